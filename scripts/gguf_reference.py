#!/usr/bin/env python3
"""Independent readings of a GGUF file, to check `pdserve model import` against:

  gguf_reference.py tokenize FILE.gguf < texts.json    # {"ids": [[...]], "decoded": [...]}
  gguf_reference.py weights FILE.gguf MODEL_DIR         # every imported tensor vs gguf-py

`tokenize` builds the tokenizer with transformers' own GGUF code
(transformers.integrations.gguf: the tokenizer conversion that
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` runs), from metadata read by gguf-py
(llama.cpp's Python reader). from_pretrained itself is not called because its GGUF reader
imports torch, which the tests do not install; the conversion is the same code.
Encoding adds special tokens as the file's add_bos_token says, like the engine.

`weights` dequantizes every tensor with gguf-py (numpy), undoes llama.cpp's q/k row
permutation with numpy, and compares with the imported model.safetensors; prints the
largest difference (relative to the tensor's largest value) and exits 1 past
--tolerance (default 1e-6).
"""
import json
import sys

import numpy as np


def read_fields(path):
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.") or k.startswith("general.")}
    return r, meta


def tokenize(path):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    _, meta = read_fields(path)
    tok = {
        name: meta[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tok)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    texts = json.load(sys.stdin)
    ids = []
    for t in texts:
        e = backend.encode(t, add_special_tokens=False).ids
        if add_bos:
            e = [int(meta["tokenizer.ggml.bos_token_id"])] + e
        ids.append(e)
    decoded = [backend.decode(i, skip_special_tokens=True) for i in ids]
    print(json.dumps({"ids": ids, "decoded": decoded}))


def unpermute(w, n_head):
    # Inverse of convert_hf_to_gguf.py's permute: reshape(n_head, 2, d/2, ...).swapaxes(1, 2).
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def weights(path, model_dir, tolerance):
    import gguf
    from safetensors.numpy import load_file

    r, meta = read_fields(path)
    arch = meta["general.architecture"]
    heads = int(r.fields[f"{arch}.attention.head_count"].contents())
    kv = r.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv.contents()) if kv is not None else heads
    st = load_file(f"{model_dir}/model.safetensors")
    names = {
        "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    worst, seen = 0.0, 0
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
            part = parts[2]
        else:
            hf = f"{names[parts[0]]}.{parts[1]}"
            part = parts[0]
        # gguf-py gives the numpy shape (rows, cols): llama.cpp's dims reversed.
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if arch == "llama" and part in ("attn_q", "attn_k"):
            want = unpermute(want, heads if part == "attn_q" else kv_heads)
        got = st[hf].astype(np.float32)
        if got.shape != want.shape:
            sys.exit(f"{hf}: shape {got.shape}, gguf-py says {want.shape}")
        diff = float(np.max(np.abs(got - want))) if want.size else 0.0
        scale = float(np.max(np.abs(want))) or 1.0
        worst = max(worst, diff / scale)
        seen += 1
    print(json.dumps({"tensors": seen, "in_safetensors": len(st), "max_rel_diff": worst}))
    if seen != len(st) or worst > tolerance:
        sys.exit(1)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "tokenize" and len(sys.argv) == 3:
        tokenize(sys.argv[2])
    elif cmd == "weights" and len(sys.argv) in (4, 6):
        tol = float(sys.argv[5]) if len(sys.argv) == 6 and sys.argv[4] == "--tolerance" else 1e-6
        weights(sys.argv[2], sys.argv[3], tol)
    else:
        sys.exit(__doc__)
