#!/usr/bin/env python3
"""The limit for GPU 0 -> GPU 1 copies on this host: torch's peer-to-peer copy
(cudaMemcpyPeer under the hood), median of 20 after warm-up, GB/s = 1e9 bytes/s."""
import statistics, sys, time
import torch

sizes = [16 << 20, 256 << 20, 1 << 30]
print("| size | median ms | GB/s |\n|---|---|---|")
for n in sizes:
    a = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        b.copy_(a); torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    t = []
    for _ in range(20):
        s = time.perf_counter(); b.copy_(a); torch.cuda.synchronize(1); t.append(time.perf_counter() - s)
    m = statistics.median(t)
    print(f"| {n >> 20} MiB | {m * 1e3:.4f} | {n / m / 1e9:.1f} |")
