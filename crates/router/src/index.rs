//! Where prompts' KV blocks live: block hash -> the workers (of one role) that hold it,
//! fed by the workers' KV events. A prompt is looked up along its chained block hashes
//! (a block is useful only after all before it), answering each worker's overlap in
//! blocks in time proportional to the prompt's length, not to the index's size.
use std::collections::HashMap;

use prompt::BlockHash;

/// Workers one index can hold (a bit each in a block's worker set).
pub const MAX_WORKERS: usize = 64;

/// How a worker names its blocks: the model fingerprint seeding the chain, and the
/// tokens per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashParams {
    pub fingerprint: u64,
    pub block_size: usize,
}

#[derive(Debug, Default, Clone)]
struct Worker {
    /// How its blocks are named: set when its snapshot begins (live once the snapshot
    /// is complete); cleared when the worker goes cold.
    params: Option<HashParams>,
    /// Blocks the index holds for this worker.
    blocks: usize,
    /// A snapshot in progress (its blocks are in the index, not yet used for routing).
    loading: bool,
}

/// One role's index (prefill-servers or decode-servers), workers numbered 0..n.
#[derive(Debug)]
pub struct KvIndex {
    blocks: HashMap<BlockHash, u64>,
    workers: Vec<Worker>,
    /// The most blocks the index keeps for one worker (each worker its own share, so
    /// that one cannot crowd out the others); stored blocks past it are not indexed
    /// (their prompts route as if uncached).
    max_per_worker: usize,
    entries: usize,
}

impl KvIndex {
    pub fn new(workers: usize, max_per_worker: usize) -> KvIndex {
        assert!(workers <= MAX_WORKERS, "at most {MAX_WORKERS} workers per index");
        KvIndex {
            blocks: HashMap::new(),
            workers: vec![Worker::default(); workers],
            max_per_worker,
            entries: 0,
        }
    }

    /// Forgets everything `w` held: it went cold, or a new snapshot of it begins.
    pub fn clear(&mut self, w: usize) {
        let bit = 1u64 << w;
        if self.workers[w].blocks > 0 {
            self.blocks.retain(|_, set| {
                *set &= !bit;
                *set != 0
            });
            self.entries -= self.workers[w].blocks;
        }
        self.workers[w] = Worker::default();
    }

    /// A snapshot of `w`, whose blocks are named by `params`, begins: what it held
    /// before is forgotten, and it is not used for routing until
    /// [`KvIndex::snapshot_done`].
    pub fn snapshot_begin(&mut self, w: usize, params: HashParams) {
        self.clear(w);
        self.workers[w].loading = true;
        self.workers[w].params = Some(params);
    }

    pub fn snapshot_done(&mut self, w: usize) {
        self.workers[w].loading = false;
    }

    /// Indexes `hashes` for `w`; returns how many were not (past its share).
    pub fn store(&mut self, w: usize, hashes: impl IntoIterator<Item = BlockHash>) -> usize {
        let bit = 1u64 << w;
        let mut dropped = 0;
        for h in hashes {
            if self.blocks.get(&h).is_some_and(|set| set & bit != 0) {
                continue;
            }
            if self.workers[w].blocks >= self.max_per_worker {
                dropped += 1;
                continue;
            }
            *self.blocks.entry(h).or_insert(0) |= bit;
            self.entries += 1;
            self.workers[w].blocks += 1;
        }
        dropped
    }

    /// The hash parameters of the workers other than `w` that are live or loading
    /// their snapshot (they all share one).
    pub fn params_of_others(&self, w: usize) -> Option<HashParams> {
        (0..self.workers.len()).filter(|&i| i != w).find_map(|i| self.workers[i].params)
    }

    /// (block, worker) entries held, over all workers.
    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn remove(&mut self, w: usize, hashes: impl IntoIterator<Item = BlockHash>) {
        let bit = 1u64 << w;
        for h in hashes {
            if let Some(set) = self.blocks.get_mut(&h)
                && *set & bit != 0
            {
                *set &= !bit;
                if *set == 0 {
                    self.blocks.remove(&h);
                }
                self.entries -= 1;
                self.workers[w].blocks -= 1;
            }
        }
    }

    /// Blocks indexed for `w`.
    pub fn worker_blocks(&self, w: usize) -> usize {
        self.workers[w].blocks
    }

    /// How `w` names blocks, once it is live (a complete snapshot, not cold).
    pub fn params(&self, w: usize) -> Option<HashParams> {
        self.workers[w].params.filter(|_| !self.workers[w].loading)
    }

    /// Each worker's leading run of `hashes` it holds, in blocks; `params` picks which
    /// workers these hashes are valid for (the others get 0), `live` masks out workers
    /// not to count.
    pub fn overlaps(&self, params: HashParams, hashes: &[BlockHash], out: &mut [usize]) {
        let mut alive: u64 = self
            .workers
            .iter()
            .enumerate()
            .filter(|(i, _)| self.params(*i) == Some(params))
            .fold(0, |m, (i, _)| m | (1 << i));
        for h in hashes {
            alive &= self.blocks.get(h).copied().unwrap_or(0);
            if alive == 0 {
                break;
            }
            let mut m = alive;
            while m != 0 {
                let i = m.trailing_zeros() as usize;
                out[i] += 1;
                m &= m - 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: HashParams = HashParams {
        fingerprint: 7,
        block_size: 4,
    };

    fn chain(tokens: &[u32]) -> Vec<BlockHash> {
        prompt::block_hashes(P.fingerprint, "", tokens, P.block_size)
    }

    #[test]
    fn overlap_is_the_leading_run_each_worker_holds() {
        let mut ix = KvIndex::new(3, 1 << 20);
        let a: Vec<u32> = (0..32).collect();
        let ha = chain(&a);
        for w in 0..3 {
            ix.snapshot_begin(w, P);
        }
        ix.store(0, ha[..6].iter().copied());
        ix.store(1, ha[..2].iter().copied());
        // Worker 2 holds a later block but not the first: useless for this prompt.
        ix.store(2, ha[3..].iter().copied());
        let mut out = [0; 3];
        ix.overlaps(P, &ha, &mut out);
        assert_eq!(out, [0; 3], "no worker is live before its snapshot completes");
        for w in 0..3 {
            ix.snapshot_done(w);
        }
        ix.overlaps(P, &ha, &mut out);
        assert_eq!(out, [6, 2, 0]);
        // Other hash parameters: no worker counts.
        let mut other = [0; 3];
        ix.overlaps(HashParams { block_size: 8, ..P }, &ha, &mut other);
        assert_eq!(other, [0; 3]);
        ix.remove(0, [ha[4]]);
        let mut out = [0; 3];
        ix.overlaps(P, &ha, &mut out);
        assert_eq!(out, [4, 2, 0]);
        assert_eq!(ix.worker_blocks(0), 5);
        ix.clear(0);
        let mut out = [0; 3];
        ix.overlaps(P, &ha, &mut out);
        assert_eq!(out, [0, 2, 0], "a cold worker holds nothing");
        assert_eq!(ix.worker_blocks(0), 0);
        assert_eq!(ix.entries(), 2 + 5);
    }

    #[test]
    fn each_worker_has_its_own_bound() {
        let mut ix = KvIndex::new(2, 10);
        ix.snapshot_begin(0, P);
        ix.snapshot_begin(1, P);
        let h = chain(&(0..64).collect::<Vec<_>>());
        assert_eq!(ix.store(0, h.iter().copied()), 6);
        assert_eq!(ix.worker_blocks(0), 10);
        assert_eq!(ix.store(0, h[..3].iter().copied()), 0, "blocks already held are not dropped");
        assert_eq!(ix.store(0, h[12..].iter().copied()), 4, "a full worker takes nothing more");
        // The other worker still gets its share, in part the same blocks.
        let g = chain(&(100..160).collect::<Vec<_>>());
        assert_eq!(ix.store(1, h[5..8].iter().chain(&g).copied()), 3 + g.len() - 10);
        assert_eq!((ix.worker_blocks(1), ix.entries()), (10, 20));
        assert_eq!(ix.blocks.len(), 10 + 10 - 3, "three blocks are held by both");
        ix.clear(0);
        assert_eq!((ix.entries(), ix.blocks.len()), (10, 10));
        assert_eq!(ix.store(0, h.iter().copied()), 6);
    }

    #[test]
    fn a_lookup_in_a_large_index_takes_microseconds() {
        // 100k cached blocks over 4 workers; the figure is printed, not asserted (speed
        // is for benchmarks): the walk is one hash lookup per prompt block.
        let mut ix = KvIndex::new(4, 1 << 20);
        for w in 0..4 {
            ix.snapshot_begin(w, P);
            for p in 0..25u32 {
                let t: Vec<u32> = (0..4000).map(|i| i ^ (p << 16) ^ ((w as u32) << 24)).collect();
                ix.store(w, chain(&t));
            }
            ix.snapshot_done(w);
        }
        assert_eq!(ix.entries(), 100_000);
        let probe = chain(&(0..4000).map(|i| i ^ (3 << 16) ^ (2 << 24)).collect::<Vec<u32>>());
        let t = std::time::Instant::now();
        let mut out = [0; 4];
        ix.overlaps(P, &probe[..128], &mut out);
        eprintln!("overlap of a 128-block prompt in a 100k-block index: {:?}", t.elapsed());
        assert_eq!(out, [0, 0, 128, 0]);
    }
}
