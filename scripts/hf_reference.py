#!/usr/bin/env python3
"""transformers (PyTorch) on the same model directory: greedy tokens and logits, the
correctness reference for pdserve's engine on the GPU, and its speed for comparison.

  hf_reference.py MODEL_DIR --prompt-ids 1,2,3 --max-new-tokens 32 --json out.json
  hf_reference.py MODEL_DIR --prompts-file prompts.txt --max-new-tokens 32 --json out.json
  hf_reference.py MODEL_DIR --bench            # prefill tok/s at 512/2048, decode tok/s at batch 1/8/32
                                               # (--bench-prefill, --bench-batches: other sizes)
  hf_reference.py MODEL_DIR --prefill-batches 1,2,4,8,16 --prefill-len 512   # batched prefill tok/s
"""
import argparse, json, time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--prompt-ids", default="")
ap.add_argument("--prompts-file", help="one prompt per line, comma-separated token ids: greedy tokens for each")
ap.add_argument("--max-new-tokens", type=int, default=32)
ap.add_argument("--json")
ap.add_argument("--bench", action="store_true")
ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
ap.add_argument("--prefill-batches", default="", help="batch sizes: one forward pass over that many prompts")
ap.add_argument("--prefill-len", type=int, default=512)
ap.add_argument("--bench-prefill", default="512,2048", help="--bench: prompt lengths")
ap.add_argument("--bench-batches", default="1,8,32", help="--bench: decode batch sizes")
a = ap.parse_args()
DTYPE = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
m = AutoModelForCausalLM.from_pretrained(a.model, dtype=DTYPE).cuda().eval()

@torch.no_grad()
def greedy(ids, n):
    x = torch.tensor([ids], device="cuda")
    out = m.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=n, output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[0, len(ids):].tolist()
    logits = [l[0].float().cpu() for l in out.logits]
    return toks, logits

res = {}
if a.prompt_ids:
    ids = [int(t) for t in a.prompt_ids.split(",")]
    toks, logits = greedy(ids, a.max_new_tokens)
    res["tokens"] = toks
    res["first_logits_top5"] = torch.topk(logits[0], 5).indices.tolist()
    torch.save(torch.stack(logits), (a.json or "ref") + ".logits.pt")
if a.prompts_file:
    res["all_tokens"] = [greedy([int(t) for t in l.split(",")], a.max_new_tokens)[0] for l in open(a.prompts_file) if l.strip()]
if a.bench:
    def timed(f, reps=3):
        f(); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps
    b = {}
    with torch.no_grad():
        for n in (int(v) for v in a.bench_prefill.split(",")):
            x = torch.randint(3, 1000, (1, n), device="cuda")
            # The last position's logits only, as a prefill needs (and as ours computes).
            b[f"prefill_{n}_tok_s"] = n / timed(lambda: m(x, logits_to_keep=1))
        for bs in (int(v) for v in a.bench_batches.split(",")):
            x = torch.randint(3, 1000, (bs, 128), device="cuda")
            steps = 64
            dt = timed(lambda: m.generate(x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False), reps=1)
            b[f"decode_b{bs}_tok_s"] = bs * steps / dt
    res["bench"] = b
if a.prefill_batches:
    def timed_best(f, reps=3):
        f(); torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter(); f(); torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best
    pb = {}
    with torch.no_grad():
        for bs in (int(x) for x in a.prefill_batches.split(",")):
            x = torch.randint(3, 1000, (bs, a.prefill_len), device="cuda")
            # The forward pass alone (logits of every position, as a prefill computes them).
            pb[f"prefill_b{bs}_tok_s"] = bs * a.prefill_len / timed_best(lambda: m(x))
    res["prefill_batches"] = pb
print(json.dumps(res))
if a.json:
    json.dump(res, open(a.json, "w"))
