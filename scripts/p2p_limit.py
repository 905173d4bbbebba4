#!/usr/bin/env python3
"""The limit for GPU 0 -> GPU 1 copies on this host: torch's peer-to-peer copy
(cudaMemcpyPeer under the hood), median of 20 after warm-up, GB/s = 1e9 bytes/s.

  p2p_limit.py [--sizes 1MiB,16MiB,...] [--json out.json]
"""
import argparse, json, statistics, time
import torch

UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

def parse_size(s):
    for u, f in UNITS.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * f)
    return int(s)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16MiB,256MiB,1GiB")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    print("| size | median ms | GB/s |\n|---|---|---|")
    for n in map(parse_size, a.sizes.split(",")):
        src = torch.empty(n, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        for _ in range(3):
            dst.copy_(src); torch.cuda.synchronize(0); torch.cuda.synchronize(1)
        t = []
        for _ in range(a.iters):
            s = time.perf_counter(); dst.copy_(src); torch.cuda.synchronize(1); t.append(time.perf_counter() - s)
        m = statistics.median(t)
        rows.append({"bytes": n, "median_ms": round(m * 1e3, 4), "gb_per_s": round(n / m / 1e9, 2)})
        print(f"| {n / 2**20:g} MiB | {m * 1e3:.4f} | {n / m / 1e9:.1f} |")
        del src, dst
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)

if __name__ == "__main__":
    main()
