#!/usr/bin/env python3
"""Prints kvbench's GB/s per backend beside NIXL's Python API (the anchor) for the same
sizes, with the ratio, and the UCX protocol lines that show what carried the bytes.

  compare-anchor.py anchor.json kvbench_nixl.json [kvbench_ucx.json ...] [--limit p2p.json]
                    [--protocols f1 f2]

--limit adds a copy limit (scripts/p2p_limit.py's JSON) and each figure's share of it.
"""
import json, sys

def main():
    args = sys.argv[1:]
    protos = []
    if "--protocols" in args:
        i = args.index("--protocols")
        protos, args = args[i + 1:], args[:i]
    limit = {}
    if "--limit" in args:
        i = args.index("--limit")
        limit = {r["bytes"]: r["gb_per_s"] for r in json.load(open(args[i + 1]))}
        args = args[:i] + args[i + 2:]
    anchor = {r["bytes"]: r for r in json.load(open(args[0]))}
    ours = {}
    for path in args[1:]:
        for r in json.load(open(path)):
            ours.setdefault(r["backend"], {})[r["bytes"]] = r
    backends = [b for b in ("nixl", "ucx", "tcp") if b in ours]
    per = ["GB/s", "/anchor"] + (["/limit"] if limit else [])
    head = ["size"] + (["copy limit GB/s"] if limit else []) + ["NIXL Python GB/s"]
    if limit:
        head.append("NIXL Python/limit")
    head += [f"{b}{c}" if c.startswith("/") else f"{b} {c}" for b in backends for c in per]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    share = lambda v, n: f"{v / limit[n]:.2f}" if limit.get(n) else "-"
    for n in sorted(anchor):
        a = anchor[n]["gb_per_s"]
        cells = [f"{n / 2**20:g} MiB"] + ([f"{limit[n]:.1f}" if n in limit else "-"] if limit else []) + [f"{a:.1f}"]
        if limit:
            cells.append(share(a, n))
        for b in backends:
            r = ours[b].get(n)
            if r is None:
                cells += ["-"] * len(per)
            else:
                ok = "" if r["verified"] else " (NOT verified)"
                cells += [f"{r['gb_per_s']:.1f}{ok}", f"{r['gb_per_s'] / a:.2f}"]
                if limit:
                    cells.append(share(r["gb_per_s"], n))
        print("| " + " | ".join(cells) + " |")
    for p in protos:
        try:
            lines = [l.split("]", 2)[-1].strip() for l in open(p) if l.strip()]
        except OSError:
            continue
        print(f"\n{p.rsplit('/', 1)[-1]}: " + (" / ".join(lines) if lines else "no protocol lines captured"))

if __name__ == "__main__":
    main()
