#!/usr/bin/env bash
# The GPU check of pdserve, in one device call.
#
#   scripts/gpu-check.sh prepare   # here: CUDA build of pdserve, NIXL/UCX libraries pruned,
#                                  # all packed into .carry/ (git-ignored, < 64 MiB)
#   scripts/gpu-check.sh remote    # on the GPU machine, from the repo copy, with .carry carried:
#                                  # kvbench --mem vram per backend, NIXL's Python API on the
#                                  # same machine, the UCX protocol that carried the bytes;
#                                  # a short table last. Results under $OUT (or /tmp/gpu-out).
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

# The engine and the daemons on the GPU: a 1B-shape synthetic Llama in bf16, our engine
# against transformers on the same weights, then router -> decode -> prefill on the one
# GPU with each backend against our colocated run.
engine_remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out}
  [ -x $D/pdserve ] || remote_unpack
  export PDSERVE_NIXL_LIB_DIR=$D/.nixl_cu13.mesonpy.libs PDSERVE_UCX_LIB_DIR=$D/libucx/lib RUST_BACKTRACE=0
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  local M=/tmp/m1b
  [ -e $M/config.json ] || $D/pdserve model synth --preset 1b --seed 0 --out $M
  local rows=$OUTDIR/engine_rows.txt; : > $rows
  for p in 1 2 3; do
    ids=$(python3 -c "print(','.join(str(3 + (i * 7919 + $p * 104729) % 120000) for i in range(40 * $p)))")
    $D/pdserve generate --local --device cuda:0 --model $M --token-ids "$ids" --max-tokens 32 --ignore-eos --json > $OUTDIR/local_$p.json
    python3 scripts/hf_reference.py $M --prompt-ids "$ids" --max-new-tokens 32 --json $OUTDIR/hf_$p.json > /dev/null
    echo "prompt$p $(python3 -c "import json;a=json.load(open('$OUTDIR/local_$p.json'))['tokens'];b=json.load(open('$OUTDIR/hf_$p.json'))['tokens'];print('ours==transformers', a==b, sum(x==y for x,y in zip(a,b)), '/', len(b))")" | tee -a $rows
    for b in nixl ucx tcp; do
      rm -rf /tmp/up-$b; $D/pdserve up --device cuda:0 --backend $b --model $M --kv-cache-mib 4096 --workdir /tmp/up-$b > /tmp/up-$b.url 2>/tmp/up-$b.err &
      local up=$!
      for _ in $(seq 1 600); do [ -s /tmp/up-$b.url ] && break; kill -0 $up 2>/dev/null || break; sleep 0.2; done
      if [ -s /tmp/up-$b.url ]; then
        $D/pdserve generate --router "$(head -1 /tmp/up-$b.url)" --token-ids "$ids" --max-tokens 32 --ignore-eos --json > $OUTDIR/disagg_${b}_$p.json || true
        echo "prompt$p $b $(python3 -c "import json;a=json.load(open('$OUTDIR/local_$p.json'))['tokens'];r=json.load(open('$OUTDIR/disagg_${b}_$p.json'));print('disagg==colocated', r['token_ids']==a, 'kv_ms', round(r['timings']['kv_transfer_ms'],3), 'kv_bytes', r['timings']['kv_bytes'], 'prefill_ms', round(r['timings']['prefill_ms'],1))")" | tee -a $rows
      else
        echo "prompt$p $b up failed: $(tail -3 /tmp/up-$b.err)" | tee -a $rows
        tail -20 /tmp/up-$b/*.log 2>/dev/null | tail -30
      fi
      kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true
    done
  done
  python3 scripts/hf_reference.py $M --bench --json $OUTDIR/hf_bench.json > /dev/null || true
  echo "== summary"; cat $rows; cat $OUTDIR/hf_bench.json 2>/dev/null; echo
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
    rm -rf /tmp/w-$b; $D/pdserve up --device cuda:0 --backend $b --model $M --kv-cache-mib 8192 --workdir /tmp/w-$b > /tmp/w-$b.url 2>/tmp/w-$b.err &
    local up=$!
    for _ in $(seq 1 600); do [ -s /tmp/w-$b.url ] && break; kill -0 $up 2>/dev/null || break; sleep 0.2; done
    for i in 1 2 3 4 5 6; do
      ids=$(python3 -c "print(','.join(str(3 + (j * 7919 + $i * 31) % 120000) for j in range(512)))")
      $D/pdserve generate --router "$(head -1 /tmp/w-$b.url)" --token-ids "$ids" --max-tokens 16 --ignore-eos --json \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['backend']='$b'; r['i']=$i; r.pop('token_ids'); r.pop('text'); print(json.dumps(r))" >> $OUTDIR/warm.jsonl
    done
    kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true
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
  [ -x $D/pdserve ] || remote_unpack
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  [ -e $M/config.json ] || $D/pdserve model synth --preset 1b --seed 0 --out $M
  python3 scripts/hf_reference.py $M --bench --json $OUTDIR/hf_bench.json > /dev/null
  $D/pdserve enginebench --model $M --device cuda:0 --json $OUTDIR/enginebench.json
  echo "transformers: $(cat $OUTDIR/hf_bench.json)"
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
  remote) remote ;;
  engine) engine_remote ;;
  warm) warm_remote ;;
  speed) speed_remote ;;
  *) echo "usage: $0 prepare|remote|engine|warm|speed" >&2; exit 2 ;;
esac
