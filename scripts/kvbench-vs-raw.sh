#!/usr/bin/env bash
# pdserve's host-memory writes against UCX with nothing around it, in one run (CPU).
#
#   scripts/kvbench-vs-raw.sh [ROUNDS]     # default 8; env SIZES (bytes), OUT
#
# Alternates, ROUNDS times: `raw_put` (crates/ucx-sys/examples: put + flush, and put +
# fence + notification + flush, one thread) and `pdserve kvbench --backend ucx,nixl`,
# each two ways: back to back (`-gap0`, kvbench `--back-to-back`), and with a pause
# between writes (`raw -gap50`: 50 µs; kvbench by default confirms each write at the
# target before posting the next, a pause of the same order). Prints the median over
# the rounds of each run's median write time, in µs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-8} SIZES=${SIZES:-4096,65536,1048576} OUT=${OUT:-/tmp/kvbench-vs-raw}
mkdir -p "$OUT"; : > "$OUT/rounds.txt"
export PDSERVE_UCX_LIB_DIR=${PDSERVE_UCX_LIB_DIR:-$PWD/.deps/ucx/libucx/lib}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cpu-release}
cargo build -q --release -p ucx-sys --example raw_put
cargo build -q --release -p pdserve
raw=$CARGO_TARGET_DIR/release/examples/raw_put pd=$CARGO_TARGET_DIR/release/pdserve
kv_sizes=$(python3 -c "print(','.join(f'{int(s)//1024}KiB' for s in '$SIZES'.split(',')))")
for _ in $(seq 1 "$ROUNDS"); do
  for gap in 0 50; do
    $raw --sizes "$SIZES" --iters 300 --gap-us $gap 2>/dev/null | awk -F'|' -v g=$gap \
      '/^\| [0-9]/ {gsub(/ /,""); print "raw-put-gap" g, $2, $3; print "raw-put+notify-gap" g, $2, $4}' >> "$OUT/rounds.txt"
  done
  for mode in gap0 paused; do
    flag=$([ $mode = gap0 ] && echo --back-to-back || true)
    $pd kvbench --backend ucx,nixl --sizes "$kv_sizes" --iters 300 --warmup 20 $flag 2>/dev/null | awk -F'|' -v m=$mode \
      '/^\| (ucx|nixl)/ {gsub(/ /,""); print "pdserve-" $2 "-" m, $4, $6 * 1000}' >> "$OUT/rounds.txt"
  done
done
python3 - "$OUT/rounds.txt" <<'PY'
import collections, statistics, sys
units = {"KiB": 1024, "MiB": 1 << 20}
def size(s):
    for u, f in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(s)
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    what, sz, us = line.split()
    d[(what, size(sz))].append(float(us))
whats = sorted({w for w, _ in d}, key=lambda w: (not w.startswith("raw"), w))
sizes = sorted({s for _, s in d})
print("| what | " + " | ".join(f"{s // 1024} KiB µs" for s in sizes) + " |")
print("|---|" + "---|" * len(sizes))
for w in whats:
    print(f"| {w} | " + " | ".join(f"{statistics.median(d[(w, s)]):.2f}" if d[(w, s)] else "-" for s in sizes) + " |")
print(f"\n(median over {len(d[(whats[0], sizes[0])])} rounds of each run's median)")
PY
