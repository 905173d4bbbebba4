#!/bin/bash
# usage: ab.sh ROUNDS OUT  — alternates /tmp/pdb and /tmp/pdn kvbench runs
cd /work/main
for i in $(seq 1 $1); do for b in pdb pdn; do
  /tmp/$b/pdserve kvbench --backend nixl,ucx --sizes 4KiB,64KiB,1MiB --iters 300 --warmup 20 2>/dev/null | grep -E "^\| (nixl|ucx)" | awk -F'|' -v b=$b '{gsub(/ /,"",$2); gsub(/ /,"",$4); gsub(/ /,"",$6); gsub(/ /,"",$8); print b, $2, $4, $6, $8}' >> $2
done; done
python3 - $2 <<'PY'
import sys, statistics, collections
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    b, be, size, ms, gbs = l.split()
    d[(be, size, b)].append(float(ms) * 1000)
for k in sorted(d):
    v = d[k]
    print(k, "median of %d runs: %.2f us (min %.2f max %.2f)" % (len(v), statistics.median(v), min(v), max(v)))
PY
