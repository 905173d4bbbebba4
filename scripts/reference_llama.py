#!/usr/bin/env python3
"""An independent Llama/Qwen2 forward pass in numpy (f32), the CPU reference for the
engine on a real model: greedy tokens from the same model.safetensors + config.json.

  reference_llama.py MODEL_DIR --prompts prompts.json --max-new-tokens 16 [--json out.json]

prompts.json is a list of prompts, each a list of token ids; the output is
{"tokens": [[...], ...]} with max-new-tokens greedy ids per prompt (EOS is not a stop:
the comparison is token for token). Needs numpy and safetensors only.

RMSNorm, RoPE (Hugging Face's half-split rotation, theta from the config), grouped-query
attention with a causal mask, SwiGLU MLP, tied or separate lm_head, Qwen2's q/k/v bias.
"""
import argparse
import json
import os

# One BLAS thread: the products here are small (one row per decode step), and BLAS's
# spinning worker threads run 3x slower on a busy 2-core machine (tests run in parallel).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402 (after the thread settings, which numpy reads at import)
from safetensors.numpy import load_file  # noqa: E402


def load(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    w = {}
    for f in files:
        w.update({k: v.astype(np.float32) for k, v in load_file(os.path.join(model_dir, f)).items()})
    return cfg, w


class Model:
    def __init__(self, cfg, w):
        if cfg.get("rope_scaling"):
            raise SystemExit("reference_llama.py: rope_scaling is not implemented")
        self.w = w
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.heads)
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.heads
        self.eps = cfg["rms_norm_eps"]
        theta = cfg.get("rope_theta", 10000.0)
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = w.get("lm_head.weight", self.embed) if not cfg.get("tie_word_embeddings") else self.embed

    def rms(self, x, weight):
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)).astype(np.float32) * weight

    def rope(self, x, pos):
        # x: [heads, t, d]; Hugging Face rotates the two halves of each head.
        ang = np.outer(pos, self.inv_freq)  # [t, d/2], float64 like the tables are built
        cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)
        sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)
        half = self.head_dim // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def linear(self, x, name):
        w = self.w[name + ".weight"]
        # One row (a decode step): a matrix-vector product, which BLAS does several times
        # faster than a 1-row matrix product.
        y = (w @ x[0])[None] if x.shape[0] == 1 else x @ w.T
        b = self.w.get(name + ".bias")
        return y + b if b is not None else y

    def forward(self, ids, start, cache):
        """Logits of the last of `ids` at positions start..; cache[i] = (k, v) grows."""
        x = self.embed[ids]  # [t, h]
        t = len(ids)
        pos = np.arange(start, start + t)
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"model.layers.{i}"
            h = self.rms(x, self.w[p + ".input_layernorm.weight"])
            q = self.linear(h, p + ".self_attn.q_proj").reshape(t, self.heads, self.head_dim).transpose(1, 0, 2)
            k = self.linear(h, p + ".self_attn.k_proj").reshape(t, self.kv_heads, self.head_dim).transpose(1, 0, 2)
            v = self.linear(h, p + ".self_attn.v_proj").reshape(t, self.kv_heads, self.head_dim).transpose(1, 0, 2)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if i in cache:
                k = np.concatenate([cache[i][0], k], 1)
                v = np.concatenate([cache[i][1], v], 1)
            cache[i] = (k, v)
            k, v = np.repeat(k, group, 0), np.repeat(v, group, 0)
            s = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(self.head_dim))  # [heads, t, total]
            total = k.shape[1]
            mask = np.arange(total)[None, :] > (start + np.arange(t))[:, None]
            s = np.where(mask[None], -np.inf, s)
            s = np.exp(s - s.max(-1, keepdims=True))
            a = (s / s.sum(-1, keepdims=True)) @ v  # [heads, t, d]
            x = x + self.linear(a.transpose(1, 0, 2).reshape(t, -1), p + ".self_attn.o_proj")
            h = self.rms(x, self.w[p + ".post_attention_layernorm.weight"])
            g = self.linear(h, p + ".mlp.gate_proj")
            u = self.linear(h, p + ".mlp.up_proj")
            x = x + self.linear((g / (1.0 + np.exp(-g))) * u, p + ".mlp.down_proj")
        last = self.rms(x[-1:], self.w["model.norm.weight"])
        return self.lm_head @ last[0]

    def greedy(self, ids, n):
        cache = {}
        logits = self.forward(np.array(ids), 0, cache)
        out = []
        pos = len(ids)
        for _ in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            if len(out) == n:
                break
            logits = self.forward(np.array([tok]), pos, cache)
            pos += 1
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", help="write the result here (default: stdout)")
    a = ap.parse_args()
    cfg, w = load(a.model)
    m = Model(cfg, w)
    res = {"tokens": [m.greedy(p, a.max_new_tokens) for p in json.load(open(a.prompts))]}
    text = json.dumps(res)
    if a.json:
        open(a.json, "w").write(text)
    else:
        print(text)


if __name__ == "__main__":
    np.seterr(over="ignore")  # exp(-g) of very negative gates overflows to inf: silu -> 0, as intended
    main()
