#!/usr/bin/env bash
# On the GPU machine (with .carry): decode speed with UCX's CUDA allocation hooks on
# (UCX's own default) and off (pdserve's default), nixl and ucx, 512-token prompts.
#   run: bash scripts/exp-ucx-hooks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source <(sed -n '/^gpu_env()/,/^}/p;/^remote_unpack()/,/^}/p' scripts/gpu-check.sh)
gpu_env
D=/tmp/pdserve-gpu M=/tmp/m1b
for v in "UCX_MEM_CUDA_HOOK_MODE=bistro" "UCX_MEM_CUDA_HOOK_MODE=none"; do
  echo "=== $v"
  env $v $D/pdserve bench compare --local colocated,ucx,nixl --device cuda:0 --model $M --kv-cache-mib 4096 \
    --input-len 512 --output-len 64 --requests 6 --concurrency 1 --vocab 120000 --quiet --no-kvbench 2>&1 \
    | grep -E "^\| (Colocated|Disagg|Method)"
done
