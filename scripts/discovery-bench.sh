#!/usr/bin/env bash
# Membership changes under load, measured: runs tests/discovery.rs's loopback scenario
# RUNS times (default 3; real etcd, real daemons, three clients checking every token)
# and writes each run's figures as JSON plus a Markdown table:
#   registration -> first request on a new prefill-server; SIGKILL -> removal;
#   etcd restart -> the prefill-server started during its outage used; requests
#   answered exactly / failed.
#   scripts/discovery-bench.sh [OUTDIR]      (default target/discovery-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/discovery-bench}
RUNS=${RUNS:-3}
mkdir -p "$OUT"
cargo build -q -p pdserve -p prefill-server -p decode-server -p router
for i in $(seq 1 "$RUNS"); do
  PDSERVE_DISCOVERY_REPORT="$PWD/$OUT/run$i.json" cargo test -q -p e2e --test discovery \
    members_join_drain_die_and_outlive_an_etcd_outage -- --test-threads=1 >/dev/null
done
python3 - "$OUT" "$RUNS" <<'PY' | tee "$OUT/summary.md"
import json, sys
out, runs = sys.argv[1], int(sys.argv[2])
rows = [json.load(open(f"{out}/run{i}.json")) for i in range(1, runs + 1)]
cols = [("join_ms", "registration -> first request on the new prefill-server finished, ms"),
        ("kill_to_removal_ms", "SIGKILL -> key removed (lease %s s), ms"),
        ("etcd_back_to_used_ms", "etcd restarted -> prefill-server started during the outage used, ms"),
        ("ok", "requests answered exactly"), ("failed", "requests failed"),
        ("late_on_drained", "requests sent after the drained server's key went that reached it")]
print("| figure | " + " | ".join(f"run {i}" for i in range(1, runs + 1)) + " |")
print("|---|" + "---|" * runs)
for key, label in cols:
    if "%s" in label:
        label = label % rows[0]["lease_s"]
    print(f"| {label} | " + " | ".join(f"{r[key]:,.0f}" for r in rows) + " |")
PY
