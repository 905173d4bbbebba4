source <(sed -n '/^gpu_env()/,/^}/p;/^remote_unpack()/,/^}/p' scripts/gpu-check.sh)
gpu_env
D=/tmp/pdserve-gpu; M=/tmp/m1b
for v in "" "UCX_MEM_CUDA_HOOK_MODE=none" "UCX_MEM_CUDA_HOOK_MODE=none UCX_MEM_EVENTS=no"; do
  echo "=== variant: ${v:-base}"
  env $v $D/pdserve bench compare --local ucx,nixl --device cuda:0 --model $M --kv-cache-mib 4096 --input-len 512 --output-len 64 \
    --requests 6 --concurrency 1 --vocab 120000 --quiet --no-kvbench 2>&1 | grep -E "^\| (Disagg|Method)"
done
