#!/usr/bin/env bash
# KV-aware routing, A/B/C in one run: `pdserve up` with PREFILL prefill-servers (4)
# under each routing policy (kv_aware, round_robin, least_outstanding), each loaded by
# `pdserve bench` with a multi-turn workload (each turn extends the last) and a
# shared-prefix one (GROUPS:LEN prefixes, each request one of them and its question).
# A table of prefix hit rate, prompt tokens computed, TTFT and throughput in
# $OUT/routing.md; every figure in $OUT/*.json.
#   OUT=docs/results/mine scripts/routing-bench.sh
# MODEL (default: a synthetic `small` Llama, 4 layers, made in the work dir), PREFILL
# (4), SHARED (8:384), TURNS (4), REQUESTS (64), CONCURRENCY (4), UP_ARGS (more
# `pdserve up` arguments), BACKEND (tcp), BIN (target/debug), POLICIES.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/routing-bench}
BIN=${BIN:-target/debug}
POLICIES=${POLICIES:-kv_aware round_robin least_outstanding}
mkdir -p "$OUT"
work=$(mktemp -d)
up=
trap '[ -n "$up" ] && { kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true; }; rm -rf "$work"' EXIT
model=${MODEL:-$work/model-small}
[ -n "${MODEL:-}" ] || "$BIN/pdserve" model synth --preset small --seed 0 --out "$model" > /dev/null
common=(--requests "${REQUESTS:-64}" --concurrency "${CONCURRENCY:-4}" --output-len 16 --vocab 2000 --quiet)
for policy in $POLICIES; do
  # shellcheck disable=SC2086
  "$BIN/pdserve" up --backend "${BACKEND:-tcp}" --model "$model" --prefill "${PREFILL:-4}" --routing "$policy" ${UP_ARGS:-} \
    --workdir "$work/up-$policy" > "$work/router-$policy" 2> "$OUT/up-$policy.log" &
  up=$!
  for _ in $(seq 1 1200); do [ -s "$work/router-$policy" ] && break; kill -0 $up 2>/dev/null || exit 1; sleep 0.1; done
  router=$(head -1 "$work/router-$policy")
  "$BIN/pdserve" bench --router "$router" --multi-turn "${TURNS:-4}" --input-len 96 "${common[@]}" \
    --json "$OUT/multiturn_$policy.json" > /dev/null
  "$BIN/pdserve" bench --router "$router" --shared-prefix "${SHARED:-8:384}" --input-len 32 "${common[@]}" \
    --json "$OUT/shared_$policy.json" > /dev/null
  kill -TERM $up; wait $up || true; up=
done
python3 - "$OUT" $POLICIES <<'PY' | tee "$OUT/routing.md"
import json, sys
d, policies = sys.argv[1], sys.argv[2:]
print("| workload | routing | prefix hit rate | prompt tokens computed | vs round_robin | TTFT p50 / p90 ms | req/s | failed |")
print("|---|---|---|---|---|---|---|---|")
for w in ("multiturn", "shared"):
    s = {p: json.load(open(f"{d}/{w}_{p}.json"))["levels"][0]["summary"] for p in policies}
    rr = s.get("round_robin")
    for p in policies:
        x = s[p]
        vs = f"{x['prefill_tokens_computed'] / rr['prefill_tokens_computed']:.2f}x" if rr and rr['prefill_tokens_computed'] else "-"
        print(f"| {'multi-turn' if w == 'multiturn' else 'shared prefix'} | {p} | {x['prefix_hit_rate'] * 100:.1f}% | "
              f"{x['prefill_tokens_computed']:,} | {vs} | {x['ttft_ms']['p50']:.1f} / {x['ttft_ms']['p90']:.1f} | "
              f"{x['request_throughput']:.2f} | {x['failed']} |")
PY
