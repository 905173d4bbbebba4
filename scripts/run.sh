#!/usr/bin/env bash
# The main job on one machine. Today: the KV data plane between two processes, every
# backend (NIXL, UCX, TCP), bytes verified at the target. As the daemons land this
# becomes `pdserve up` plus one `pdserve generate` (issue "The daemons end to end").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p pdserve
exec target/release/pdserve kvbench --backend nixl,ucx,tcp --sizes 4KiB,1MiB,16MiB,64MiB --iters 10 "$@"
