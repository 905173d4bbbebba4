#!/usr/bin/env bash
# CUDA builds of pdserve's binaries on a machine without a CUDA toolkit or GPU.
# nvcc, the headers and the libraries to link against come from PyPI wheels (CUDA 13.0,
# matching the lent machines' driver 580 and /usr/local/cuda 13.0); the driver library
# is a generated stub (SONAME libcuda.so.1) that the real driver replaces at run time.
# Output: target/release/{pdserve,prefill-server,decode-server,router} with CUDA.
#
#   CUDA_COMPUTE_CAP=90 scripts/build-cuda.sh      # 90: H100/H200; 80: A100; 89: L40S
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CUDA_DEPS=$ROOT/.deps/cuda
CU=$CUDA_DEPS/nvidia/cu13
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$CU/nvvm/bin/cicc" ]; then
  tmp=$(mktemp -d)
  # CUDA 13's nvcc wheel leaves cicc/libdevice (nvvm) and the crt headers to their own wheels.
  for p in "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
           "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
           "nvidia-cublas==13.0.2.14" "nvidia-cuda-nvrtc==13.0.88" "nvidia-curand==10.4.5.25"; do
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$p"
  done
  mkdir -p "$CUDA_DEPS"
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$CUDA_DEPS"; done
  rm -rf "$tmp"
  chmod +x "$CU"/bin/* "$CU"/nvvm/bin/* 2>/dev/null || true
fi

# A CUDA-root layout for the build scripts: lib64, unversioned .so names, driver stub.
ln -sfn lib "$CU/lib64"
for l in "$CU"/lib/lib*.so.*; do
  base=$(basename "$l"); ln -sfn "$base" "$CU/lib/${base%%.so.*}.so"
done
if [ ! -e "$CU/lib/stubs/libcuda.so" ]; then
  mkdir -p "$CU/lib/stubs"
  # The stub's symbols come from cudarc's sources: on a fresh machine, fetch them first.
  cargo fetch --locked -q
  sys=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -1)
  grep -oE "^\s+fn cu[A-Za-z0-9_]+\(" "$sys" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$CU/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/cuda_stub.c"
fi

export CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_TOOLKIT_ROOT_DIR=$CU PATH="$CU/bin:$PATH"
export LIBRARY_PATH="$CU/lib:$CU/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
# At run time the GPU machine's own CUDA 13 libraries are found here.
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,/usr/local/cuda/lib64"
scripts/setup.sh
cargo build --release --features cuda -p pdserve -p prefill-server -p decode-server -p router
echo "build-cuda: ok (compute capability $CUDA_COMPUTE_CAP)"
