#!/usr/bin/env bash
# Everything the tests need, then the tests. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. "$HOME/.cargo/env" 2>/dev/null || true
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${PDSERVE_TEST_THREADS:-2}"
