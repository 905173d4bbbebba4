#!/usr/bin/env bash
# Prefix caching, A/B in one run: `pdserve up` with prefix caching, then with
# `--no-prefix-caching`, each loaded by `pdserve bench` with a shared-prefix workload
# (GROUPS:LEN prefixes, each request one of them and its own question) and a multi-turn
# workload (each turn extends the last). A table of hit rate, prompt tokens computed,
# TTFT and throughput in $OUT/prefix.md; every figure in $OUT/*.json.
#   OUT=docs/results/mine scripts/prefix-bench.sh
# MODEL (default: a synthetic `small` Llama, 4 layers, made in the work dir), SHARED
# (4:384), REQUESTS (48), CONCURRENCY (4), UP_ARGS (more `pdserve up` arguments),
# BACKEND (tcp), BIN (target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/prefix-bench}
BIN=${BIN:-target/debug}
mkdir -p "$OUT"
work=$(mktemp -d)
up=
trap '[ -n "$up" ] && { kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true; }; rm -rf "$work"' EXIT
model=${MODEL:-$work/model-small}
[ -n "${MODEL:-}" ] || "$BIN/pdserve" model synth --preset small --seed 0 --out "$model" > /dev/null
common=(--requests "${REQUESTS:-48}" --concurrency "${CONCURRENCY:-4}" --output-len 16 --vocab 2000 --quiet)
for mode in on off; do
  flag=(); [ $mode = off ] && flag=(--no-prefix-caching)
  # shellcheck disable=SC2086
  "$BIN/pdserve" up --backend "${BACKEND:-tcp}" --model "$model" "${flag[@]}" ${UP_ARGS:-} \
    --workdir "$work/up-$mode" > "$work/router-$mode" 2> "$OUT/up-$mode.log" &
  up=$!
  for _ in $(seq 1 600); do [ -s "$work/router-$mode" ] && break; kill -0 $up 2>/dev/null || exit 1; sleep 0.1; done
  router=$(head -1 "$work/router-$mode")
  "$BIN/pdserve" bench --router "$router" --shared-prefix "${SHARED:-4:384}" --input-len 32 "${common[@]}" \
    --json "$OUT/shared_$mode.json" > /dev/null
  "$BIN/pdserve" bench --router "$router" --multi-turn 4 --input-len 96 "${common[@]}" \
    --json "$OUT/multiturn_$mode.json" > /dev/null
  kill -TERM $up; wait $up || true; up=
done
python3 - "$OUT" <<'PY' | tee "$OUT/prefix.md"
import json, sys
d = sys.argv[1]
print("| workload | prefix caching | prefix hit rate | prompt tokens computed | TTFT p50 / p90 ms | prefill ms (server, mean) | req/s | failed |")
print("|---|---|---|---|---|---|---|---|")
for w in ("shared", "multiturn"):
    for mode in ("on", "off"):
        s = json.load(open(f"{d}/{w}_{mode}.json"))["levels"][0]["summary"]
        print(f"| {'shared prefix' if w == 'shared' else 'multi-turn'} | {mode} | {s['prefix_hit_rate'] * 100:.1f}% | "
              f"{s['prefill_tokens_computed']:,} | {s['ttft_ms']['p50']:.1f} / {s['ttft_ms']['p90']:.1f} | "
              f"{s['prefill_ms']['mean']:.1f} | {s['request_throughput']:.2f} | {s['failed']} |")
PY
