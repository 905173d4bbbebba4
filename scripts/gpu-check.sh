#!/usr/bin/env bash
# The GPU check of pdserve, in one device call.
#
#   scripts/gpu-check.sh prepare   # here: CUDA build of pdserve, NIXL/UCX libraries pruned,
#                                  # all packed into .carry/ (git-ignored, < 64 MiB)
#   scripts/gpu-check.sh remote    # on the GPU machine, from the repo copy, with .carry carried:
#                                  # kvbench --mem vram per backend, NIXL's Python API on the
#                                  # same machine, the UCX protocol that carried the bytes;
#                                  # a short table last. Results under $OUT (or /tmp/gpu-out).
#   scripts/gpu-check.sh engine    # 10 prompts: ours == transformers, disaggregated == one process (nixl, ucx, tcp)
#   scripts/gpu-check.sh bench     # pdserve bench compare at 512/2048/8192 tokens, with the plot
#                                  # (env LOCAL, INPUTS, REQUESTS, CONCURRENCY, KVBENCH (none: off), OUT)
#   scripts/gpu-check.sh leak      # 1,000 requests: VRAM, registered regions, free blocks unchanged
#   scripts/gpu-check.sh doctor    # pdserve doctor, with the UCX protocol of VRAM writes
#   scripts/gpu-check.sh twogpu    # two GPUs of one host: prefill on GPU 0, decode on GPU 1; tokens
#                                  # per backend, kvbench 0 -> 1 beside the peer copy and NIXL Python
#   scripts/gpu-check.sh prepare-model  # here (prepare runs it too): the SmolLM2 GGUF split into
#                                  # .carry-model-a/-b (one carry can't hold it and the binaries)
#   scripts/gpu-check.sh stage     # there, carrying .carry-model-a, then -b: the pieces to /tmp
#   scripts/gpu-check.sh smollm    # there, carrying .carry: import the GGUF, 24 prompts against
#                                  # transformers f32/bf16, per backend, tokens/s GPU and CPU
#   scripts/gpu-check.sh numerics  # there, carrying .carry (after stage): SmolLM2's arithmetic
#                                  # against transformers f32 layer by layer, pdserve per precision
#                                  # beside transformers bf16 (fails below it); enginebench per
#                                  # precision (and the build before, BEFORE=pdserve.xz at prepare-model)
#   scripts/gpu-check.sh prefix    # scripts/prefix-bench.sh on the 1B shape (prefix caching on/off)
#   scripts/gpu-check.sh routing   # scripts/routing-bench.sh on the 1B shape: 4 prefill-servers on
#                                  # one GPU, kv_aware vs round_robin vs least_outstanding
#   scripts/gpu-check.sh overload  # pdserve bench overload on the GPU (1B shape, nixl): 1x/2x/4x
#                                  # of capacity, DURATION s each (env DURATION, BACKEND, SHED_TTFT_MS)
#   scripts/gpu-check.sh twogpu-bench  # bench compare across the two GPUs (env PRESET=1b|8b, INPUTS, REQUESTS)
#   scripts/gpu-check.sh prefill-batch # batched prefill (1-16 prompts of 512 tokens in one pass) against
#                                  # transformers' batched forward, 1B shape
#   scripts/gpu-check.sh core      # serving core A/B (bench compare --core before,current, nixl, 1B shape):
#                                  # concurrency 1/8/32/64, Poisson rates, 8-turn chats (and without prefix caching)
#   scripts/gpu-check.sh core-budget # the current core at several max_batch_tokens:chunk_tokens (env BUDGETS)
#   scripts/gpu-check.sh roofline  # the engine against the roofline and transformers, with and without CUDA
#                                  # graphs (env PRESETS="1b 8b", PREFILL, BATCHES, HF=0 to skip transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-1MiB,16MiB,64MiB,256MiB,1GiB}
ITERS=${ITERS:-20}

prepare() {
  scripts/build-cuda.sh
  # The device's Python is 3.12: the anchor needs that wheel's bindings (same C libraries).
  local w=.deps/wheels-py312
  if ! ls $w/nixl_cu13-*-cp312-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 -d $w "${NIXL_WHEEL:-nixl-cu13==1.5.1}"
  fi
  rm -rf .carry
  python3 scripts/pack-device.py --nixl-wheel $w/nixl_cu13-*-cp312-*.whl --ucx-dir .deps/ucx \
    --bin target/release/pdserve,target/release/prefill-server,target/release/decode-server,target/release/router --out .carry
  # The device has no fonts; the bench plots need one.
  cp /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf .carry/
  prepare_model
}

remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out}
  mkdir -p $D $OUTDIR
  remote_unpack
  export PDSERVE_NIXL_LIB_DIR=$D/.nixl_cu13.mesonpy.libs PDSERVE_UCX_LIB_DIR=$D/libucx/lib RUST_BACKTRACE=0
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # Keep NVLink multicast off on shared multi-GPU hosts.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUTDIR/gpu.txt

  echo "== which UCX protocol carries a VRAM write (ucx, then nixl)"
  for b in ucx nixl; do
    UCX_PROTO_INFO=y $D/pdserve kvbench --mem vram --backend $b --sizes 16MiB --iters 2 --warmup 1 \
      > $OUTDIR/proto_raw_$b.txt 2>&1 || true
    grep -A8 -E "remote memory write by ucp_put.* from cuda" $OUTDIR/proto_raw_$b.txt | grep -E "\|" \
      | grep -vE "\+--|Range" | head -6 | tee $OUTDIR/proto_$b.txt || true
  done

  echo "== kvbench --mem vram"
  for b in nixl ucx tcp; do
    $D/pdserve kvbench --mem vram --backend $b --sizes "$SIZES" --iters $ITERS --json $OUTDIR/kvbench_$b.json \
      | tee $OUTDIR/kvbench_$b.md
  done
  echo "== kvbench --mem vram, paged: 4096 blocks of 16 KiB in one write"
  $D/pdserve kvbench --mem vram --backend nixl,ucx --sizes 64MiB --segments 4096 --iters $ITERS \
    --json $OUTDIR/kvbench_paged.json | tee $OUTDIR/kvbench_paged.md

  echo "== NIXL Python API (the anchor), same machine"
  PYTHONPATH=$D PYTHONUNBUFFERED=1 python3 .carry/nixl_anchor.py --mem vram --sizes "$SIZES" --iters $ITERS \
    --json $OUTDIR/anchor.json | tee $OUTDIR/anchor.md

  python3 scripts/compare-anchor.py $OUTDIR/anchor.json $OUTDIR/kvbench_nixl.json $OUTDIR/kvbench_ucx.json \
    $OUTDIR/kvbench_tcp.json --protocols $OUTDIR/proto_ucx.txt $OUTDIR/proto_nixl.txt | tee $OUTDIR/summary.md
}

# The engine and the daemons on the GPU: a 1B-shape synthetic Llama in bf16; for 10
# prompts, our engine in one process against transformers on the same weights, then
# router -> decode -> prefill on the one GPU with each backend against our one-process run.
engine_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b N=${PROMPTS:-10}
  gpu_env
  python3 -c "
for p in range(1, $N + 1):
    print(','.join(str(3 + (i * 7919 + p * 104729) % 120000) for i in range(40 * p)))" > $OUTDIR/prompts.txt
  python3 scripts/hf_reference.py $M --prompts-file $OUTDIR/prompts.txt --max-new-tokens 32 --json $OUTDIR/hf_tokens.json > /dev/null
  : > $OUTDIR/local.jsonl
  while read -r ids; do
    $D/pdserve generate --local --device cuda:0 --model $M --token-ids "$ids" --max-tokens 32 --ignore-eos --json >> $OUTDIR/local.jsonl
  done < $OUTDIR/prompts.txt
  for b in nixl ucx tcp; do
    : > $OUTDIR/disagg_$b.jsonl
    up_start /tmp/up-$b --device cuda:0 --backend $b --model $M --kv-cache-mib 4096
    if [ -n "$ROUTER" ]; then
      # Twice: the second pass finds each prompt's whole blocks in the prefix cache.
      : > $OUTDIR/disagg_${b}_again.jsonl
      for f in disagg_$b disagg_${b}_again; do
        while read -r ids; do
          $D/pdserve generate --router "$ROUTER" --token-ids "$ids" --max-tokens 32 --ignore-eos --json >> $OUTDIR/$f.jsonl || echo '{}' >> $OUTDIR/$f.jsonl
        done < $OUTDIR/prompts.txt
      done
    else
      echo "$b: up failed: $(tail -3 /tmp/up-$b.err)"; tail -20 /tmp/up-$b/*.log 2>/dev/null | tail -30
    fi
    up_stop
  done
  python3 - $OUTDIR <<'PY' | tee $OUTDIR/tokens.md
import json, sys
d = sys.argv[1]
hf = json.load(open(f"{d}/hf_tokens.json"))["all_tokens"]
local = [json.loads(l)["tokens"] for l in open(f"{d}/local.jsonl")]
print("| prompt | tokens in | ours == transformers | " + " | ".join(f"{b} == ours (KV ms); again, cached" for b in ("nixl", "ucx", "tcp")) + " |")
print("|---|---|---|---|---|---|")
ok = True
for i, (h, l) in enumerate(zip(hf, local)):
    cells = []
    for b in ("nixl", "ucx", "tcp"):
        rows = [json.loads(x) for x in open(f"{d}/disagg_{b}.jsonl")]
        again = [json.loads(x) for x in open(f"{d}/disagg_{b}_again.jsonl")]
        r = rows[i] if i < len(rows) else {}
        a = again[i] if i < len(again) else {}
        same, same_again = r.get("token_ids") == l, a.get("token_ids") == l
        ok &= same and same_again and a.get("cached_tokens", 0) > 0
        cells.append(f"{same} ({r.get('timings', {}).get('kv_transfer_ms', float('nan')):.3f}); {same_again}, {a.get('cached_tokens', 0)}")
    ok &= h == l
    print(f"| {i + 1} | {40 * (i + 1)} | {h == l} ({sum(x == y for x, y in zip(h, l))}/{len(h)}) | " + " | ".join(cells) + " |")
print(f"\ntoken equality: {'PASS' if ok else 'FAIL'} ({len(local)} prompts, 32 greedy tokens each)")
PY
}

# Warm figures: one deployment per backend on the one GPU, six requests with a 512-token
# prompt; the first (JIT, first-use IPC set-up) is left out of the table.
warm_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b
  [ -x $D/pdserve ] || remote_unpack
  export PDSERVE_NIXL_LIB_DIR=$D/.nixl_cu13.mesonpy.libs PDSERVE_UCX_LIB_DIR=$D/libucx/lib RUST_BACKTRACE=0
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  [ -e $M/config.json ] || $D/pdserve model synth --preset 1b --seed 0 --out $M
  : > $OUTDIR/warm.jsonl
  for b in nixl ucx tcp; do
    up_start /tmp/w-$b --device cuda:0 --backend $b --model $M --kv-cache-mib 8192
    for i in 1 2 3 4 5 6; do
      ids=$(python3 -c "print(','.join(str(3 + (j * 7919 + $i * 31) % 120000) for j in range(512)))")
      $D/pdserve generate --router "$ROUTER" --token-ids "$ids" --max-tokens 16 --ignore-eos --json \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['backend']='$b'; r['i']=$i; r.pop('token_ids'); r.pop('text'); print(json.dumps(r))" >> $OUTDIR/warm.jsonl
    done
    up_stop
  done
  python3 - $OUTDIR/warm.jsonl <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| backend | prompt tokens | KV bytes | prefill ms | KV transfer ms | transfer GB/s | first token ms | mean ITL ms | transfer share of TTFT |")
print("|---|---|---|---|---|---|---|---|---|")
for b in ("nixl", "ucx", "tcp"):
    w = [r for r in rows if r["backend"] == b and r["i"] > 1]
    if not w:
        print(f"| {b} | failed |"); continue
    med = lambda k: statistics.median(r["timings"][k] for r in w)
    kv = w[0]["timings"]["kv_bytes"]
    print(f"| {b} | {w[0]['prompt_tokens']} | {kv} | {med('prefill_ms'):.1f} | {med('kv_transfer_ms'):.3f} | {kv / med('kv_transfer_ms') / 1e6:.1f} | {med('first_token_ms'):.1f} | {med('mean_inter_token_ms'):.2f} | {100 * med('kv_transfer_ms') / med('first_token_ms'):.1f}% |")
PY
}

# The engine alone against transformers on the same 1B-shape weights and GPU.
speed_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b
  gpu_env
  echo "== fused kernels against candle's ops (logits, greedy tokens)"
  $D/pdserve enginebench --model $M --device cuda:0 --check --kv-cache-mib 4096 | tee $OUTDIR/kernels_check.md
  python3 scripts/hf_reference.py $M --bench --json $OUTDIR/hf_bench.json > /dev/null
  for k in reference auto; do
    $D/pdserve enginebench --model $M --device cuda:0 --kernels $k --json $OUTDIR/enginebench_$k.json > /dev/null
    echo "== decode at 2048-token contexts, kernels $k"
    $D/pdserve enginebench --model $M --device cuda:0 --kernels $k --prefill 16 --context 2048 \
      --json $OUTDIR/enginebench_long_$k.json | tee $OUTDIR/enginebench_long_$k.md
  done
  python3 - $OUTDIR <<'PY' | tee $OUTDIR/speed.md
import json, sys
eb_rows = lambda p: (lambda j: j["rows"] if isinstance(j, dict) else j)(json.load(open(p)))  # enginebench JSON, old and new
d = sys.argv[1]
hf = json.load(open(f"{d}/hf_bench.json"))["bench"]
ref = {r["what"]: r for r in eb_rows(f"{d}/enginebench_reference.json")}
fused = {r["what"]: r for r in eb_rows(f"{d}/enginebench_auto.json")}
keys = {"prefill 512 tokens": "prefill_512", "prefill 2048 tokens": "prefill_2048",
        "decode batch 1": "decode_b1", "decode batch 8": "decode_b8", "decode batch 32": "decode_b32"}
print("| measurement | candle ops tok/s | fused kernels tok/s (ms) | transformers tok/s | fused / transformers |")
print("|---|---|---|---|---|")
for what, f in fused.items():
    h = hf.get(keys.get(what, "") + "_tok_s", float("nan"))
    print(f"| {what} | {ref[what]['tokens_per_s']:,.0f} | {f['tokens_per_s']:,.0f} ({f['ms']:.2f}) | {h:,.0f} | {f['tokens_per_s'] / h:.2f} |")
PY
}

# The compare table on the GPU: colocated and disaggregated (nixl, ucx, tcp), one
# deployment at a time on the one GPU, a 1B-shape Llama in bf16, prompts of 512, 2048
# and 8192 tokens; latency against load from the concurrency sweep.
bench_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b kv="--kvbench ${KVBENCH:-nixl,ucx,tcp}"
  [ "${KVBENCH:-}" = none ] && kv=--no-kvbench
  gpu_env
  $D/pdserve bench compare --local "${LOCAL:-colocated,nixl,ucx,tcp}" --device cuda:0 --model $M --kv-cache-mib 8192 \
    --input-len "${INPUTS:-512,2048,8192}" --output-len "${OUTPUT_LEN:-64}" --requests "${REQUESTS:-8}" \
    --concurrency "${CONCURRENCY:-1,4}" --vocab 120000 --quiet $kv \
    --json $OUTDIR/compare.json --plot $OUTDIR/compare.svg | tee $OUTDIR/compare.md
  gzip -f $OUTDIR/compare.json
}

# Batched prefill on the 1B shape: B prompts of 512 tokens in one forward pass, ours
# (prefill_batch_pick, varlen attention) against transformers' forward over a [B, 512] batch.
prefill_batch_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b B=${BATCHES:-1,2,4,8,16}
  gpu_env
  $D/pdserve enginebench --model $M --device cuda:0 --prefill 512 --batch 1 --steps 8 --prefill-batch $B \
    --prefill-batch-len 512 --kv-cache-mib 8192 --json $OUTDIR/prefill_batch.json > /dev/null
  python3 scripts/hf_reference.py $M --prefill-batches $B --prefill-len 512 --json $OUTDIR/hf_prefill_batch.json > /dev/null
  python3 - $OUTDIR <<'PY' | tee $OUTDIR/prefill_batch.md
import json, sys
eb_rows = lambda p: (lambda j: j["rows"] if isinstance(j, dict) else j)(json.load(open(p)))  # enginebench JSON, old and new
d = sys.argv[1]
ours = {r["what"]: r for r in eb_rows(f"{d}/prefill_batch.json")}
hf = json.load(open(f"{d}/hf_prefill_batch.json"))["prefill_batches"]
print("| prompts x 512 tokens in one pass | pdserve tok/s (ms) | transformers tok/s | pdserve / transformers |")
print("|---|---|---|---|")
for k, v in hf.items():
    b = int(k.split("_")[1][1:])
    o = ours[f"prefill batch {b} x 512 tokens"]
    print(f"| {b} | {o['tokens_per_s']:,.0f} ({o['ms']:.1f}) | {v:,.0f} | {o['tokens_per_s'] / v:.2f} |")
PY
}

# The serving core before and after batched prefill, on-demand KV blocks and the decode
# side's prefix cache, one deployment at a time (nixl, one prefill-server and one
# decode-server on the one GPU, 1B shape): closed loops at 1/8/32/64, Poisson rates,
# 8-turn chats; the chats again with prefix caching off everywhere.
core_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b
  gpu_env
  local common="--local nixl --device cuda:0 --model $M --kv-cache-mib ${KV_MIB:-8192} --vocab 120000 --quiet --no-kvbench"
  $D/pdserve bench compare $common --core before,current --input-len ${INPUT:-512} --output-len ${OUTPUT_LEN:-128} \
    --requests ${REQUESTS:-128} --concurrency ${CONCURRENCY:-1,8,32,64} --slo-ttft-ms 500 --slo-tpot-ms 50 \
    --json $OUTDIR/core_closed.json | tee $OUTDIR/core_closed.md || true
  $D/pdserve bench compare $common --core before,current --input-len ${INPUT:-512} --output-len ${OUTPUT_LEN:-128} \
    --requests ${REQUESTS:-128} --rate ${RATES:-20,60} --slo-ttft-ms 500 --slo-tpot-ms 50 \
    --json $OUTDIR/core_poisson.json | tee $OUTDIR/core_poisson.md || true
  $D/pdserve bench compare $common --core before,current --multi-turn 8 --input-len 256 --output-len 64 \
    --requests 64 --concurrency 8 --json $OUTDIR/core_chats.json | tee $OUTDIR/core_chats.md || true
  $D/pdserve bench compare $common --core current --no-prefix-caching --multi-turn 8 --input-len 256 --output-len 64 \
    --requests 64 --concurrency 8 --json $OUTDIR/core_chats_nocache.json | tee $OUTDIR/core_chats_nocache.md || true
  gzip -f $OUTDIR/core_*.json
}

# The current core's prefill budget (max_batch_tokens:chunk_tokens pairs in BUDGETS) on
# core's closed loops.
core_budget_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b
  gpu_env
  for b in ${BUDGETS:-2048:512 1024:512 4096:1024}; do
    $D/pdserve bench compare --local nixl --device cuda:0 --model $M --kv-cache-mib ${KV_MIB:-8192} --vocab 120000 \
      --quiet --no-kvbench --core current --max-batch-tokens ${b%%:*} --chunk-tokens ${b##*:} --input-len ${INPUT:-512} \
      --output-len ${OUTPUT_LEN:-64} --requests ${REQUESTS:-128} --concurrency ${CONCURRENCY:-8,32,64} \
      --slo-ttft-ms 500 --slo-tpot-ms 50 --json $OUTDIR/budget_${b/:/_}.json | sed "s/current core/current core, budget $b/" \
      | tee $OUTDIR/budget_${b/:/_}.md || true
  done
  gzip -f $OUTDIR/budget_*.json
}

# The engine against the hardware's limits and transformers, same weights, one call: for
# each preset in PRESETS (1b, 8b), the fused path's check against candle's ops (1b),
# enginebench with CUDA graphs (the default) and without, and transformers' bench; the
# table gives tokens/s, the share of the roofline (decode: HBM bandwidth, prefill:
# tensor-core peak) and the ratio to transformers.
roofline_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} rc=0 P M
  local prefill=${PREFILL:-512,2048,8192} batches=${BATCHES:-1,8,32,64}
  gpu_env
  for P in ${PRESETS:-1b}; do
    M=/tmp/m$P
    [ -e $M/config.json ] || $D/pdserve model synth --preset $P --seed 0 --out $M > /dev/null
    if [ $P = 1b ]; then
      $D/pdserve enginebench --model $M --device cuda:0 --check --kv-cache-mib 4096 > $OUTDIR/check_$P.md || rc=1
      tail -1 $OUTDIR/check_$P.md
    fi
    for g in 128 0; do
      $D/pdserve enginebench --model $M --device cuda:0 --prefill $prefill --batch $batches --cuda-graph-max-batch $g \
        --kv-cache-mib 8192 --json $OUTDIR/roofline_${P}_g$g.json > $OUTDIR/roofline_${P}_g$g.md || rc=1
    done
    if [ "${HF:-1}" = 1 ]; then
      python3 scripts/hf_reference.py $M --bench --bench-prefill $prefill --bench-batches $batches \
        --json $OUTDIR/hf_$P.json > /dev/null || rc=1
    fi
  done
  python3 - $OUTDIR ${PRESETS:-1b} <<'PY' | tee $OUTDIR/roofline.md
import json, os, sys
d, presets = sys.argv[1], sys.argv[2:]
for p in presets:
    def load(name):
        f = f"{d}/{name}.json"
        return json.load(open(f)) if os.path.exists(f) else None
    g, e, hf = load(f"roofline_{p}_g128"), load(f"roofline_{p}_g0"), load(f"hf_{p}")
    if not g:
        print(f"{p}: no enginebench result"); continue
    lim = g["limits"] or {}
    print(f"\n{p} shape, bf16, {lim.get('gpu', '?')} ({lim.get('hbm_gbps', '?')} GB/s, {lim.get('peak_tflops', '?')} TFLOP/s)")
    print("| measurement | pdserve tok/s (ms) | of roofline | without CUDA graphs tok/s (ms) | transformers tok/s | pdserve / transformers |")
    print("|---|---|---|---|---|---|")
    eager = {r["what"]: r for r in (e or {"rows": []})["rows"]}
    hb = (hf or {}).get("bench", {})
    for r in g["rows"]:
        w = r["what"].split()
        key = f"prefill_{w[1]}_tok_s" if w[0] == "prefill" else f"decode_b{w[2]}_tok_s"
        h = hb.get(key)
        x = eager.get(r["what"])
        roof = f"{100 * r['roofline']:.1f}%" if r.get("roofline") is not None else "n/a"
        print(f"| {r['what']} | {r['tokens_per_s']:,.0f} ({r['ms']:.2f}) | {roof} | "
              + (f"{x['tokens_per_s']:,.0f} ({x['ms']:.2f})" if x else "n/a") + " | "
              + (f"{h:,.0f} | {r['tokens_per_s'] / h:.2f}x" if h else "n/a | n/a") + " |")
PY
  return $rc
}

# 1,000 requests through one deployment on the GPU: VRAM per process, registered regions
# and free KV blocks must be the same before and after.
leak_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b b=${BACKEND:-nixl}
  gpu_env
  up_start /tmp/leak --device cuda:0 --backend $b --model $M --kv-cache-mib 4096 --metrics-port 19400
  local router=$ROUTER
  snap() { # <name>
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | sort > $OUTDIR/leak_vram_$1.txt
    for p in 19401 19402; do curl -s localhost:$p/metrics; done \
      | grep -E "^pdserve_(kv_registered_regions|kv_blocks_free|kv_blocks_total|requests_total)" | sort > $OUTDIR/leak_metrics_$1.txt
  }
  # Warm up with the same load first: the CUDA memory pools and cuBLAS workspaces grow
  # to their high-water mark. Then two rounds: a leak grows with every round.
  $D/pdserve bench --router "$router" --requests 300 --input-len 16:600 --output-len 1:16 --concurrency 16 --vocab 120000 --seed 1 --quiet > /dev/null
  snap warm
  for round in 1 2; do
    $D/pdserve bench --router "$router" --requests ${LEAK_REQUESTS:-1000} --input-len 16:600 --output-len 1:16 \
      --concurrency 16 --vocab 120000 --seed $((round + 1)) --quiet --json $OUTDIR/leak_bench_$round.json | tee $OUTDIR/leak_bench_$round.md
    sleep 1; snap round$round
  done
  echo "== the router's early prefills on the prefill-server, by outcome" | tee $OUTDIR/leak_early.txt
  curl -s localhost:19402/metrics | grep -E "^pdserve_early_prefills_total" | tee -a $OUTDIR/leak_early.txt
  up_stop
  gzip -f $OUTDIR/leak_bench_*.json
  echo "== VRAM per process (pid, used): after warm-up | after round 1 | after round 2" | tee $OUTDIR/leak_summary.txt
  paste $OUTDIR/leak_vram_warm.txt $OUTDIR/leak_vram_round1.txt $OUTDIR/leak_vram_round2.txt | tee -a $OUTDIR/leak_summary.txt
  echo "== KV metrics after round 2 (requests_total grows; the rest must equal the warm-up's)" | tee -a $OUTDIR/leak_summary.txt
  grep -v requests_total $OUTDIR/leak_metrics_round2.txt | tee -a $OUTDIR/leak_summary.txt
  if cmp -s $OUTDIR/leak_vram_round1.txt $OUTDIR/leak_vram_round2.txt \
     && diff <(grep -v requests_total $OUTDIR/leak_metrics_warm.txt) <(grep -v requests_total $OUTDIR/leak_metrics_round2.txt) >/dev/null; then
    echo "leak check: PASS (VRAM unchanged from round 1 to round 2 of ${LEAK_REQUESTS:-1000} requests; regions and free blocks as after warm-up)" | tee -a $OUTDIR/leak_summary.txt
  else
    echo "leak check: FAIL" | tee -a $OUTDIR/leak_summary.txt
  fi
}

# pdserve doctor on the GPU machine: which protocol carries VRAM-to-VRAM writes.
doctor_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out}
  gpu_env
  $D/pdserve doctor | tee $OUTDIR/doctor.txt
  $D/pdserve doctor --json > $OUTDIR/doctor.json
}

# Two GPUs of one host: prefill-server on GPU 0, decode-server on GPU 1, KV over
# NVLink/PCIe peer access (CUDA IPC); tokens against the one-process run, per backend;
# kvbench GPU 0 -> GPU 1 with the protocol UCX chose; doctor.
twogpu_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/m1b N=${PROMPTS:-6}
  gpu_env
  nvidia-smi topo -m | tee $OUTDIR/topo.txt
  $D/pdserve doctor --backend nixl,ucx | tee $OUTDIR/doctor.txt
  : > $OUTDIR/twogpu_local.jsonl
  for p in $(seq 1 $N); do
    ids=$(python3 -c "print(','.join(str(3 + (i * 7919 + $p * 104729) % 120000) for i in range(100 * $p)))")
    echo "$ids" >> $OUTDIR/twogpu_prompts.txt
    $D/pdserve generate --local --device cuda:1 --model $M --token-ids "$ids" --max-tokens 32 --ignore-eos --json >> $OUTDIR/twogpu_local.jsonl
  done
  for b in nixl ucx tcp; do
    : > $OUTDIR/twogpu_$b.jsonl
    up_start /tmp/two-$b --device cuda:1 --prefill-device cuda:0 --backend $b --model $M --kv-cache-mib 4096
    while read -r ids; do
      $D/pdserve generate --router "$ROUTER" --token-ids "$ids" --max-tokens 32 --ignore-eos --json >> $OUTDIR/twogpu_$b.jsonl || echo '{}' >> $OUTDIR/twogpu_$b.jsonl
    done < $OUTDIR/twogpu_prompts.txt
    up_stop
  done
  echo "== kvbench GPU 0 -> GPU 1, beside the peer-copy limit and NIXL's Python API"
  local S=${SIZES:-1MiB,16MiB,64MiB,256MiB,1GiB}
  python3 scripts/p2p_limit.py --sizes "$S" --json $OUTDIR/p2p_limit.json > $OUTDIR/p2p_limit.md
  UCX_PROTO_INFO=y $D/pdserve kvbench --mem vram --device 0 --target-device 1 --backend nixl,ucx,tcp --sizes "$S" \
    --iters $ITERS --json $OUTDIR/twogpu_kvbench.json > $OUTDIR/twogpu_kvbench_raw.txt 2>&1 || true
  grep -A6 "ucp_put\* from cuda" $OUTDIR/twogpu_kvbench_raw.txt | grep -E "\.\.|from cuda" | head -6 > $OUTDIR/twogpu_proto.txt || true
  PYTHONPATH=$D PYTHONUNBUFFERED=1 python3 scripts/nixl_anchor_2gpu.py .carry/nixl_anchor.py --mem vram --sizes "$S" \
    --iters $ITERS --json $OUTDIR/twogpu_anchor.json > $OUTDIR/twogpu_anchor.md 2>&1 || true
  python3 scripts/compare-anchor.py $OUTDIR/twogpu_anchor.json $OUTDIR/twogpu_kvbench.json --limit $OUTDIR/p2p_limit.json \
    --protocols $OUTDIR/twogpu_proto.txt | tee $OUTDIR/twogpu_kvbench.md
  python3 - $OUTDIR <<'PY' | tee $OUTDIR/twogpu_tokens.md
import json, sys
d = sys.argv[1]
local = [json.loads(l)["tokens"] for l in open(f"{d}/twogpu_local.jsonl")]
ok = True
print("| prompt | tokens in | nixl == one process (KV ms) | ucx | tcp |\n|---|---|---|---|---|")
for i, l in enumerate(local):
    cells = []
    for b in ("nixl", "ucx", "tcp"):
        rows = [json.loads(x) for x in open(f"{d}/twogpu_{b}.jsonl")]
        r = rows[i] if i < len(rows) else {}
        same = r.get("token_ids") == l
        ok &= same
        cells.append(f"{same} ({r.get('timings', {}).get('kv_transfer_ms', float('nan')):.3f})")
    print(f"| {i + 1} | {100 * (i + 1)} | " + " | ".join(cells) + " |")
print(f"\ntwo GPUs, prefill on GPU 0, decode on GPU 1: token equality {'PASS' if ok else 'FAIL'}")
PY
}

# The real model (SmolLM2-135M-Instruct, 98 MB of GGUF) travels in two pieces, each
# in its own device call, since one carry holds 64 MiB.
prepare_model() {
  local g=.deps/models/cache/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f $g ] || scripts/models.sh target/debug/pdserve
  rm -rf .carry-model-a .carry-model-b && mkdir -p .carry-model-a .carry-model-b
  split -b 50M -d $g .carry-model-a/gguf.part-
  mv .carry-model-a/gguf.part-01 .carry-model-b/
  if [ -n "${BEFORE:-}" ]; then cp "$BEFORE" .carry-model-b/pdserve-before.xz; fi
  sha256sum $g | cut -d' ' -f1 > .carry/smollm2.sha256
}

stage_remote() {
  mkdir -p /tmp/pdserve-model
  cp .carry-model-*/gguf.part-* /tmp/pdserve-model/
  # An earlier build to compare with, if one rides along (BEFORE=FILE.xz at prepare-model).
  cp .carry-model-*/pdserve-before.xz /tmp/pdserve-model/ 2>/dev/null || true
  ls -la /tmp/pdserve-model
}

# The staged GGUF checked and imported to /tmp/smollm2 (once per warm machine).
smollm_import() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} S=/tmp/pdserve-model M=/tmp/smollm2
  [ -e $M/config.json ] && return 0
  cat $S/gguf.part-* > $S/model.gguf
  echo "$(cat .carry/smollm2.sha256)  $S/model.gguf" | sha256sum -c
  local t0; t0=$(date +%s%N)
  rm -rf $M.tmp
  $D/pdserve model import $S/model.gguf --out $M.tmp
  rm -rf $M
  mv $M.tmp $M
  echo "import: $(( ($(date +%s%N) - t0) / 1000000 )) ms, $(du -sm $M | cut -f1) MiB" | tee $OUTDIR/import.txt
}

smollm_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/smollm2
  gpu_env
  smollm_import
  PYTHONUNBUFFERED=1 python3 scripts/real_model_gpu.py --pdserve $D/pdserve --model $M --out $OUTDIR | tee $OUTDIR/real_model.md
  echo "== SmolLM2 tokens/s: GPU bf16, GPU f32, transformers bf16, the host's CPU f32"
  $D/pdserve enginebench --model $M --device cuda:0 --dtype bf16 --kv-cache-mib 4096 --json $OUTDIR/smollm_gpu_bf16.json | tee $OUTDIR/smollm_gpu_bf16.md
  $D/pdserve enginebench --model $M --device cuda:0 --dtype f32 --kv-cache-mib 4096 --json $OUTDIR/smollm_gpu_f32.json | tee $OUTDIR/smollm_gpu_f32.md
  python3 scripts/hf_reference.py $M --bench --json $OUTDIR/smollm_hf_bench.json | tail -1
  $D/pdserve enginebench --model $M --device cpu --prefill 128 --batch 1,8 --steps 16 --kv-cache-mib 512 \
    --json $OUTDIR/smollm_cpu.json | tee $OUTDIR/smollm_cpu.md
  echo "host CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
}

# The GPU's arithmetic on the real model: pdserve's variants against transformers f32
# (and transformers bf16 as the bar), layer by layer; then the engine's speed per
# precision on the 1B shape, beside the build before (staged with the model, if
# given) and the fused kernels' check against candle's ops.
numerics_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out} M=/tmp/smollm2 B=/tmp/m1b
  gpu_env
  smollm_import
  local before=() runs=("f32|$D/pdserve|--precision f32" "model|$D/pdserve|--precision model") name bin args
  if [ -f /tmp/pdserve-model/pdserve-before.xz ]; then
    xz -dc /tmp/pdserve-model/pdserve-before.xz > $D/pdserve-before && chmod +x $D/pdserve-before
    before=(--variant "build before, bf16=$D/pdserve-before:--dtype bf16")
    runs+=("before|$D/pdserve-before|")
  fi
  local rc=0
  PYTHONUNBUFFERED=1 python3 scripts/numerics_gpu.py --model $M --out $OUTDIR/numerics --tokens ${TOKENS:-32} \
    --variant "pdserve bf16=$D/pdserve:--dtype bf16 --precision f32" \
    --variant "pdserve bf16, precision model=$D/pdserve:--dtype bf16 --precision model" \
    --variant "pdserve bf16, candle ops=$D/pdserve:--dtype bf16 --kernels reference" \
    --variant "pdserve f32=$D/pdserve:--dtype f32" "${before[@]}" | tee $OUTDIR/numerics.md || rc=$?
  rm -rf $OUTDIR/numerics/*/  # the raw dumps are too big to bring back
  # The fused kernels as they ship (precision f32) against candle's ops. Not with
  # precision model: both sides' logits are then bf16, where near-equal tokens tie and
  # a reduction order decides (seen: one greedy token of 56 differed on the 1B shape).
  $D/pdserve enginebench --model $B --device cuda:0 --check --kv-cache-mib 4096 \
    | tail -4 | tee $OUTDIR/kernels_check.md || rc=$?
  for r in "${runs[@]}"; do
    IFS='|' read -r name bin args <<< "$r"
    # shellcheck disable=SC2086
    $bin enginebench --model $B --device cuda:0 --prefill 512,2048,8192 --batch 1,8,32,64 $args \
      --json $OUTDIR/enginebench_$name.json > /dev/null
  done
  python3 - $OUTDIR "${runs[@]%%|*}" <<'PY' | tee $OUTDIR/enginebench.md
import json, sys
eb_rows = lambda p: (lambda j: j["rows"] if isinstance(j, dict) else j)(json.load(open(p)))  # enginebench JSON, old and new
d, names = sys.argv[1], sys.argv[2:]
runs = {n: {r["what"]: r for r in eb_rows(f"{d}/enginebench_{n}.json")} for n in names}
print("\n1B shape, bf16, tokens/s (ms): " + ", ".join(names))
print("| measurement | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
for what in runs[names[0]]:
    cells = [runs[n].get(what) for n in names]
    print(f"| {what} | " + " | ".join(f"{c['tokens_per_s']:,.0f} ({c['ms']:.2f})" if c else "n/a" for c in cells) + " |")
PY
  return $rc  # the numerics gate (the bench only reports)
}

# Starts `pdserve up --workdir WORKDIR ARGS...` in the background and waits until it
# prints the router's URL (or exits): sets UP (its pid) and ROUTER (empty on failure);
# its stderr goes to WORKDIR.err. up_stop ends it.
up_start() { # <workdir> <pdserve up arguments...>
  local w=$1; shift
  rm -rf "$w"; ${PDSERVE:-/tmp/pdserve-gpu/pdserve} up --workdir "$w" "$@" > "$w.url" 2> "$w.err" &
  UP=$!
  for _ in $(seq 1 600); do [ -s "$w.url" ] && break; kill -0 $UP 2>/dev/null || break; sleep 0.2; done
  ROUTER=$(head -1 "$w.url" 2>/dev/null || true)
}
up_stop() { kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null || true; }

gpu_env() {
  local D=/tmp/pdserve-gpu M=/tmp/m1b
  [ -x $D/pdserve ] || remote_unpack
  export PDSERVE_NIXL_LIB_DIR=$D/.nixl_cu13.mesonpy.libs PDSERVE_UCX_LIB_DIR=$D/libucx/lib RUST_BACKTRACE=0
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PDSERVE_PLOT_FONT=$PWD/.carry/DejaVuSans.ttf
  mkdir -p ${OUT:-/tmp/gpu-out}
  [ -e $M/config.json ] || $D/pdserve model synth --preset 1b --seed 0 --out $M
}

remote_unpack() {
  local D=/tmp/pdserve-gpu
  mkdir -p $D
  tar xf .carry/nixl.tar.xz -C $D
  tar xf .carry/ucx.tar.xz -C $D
  for b in pdserve prefill-server decode-server router; do xz -dc .carry/$b.xz > $D/$b && chmod +x $D/$b; done
}

case "${1:-}" in
  prepare) prepare ;;
  prepare-model) prepare_model ;;
  stage) stage_remote ;;
  smollm) smollm_remote ;;
  numerics) numerics_remote ;;
  prefix)
    # Prefix caching A/B on the 1B shape: shared prefixes of 2048 tokens, 4-turn chats.
    gpu_env
    BIN=/tmp/pdserve-gpu MODEL=/tmp/m1b SHARED=${SHARED:-8:2048} REQUESTS=${REQUESTS:-64} BACKEND=${BACKEND:-nixl} \
      OUT=${OUT:-/tmp/gpu-out}/prefix UP_ARGS="--device cuda:0 --kv-cache-mib 8192" scripts/prefix-bench.sh ;;
  routing)
    # KV-aware routing A/B/C on the 1B shape: PREFILL prefill-servers and a decode-server
    # sharing one GPU; 8-turn chats and shared prefixes of 1024 tokens.
    gpu_env
    BIN=/tmp/pdserve-gpu MODEL=/tmp/m1b PREFILL=${PREFILL:-4} TURNS=${TURNS:-8} CONCURRENCY=${CONCURRENCY:-5} \
      REQUESTS=${REQUESTS:-120} SHARED=${SHARED:-8:1024} BACKEND=${BACKEND:-nixl} OUT=${OUT:-/tmp/gpu-out}/routing \
      PLACEMENT="--device cuda:0 --kv-cache-mib 3072" scripts/routing-bench.sh ;;
  remote) remote ;;
  engine) engine_remote ;;
  warm) warm_remote ;;
  speed) speed_remote ;;
  bench) bench_remote ;;
  leak) leak_remote ;;
  doctor) doctor_remote ;;
  twogpu) twogpu_remote ;;
  overload)
    gpu_env
    BIN=/tmp/pdserve-gpu MODEL=/tmp/m1b BACKEND=${BACKEND:-nixl} DURATION=${DURATION:-20} OUT=${OUT:-/tmp/gpu-out}/overload \
      UP_ARGS="--device cuda:0 --kv-cache-mib 4096" scripts/overload-bench.sh --input-len 512 --output-len 32 \
      --vocab 120000 --requests 200 --capacity-concurrency 16 || true
    tail -8 ${OUT:-/tmp/gpu-out}/overload/overload.md ;;
  prefill-batch) prefill_batch_remote ;;
  core) core_remote ;;
  core-budget) core_budget_remote ;;
  roofline) roofline_remote ;;
  twogpu-bench)
    # PRESET=1b|8b: the synthetic Llama shape; colocated runs on GPU 1 alone.
    gpu_env; P=${PRESET:-1b}
    [ -e /tmp/m$P/config.json ] || /tmp/pdserve-gpu/pdserve model synth --preset $P --seed 0 --out /tmp/m$P
    /tmp/pdserve-gpu/pdserve bench compare --local colocated,nixl,ucx,tcp --device cuda:1 --prefill-device cuda:0 \
      --model /tmp/m$P --kv-cache-mib 8192 --input-len "${INPUTS:-512,2048,8192}" --output-len 64 --requests "${REQUESTS:-6}" \
      --concurrency 1 --vocab 120000 --quiet --no-kvbench --json ${OUT:-/tmp/gpu-out}/twogpu_$P.json | tee ${OUT:-/tmp/gpu-out}/twogpu_compare_$P.md ;;
  *) echo "usage: $0 prepare|prepare-model|stage|smollm|numerics|prefix|routing|remote|engine|warm|speed|bench|leak|doctor|twogpu|twogpu-bench|overload|prefill-batch|core|core-budget|roofline" >&2; exit 2 ;;
esac
