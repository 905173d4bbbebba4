#!/usr/bin/env bash
# The main job on one machine: prefill-server, decode-server and router on loopback
# (SmolLM2-135M-Instruct, fetched and imported once into .deps/models, unless MODEL is
# set; KV cache moved by BACKEND: nixl, ucx or tcp), answering one streaming generate
# request (greedy unless TEMPERATURE is set); then everything stops.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${BACKEND:-nixl}
# A chat turn in SmolLM2's template (the same text the chat API would render).
PROMPT=${PROMPT:-$'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France, and what is it famous for?<|im_end|>\n<|im_start|>assistant\n'}
TEMPERATURE=${TEMPERATURE:-0}
scripts/setup.sh
cargo build --release --workspace --bins
if [ -z "${MODEL:-}" ]; then
  scripts/models.sh target/release/pdserve
  MODEL=${PDSERVE_DEPS_DIR:-.deps}/models/smollm2-135m-instruct
fi
work=$(mktemp -d)
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true; rm -rf "$work"' EXIT
target/release/pdserve up --backend "$BACKEND" ${MODEL:+--model "$MODEL"} --workdir "$work" > "$work/router" &
up=$!
for _ in $(seq 1 600); do [ -s "$work/router" ] && break; kill -0 $up 2>/dev/null || exit 1; sleep 0.1; done
router=$(head -1 "$work/router")
target/release/pdserve generate --router "$router" --prompt "$PROMPT" --max-tokens 48 --temperature "$TEMPERATURE" --seed 7 --stream "$@"
