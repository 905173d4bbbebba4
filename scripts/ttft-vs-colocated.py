#!/usr/bin/env python3
"""TTFT p50 of each deployment against the colocated one of the same run, from
`pdserve bench compare --json` files (one run each, e.g. A/B rounds in alternating
order): a Markdown table, one line per run and prompt length, and the mean over runs.

    scripts/ttft-vs-colocated.py docs/results/h100-2026-11-25-early/ab/*.json.gz
"""
import gzip
import json
import sys
from collections import defaultdict


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def main(paths):
    lines, targets, rel = [], [], defaultdict(list)
    for path in paths:
        levels = load(path)["levels"]
        first = levels[0]["load"]  # the lowest load: what the compare table shows
        p50 = {(l["target"], l["input_len"]): l["summary"]["ttft_ms"]["p50"] for l in levels if l["load"] == first}
        for t, _ in p50:
            if t != "colocated" and t not in targets:
                targets.append(t)
        for n in sorted({i for _, i in p50}, key=int):
            base = p50.get(("colocated", n))
            if base is None:
                continue
            cells = []
            for t in targets:
                v = p50.get((t, n))
                if v is None:
                    cells.append("")
                    continue
                rel[(t, n)].append(v / base - 1)
                cells.append(f"{v:.3f} ({(v / base - 1) * 100:+.1f}%)")
            lines.append((path.split("/")[-1], n, f"{base:.3f}", cells))
    print("| run | input | colocated ms | " + " | ".join(targets) + " |")
    print("|---|---|---|" + "---|" * len(targets))
    for run, n, base, cells in lines:
        cells += [""] * (len(targets) - len(cells))
        print(f"| {run} | {n} | {base} | " + " | ".join(cells) + " |")
    for n in sorted({n for _, n in rel}, key=int):
        cells = []
        for t in targets:
            v = rel.get((t, n), [])
            cells.append(f"{sum(v) / len(v) * 100:+.1f}% (n={len(v)})" if v else "")
        print(f"| mean | {n} | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
