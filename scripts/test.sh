#!/usr/bin/env bash
# Everything the tests need, then the tests. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. "$HOME/.cargo/env" 2>/dev/null || true
# A fresh clone builds once: incremental caches would only cost CI's disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
cargo build --workspace --all-targets
# The real model the engine's reference tests use (downloaded by setup.sh, imported by the binary).
scripts/models.sh target/debug/pdserve
cargo test --workspace -- --test-threads="${PDSERVE_TEST_THREADS:-2}"
