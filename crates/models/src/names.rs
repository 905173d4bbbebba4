//! From llama.cpp's tensor names and row order to Hugging Face's (Llama/Qwen2 layout),
//! which is what the engine and transformers read.

/// The Hugging Face name of a GGUF tensor, or `None` for a tensor this import does not
/// know (the caller refuses the file rather than drop weights silently).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    // Only q/k/v have biases in these architectures (Qwen2); the engine has no other.
    if kind == "bias" && !matches!(part, "attn_q" | "attn_k" | "attn_v") {
        return None;
    }
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Which RoPE head count a tensor's rows were permuted with, if any: llama.cpp's
/// converter reorders the rows of Llama's q and k projections (weights and biases) so
/// that its RoPE rotates adjacent pairs; Hugging Face's rotates the two halves of each
/// head. Qwen2 files are written unpermuted.
pub fn permuted_heads(gguf: &str, llama: bool, heads: usize, kv_heads: usize) -> Option<usize> {
    if !llama {
        return None;
    }
    let part = gguf.strip_prefix("blk.")?.split_once('.')?.1.rsplit_once('.')?.0;
    match part {
        "attn_q" => Some(heads),
        "attn_k" => Some(kv_heads),
        _ => None,
    }
}

/// Undoes llama.cpp's `permute` (convert_hf_to_gguf.py) on a row-major `[rows, cols]`
/// matrix (a bias is `cols == 1`). The converter does, per head of `d = rows / heads`
/// rows, `reshape(heads, 2, d/2, cols).swapaxes(1, 2)`: Hugging Face row `i * d/2 + k`
/// of a head (half `i`, pair `k`) is stored at row `2k + i`. This gathers it back.
pub fn unpermute_rows<T: Copy>(data: &[T], rows: usize, cols: usize, heads: usize) -> Result<Vec<T>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) || data.len() != rows * cols {
        return Err(format!(
            "cannot undo the RoPE row permutation: {rows} rows x {cols} columns ({} values) do not split into {heads} heads of an even size",
            data.len()
        ));
    }
    let d = rows / heads;
    let half = d / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for i in 0..2 {
            for k in 0..half {
                let src = h * d + 2 * k + i;
                out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// llama.cpp's `permute`, written as the numpy it is: `w.reshape(heads, 2, d/2,
    /// cols).swapaxes(1, 2).reshape(rows, cols)`, by explicit strides of the 4-D view.
    fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let d = rows / heads;
        let half = d / 2;
        // Source view dims (heads, 2, half, cols); after swapaxes(1, 2) the output is
        // iterated in (heads, half, 2, cols) order.
        let src = |h: usize, i: usize, k: usize, c: usize| w[((h * 2 + i) * half + k) * cols + c];
        let mut out = Vec::with_capacity(w.len());
        for h in 0..heads {
            for k in 0..half {
                for i in 0..2 {
                    for c in 0..cols {
                        out.push(src(h, i, k, c));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // (rows, cols, heads): q of 3 heads x 8, k of 1 head, a bias (cols 1), head dim 2.
        for (rows, cols, heads) in [(24, 5, 3), (8, 5, 1), (24, 1, 3), (4, 3, 2), (64, 16, 4)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let p = llama_cpp_permute(&w, rows, cols, heads);
            if rows / heads > 2 {
                assert_ne!(p, w, "the permutation moves rows for {rows}x{cols}/{heads}");
            }
            assert_eq!(unpermute_rows(&p, rows, cols, heads).unwrap(), w, "{rows}x{cols}/{heads}");
        }
    }

    #[test]
    fn unpermute_matches_known_rows() {
        // One head of 4 rows: HF rows [a0, a1, b0, b1] (halves a, b) are stored [a0, b0, a1, b1].
        let stored = [10, 20, 11, 21];
        assert_eq!(unpermute_rows(&stored, 4, 1, 1).unwrap(), vec![10, 11, 20, 21]);
    }

    #[test]
    fn unpermute_refuses_odd_shapes() {
        assert!(unpermute_rows(&[0.0f32; 6], 6, 1, 4).is_err());
        assert!(unpermute_rows(&[0.0f32; 3], 3, 1, 1).is_err());
        assert!(unpermute_rows(&[0.0f32; 5], 4, 1, 2).is_err());
    }

    #[test]
    fn names_map_to_hugging_face() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
            ("blk.12.attn_k.weight", "model.layers.12.self_attn.k_proj.weight"),
            ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
            ("blk.29.attn_output.weight", "model.layers.29.self_attn.o_proj.weight"),
            ("blk.1.ffn_gate.weight", "model.layers.1.mlp.gate_proj.weight"),
            ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
            ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
            ("blk.7.attn_norm.weight", "model.layers.7.input_layernorm.weight"),
            ("blk.7.ffn_norm.weight", "model.layers.7.post_attention_layernorm.weight"),
        ];
        for (g, h) in cases {
            assert_eq!(hf_name(g).as_deref(), Some(h), "{g}");
        }
        for unknown in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_q.scale",
            "blk.0.ffn_norm.bias",
            "blk.0.attn_output.bias",
            "blk.0.attn_qkv.weight",
            "output.bias",
        ] {
            assert_eq!(hf_name(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn only_llama_q_and_k_are_permuted() {
        assert_eq!(permuted_heads("blk.0.attn_q.weight", true, 9, 3), Some(9));
        assert_eq!(permuted_heads("blk.0.attn_k.weight", true, 9, 3), Some(3));
        assert_eq!(permuted_heads("blk.0.attn_k.bias", true, 9, 3), Some(3));
        assert_eq!(permuted_heads("blk.0.attn_v.weight", true, 9, 3), None);
        assert_eq!(permuted_heads("token_embd.weight", true, 9, 3), None);
        assert_eq!(permuted_heads("blk.0.attn_q.weight", false, 9, 3), None);
    }
}
