#!/usr/bin/env python3
"""Prints kvbench's GB/s per backend beside NIXL's Python API (the anchor) for the same
sizes, with the ratio, and the UCX protocol lines that show what carried the bytes.

  compare-anchor.py anchor.json kvbench_nixl.json [kvbench_ucx.json ...] [--protocols f1 f2]
"""
import json, sys

def main():
    args = sys.argv[1:]
    protos = []
    if "--protocols" in args:
        i = args.index("--protocols")
        protos, args = args[i + 1:], args[:i]
    anchor = {r["bytes"]: r for r in json.load(open(args[0]))}
    ours = {}
    for path in args[1:]:
        for r in json.load(open(path)):
            ours.setdefault(r["backend"], {})[r["bytes"]] = r
    backends = [b for b in ("nixl", "ucx", "tcp") if b in ours]
    head = "| size | NIXL Python GB/s | " + " | ".join(f"{b} GB/s | {b}/anchor" for b in backends) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(backends)))
    for n in sorted(anchor):
        cells = [f"{n / 2**20:g} MiB", f"{anchor[n]['gb_per_s']:.1f}"]
        for b in backends:
            r = ours[b].get(n)
            if r is None:
                cells += ["-", "-"]
            else:
                ok = "" if r["verified"] else " (NOT verified)"
                cells += [f"{r['gb_per_s']:.1f}{ok}", f"{r['gb_per_s'] / anchor[n]['gb_per_s']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for p in protos:
        try:
            lines = [l.split("]", 2)[-1].strip() for l in open(p) if l.strip()]
        except OSError:
            continue
        print(f"\n{p.rsplit('/', 1)[-1]}: " + (" / ".join(lines) if lines else "no protocol lines captured"))

if __name__ == "__main__":
    main()
