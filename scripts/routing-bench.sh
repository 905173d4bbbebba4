#!/usr/bin/env bash
# KV-aware routing, A/B/C in one run: `pdserve bench compare` starts a deployment with
# PREFILL prefill-servers (4) under each router policy (kv_aware, round_robin,
# least_outstanding) and loads it with a multi-turn workload (TURNS-turn chats, each
# turn extends the last), then again with a shared-prefix one (GROUPS:LEN prefixes,
# each request one of them and its own question). Tables of prefix hit rate, prompt
# tokens computed (against round-robin's), TTFT and throughput in $OUT/routing.md;
# every figure in $OUT/*.json.
#   OUT=docs/results/mine scripts/routing-bench.sh
# MODEL (default: a synthetic `small` Llama, 4 layers, made in the work dir), PREFILL
# (4), TURNS (8), TURN_LEN (96: new prompt tokens a turn), SHARED (8:384), REQUESTS (80), CONCURRENCY (5: not a multiple of
# PREFILL, so that round-robin does not keep a conversation on one server by accident),
# BACKEND (tcp), BIN (target/debug), POLICIES (comma-separated), and the placement
# flags of `pdserve up` in PLACEMENT (e.g. "--device cuda:0 --kv-cache-mib 3072").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/routing-bench}
BIN=${BIN:-target/debug}
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=${MODEL:-$work/model-small}
[ -n "${MODEL:-}" ] || "$BIN/pdserve" model synth --preset small --seed 0 --out "$model" > /dev/null
run() { # <name> <workload flags...>
  local name=$1; shift
  # shellcheck disable=SC2086
  "$BIN/pdserve" bench compare --local "${BACKEND:-tcp}" --prefill "${PREFILL:-4}" \
    --routing "${POLICIES:-kv_aware,round_robin,least_outstanding}" --model "$model" ${PLACEMENT:-} \
    --requests "${REQUESTS:-80}" --concurrency "${CONCURRENCY:-5}" --output-len 16 --vocab 2000 --quiet \
    --no-kvbench "$@" --json "$OUT/$name.json" > "$OUT/$name.md"
}
run multiturn --multi-turn "${TURNS:-8}" --input-len "${TURN_LEN:-96}"
run shared --shared-prefix "${SHARED:-8:384}" --input-len 32
{
  echo "### Multi-turn (${TURNS:-8} turns), ${PREFILL:-4} prefill-servers"; echo
  sed -n '/^| Deployment | Input | Prefix hit rate/,/^$/p' "$OUT/multiturn.md"
  echo "### Shared prefix (${SHARED:-8:384}), ${PREFILL:-4} prefill-servers"; echo
  sed -n '/^| Deployment | Input | Prefix hit rate/,/^$/p' "$OUT/shared.md"
} | tee "$OUT/routing.md"
