#!/usr/bin/env bash
# Reproduces the compare table on one machine: for each of colocated, tcp, nixl and ucx
# it starts prefill-server, decode-server and router on loopback (one deployment at a
# time, so they do not share the CPU or GPU), runs the same workload, and prints the
# table, the verdict and the kvbench figures at the workload's KV sizes.
#   OUT=docs/results/mine scripts/bench-compare.sh --input-len 128,512 --requests 50
# Extra arguments go to `pdserve bench compare` (see `pdserve bench compare --help`);
# DEVICE=cuda:0 and MODEL=DIR pick the device and model (a `cuda` build is needed for GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bench-compare}
BIN=${BIN:-target/release}
if [ -z "${SKIP_BUILD:-}" ]; then
  scripts/setup.sh
  cargo build --release --workspace --bins
fi
mkdir -p "$OUT"
"$BIN/pdserve" bench compare --local "${METHODS:-colocated,tcp,nixl,ucx}" \
  --device "${DEVICE:-cpu}" ${MODEL:+--model "$MODEL"} \
  --json "$OUT/compare.json" --plot "$OUT/compare.svg" "$@" | tee "$OUT/compare.md"
echo "bench-compare: table in $OUT/compare.md, every request in $OUT/compare.json, plot in $OUT/compare.svg" >&2
