#!/usr/bin/env python3
"""The compare table for Llama-3-8B and Llama-3-70B shapes at 100 and 400 Gb/s,
COMPUTED, not measured: KV bytes per request from the model shape, transfer time from
the link rate plus pdserve's measured per-request overhead, prefill and decode time from
stated GPU assumptions. It shows whether the KV transfer can matter, not what a cluster
will do; measure yours with `pdserve bench compare`.

  scripts/extrapolate.py [--overhead-ms 0.6] [--link-efficiency 0.9] [--output-len 64]
"""
import argparse

ap = argparse.ArgumentParser()
ap.add_argument("--overhead-ms", type=float, default=0.6,
                help="fixed cost of one request's KV write (measured in the daemons on the H100: ~0.6 ms for 32 segments)")
ap.add_argument("--link-efficiency", type=float, default=0.9, help="share of the line rate RDMA writes reach")
ap.add_argument("--output-len", type=int, default=64)
ap.add_argument("--mfu", type=float, default=0.4, help="prefill: share of the GPUs' dense bf16 peak reached")
ap.add_argument("--mbu", type=float, default=0.6, help="decode: share of HBM bandwidth reached at batch 1")
a = ap.parse_args()

H100_FLOPS, H100_HBM = 989e12, 3.35e12  # dense bf16 FLOP/s, bytes/s per GPU
MODELS = {  # name: (parameters, layers, kv heads, head dim, GPUs for tensor parallelism)
    "Llama-3-8B": (8.0e9, 32, 8, 128, 1),
    "Llama-3-70B": (70.6e9, 80, 8, 128, 8),
}
print("COMPUTED from shapes and assumptions, not measured "
      f"(MFU {a.mfu:.0%}, decode HBM use {a.mbu:.0%}, link efficiency {a.link_efficiency:.0%}, "
      f"{a.overhead_ms} ms fixed per transfer, {a.output_len} output tokens, bf16 KV)\n")
print("| Model | Link | Input | KV per request | Prefill ms | Transfer ms | Decode ms | Total ms | Transfer share | Share of TTFT | Verdict |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, (params, layers, kvh, hd, gpus) in MODELS.items():
    for gbps in (100, 400):
        for n in (512, 2048, 8192):
            kv = layers * 2 * kvh * hd * 2 * n
            # Prefill: 2 FLOPs per parameter per token, plus attention (4 * layers * n^2 * hidden-ish).
            flops = 2 * params * n + 4 * layers * n * n * kvh * hd * 4
            prefill = flops / (gpus * H100_FLOPS * a.mfu) * 1e3
            # Under tensor parallelism each GPU sends its shard over its own NIC.
            link = gbps / 8 * 1e9 * a.link_efficiency * gpus
            transfer = kv / link * 1e3 + a.overhead_ms
            decode = a.output_len * (params * 2) / (gpus * H100_HBM * a.mbu) * 1e3
            total = prefill + transfer + decode
            share = transfer / total
            verdict = "negligible" if share < 0.05 else "acceptable" if share < 0.15 else "significant"
            print(f"| {name} (TP{gpus}) | {gbps} Gb/s | {n} | {kv / 2**20:.0f} MiB | {prefill:.1f} | {transfer:.2f} | "
                  f"{decode:.1f} | {total:.1f} | {share:.2%} | {transfer / (prefill + transfer):.2%} | {verdict} |")
