#!/usr/bin/env bash
# The main job on one machine: prefill-server, decode-server and router on loopback
# (the synthetic tiny model unless MODEL is set, KV cache moved by BACKEND: nixl, ucx
# or tcp), answering one streaming generate request; then everything stops.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${BACKEND:-nixl}
PROMPT=${PROMPT:-"Disaggregated serving moves the KV cache from GPU to GPU. Bonjour, 世界!"}
scripts/setup.sh
cargo build --release --workspace --bins
work=$(mktemp -d)
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true; rm -rf "$work"' EXIT
target/release/pdserve up --backend "$BACKEND" ${MODEL:+--model "$MODEL"} --workdir "$work" > "$work/router" &
up=$!
for _ in $(seq 1 600); do [ -s "$work/router" ] && break; kill -0 $up 2>/dev/null || exit 1; sleep 0.1; done
router=$(head -1 "$work/router")
target/release/pdserve generate --router "$router" --prompt "$PROMPT" --max-tokens 24 --temperature 0.8 --seed 7 --stream "$@"
