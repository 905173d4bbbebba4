//! The forward pass: Llama-family decoder layers (RMSNorm, GQA attention with RoPE,
//! SwiGLU MLP; Qwen2's q/k/v bias; tied embeddings), reading and writing K/V through
//! the paged pools. One sequence's prefill, or one token each for a batch of
//! sequences of different lengths.
use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvPools;
use crate::loader::ModelDir;

struct Layer {
    in_norm: Tensor,
    /// q, k and v projections as one matmul: `[n, (heads + 2 kv_heads) * head_dim]`.
    qkv: Linear,
    o: Linear,
    post_norm: Tensor,
    /// gate and up projections as one matmul: `[n, 2 * intermediate]`.
    gate_up: Linear,
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
    /// The fused CUDA kernels (`kernels.rs`) run attention, RoPE and SwiGLU.
    fused: bool,
    /// With the fused kernels: the residual stream and the logits in f32 (`precision`
    /// `f32`), not in the model's dtype.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    f32_stream: bool,
    /// Prefill attention on tensor cores (`kernels::flash_prefill`).
    flash: bool,
    /// Decode steps as CUDA graphs (`graphs.rs`), behind the lock a decode step holds.
    /// None: off (CPU, candle's ops, precision `model`, an f32 model, or
    /// `cuda_graph_max_batch = 0`).
    #[cfg(feature = "cuda")]
    graphs: Option<std::sync::Mutex<crate::graphs::DecodeGraphs>>,
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
    /// `kernels`: `auto` uses the fused CUDA kernels where they serve the model,
    /// `reference` the plain candle ops everywhere. `precision`: `f32` keeps the fused
    /// path's residual stream and logits in f32, `model` in `dtype` (candle's ops always do).
    /// `graph_max_batch`: decode batches up to this size run as CUDA graphs (fused
    /// kernels, a bf16/f16 dtype, precision `f32`); 0: never.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device, kernels: &str, precision: &str, graph_max_batch: usize) -> Result<Model> {
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
        // Projections that read the same input become one matmul: rows stacked.
        let stacked = |parts: &[(VarBuilder, usize)], inp: usize, bias: bool| -> Result<Linear> {
            let mut ws = Vec::with_capacity(parts.len());
            let mut bs = Vec::with_capacity(parts.len());
            for (vb, out) in parts {
                ws.push(vb.get((*out, inp), "weight")?);
                if bias {
                    bs.push(vb.get(*out, "bias")?);
                }
            }
            let b = if bias { Some(Tensor::cat(&bs, 0)?) } else { None };
            Ok(Linear::new(Tensor::cat(&ws, 0)?, b))
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let vb = vb.pp(format!("model.layers.{i}"));
            let a = vb.pp("self_attn");
            let m = vb.pp("mlp");
            layers.push(Layer {
                in_norm: vb.get(h, "input_layernorm.weight")?,
                post_norm: vb.get(h, "post_attention_layernorm.weight")?,
                qkv: stacked(
                    &[(a.pp("q_proj"), c.num_heads * d), (a.pp("k_proj"), kv), (a.pp("v_proj"), kv)],
                    h,
                    c.qkv_bias,
                )?,
                o: linear(a.pp("o_proj"), h, c.num_heads * d, false)?,
                gate_up: stacked(
                    &[(m.pp("gate_proj"), c.intermediate_size), (m.pp("up_proj"), c.intermediate_size)],
                    h,
                    false,
                )?,
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
        let fused = match kernels {
            "auto" => fused_supported(device, c),
            "reference" => false,
            other => return Err(EngineError::Invalid(format!("kernels {other:?} is not auto or reference"))),
        };
        #[cfg(not(feature = "cuda"))]
        let _ = graph_max_batch;
        let f32_stream = match precision {
            "f32" => fused,
            "model" => false,
            other => return Err(EngineError::Invalid(format!("precision {other:?} is not f32 or model"))),
        };
        Ok(Model {
            cfg: c.clone(),
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            // The fused RoPE reads f32 tables (and rounds them itself for precision
            // `model`); candle's rope wants them in the model's dtype.
            cos: freqs.cos()?.to_dtype(if fused { DType::F32 } else { dtype })?,
            sin: freqs.sin()?.to_dtype(if fused { DType::F32 } else { dtype })?,
            fused,
            f32_stream,
            flash: fused && flash_supported(device, dtype, c),
            #[cfg(feature = "cuda")]
            // The graph's logits GEMM reads bf16/f16 (an f32 model's decode runs eagerly).
            graphs: (f32_stream && dtype != DType::F32 && graph_max_batch > 0)
                .then(|| std::sync::Mutex::new(crate::graphs::DecodeGraphs::new(graph_max_batch))),
        })
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, self.cfg.rms_norm_eps as f32)?)
    }

    /// Runs the prompt `tokens` at positions `start..start+len`, writing their K/V into
    /// `blocks` (which must cover `0..start+len`); returns the last position's logits (f32).
    pub fn prefill(&self, pools: &KvPools, tokens: &[u32], start: usize, blocks: &[u32]) -> Result<Vec<f32>> {
        let chunk = PrefillChunk {
            tokens,
            start,
            blocks,
            logits: true,
        };
        self.prefill_chunks(pools, &[chunk], None, |l| Ok(l.squeeze(0)?.to_vec1()?))
    }

    /// [`Model::prefill`], keeping in `taps` the residual stream after each layer (f32
    /// `[len, hidden]`): for comparing numerics with a reference layer by layer (in a
    /// process of its own: the taps are read after the pass, outside its lock).
    pub fn prefill_traced(
        &self,
        pools: &KvPools,
        tokens: &[u32],
        start: usize,
        blocks: &[u32],
        taps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let chunk = PrefillChunk {
            tokens,
            start,
            blocks,
            logits: true,
        };
        self.prefill_chunks(pools, &[chunk], taps, |l| Ok(l.squeeze(0)?))
    }

    /// One forward pass over several sequences' chunks (a varlen batch: each its own
    /// positions, block table and causal context); the logits `[k, vocab]` (f32) of the
    /// last position of each chunk that asks for them, in order (none asked: the K/V
    /// is written, and no logits are computed), handed to `read` as in [`Model::decode`].
    pub fn prefill_batch<R>(&self, pools: &KvPools, chunks: &[PrefillChunk<'_>], read: impl FnOnce(Tensor) -> Result<R>) -> Result<R> {
        self.prefill_chunks(pools, chunks, None, read)
    }

    fn prefill_chunks<R>(
        &self,
        pools: &KvPools,
        chunks: &[PrefillChunk<'_>],
        taps: Option<&mut Vec<Tensor>>,
        read: impl FnOnce(Tensor) -> Result<R>,
    ) -> Result<R> {
        if chunks.is_empty() || chunks.iter().any(|c| c.tokens.is_empty()) {
            return Err(EngineError::Invalid("prefill of no tokens".into()));
        }
        // candle's one cuBLAS handle (and its workspace) serves every thread, and a
        // captured graph replays its GEMMs with the workspace it was captured with: no
        // prefill's GEMMs may run beside a decode step's capture or replay.
        #[cfg(feature = "cuda")]
        let _graphs = self.stream_lock();

        // Each chunk's rows, and the rows whose logits are wanted.
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut wanted = Vec::new();
        let mut n = 0usize;
        for c in chunks {
            offsets.push(n);
            n += c.tokens.len();
            if c.logits {
                wanted.push((n - 1) as u32);
            }
        }
        // None asked: the pass still writes every row's K/V; one row goes through the
        // final norm, and no logits are computed.
        let none = wanted.is_empty();
        if none {
            wanted.push((n - 1) as u32);
        }
        let x = if self.fused {
            let mut rows = Rows::new(chunks.len(), self.prefill_queries_per_block());
            rows.flash = self.flash;
            let width = chunks.iter().map(|c| c.blocks.len()).max().unwrap_or(0);
            for (i, c) in chunks.iter().enumerate() {
                let to = c.start + c.tokens.len();
                rows.push_tile_run(c.tokens, c.start, &pools.slots(c.blocks, c.start, to)?, i as u32);
                rows.push_table(c.blocks, width);
            }
            self.forward_fused(pools, &rows, Some(&wanted), taps)?
        } else {
            let x = self.prefill_reference(pools, chunks, &offsets, taps)?;
            let rows = Tensor::new(wanted.as_slice(), &self.device)?;
            self.rms(&x.index_select(&rows, 0)?, &self.norm)?
        };
        if none {
            return read(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        }
        read(self.logits(&x)?)
    }

    /// Advances each sequence by one token and hands its logits `[batch, vocab]` (f32)
    /// to `read`, whose result is returned. The logits may live in a buffer the next
    /// step overwrites (a CUDA graph's), so `read` runs while no other step can.
    pub(crate) fn decode<R>(&self, pools: &KvPools, batch: &[DecodeInput<'_>], read: impl FnOnce(Tensor) -> Result<R>) -> Result<R> {
        #[cfg(feature = "cuda")]
        if let Some(mut g) = self.stream_lock()
            && g.enabled
        {
            let width = batch.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
            if let Some(shape) = crate::graphs::Shape::of(batch.len(), width, g.max_batch)
                && let Some(logits) = self.decode_graphed(&mut g, pools, batch, shape)?
            {
                return read(logits);
            }
        }
        read(self.decode_eager(pools, batch)?)
    }

    /// With CUDA graphs: their state, held by a decode step from its first upload to
    /// the end of `read` (the static logits are the next step's), and by a prefill
    /// pass (they share cuBLAS's workspace). A capture takes only its own thread's
    /// stream's work: candle puts each thread's work on that thread's default stream.
    #[cfg(feature = "cuda")]
    fn stream_lock(&self) -> Option<std::sync::MutexGuard<'_, crate::graphs::DecodeGraphs>> {
        self.graphs.as_ref().map(|g| g.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn decode_eager(&self, pools: &KvPools, batch: &[DecodeInput<'_>]) -> Result<Tensor> {
        let x = if self.fused {
            let b = batch.len();
            let width = batch.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
            let mut rows = Rows::decode(pools, batch, b, width)?;
            let longest = batch.iter().map(|s| s.pos + 1).max().unwrap_or(1);
            rows.key_splits = decode_key_splits(b * self.cfg.num_kv_heads, longest);
            self.forward_fused(pools, &rows, None, None)?
        } else {
            self.rms(&self.decode_reference(pools, batch)?, &self.norm)?
        };
        self.logits(&x)
    }

    /// A decode step through the CUDA graph of `shape` (captured on the shape's first
    /// step, which runs eagerly on the graph's buffers); the batch's rows of the
    /// bucket's static logits. None: capturing failed, graphs are off from now on, and
    /// the step is left to the eager path (it wrote nothing the eager step would not).
    #[cfg(feature = "cuda")]
    fn decode_graphed(
        &self,
        g: &mut crate::graphs::DecodeGraphs,
        pools: &KvPools,
        batch: &[DecodeInput<'_>],
        shape: crate::graphs::Shape,
    ) -> Result<Option<Tensor>> {
        use crate::graphs;
        let b = batch.len();
        let mut rows = Rows::decode(pools, batch, shape.batch, shape.width)?;
        for i in b..shape.batch {
            rows.push_padding(i as u32, shape.width);
        }
        // Fixed per shape (a graph's launch grid is), from the longest context its
        // tables can hold.
        rows.key_splits = decode_key_splits(shape.batch * self.cfg.num_kv_heads, shape.width * pools.layout().block_size);
        let meta = rows.meta();
        let (entry, logits) = g.entry(shape, meta.len(), self.cfg.vocab_size, &self.device)?;
        graphs::upload(&entry.meta, &meta)?;
        if let Some(graph) = &entry.graph {
            graphs::launch(graph)?;
            return Ok(Some(logits.narrow(0, 0, b)?));
        }
        let inputs = rows.inputs(&entry.meta)?;
        let step = || -> Result<()> {
            let h = self.forward_fused_on(pools, &rows, &inputs, None, None)?;
            crate::kernels::linear_f32_into(&h, self.lm_head.weight(), &logits)
        };
        let Device::Cuda(dev) = &self.device else {
            return Err(EngineError::Invalid("CUDA graphs on a device that is not CUDA".into()));
        };
        // Some of candle's kernels upload their parameters (index_select: the ids'
        // shape) from host vectors; a capture would replay copies from freed host
        // memory. With candle's cache on, the eager step leaves them on the device and
        // the capture finds them there (or fails, and graphs go off).
        let _params = dev.enable_cuda_graph_htod_cache();
        let captured = step().and_then(|()| {
            let eager = logits.narrow(0, 0, b)?.to_vec2::<f32>()?;
            let graph = graphs::capture(&self.device, step)?;
            // The graph must reproduce the step it was captured from (it rewrites the
            // same K/V into the same slots) before it replaces eager steps.
            graphs::launch(&graph)?;
            let replay = logits.narrow(0, 0, b)?.to_vec2::<f32>()?;
            let same = eager
                .iter()
                .zip(&replay)
                .flat_map(|(a, r)| a.iter().zip(r))
                .all(|(a, r)| (a - r).abs() <= 1e-3 * a.abs().max(1.0));
            if !same {
                return Err(EngineError::Invalid("the replay's logits differ from the eager step's".into()));
            }
            Ok(graph)
        });
        match captured {
            Ok(graph) => {
                entry.graph = Some(graph);
                Ok(Some(logits.narrow(0, 0, b)?))
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = shape.batch, width = shape.width, "capturing a decode step as a CUDA graph failed; decode steps run without graphs from now on");
                g.enabled = false;
                graphs::clear_errors(&self.device);
                Ok(None)
            }
        }
    }

    /// The final-normed hidden states' logits, f32 `[rows, vocab]`: accumulated and kept
    /// in f32 with `precision` `f32` on the fused path, rounded to the model's dtype
    /// (as candle's and transformers' ops leave them) otherwise.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.f32_stream {
            return crate::kernels::linear_f32(x, self.lm_head.weight());
        }
        Ok(self.lm_head.forward(x)?.to_dtype(DType::F32)?)
    }

    /// Prefill with candle's ops: the reference, and the path on the CPU. The chunks'
    /// rows go through the projections and the MLP together; each attends its own
    /// context (its chunk, and the positions before it from the pools) under a causal
    /// mask. Returns the residual stream of every row (`offsets`: each chunk's first).
    fn prefill_reference(
        &self,
        pools: &KvPools,
        chunks: &[PrefillChunk<'_>],
        offsets: &[usize],
        mut taps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (mut ids, mut pos, mut new_slots) = (Vec::new(), Vec::new(), Vec::new());
        // Per chunk: its context's slots and its causal mask.
        let mut contexts = Vec::with_capacity(chunks.len());
        for c in chunks {
            let (t, total) = (c.tokens.len(), c.start + c.tokens.len());
            let slots = pools.slots(c.blocks, 0, total)?;
            ids.extend_from_slice(c.tokens);
            pos.extend(c.start as u32..total as u32);
            new_slots.extend_from_slice(&slots[c.start..]);
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..total).map(move |j| if j > c.start + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            contexts.push((
                Tensor::new(slots.as_slice(), &self.device)?,
                Tensor::from_vec(mask, (1, 1, t, total), &self.device)?,
            ));
        }
        let n = ids.len();
        let new_slots = pools.write_index(&new_slots, &self.device)?;
        let pos = Tensor::new(pos.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?; // [n, hidden]
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms(&x, &layer.in_norm)?;
            let (q, k, v) = self.qkv(layer, &h, 1, n, &cos, &sin)?; // [1, heads, n, d]
            pools.write(li, &new_slots, &k, &v)?;
            let mut att = Vec::with_capacity(chunks.len());
            for ((c, &at), (slots, mask)) in chunks.iter().zip(offsets).zip(&contexts) {
                let t = c.tokens.len();
                let rows = |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(2, at, t)?.contiguous()?) };
                let (kc, vc) = if c.start == 0 {
                    (rows(&k)?, rows(&v)?)
                } else {
                    pools.gather(li, slots, 1, c.start + t)?
                };
                att.push(self.attend(&rows(&q)?, &kc, &vc, Some(mask))?.reshape((t, ()))?); // [t, heads*d]
            }
            let att = if att.len() == 1 { att.remove(0) } else { Tensor::cat(&att, 0)? };
            x = (x + layer.o.forward(&att)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
            if let Some(taps) = taps.as_deref_mut() {
                taps.push(x.to_dtype(DType::F32)?);
            }
        }
        Ok(x)
    }

    /// A decode step with candle's ops: the reference, and the path on the CPU. The
    /// projections and the MLP run over the batch's rows together; each sequence
    /// attends its own context, read from the pools at its own length (no padding to
    /// the longest, no mask).
    fn decode_reference(&self, pools: &KvPools, batch: &[DecodeInput<'_>]) -> Result<Tensor> {
        let b = batch.len();
        let mut new_slots = Vec::with_capacity(b);
        let mut contexts = Vec::with_capacity(b);
        for s in batch {
            let slots = pools.slots(s.blocks, 0, s.pos + 1)?;
            new_slots.push(slots[s.pos]);
            contexts.push((Tensor::new(slots.as_slice(), &self.device)?, slots.len()));
        }
        let new_slots = pools.write_index(&new_slots, &self.device)?;
        let pos = Tensor::new(batch.iter().map(|s| s.pos as u32).collect::<Vec<_>>().as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?.unsqueeze(1)?; // [b, 1, d/2]
        let sin = self.sin.index_select(&pos, 0)?.unsqueeze(1)?;
        let ids = Tensor::new(batch.iter().map(|s| s.token).collect::<Vec<_>>().as_slice(), &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?; // [b, hidden]
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms(&x, &layer.in_norm)?;
            let (q, k, v) = self.qkv(layer, &h, b, 1, &cos, &sin)?; // [b, heads, 1, d]
            pools.write(li, &new_slots, &k, &v)?;
            let mut att = Vec::with_capacity(b);
            for (i, (slots, len)) in contexts.iter().enumerate() {
                let (k, v) = pools.gather(li, slots, 1, *len)?;
                att.push(self.attend(&q.narrow(0, i, 1)?.contiguous()?, &k, &v, None)?); // [1, 1, heads*d]
            }
            let att = if att.len() == 1 { att.remove(0) } else { Tensor::cat(&att, 0)? };
            x = (x + layer.o.forward(&att.reshape((b, ()))?)?)?;
            x = (&x + self.mlp(layer, &x)?)?;
        }
        Ok(x)
    }

    /// The decoder layers with the fused CUDA kernels: RoPE and the K/V writes in one
    /// kernel, attention straight from the pools through the block tables (no gather,
    /// no padding, no score matrix), SwiGLU in one kernel, each residual add with the
    /// RMSNorm after it in one kernel. Returns the final-normed hidden states of every
    /// row, or of row `only` alone; `taps` as in [`Model::prefill_traced`].
    #[cfg(feature = "cuda")]
    fn forward_fused(&self, pools: &KvPools, r: &Rows, only: Option<&[u32]>, taps: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let meta = Tensor::new(r.meta().as_slice(), &self.device)?;
        let inputs = r.inputs(&meta)?;
        self.forward_fused_on(pools, r, &inputs, only, taps)
    }

    /// [`Model::forward_fused`] on the rows' integers already on the device.
    #[cfg(feature = "cuda")]
    fn forward_fused_on(
        &self,
        pools: &KvPools,
        r: &Rows,
        inputs: &Inputs,
        only: Option<&[u32]>,
        mut taps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        use crate::kernels::{self, PagedContext};
        let n = r.tokens.len();
        let Inputs {
            ids,
            pos,
            slots,
            seq,
            ctx,
            tiles: tiles_t,
            tables,
        } = inputs;
        let paged = PagedContext {
            tables,
            seq,
            ctx,
            tiles: tiles_t,
            block_size: pools.layout().block_size,
            queries_per_block: r.queries_per_block,
            key_splits: r.key_splits,
        };
        let heads = self.heads();
        let mut x = self.embed.index_select(ids, 0)?; // [n, hidden]: the residual stream
        if self.f32_stream {
            x = x.to_dtype(DType::F32)?;
        }
        let eps = self.cfg.rms_norm_eps as f32;
        // Each layer's MLP output, added to the stream by the next norm's kernel.
        let mut delta: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let (kp, vp) = pools.layer(li);
            let (x1, h) = kernels::add_rms_norm(&x, delta.as_ref(), &layer.in_norm, eps)?;
            if let (Some(taps), Some(_)) = (taps.as_deref_mut(), &delta) {
                taps.push(x1.to_dtype(DType::F32)?);
            }
            let qkv = layer.qkv.forward(&h)?;
            let q = kernels::rope_kv(kernels::RopeKv {
                qkv: &qkv,
                pos,
                slots,
                cos: &self.cos,
                sin: &self.sin,
                k_pool: kp,
                v_pool: vp,
                heads,
                in_dtype: !self.f32_stream,
            })?;
            let att = if r.flash {
                kernels::flash_prefill(&q, kp, vp, &paged, heads)?
            } else {
                kernels::paged_attention(&q, kp, vp, &paged, heads)?
            };
            let o = layer.o.forward(&att.reshape((n, ()))?)?;
            let (x2, h) = kernels::add_rms_norm(&x1, Some(&o), &layer.post_norm, eps)?;
            let gu = layer.gate_up.forward(&h)?;
            delta = Some(layer.down.forward(&kernels::silu_mul(&gu)?)?);
            x = x2;
        }
        // The last layer's add and the final norm: for the rows asked, unless the taps
        // want the whole stream.
        let pick = |t: Tensor, rows: &[u32]| -> Result<Tensor> {
            Ok(match rows {
                [i] => t.narrow(0, *i as usize, 1)?.contiguous()?,
                _ => t.index_select(&Tensor::new(rows, &self.device)?, 0)?,
            })
        };
        let narrow = only.filter(|_| taps.is_none());
        let (x, d) = match narrow {
            Some(rows) => (pick(x, rows)?, delta.map(|d| pick(d, rows)).transpose()?),
            None => (x, delta),
        };
        let (x, h) = kernels::add_rms_norm(&x, d.as_ref(), &self.norm, eps)?;
        if let (Some(taps), Some(_)) = (taps, &d) {
            taps.push(x.to_dtype(DType::F32)?);
        }
        match (only, narrow) {
            (Some(rows), None) => pick(h, rows),
            _ => Ok(h),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn forward_fused(&self, _: &KvPools, _: &Rows, _: Option<&[u32]>, _: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        unreachable!("the fused kernels are built with the `cuda` feature only")
    }

    /// Each row's argmax (ties to the lowest id), computed where `logits` lives.
    pub(crate) fn argmax_rows(&self, logits: &Tensor) -> Result<Vec<u32>> {
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            return crate::kernels::argmax_rows(&logits.contiguous()?);
        }
        Ok(logits.to_vec2::<f32>()?.iter().map(|l| argmax(l)).collect())
    }

    #[cfg(feature = "cuda")]
    fn heads(&self) -> crate::kernels::Heads {
        crate::kernels::Heads {
            q: self.cfg.num_heads,
            kv: self.cfg.num_kv_heads,
            dim: self.cfg.head_dim,
        }
    }

    /// Prefill queries per attention block: the tensor-core kernel's 64, or as many as
    /// fill the other kernel's warps, one per q head.
    fn prefill_queries_per_block(&self) -> usize {
        #[cfg(feature = "cuda")]
        if self.flash {
            return crate::kernels::FLASH_ROWS;
        }
        (MAX_ATTENTION_WARPS / (self.cfg.num_heads / self.cfg.num_kv_heads).max(1)).max(1)
    }

    /// q, k, v for `b` sequences of `t` tokens each: `[b, heads, t, d]`, RoPE applied.
    fn qkv(&self, layer: &Layer, h: &Tensor, b: usize, t: usize, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (qn, kvn) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let qkv = layer.qkv.forward(h)?;
        let shape = |from: usize, heads: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(1, from, heads * c.head_dim)?
                .reshape((b, t, heads, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = shape(0, c.num_heads)?;
        let k = shape(qn, c.num_kv_heads)?;
        let v = shape(qn + kvn, c.num_kv_heads)?;
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
        let i = self.cfg.intermediate_size;
        let gu = layer.gate_up.forward(&self.rms(x, &layer.post_norm)?)?;
        let g = candle_nn::ops::silu(&gu.narrow(1, 0, i)?)?;
        Ok(layer.down.forward(&(g * gu.narrow(1, i, i)?)?)?)
    }
}

/// One fused forward pass's rows (tokens), and where each finds its context.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Rows {
    tokens: Vec<u32>,
    pos: Vec<u32>,
    /// Pool slot each row's K/V is written to.
    slots: Vec<u32>,
    /// Each row's block table (row of `tables`).
    seq: Vec<u32>,
    /// Keys each row attends: `0..ctx`.
    ctx: Vec<u32>,
    /// `sequences` block tables of equal width (padded).
    tables: Vec<u32>,
    sequences: usize,
    queries_per_block: usize,
    /// Each attention tile's first row: at most `queries_per_block` rows of one sequence.
    tiles: Vec<u32>,
    /// Attention blocks sharing each row's keys (see `decode_key_splits`).
    key_splits: usize,
    /// Attention on tensor cores (`kernels::flash_prefill`; prefill passes).
    flash: bool,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Rows {
    fn new(sequences: usize, queries_per_block: usize) -> Rows {
        Rows {
            tokens: Vec::new(),
            pos: Vec::new(),
            slots: Vec::new(),
            seq: Vec::new(),
            ctx: Vec::new(),
            tables: Vec::new(),
            sequences,
            queries_per_block,
            tiles: Vec::new(),
            key_splits: 1,
            flash: false,
        }
    }

    /// Rows for `tokens` of sequence `seq` at positions `start..` (K/V to `slots`),
    /// each attending its causal context, in tiles of their own.
    fn push_tile_run(&mut self, tokens: &[u32], start: usize, slots: &[u32], seq: u32) {
        let first = self.tokens.len() as u32;
        let t = tokens.len() as u32;
        self.tiles.extend((0..t).step_by(self.queries_per_block.max(1)).map(|i| first + i));
        self.tokens.extend_from_slice(tokens);
        self.pos.extend(start as u32..start as u32 + t);
        self.slots.extend_from_slice(slots);
        self.seq.extend(std::iter::repeat_n(seq, t as usize));
        self.ctx.extend(start as u32 + 1..=start as u32 + t);
    }

    /// The next sequence's block table, padded to `width`.
    fn push_table(&mut self, blocks: &[u32], width: usize) {
        self.tables.extend_from_slice(blocks);
        self.tables.extend(std::iter::repeat_n(0, width - blocks.len()));
    }

    /// A decode step's rows (one a sequence, each its own tile; room for `sequences`
    /// tables, `width` wide).
    fn decode(pools: &KvPools, batch: &[DecodeInput<'_>], sequences: usize, width: usize) -> Result<Rows> {
        let mut rows = Rows::new(sequences, 1);
        for (i, s) in batch.iter().enumerate() {
            rows.push_tile_run(&[s.token], s.pos, &pools.slots(s.blocks, s.pos, s.pos + 1)?, i as u32);
            rows.push_table(s.blocks, width);
        }
        Ok(rows)
    }

    /// A padding row (sequence `seq`, an empty table): it writes no K/V and attends
    /// no key; its logits are not read.
    fn push_padding(&mut self, seq: u32, width: usize) {
        self.tiles.push(self.tokens.len() as u32);
        self.tokens.push(0);
        self.pos.push(0);
        self.slots.push(NO_SLOT);
        self.seq.push(seq);
        self.ctx.push(0);
        self.push_table(&[], width);
    }

    /// Every integer of the pass, for one host-to-device copy: tokens, positions,
    /// slots, table rows, contexts, the tiles' first rows and the row count, tables.
    fn meta(&self) -> Vec<u32> {
        let n = self.tokens.len();
        let mut meta = Vec::with_capacity(5 * n + self.tiles.len() + 1 + self.tables.len());
        for part in [&self.tokens, &self.pos, &self.slots, &self.seq, &self.ctx, &self.tiles] {
            meta.extend_from_slice(part);
        }
        meta.push(n as u32);
        meta.extend_from_slice(&self.tables);
        meta
    }

    /// The views of [`Rows::meta`] on the device (`meta` holds it).
    fn inputs(&self, meta: &Tensor) -> Result<Inputs> {
        let n = self.tokens.len();
        let part = |i: usize| meta.narrow(0, i * n, n);
        let tiles = self.tiles.len() + 1;
        Ok(Inputs {
            ids: part(0)?,
            pos: part(1)?,
            slots: part(2)?,
            seq: part(3)?,
            ctx: part(4)?,
            tiles: meta.narrow(0, 5 * n, tiles)?,
            tables: meta.narrow(0, 5 * n + tiles, self.tables.len())?.reshape((self.sequences, ()))?,
        })
    }
}

/// A slot no row writes: the padding rows of a captured decode batch (NO_SLOT in
/// kernels/fused.cu).
const NO_SLOT: u32 = u32::MAX;

/// [`Rows`]' integers on the device.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Inputs {
    ids: Tensor,
    pos: Tensor,
    slots: Tensor,
    seq: Tensor,
    ctx: Tensor,
    tiles: Tensor,
    tables: Tensor,
}

/// One sequence's part of a batched prefill: `tokens` at positions
/// `start..start + tokens.len()` (a whole prompt, or a chunk of one whose earlier
/// positions' K/V `blocks` already hold), written into `blocks`.
#[derive(Debug, Clone, Copy)]
pub struct PrefillChunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub blocks: &'a [u32],
    /// Return the logits of the chunk's last position (its prompt's last).
    pub logits: bool,
}

/// How many blocks share a decode query's keys: without a split a step runs one block
/// per (sequence, KV head), too few to fill a GPU at batch 1-16 (each block then walks
/// its keys alone, one 32-key tile after another, bound by memory latency). Aim at
/// about 256 blocks, with at least one tile (32 keys) per share and at most 32 shares.
fn decode_key_splits(blocks: usize, longest_context: usize) -> usize {
    const TARGET_BLOCKS: usize = 256;
    if blocks >= TARGET_BLOCKS {
        return 1;
    }
    longest_context.div_ceil(32).min(TARGET_BLOCKS.div_ceil(blocks.max(1))).clamp(1, 32)
}

/// Warps of one attention block (MAX_WARPS in kernels/fused.cu).
pub(crate) const MAX_ATTENTION_WARPS: usize = 16;

#[cfg(feature = "cuda")]
fn fused_supported(device: &Device, c: &ModelConfig) -> bool {
    crate::kernels::supported(
        device,
        crate::kernels::Heads {
            q: c.num_heads,
            kv: c.num_kv_heads,
            dim: c.head_dim,
        },
    )
}

#[cfg(not(feature = "cuda"))]
fn fused_supported(_: &Device, _: &ModelConfig) -> bool {
    false
}

#[cfg(feature = "cuda")]
fn flash_supported(device: &Device, dtype: DType, c: &ModelConfig) -> bool {
    crate::kernels::flash_supported(
        device,
        dtype,
        crate::kernels::Heads {
            q: c.num_heads,
            kv: c.num_kv_heads,
            dim: c.head_dim,
        },
    )
}

#[cfg(not(feature = "cuda"))]
fn flash_supported(_: &Device, _: DType, _: &ModelConfig) -> bool {
    false
}

/// Argmax of a logits vector (greedy decoding, ties to the lowest id).
pub fn argmax(logits: &[f32]) -> u32 {
    let Some(&first) = logits.first() else { return 0 };
    // The best value rides in a register: the scan is one compare per logit.
    let (mut best, mut best_v) = (0, first);
    for (i, &v) in logits.iter().enumerate().skip(1) {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The integers a pass uploads, and the views the kernels read them through: a
    /// captured decode batch of 2 sequences padded to 4 rows.
    #[test]
    fn rows_upload_as_one_buffer_and_padding_rows_write_nothing() {
        let mut r = Rows::new(4, 1);
        r.push_tile_run(&[7], 20, &[333], 0);
        r.push_table(&[20, 21], 4);
        r.push_tile_run(&[9], 3, &[51], 1);
        r.push_table(&[3], 4);
        r.push_padding(2, 4);
        r.push_padding(3, 4);
        let meta = Tensor::new(r.meta().as_slice(), &Device::Cpu).unwrap();
        let i = r.inputs(&meta).unwrap();
        let v = |t: &Tensor| t.to_vec1::<u32>().unwrap();
        assert_eq!(v(&i.ids), [7, 9, 0, 0]);
        assert_eq!(v(&i.pos), [20, 3, 0, 0]);
        assert_eq!(v(&i.slots), [333, 51, NO_SLOT, NO_SLOT]);
        assert_eq!(v(&i.seq), [0, 1, 2, 3]);
        assert_eq!(v(&i.ctx), [21, 4, 0, 0], "padding rows attend nothing");
        assert_eq!(v(&i.tiles), [0, 1, 2, 3, 4], "one tile a row, then the row count");
        assert_eq!(
            i.tables.to_vec2::<u32>().unwrap(),
            [[20, 21, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
        );
    }

    #[test]
    fn decode_keys_split_to_fill_the_gpu_one_tile_a_share_at_least() {
        // Batch 1 of the 1B shape (8 KV heads): 160 keys make 5 shares of a tile each.
        assert_eq!(decode_key_splits(8, 160), 5);
        assert_eq!(decode_key_splits(8, 20), 1);
        // Long contexts: at most 32 shares; about 256 blocks in all.
        assert_eq!(decode_key_splits(8, 8192), 32);
        assert_eq!(decode_key_splits(64, 8192), 4);
        assert_eq!(decode_key_splits(256, 8192), 1);
    }
}
