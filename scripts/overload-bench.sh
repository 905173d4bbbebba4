#!/usr/bin/env bash
# The overload bench on one machine: `pdserve up` (prefill-server, decode-server and
# router on loopback; the synthetic tiny model unless MODEL=DIR), then `pdserve bench
# overload`: capacity measured in a closed loop, then 1x, 2x and 4x of it for DURATION
# seconds each (open loop), checking goodput >= 80% of its peak, refusals within 100 ms
# and the daemons' memory flat. Table in $OUT/overload.md, every figure in .json.
#   OUT=docs/results/mine scripts/overload-bench.sh [more `pdserve bench overload` args]
# BACKEND (tcp), MAX_WAITING (requests in a decode-server's line; 8), DURATION (60),
# SHED_TTFT_MS (the router's load shedding on time to first token; 1000, half the
# bench's TTFT SLO; 0: off),
# UP_ARGS (more `pdserve up` arguments, e.g. "--device cuda:0"),
# BIN (target/debug; a `cargo build --release` puts faster ones in target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/overload}
BIN=${BIN:-target/debug}
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck disable=SC2086
"$BIN/pdserve" up --backend "${BACKEND:-tcp}" ${MODEL:+--model "$MODEL"} ${UP_ARGS:-} \
  --max-waiting "${MAX_WAITING:-8}" --shed-ttft-ms "${SHED_TTFT_MS:-1000}" --workdir "$work" > "$work/router" 2> "$OUT/up.log" &
up=$!
for _ in $(seq 1 600); do [ -s "$work/router" ] && break; kill -0 $up 2>/dev/null || exit 1; sleep 0.1; done
router=$(head -1 "$work/router")
"$BIN/pdserve" bench overload --router "$router" --duration-s "${DURATION:-60}" --quiet \
  --json "$OUT/overload.json" --markdown "$OUT/overload.md" "$@"
