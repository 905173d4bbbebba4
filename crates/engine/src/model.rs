//! The forward pass: Llama-family decoder layers (RMSNorm, GQA attention with RoPE,
//! SwiGLU MLP; Qwen2's q/k/v bias; tied embeddings), reading and writing K/V through
//! the paged pools. One sequence's prefill, or one token each for a batch of
//! sequences of different lengths.
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::KvPools;
use crate::loader::ModelDir;

struct Layer {
    in_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub device: Device,
    pub dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
}

/// One sequence's part of a decode step.
#[derive(Debug, Clone)]
pub struct DecodeInput<'a> {
    /// The token whose K/V is written at `pos` and whose next-token logits are returned.
    pub token: u32,
    pub pos: usize,
    /// Block table covering positions `0..=pos`.
    pub blocks: &'a [u32],
}

impl Model {
    /// Loads weights as `dtype` on `device`, checking every tensor's shape first.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Model> {
        let c = &dir.config;
        let (h, kv, d) = (c.hidden_size, c.num_kv_heads * c.head_dim, c.head_dim);
        let mut expected: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![c.vocab_size, h]),
            ("model.norm.weight".into(), vec![h]),
        ];
        if !c.tie_word_embeddings {
            expected.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
        }
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            expected.push((format!("{p}.input_layernorm.weight"), vec![h]));
            expected.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            expected.push((format!("{p}.self_attn.q_proj.weight"), vec![c.num_heads * d, h]));
            expected.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            expected.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            expected.push((format!("{p}.self_attn.o_proj.weight"), vec![h, c.num_heads * d]));
            if c.qkv_bias {
                expected.push((format!("{p}.self_attn.q_proj.bias"), vec![c.num_heads * d]));
                expected.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                expected.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            expected.push((format!("{p}.mlp.gate_proj.weight"), vec![c.intermediate_size, h]));
            expected.push((format!("{p}.mlp.up_proj.weight"), vec![c.intermediate_size, h]));
            expected.push((format!("{p}.mlp.down_proj.weight"), vec![h, c.intermediate_size]));
        }
        for (name, shape) in &expected {
            dir.index.expect(name, shape)?;
        }
        // SAFETY: the files are memory-mapped read-only; like every safetensors loader we
        // rely on them not being modified while the model loads (weights are copied out).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&dir.index.files, dtype, device)? };
        let linear = |vb: VarBuilder, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = vb.get((out, inp), "weight")?;
            let b = if bias { Some(vb.get(out, "bias")?) } else { None };
            Ok(Linear::new(w, b))
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let vb = vb.pp(format!("model.layers.{i}"));
            let a = vb.pp("self_attn");
            let m = vb.pp("mlp");
            layers.push(Layer {
                in_norm: vb.get(h, "input_layernorm.weight")?,
                post_norm: vb.get(h, "post_attention_layernorm.weight")?,
                q: linear(a.pp("q_proj"), c.num_heads * d, h, c.qkv_bias)?,
                k: linear(a.pp("k_proj"), kv, h, c.qkv_bias)?,
                v: linear(a.pp("v_proj"), kv, h, c.qkv_bias)?,
                o: linear(a.pp("o_proj"), h, c.num_heads * d, false)?,
                gate: linear(m.pp("gate_proj"), c.intermediate_size, h, false)?,
                up: linear(m.pp("up_proj"), c.intermediate_size, h, false)?,
                down: linear(m.pp("down_proj"), h, c.intermediate_size, false)?,
            });
        }
        let embed = vb.get((c.vocab_size, h), "model.embed_tokens.weight")?;
        let lm_head = if c.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            linear(vb.pp("lm_head"), c.vocab_size, h, false)?
        };
        let norm = vb.get(h, "model.norm.weight")?;
        let inv = Tensor::new(c.inv_freq(), device)?;
        let positions = Tensor::arange(0u32, c.max_position_embeddings as u32, device)?.to_dtype(DType::F32)?;
        let freqs = positions.unsqueeze(1)?.matmul(&inv.unsqueeze(0)?)?;
        Ok(Model {
            cfg: c.clone(),
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, self.cfg.rms_norm_eps as f32)?)
    }

    /// Runs the prompt `tokens` at positions `start..start+len`, writing their K/V into
    /// `blocks` (which must cover `0..start+len`); returns the last position's logits (f32).
    pub fn prefill(&self, pools: &KvPools, tokens: &[u32], start: usize, blocks: &[u32]) -> Result<Tensor> {
        let t = tokens.len();
        let total = start + t;
        let slots = pools.slots(blocks, 0, total)?;
        let new_slots = pools.write_index(&slots[start..], &self.device)?;
        let all_slots = Tensor::new(slots.as_slice(), &self.device)?;
        let pos = Tensor::arange(start as u32, total as u32, &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        // Causal mask over the whole context, offset by the cached prefix.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..total).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, total), &self.device)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?; // [t, hidden]
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms(&x, &layer.in_norm)?;
            let (q, k, v) = self.qkv(layer, &h, 1, t, &cos, &sin)?; // [1, heads, t, d]
            let (kk, vv) = pools.write(li, &new_slots, &k, &v)?;
            let (k, v) = if start == 0 {
                (kk, vv)
            } else {
                pools.gather(li, &all_slots, 1, total)?
            };
            let att = self.attend(&q, &k, &v, Some(&mask))?; // [1, t, heads*d]
            x = (x + layer.o.forward(&att.reshape((t, ()))?)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        let last = self.rms(&x.i(t - 1..t)?, &self.norm)?;
        Ok(self.lm_head.forward(&last)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// Advances each sequence by one token; returns logits `[batch, vocab]` (f32).
    pub fn decode(&self, pools: &KvPools, batch: &[DecodeInput<'_>]) -> Result<Tensor> {
        let b = batch.len();
        let max_len = batch.iter().map(|s| s.pos + 1).max().unwrap_or(0);
        let mut new_slots = Vec::with_capacity(b);
        // Each sequence's context, padded to the longest with slot 0 and masked out.
        let mut gather = Vec::with_capacity(b * max_len);
        let mut mask = Vec::with_capacity(b * max_len);
        for s in batch {
            let slots = pools.slots(s.blocks, 0, s.pos + 1)?;
            new_slots.push(slots[s.pos]);
            gather.extend_from_slice(&slots);
            gather.extend(std::iter::repeat_n(0, max_len - slots.len()));
            mask.extend(std::iter::repeat_n(0f32, slots.len()));
            mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, max_len - slots.len()));
        }
        let new_slots = pools.write_index(&new_slots, &self.device)?;
        let gather = Tensor::new(gather.as_slice(), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, 1, 1, max_len), &self.device)?;
        let pos = Tensor::new(batch.iter().map(|s| s.pos as u32).collect::<Vec<_>>().as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?.unsqueeze(1)?; // [b, 1, d/2]
        let sin = self.sin.index_select(&pos, 0)?.unsqueeze(1)?;
        let ids = Tensor::new(batch.iter().map(|s| s.token).collect::<Vec<_>>().as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?; // [b, hidden]
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms(&x, &layer.in_norm)?;
            let (q, k, v) = self.qkv(layer, &h, b, 1, &cos, &sin)?; // [b, heads, 1, d]
            pools.write(li, &new_slots, &k, &v)?;
            let (k, v) = pools.gather(li, &gather, b, max_len)?;
            let att = self.attend(&q, &k, &v, Some(&mask))?; // [b, 1, heads*d]
            x = (x + layer.o.forward(&att.reshape((b, ()))?)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        let x = self.rms(&x, &self.norm)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// q, k, v for `b` sequences of `t` tokens each: `[b, heads, t, d]`, RoPE applied.
    fn qkv(&self, layer: &Layer, h: &Tensor, b: usize, t: usize, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let shape =
            |x: Tensor, heads: usize| -> Result<Tensor> { Ok(x.reshape((b, t, heads, c.head_dim))?.transpose(1, 2)?.contiguous()?) };
        let q = shape(layer.q.forward(h)?, c.num_heads)?;
        let k = shape(layer.k.forward(h)?, c.num_kv_heads)?;
        let v = shape(layer.v.forward(h)?, c.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// Scaled dot-product attention in f32 with grouped K/V heads; `[b, t, heads*d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, _, t, d) = q.dims4()?;
        let groups = c.num_heads / c.num_kv_heads;
        let l = k.dim(2)?;
        // [b, kv, l, d] -> [b, kv*groups, l, d], each kv head serving `groups` q heads.
        let repeat = |x: &Tensor| -> Result<Tensor> {
            if groups == 1 {
                return Ok(x.clone());
            }
            Ok(x.unsqueeze(2)?
                .expand((b, c.num_kv_heads, groups, l, d))?
                .reshape((b, c.num_heads, l, d))?)
        };
        let q = q.to_dtype(DType::F32)?;
        let k = repeat(&k.to_dtype(DType::F32)?)?;
        let v = repeat(&v.to_dtype(DType::F32)?)?;
        let mut att = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let out = att.matmul(&v.contiguous()?)?.to_dtype(self.dtype)?; // [b, heads, t, d]
        Ok(out.transpose(1, 2)?.reshape((b, t, c.num_heads * d))?)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor> {
        let h = self.rms(x, &layer.post_norm)?;
        let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
        Ok(layer.down.forward(&(g * layer.up.forward(&h)?)?)?)
    }
}

/// Argmax of a logits vector (greedy decoding, ties to the lowest id).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
