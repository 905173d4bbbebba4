#!/usr/bin/env bash
# The GPU check of pdserve, in one device call.
#
#   scripts/gpu-check.sh prepare   # here: CUDA build of pdserve, NIXL/UCX libraries pruned,
#                                  # all packed into .carry/ (git-ignored, < 64 MiB)
#   scripts/gpu-check.sh remote    # on the GPU machine, from the repo copy, with .carry carried:
#                                  # kvbench --mem vram per backend, NIXL's Python API on the
#                                  # same machine, the UCX protocol that carried the bytes;
#                                  # a short table last. Results under $OUT (or /tmp/gpu-out).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-1MiB,16MiB,64MiB,256MiB,1GiB}
ITERS=${ITERS:-20}

prepare() {
  scripts/setup.sh
  cargo build --release -p pdserve --features cuda
  # The device's Python is 3.12: the anchor needs that wheel's bindings (same C libraries).
  local w=.deps/wheels-py312
  if ! ls $w/nixl_cu13-*-cp312-*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 -d $w "${NIXL_WHEEL:-nixl-cu13==1.5.1}"
  fi
  rm -rf .carry
  python3 scripts/pack-device.py --nixl-wheel $w/nixl_cu13-*-cp312-*.whl --ucx-dir .deps/ucx \
    --bin target/release/pdserve --out .carry
}

remote() {
  local D=/tmp/pdserve-gpu OUTDIR=${OUT:-/tmp/gpu-out}
  mkdir -p $D $OUTDIR
  tar xf .carry/nixl.tar.xz -C $D
  tar xf .carry/ucx.tar.xz -C $D
  xz -dc .carry/pdserve.xz > $D/pdserve && chmod +x $D/pdserve
  export PDSERVE_NIXL_LIB_DIR=$D/.nixl_cu13.mesonpy.libs PDSERVE_UCX_LIB_DIR=$D/libucx/lib RUST_BACKTRACE=0
  # Keep NVLink multicast off on shared multi-GPU hosts.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUTDIR/gpu.txt

  echo "== which UCX protocol carries a VRAM write (ucx, then nixl)"
  for b in ucx nixl; do
    UCX_PROTO_INFO=y $D/pdserve kvbench --mem vram --backend $b --sizes 16MiB --iters 2 --warmup 1 \
      > $OUTDIR/proto_raw_$b.txt 2>&1 || true
    grep -A8 -E "remote memory write by ucp_put.* from cuda" $OUTDIR/proto_raw_$b.txt | grep -E "\|" \
      | grep -vE "\+--|Range" | head -6 | tee $OUTDIR/proto_$b.txt || true
  done

  echo "== kvbench --mem vram"
  for b in nixl ucx tcp; do
    $D/pdserve kvbench --mem vram --backend $b --sizes "$SIZES" --iters $ITERS --json $OUTDIR/kvbench_$b.json \
      | tee $OUTDIR/kvbench_$b.md
  done
  echo "== kvbench --mem vram, paged: 4096 blocks of 16 KiB in one write"
  $D/pdserve kvbench --mem vram --backend nixl,ucx --sizes 64MiB --segments 4096 --iters $ITERS \
    --json $OUTDIR/kvbench_paged.json | tee $OUTDIR/kvbench_paged.md

  echo "== NIXL Python API (the anchor), same machine"
  PYTHONPATH=$D PYTHONUNBUFFERED=1 python3 .carry/nixl_anchor.py --mem vram --sizes "$SIZES" --iters $ITERS \
    --json $OUTDIR/anchor.json | tee $OUTDIR/anchor.md

  python3 scripts/compare-anchor.py $OUTDIR/anchor.json $OUTDIR/kvbench_nixl.json $OUTDIR/kvbench_ucx.json \
    $OUTDIR/kvbench_tcp.json --protocols $OUTDIR/proto_ucx.txt $OUTDIR/proto_nixl.txt | tee $OUTDIR/summary.md
}

case "${1:-}" in
  prepare) prepare ;;
  remote) remote ;;
  *) echo "usage: $0 prepare|remote" >&2; exit 2 ;;
esac
