//! The engine as the daemons use it: a loaded model, its KV pools and block manager,
//! and its tokenizer.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{BlockHash, BlockManager, KvEvent, KvLayout, KvPools, dtype_name};
use crate::loader::ModelDir;
use crate::model::{DecodeInput, Model, PrefillChunk};
use crate::sampling::{SamplingParams, sample};

/// The `[engine]` section of a daemon's config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Hugging Face model directory.
    pub model: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `auto` (f32 on CPU, bf16 on GPU), `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Memory for the KV pools, in MiB; sets the number of blocks.
    pub kv_cache_mib: u64,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Longest sequence (prompt + output) served; 0 means the model's maximum.
    pub max_model_len: usize,
    /// `auto`: fused CUDA kernels for attention, RoPE with the KV writes, and SwiGLU
    /// where they serve the model (head dim 32, 64 or 128, at most 16 query heads per
    /// KV head); `reference`: candle's plain ops (the CPU always uses those).
    pub kernels: String,
    /// `f32`: with the fused kernels, the residual stream and the logits stay in f32
    /// (the matmuls still read bf16/f16 weights and activations); `model`: both in the
    /// model's dtype, as transformers and candle's ops keep them.
    pub precision: String,
    /// Keep computed prompt blocks after their request and reuse them for prompts that
    /// start the same way (see `kv_cache`'s module comment); used where prompts are
    /// admitted with [`Engine::admit_prompt`] (the prefill-server).
    pub prefix_caching: bool,
    /// Decode batches run as CUDA graphs, captured per batch-size bucket (1, 2, 4, 8,
    /// 16, 24, 32, 48, ... 256; the largest bucket not above this value is the last)
    /// and block-table width: one launch a step instead of some 150 (fused kernels, a
    /// bf16/f16 dtype, precision `f32`; a shape's first step runs eagerly and is
    /// captured). 0: no graphs.
    pub cuda_graph_max_batch: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: PathBuf::from("models/tiny"),
            device: "cpu".into(),
            dtype: "auto".into(),
            kv_cache_mib: 256,
            block_size: 16,
            max_model_len: 0,
            kernels: "auto".into(),
            precision: "f32".into(),
            prefix_caching: true,
            cuda_graph_max_batch: 128,
        }
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let n = s
                .strip_prefix("cuda:")
                .or(if s == "cuda" { Some("0") } else { None })
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| EngineError::Invalid(format!("device {s:?} is not `cpu` or `cuda:N`")))?;
            let device = Device::new_cuda(n)?;
            #[cfg(feature = "cuda")]
            crate::graphs::single_stream(&device);
            Ok(device)
        }
    }
}

/// One prompt's part of a batched prefill: positions `from..to` of `prompt`, the K/V
/// of `..from` already in `blocks` (a cached prefix, or its earlier chunks).
#[derive(Debug, Clone, Copy)]
pub struct PrefillPart<'a> {
    pub prompt: &'a [u32],
    pub from: usize,
    pub to: usize,
    pub blocks: &'a [u32],
    pub params: &'a SamplingParams,
}

/// How one sequence of a decode batch picks its next token.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    pub params: &'a SamplingParams,
    /// Every token so far, prompt and output (for the repetition penalty).
    pub history: &'a [u32],
    /// Index of this generation step (seeds the sampler).
    pub step: u64,
}

pub struct Engine {
    model: Model,
    pools: Arc<KvPools>,
    blocks: Mutex<BlockManager>,
    /// The model's tokenizer and chat template.
    prompter: prompt::Prompter,
    max_len: usize,
    next_seq: AtomicU64,
    prefix_caching: bool,
    /// KV events of the prefix cache, for the workers' event streams.
    kv_events: tokio::sync::broadcast::Sender<KvEventBatch>,
    /// Free blocks promised to sequences waiting to resume (see [`Engine::hold_blocks`]).
    held: AtomicU64,
}

/// KV events made under one lock of the block manager, each with its number.
pub type KvEventBatch = Arc<[(u64, KvEvent)]>;

/// Batches of KV events a slow subscriber may fall behind before it lagged.
pub const KV_EVENT_BACKLOG: usize = 4096;

impl Engine {
    pub fn load(cfg: &EngineConfig) -> Result<Engine> {
        let dir = ModelDir::open(&cfg.model)?;
        let device = parse_device(&cfg.device)?;
        let dtype = match cfg.dtype.as_str() {
            "auto" if device.is_cpu() => DType::F32,
            "auto" => DType::BF16,
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => return Err(EngineError::Invalid(format!("dtype {other:?} is not auto, f32, bf16 or f16"))),
        };
        let prompter = prompt::Prompter::load(&dir.root)?;
        let model = Model::load(&dir, dtype, &device, &cfg.kernels, &cfg.precision, cfg.cuda_graph_max_batch)?;
        let c = &model.cfg;
        let block_size = cfg.block_size.max(1);
        let per_block = (c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * dtype.size_in_bytes()) as u64;
        let num_blocks = ((cfg.kv_cache_mib << 20) / per_block) as usize;
        if num_blocks == 0 {
            return Err(EngineError::Invalid(format!(
                "kv_cache_mib {} holds no block of {per_block} bytes",
                cfg.kv_cache_mib
            )));
        }
        let layout = KvLayout {
            model_fingerprint: dir.fingerprint,
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size,
            dtype: dtype_name(dtype).into(),
            num_blocks,
        };
        let pools = Arc::new(KvPools::new(layout, dtype, &device)?);
        let max_len = if cfg.max_model_len == 0 {
            c.max_position_embeddings
        } else {
            cfg.max_model_len.min(c.max_position_embeddings)
        };
        tracing::info!(model = %cfg.model.display(), device = %cfg.device, dtype = dtype_name(dtype), num_blocks, block_size, "engine loaded");
        Ok(Engine {
            model,
            pools,
            blocks: Mutex::new({
                let mut b = BlockManager::new(num_blocks, block_size);
                if cfg.prefix_caching {
                    b.record_events();
                }
                b
            }),
            kv_events: tokio::sync::broadcast::channel(KV_EVENT_BACKLOG).0,
            prompter,
            max_len,
            next_seq: AtomicU64::new(1),
            held: AtomicU64::new(0),
            prefix_caching: cfg.prefix_caching,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    pub fn layout(&self) -> &KvLayout {
        self.pools.layout()
    }
    pub fn pools(&self) -> Arc<KvPools> {
        self.pools.clone()
    }
    pub fn max_model_len(&self) -> usize {
        self.max_len
    }
    pub fn next_sequence_id(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.prompter.tokenize(text)?)
    }

    /// A conversation's prompt: the model's chat template with the assistant's turn
    /// opened, tokenized without adding special tokens (the template writes them).
    pub fn chat_prompt(&self, messages: &[prompt::ChatMessage]) -> Result<Vec<u32>> {
        Ok(self.prompter.chat_prompt(messages)?)
    }

    pub fn detokenize(&self, ids: &[u32]) -> Result<String> {
        Ok(self.prompter.detokenize(ids)?)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.model.cfg.eos_token_ids.contains(&id)
    }

    /// Refuses prompts the engine cannot serve, with the reason.
    pub fn check_prompt(&self, prompt: &[u32], params: &SamplingParams) -> Result<()> {
        if prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= self.model.cfg.vocab_size) {
            return Err(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.model.cfg.vocab_size
            )));
        }
        let need = prompt.len() + params.max_tokens as usize;
        if need > self.max_len {
            return Err(EngineError::Invalid(format!(
                "prompt of {} tokens plus max_tokens {} exceeds the maximum sequence length {}",
                prompt.len(),
                params.max_tokens,
                self.max_len
            )));
        }
        Ok(())
    }

    /// Reserves blocks for `tokens` positions; returns the block table.
    pub fn admit(&self, seq: u64, tokens: usize) -> Result<Vec<u32>> {
        self.with_blocks(|b| Ok(b.admit(seq, tokens)?.to_vec()))
    }

    /// Extends a sequence's blocks to cover `tokens` positions (blocks are taken as a
    /// sequence grows); returns the whole table.
    pub fn grow(&self, seq: u64, tokens: usize) -> Result<Vec<u32>> {
        self.with_blocks(|b| Ok(b.grow(seq, tokens)?.to_vec()))
    }

    /// Admits a prompt of `len` tokens with its [`Engine::prompt_hashes`] for prefill:
    /// with prefix caching, its leading blocks already cached are shared and only the
    /// rest must be computed, from `cached_tokens` on (never earlier: the shared blocks
    /// may be in use by other requests).
    pub fn admit_prompt(&self, seq: u64, len: usize, hashes: &[crate::kv_cache::BlockHash]) -> Result<crate::kv_cache::Admitted> {
        self.with_blocks(|b| b.admit_cached(seq, len, hashes))
    }

    /// Admits a sequence whose prompt (the positions whose K/V must be in its blocks
    /// before it decodes) is `prompt_len` tokens long, with blocks for `tokens`
    /// positions (the prompt and as much of its output as is reserved), sharing the
    /// prompt's leading blocks found in the prefix cache under `hashes`; never the
    /// block of the prompt's last token, which is always computed or written.
    pub fn admit_sequence(&self, seq: u64, prompt_len: usize, tokens: usize, hashes: &[BlockHash]) -> Result<crate::kv_cache::Admitted> {
        let reusable = prompt_len.saturating_sub(1) / self.layout().block_size;
        let hashes = &hashes[..hashes.len().min(reusable)];
        self.with_blocks(|b| b.admit_cached(seq, tokens.max(prompt_len), hashes))
    }

    /// Offers a prefilled prompt's full blocks to the prefix cache (after its K/V is
    /// computed: a block must never be found before it holds its tokens' K/V).
    pub fn commit_prompt(&self, seq: u64, hashes: &[crate::kv_cache::BlockHash]) {
        self.with_blocks(|b| b.commit_cached(seq, hashes));
    }

    /// The prompt's full blocks' chained hashes, under `salt` (prompts find each
    /// other's blocks only with equal salts); none with prefix caching off.
    pub fn prompt_hashes(&self, prompt: &[u32], salt: &str) -> Vec<crate::kv_cache::BlockHash> {
        if !self.prefix_caching {
            return vec![];
        }
        let layout = self.layout();
        crate::kv_cache::block_hashes(layout.model_fingerprint, salt, prompt, layout.block_size)
    }

    /// Runs `f` on the block manager and publishes the KV events it made, in order
    /// (under the lock: the numbers subscribers see follow the events' order).
    fn with_blocks<R>(&self, f: impl FnOnce(&mut BlockManager) -> R) -> R {
        let mut b = self.blocks.lock().unwrap();
        let r = f(&mut b);
        let events = b.take_events();
        if !events.is_empty() {
            // No subscriber is no error: the events are for whoever listens now.
            let _ = self.kv_events.send(events.into());
        }
        r
    }

    /// The prefix cache as it is now (the last event's number and every cached block's
    /// hash) and a receiver of every event after it: what a KV-event stream starts
    /// from. A receiver that falls more than [`KV_EVENT_BACKLOG`] batches behind is
    /// told it lagged (it must start again from a new snapshot).
    pub fn subscribe_kv_events(&self) -> (u64, Vec<BlockHash>, tokio::sync::broadcast::Receiver<KvEventBatch>) {
        let b = self.blocks.lock().unwrap();
        let (seq, hashes) = b.cache_snapshot();
        (seq, hashes, self.kv_events.subscribe())
    }

    /// Whether this engine keeps a prefix cache (and so publishes KV events).
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Blocks holding a cached prompt block (in use or idle).
    pub fn cached_blocks(&self) -> usize {
        self.blocks.lock().unwrap().cached_blocks()
    }

    pub fn release(&self, seq: u64) {
        self.blocks.lock().unwrap().release(seq);
    }

    pub fn free_blocks(&self) -> usize {
        self.blocks.lock().unwrap().free_blocks()
    }

    /// Marks `n` of the free blocks as promised (to preempted sequences waiting to
    /// resume): [`Engine::available_blocks`] leaves them out.
    pub fn hold_blocks(&self, n: usize) {
        self.held.store(n as u64, Ordering::Relaxed);
    }

    /// Free blocks a new request could take: those not promised to waiting sequences.
    pub fn available_blocks(&self) -> usize {
        self.free_blocks().saturating_sub(self.held.load(Ordering::Relaxed) as usize)
    }

    /// Sequences holding blocks now.
    pub fn sequences(&self) -> usize {
        self.blocks.lock().unwrap().sequences()
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.lock().unwrap().total()
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.layout().block_size)
    }

    /// Prefill of `tokens` at positions `start..`; the last position's logits.
    pub fn prefill(&self, tokens: &[u32], start: usize, blocks: &[u32]) -> Result<Vec<f32>> {
        self.model.prefill(&self.pools, tokens, start, blocks)
    }

    /// A prompt's prefill from position 0 in blocks of its own, kept apart from any
    /// serving: the last position's logits and, with `layers`, the residual stream
    /// after every layer (f32, `[len * hidden]` each; layers x len x hidden x 4 bytes
    /// on the device and here). For comparing numerics with a reference.
    pub fn trace_prefill(&self, tokens: &[u32], layers: bool) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        self.check_prompt(
            tokens,
            &SamplingParams {
                max_tokens: 0,
                ..Default::default()
            },
        )?;
        let seq = self.next_sequence_id();
        let blocks = self.admit(seq, tokens.len())?;
        let traced = (|| {
            let mut taps = Vec::new();
            let logits = self
                .model
                .prefill_traced(&self.pools, tokens, 0, &blocks, layers.then_some(&mut taps))?;
            let layers = taps
                .iter()
                .map(|t| t.flatten_all()?.to_vec1())
                .collect::<candle_core::Result<_>>()?;
            Ok((layers, logits.to_vec1()?))
        })();
        self.release(seq);
        traced
    }

    /// Prefills like [`Engine::prefill`] and samples the prompt's first token (see
    /// [`Engine::prefill_batch_pick`]). `start`: leading positions whose K/V the blocks
    /// already hold (a cached prefix).
    pub fn prefill_pick(&self, tokens: &[u32], start: usize, blocks: &[u32], params: &SamplingParams) -> Result<u32> {
        let part = PrefillPart {
            prompt: tokens,
            from: start,
            to: tokens.len(),
            blocks,
            params,
        };
        Ok(self.prefill_batch_pick(&[part])?[0].expect("the prompt's last chunk"))
    }

    /// One forward pass over several prompts' chunks (batched, chunked prefill): each
    /// part's K/V written, and the first token of each prompt whose last chunk it is
    /// (None for the others). Greedy picks without repetition penalty are made on the
    /// device, so only the token ids come to the host (copying 128k logits out costs
    /// ~0.3 ms of TTFT).
    pub fn prefill_batch_pick(&self, parts: &[PrefillPart<'_>]) -> Result<Vec<Option<u32>>> {
        if let Some(p) = parts.iter().find(|p| p.from >= p.to || p.to > p.prompt.len()) {
            return Err(EngineError::Invalid(format!(
                "prefill from position {} to {} of a {}-token prompt",
                p.from,
                p.to,
                p.prompt.len()
            )));
        }
        let chunks: Vec<PrefillChunk<'_>> = parts
            .iter()
            .map(|p| PrefillChunk {
                tokens: &p.prompt[p.from..p.to],
                start: p.from,
                blocks: p.blocks,
                logits: p.to == p.prompt.len(),
            })
            .collect();
        let picks: Vec<Pick<'_>> = parts
            .iter()
            .filter(|p| p.to == p.prompt.len())
            .map(|p| Pick {
                params: p.params,
                history: p.prompt,
                step: 0,
            })
            .collect();
        let firsts = self
            .model
            .prefill_batch(&self.pools, &chunks, |logits| self.pick_rows(logits, &picks))?;
        let mut firsts = firsts.into_iter();
        Ok(parts
            .iter()
            .map(|p| if p.to == p.prompt.len() { firsts.next() } else { None })
            .collect())
    }

    /// Whether [`Engine::prefill_pick`] and [`Engine::decode_pick`] pick on the device.
    fn picks_on_device(&self, params: &SamplingParams) -> bool {
        !self.model.device.is_cpu() && params.is_greedy() && params.repetition_penalty == 1.0
    }

    /// One decode step for a batch, sampled: each sequence's next token. Greedy picks
    /// without a repetition penalty are made on the device (only the token ids come to
    /// the host); the other rows' logits come to the host for [`sample`].
    pub fn decode_pick(&self, batch: &[DecodeInput<'_>], picks: &[Pick<'_>]) -> Result<Vec<u32>> {
        if batch.len() != picks.len() {
            return Err(EngineError::Invalid(format!(
                "{} sequences but {} sampling picks",
                batch.len(),
                picks.len()
            )));
        }
        if batch.is_empty() {
            return Ok(vec![]);
        }
        self.model.decode(&self.pools, batch, |logits| self.pick_rows(logits, picks))
    }

    /// Each row's pick from logits `[rows, vocab]`: greedy ones without a repetition
    /// penalty on the device (only the token ids come to the host), the others' logits
    /// to the host for [`sample`].
    fn pick_rows(&self, logits: candle_core::Tensor, picks: &[Pick<'_>]) -> Result<Vec<u32>> {
        if picks.is_empty() {
            return Ok(vec![]);
        }
        let on_device = |p: &Pick<'_>| self.picks_on_device(p.params);
        let mut next = vec![0u32; picks.len()];
        if picks.iter().any(on_device) {
            let ids = self.model.argmax_rows(&logits)?;
            for (i, p) in picks.iter().enumerate() {
                if on_device(p) {
                    next[i] = ids[i];
                }
            }
        }
        let host: Vec<u32> = (0..picks.len() as u32).filter(|&i| !on_device(&picks[i as usize])).collect();
        if !host.is_empty() {
            let rows = if host.len() == picks.len() {
                logits
            } else {
                logits.index_select(&candle_core::Tensor::new(host.as_slice(), &self.model.device)?, 0)?
            };
            for (&i, row) in host.iter().zip(rows.to_vec2::<f32>()?) {
                let p = &picks[i as usize];
                next[i as usize] = sample(&row, p.params, p.history, p.step);
            }
        }
        Ok(next)
    }

    /// One decode step for a batch; logits per sequence.
    pub fn decode(&self, batch: &[DecodeInput<'_>]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        self.model.decode(&self.pools, batch, |logits| Ok(logits.to_vec2()?))
    }
}
