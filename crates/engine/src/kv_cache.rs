//! The paged KV cache: per layer one K pool and one V pool
//! `[num_blocks, block_size, num_kv_heads, head_dim]`, allocated once; a block manager
//! hands out blocks (lowest ids first, so a request's blocks tend to be one contiguous
//! run) and keeps per-sequence block tables with reference counts. The pools are what
//! the data plane registers; moving a request's KV is a list of block runs.
//!
//! Prefix caching: a full block computed for a prompt is named by a chained hash of its
//! tokens ([`block_hashes`]); after its sequence ends it stays cached (idle, least
//! recently used first) until the free list runs out, and a later prompt with the same
//! leading blocks takes them instead of computing them again.
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub use prompt::{BlockHash, block_hashes};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// What two daemons must agree on before one writes KV blocks into the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub model_fingerprint: u64,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: String,
    /// Pool size: may differ between peers.
    pub num_blocks: usize,
}

impl KvLayout {
    pub fn dtype_size(&self) -> usize {
        match self.dtype.as_str() {
            "f32" => 4,
            _ => 2,
        }
    }

    /// Bytes of one block of one layer's K (or V) pool.
    pub fn block_bytes(&self) -> u64 {
        (self.block_size * self.num_kv_heads * self.head_dim * self.dtype_size()) as u64
    }

    /// KV bytes per token across the model (K and V, every layer).
    pub fn bytes_per_token(&self) -> u64 {
        (self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_size()) as u64
    }

    /// Refuses a peer whose blocks would not mean the same thing here.
    pub fn check_compatible(&self, peer: &KvLayout) -> std::result::Result<(), String> {
        let mut diffs = Vec::new();
        if self.model_fingerprint != peer.model_fingerprint {
            diffs.push(format!(
                "model fingerprint {:#x} vs {:#x} (different weights or config)",
                self.model_fingerprint, peer.model_fingerprint
            ));
        }
        let mut cmp = |what: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{what} {a} vs {b}"));
            }
        };
        cmp("layers", self.num_layers.to_string(), peer.num_layers.to_string());
        cmp("kv heads", self.num_kv_heads.to_string(), peer.num_kv_heads.to_string());
        cmp("head dim", self.head_dim.to_string(), peer.head_dim.to_string());
        cmp("block size", self.block_size.to_string(), peer.block_size.to_string());
        cmp("dtype", self.dtype.clone(), peer.dtype.clone());
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(format!("KV layouts differ: {}", diffs.join("; ")))
        }
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// One contiguous range of a pool, as the data plane registers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRegion {
    pub layer: usize,
    /// false: the K pool, true: the V pool.
    pub value: bool,
    pub addr: u64,
    pub len: u64,
    /// CUDA device, or None for host memory.
    pub device: Option<u32>,
}

pub struct KvPools {
    layout: KvLayout,
    /// Per layer `[num_blocks * block_size, kv_heads, head_dim]` views of the pools.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl KvPools {
    pub fn new(layout: KvLayout, dtype: DType, device: &Device) -> Result<KvPools> {
        let shape = (layout.num_blocks * layout.block_size, layout.num_kv_heads, layout.head_dim);
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        let zeros = || -> Result<Tensor> {
            #[cfg(feature = "cuda")]
            if device.is_cuda() {
                return crate::memory::ipc_zeros(shape, dtype, device);
            }
            Ok(Tensor::zeros(shape, dtype, device)?)
        };
        for _ in 0..layout.num_layers {
            k.push(zeros()?);
            v.push(zeros()?);
        }
        Ok(KvPools { layout, k, v })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Pool slots of positions `from..to` of a sequence with block table `blocks`.
    pub fn slots(&self, blocks: &[u32], from: usize, to: usize) -> Result<Vec<u32>> {
        let bs = self.layout.block_size;
        if to.div_ceil(bs) > blocks.len() {
            return Err(EngineError::Invalid(format!(
                "block table of {} blocks cannot hold {to} positions",
                blocks.len()
            )));
        }
        Ok((from..to).map(|p| blocks[p / bs] * bs as u32 + (p % bs) as u32).collect())
    }

    /// The scatter index for writing rows at `slots` (built once per forward pass).
    pub fn write_index(&self, slots: &[u32], device: &Device) -> Result<Tensor> {
        let (h, d) = (self.layout.num_kv_heads, self.layout.head_dim);
        Ok(Tensor::new(slots, device)?
            .reshape((slots.len(), 1, 1))?
            .broadcast_as((slots.len(), h, d))?
            .contiguous()?)
    }

    /// Writes `k`/`v` (`[b, kv_heads, t, d]`, rows in slot order) into layer `layer`
    /// at the slots of `index`; returns them unchanged for immediate use.
    pub fn write(&self, layer: usize, index: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        let rows = |x: &Tensor| -> Result<Tensor> { Ok(x.transpose(1, 2)?.reshape((b * t, h, d))?.contiguous()?) };
        self.k[layer].scatter_set(index, &rows(k)?, 0)?;
        self.v[layer].scatter_set(index, &rows(v)?, 0)?;
        Ok((k.clone(), v.clone()))
    }

    /// Layer `layer`'s K and V pools, for the fused kernels that read and write them.
    #[cfg(feature = "cuda")]
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Reads `b` contexts of `l` slots each (`index` is `[b*l]`): `[b, kv_heads, l, d]`.
    pub fn gather(&self, layer: usize, index: &Tensor, b: usize, l: usize) -> Result<(Tensor, Tensor)> {
        let (h, d) = (self.layout.num_kv_heads, self.layout.head_dim);
        let read =
            |pool: &Tensor| -> Result<Tensor> { Ok(pool.index_select(index, 0)?.reshape((b, l, h, d))?.transpose(1, 2)?.contiguous()?) };
        Ok((read(&self.k[layer])?, read(&self.v[layer])?))
    }

    /// Copies blocks `src` of `other` into blocks `dst` of these pools (same layout):
    /// the in-memory stand-in for a data-plane write, for tests and local handoff.
    pub fn copy_blocks_from(&self, other: &KvPools, src: &[u32], dst: &[u32]) -> Result<()> {
        let bs = self.layout.block_size as u32;
        let slots = |blocks: &[u32]| -> Vec<u32> { blocks.iter().flat_map(|b| (b * bs)..(b + 1) * bs).collect() };
        let (from, to) = (slots(src), slots(dst));
        let device = self.k[0].device().clone();
        let from_t = Tensor::new(from.as_slice(), other.k[0].device())?;
        let index = self.write_index(&to, &device)?;
        for l in 0..self.layout.num_layers {
            self.k[l].scatter_set(&index, &other.k[l].index_select(&from_t, 0)?.to_device(&device)?, 0)?;
            self.v[l].scatter_set(&index, &other.v[l].index_select(&from_t, 0)?.to_device(&device)?, 0)?;
        }
        Ok(())
    }

    /// The pools' memory, K then V for each layer, for registration with the data plane.
    /// The addresses stay valid for as long as these pools live.
    pub fn regions(&self) -> Result<Vec<PoolRegion>> {
        let mut out = Vec::with_capacity(2 * self.layout.num_layers);
        for l in 0..self.layout.num_layers {
            for (value, t) in [(false, &self.k[l]), (true, &self.v[l])] {
                let (addr, device) = crate::memory::tensor_address(t)?;
                out.push(PoolRegion {
                    layer: l,
                    value,
                    addr,
                    len: (t.elem_count() * t.dtype().size_in_bytes()) as u64,
                    device,
                });
            }
        }
        Ok(out)
    }
}

/// Pairs of block runs to move: `count` blocks from `src` onwards to `dst` onwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRun {
    pub src: u32,
    pub dst: u32,
    pub count: u32,
}

/// Coalesces a block-to-block mapping into runs contiguous on both sides: each run is
/// one segment per pool for the data plane, which pays per segment.
pub fn block_runs(src: &[u32], dst: &[u32]) -> Vec<BlockRun> {
    let mut runs: Vec<BlockRun> = Vec::new();
    for (&s, &d) in src.iter().zip(dst) {
        match runs.last_mut() {
            Some(r) if r.src + r.count == s && r.dst + r.count == d => r.count += 1,
            _ => runs.push(BlockRun { src: s, dst: d, count: 1 }),
        }
    }
    runs
}

/// A change to what a prefix cache can hand out, as its worker publishes it (KV events):
/// the router's index follows these to know where each prompt's blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Blocks now findable by these hashes, in their prompt's chain order (a block
    /// another request cached first is skipped); `parent` is the hash before the first
    /// of them in that chain (None: the chain's first block). Informational: the
    /// router's index is keyed by hash alone.
    Stored { parent: Option<BlockHash>, hashes: Vec<BlockHash> },
    /// Blocks evicted: no longer findable.
    Removed { hashes: Vec<BlockHash> },
}

/// Free list, reference counts, per-sequence block tables, and the prefix cache.
pub struct BlockManager {
    block_size: usize,
    /// Blocks holding nothing reusable.
    free: BTreeSet<u32>,
    refs: Vec<u32>,
    tables: HashMap<u64, Vec<u32>>,
    /// The hash of each cached block's content, and the block of each hash.
    hash_of: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, u32>,
    /// Cached blocks no sequence holds, by when they were last released (oldest first):
    /// allocatable, evicted when the free list is empty.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
    /// KV events not yet taken ([`BlockManager::take_events`]), numbered from 1 in the
    /// order they happened; recorded only once [`BlockManager::record_events`] is called.
    journal: Option<Vec<(u64, KvEvent)>>,
    event_seq: u64,
}

/// What a prompt found in the prefix cache at admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub blocks: Vec<u32>,
    /// Leading tokens whose K/V the blocks already hold (whole blocks).
    pub cached_tokens: usize,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            free: (0..num_blocks as u32).collect(),
            refs: vec![0; num_blocks],
            tables: HashMap::new(),
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; num_blocks],
            clock: 0,
            journal: None,
            event_seq: 0,
        }
    }

    /// From now on, keep a journal of KV events for [`BlockManager::take_events`].
    pub fn record_events(&mut self) {
        self.journal.get_or_insert_with(Vec::new);
    }

    /// The events since the last call, each with its sequence number.
    pub fn take_events(&mut self) -> Vec<(u64, KvEvent)> {
        self.journal.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The sequence number of the last event, and every hash findable now: what a
    /// subscriber starts from before it follows the events after that number.
    pub fn cache_snapshot(&self) -> (u64, Vec<BlockHash>) {
        (self.event_seq, self.by_hash.keys().copied().collect())
    }

    fn publish(&mut self, event: KvEvent) {
        if let Some(j) = &mut self.journal {
            self.event_seq += 1;
            j.push((self.event_seq, event));
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }
    /// Blocks a new sequence can take: empty ones and idle cached ones.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }
    /// Blocks holding a cached prefix block, held by a sequence or idle.
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
    pub fn sequences(&self) -> usize {
        self.tables.len()
    }

    /// Takes `n` blocks: empty ones first (lowest ids), then the least recently used
    /// idle cached ones, whose hashes are forgotten.
    fn take(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free_blocks() {
            return Err(EngineError::OutOfBlocks {
                needed: n,
                free: self.free_blocks(),
                total: self.total(),
            });
        }
        let mut ids: Vec<u32> = self.free.iter().take(n).copied().collect();
        for id in &ids {
            self.free.remove(id);
        }
        let mut evicted = Vec::new();
        while ids.len() < n {
            let (_, id) = self.idle.pop_first().expect("counted above");
            if let Some(h) = self.hash_of[id as usize].take() {
                self.by_hash.remove(&h);
                evicted.push(h);
            }
            ids.push(id);
        }
        if !evicted.is_empty() {
            self.publish(KvEvent::Removed { hashes: evicted });
        }
        for id in &ids {
            self.refs[*id as usize] = 1;
        }
        Ok(ids)
    }

    /// Drops one reference to each of a table's `ids`, last block first: a prefix's
    /// first blocks become idle last, so eviction takes a chain's tail before its head
    /// (a head evicted strands its tail, which lookups can no longer reach).
    fn put(&mut self, ids: &[u32]) {
        for &id in ids.iter().rev() {
            let r = &mut self.refs[id as usize];
            debug_assert!(*r > 0, "block {id} freed twice");
            if *r == 0 {
                // Already free: inserting it again would let two sequences take it.
                tracing::error!(block = id, "a free KV block was released again; ignored");
                continue;
            }
            *r -= 1;
            if *r == 0 {
                if self.hash_of[id as usize].is_some() {
                    self.clock += 1;
                    self.idle.insert(self.clock, id);
                    self.idle_since[id as usize] = self.clock;
                } else {
                    self.free.insert(id);
                }
            }
        }
    }

    /// Admits a prompt of `tokens` positions whose full blocks have `hashes`
    /// ([`block_hashes`]): its leading blocks found in the cache are shared, the rest
    /// taken fresh; all or nothing. At least the last token is always left to compute
    /// (its logits give the first output token), so a fully cached prompt still
    /// recomputes its last block.
    pub fn admit_cached(&mut self, seq: u64, tokens: usize, hashes: &[BlockHash]) -> Result<Admitted> {
        if self.tables.contains_key(&seq) {
            return Err(EngineError::Invalid(format!("sequence {seq} is already admitted")));
        }
        let reusable = tokens.saturating_sub(1) / self.block_size.max(1);
        let hits: Vec<u32> = hashes.iter().take(reusable).map_while(|h| self.by_hash.get(h).copied()).collect();
        for &b in &hits {
            if self.refs[b as usize] == 0 {
                let was = self.idle.remove(&self.idle_since[b as usize]);
                debug_assert_eq!(was, Some(b), "an unheld cached block is idle");
            }
            self.refs[b as usize] += 1;
        }
        match self.take(self.blocks_for(tokens) - hits.len()) {
            Ok(fresh) => {
                let cached_tokens = hits.len() * self.block_size;
                let mut blocks = hits;
                blocks.extend(fresh);
                self.tables.insert(seq, blocks.clone());
                Ok(Admitted { blocks, cached_tokens })
            }
            Err(e) => {
                self.put(&hits);
                Err(e)
            }
        }
    }

    /// Offers a computed sequence's full blocks to the cache under their `hashes`; a
    /// hash already cached (the same prefix computed by another sequence meanwhile)
    /// keeps its block.
    pub fn commit_cached(&mut self, seq: u64, hashes: &[BlockHash]) {
        let Some(table) = self.tables.get(&seq) else { return };
        let (mut parent, mut stored) = (None, Vec::new());
        for (i, (&b, &h)) in table.iter().zip(hashes).enumerate() {
            if self.hash_of[b as usize].is_none() && !self.by_hash.contains_key(&h) {
                self.hash_of[b as usize] = Some(h);
                self.by_hash.insert(h, b);
                if stored.is_empty() && i > 0 {
                    parent = Some(hashes[i - 1]);
                }
                stored.push(h);
            }
        }
        if !stored.is_empty() {
            self.publish(KvEvent::Stored { parent, hashes: stored });
        }
    }

    /// Reserves blocks for `tokens` positions of a new sequence; all or nothing.
    pub fn admit(&mut self, seq: u64, tokens: usize) -> Result<&[u32]> {
        if self.tables.contains_key(&seq) {
            return Err(EngineError::Invalid(format!("sequence {seq} is already admitted")));
        }
        let ids = self.take(self.blocks_for(tokens))?;
        Ok(self.tables.entry(seq).or_insert(ids))
    }

    /// Extends a sequence's table to cover `tokens` positions.
    pub fn grow(&mut self, seq: u64, tokens: usize) -> Result<&[u32]> {
        let have = self
            .tables
            .get(&seq)
            .map(Vec::len)
            .ok_or_else(|| EngineError::Invalid(format!("unknown sequence {seq}")))?;
        let need = self.blocks_for(tokens).saturating_sub(have);
        if need > 0 {
            let more = self.take(need)?;
            self.tables.get_mut(&seq).expect("checked").extend(more);
        }
        Ok(&self.tables[&seq])
    }

    /// Shares another sequence's blocks (reference-counted), e.g. a common prefix.
    pub fn fork(&mut self, from: u64, to: u64) -> Result<()> {
        let blocks = self
            .tables
            .get(&from)
            .cloned()
            .ok_or_else(|| EngineError::Invalid(format!("unknown sequence {from}")))?;
        if self.tables.contains_key(&to) {
            return Err(EngineError::Invalid(format!("sequence {to} is already admitted")));
        }
        for &b in &blocks {
            self.refs[b as usize] += 1;
        }
        self.tables.insert(to, blocks);
        Ok(())
    }

    pub fn table(&self, seq: u64) -> Option<&[u32]> {
        self.tables.get(&seq).map(Vec::as_slice)
    }

    /// Releases a finished, failed or cancelled sequence's blocks (idempotent).
    pub fn release(&mut self, seq: u64) {
        if let Some(ids) = self.tables.remove(&seq) {
            self.put(&ids);
        }
    }
}
