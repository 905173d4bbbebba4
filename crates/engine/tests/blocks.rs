//! Block accounting: random admit/grow/fork/finish/cancel sequences leave no block
//! leaked or shared by mistake; running out is an error, not a crash.
mod common;

use engine::{BlockManager, EngineError};
use rand::{Rng, SeedableRng};

#[test]
fn random_operations_leak_nothing() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut m = BlockManager::new(200, 16);
    let mut live: Vec<u64> = Vec::new();
    let mut next = 0u64;
    let (mut refused, mut ok) = (0, 0);
    for _ in 0..1000 {
        match rng.random_range(0..5) {
            0 | 1 => {
                next += 1;
                match m.admit(next, rng.random_range(1..400)) {
                    Ok(_) => {
                        live.push(next);
                        ok += 1
                    }
                    Err(EngineError::OutOfBlocks { .. }) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            2 if !live.is_empty() => {
                let s = live[rng.random_range(0..live.len())];
                let len = m.table(s).unwrap().len() * 16;
                let _ = m.grow(s, len + rng.random_range(1..64));
            }
            3 if !live.is_empty() => {
                next += 1;
                let s = live[rng.random_range(0..live.len())];
                m.fork(s, next).unwrap();
                live.push(next);
            }
            _ if !live.is_empty() => {
                // finish or cancel: both release
                let s = live.swap_remove(rng.random_range(0..live.len()));
                m.release(s);
            }
            _ => {}
        }
        // Every block is either free or held by at least one live table.
        let held: std::collections::HashSet<u32> = live.iter().flat_map(|s| m.table(*s).unwrap().to_vec()).collect();
        assert_eq!(held.len() + m.free_blocks(), m.total(), "a block is neither free nor held");
    }
    assert!(
        refused > 0 && ok > 0,
        "the run should hit both outcomes ({ok} ok, {refused} refused)"
    );
    for s in live {
        m.release(s);
    }
    assert_eq!(m.free_blocks(), m.total());
    assert_eq!(m.sequences(), 0);
}

#[test]
fn engine_refuses_when_full_and_recovers() {
    let e = common::engine(engine::Arch::Llama, engine::synth::Preset::Tiny, 1);
    let total = e.total_blocks();
    let err = e.admit(1, (total + 1) * 16).unwrap_err();
    assert!(matches!(err, EngineError::OutOfBlocks { .. }), "{err}");
    assert!(err.to_string().contains("out of KV cache blocks"));
    e.admit(2, total * 16).unwrap();
    assert_eq!(e.free_blocks(), 0);
    e.release(2);
    assert_eq!(e.free_blocks(), total);
}

/// Prefix caching: a computed prompt's full blocks are found by a later prompt that
/// starts the same way (never its last token's block when the whole prompt matches),
/// stay cached after release until the free list runs out (least recently used first),
/// and a refused admission gives back what it had found.
#[test]
fn cached_prefixes_are_shared_reused_and_evicted_oldest_first() {
    use engine::kv_cache::block_hashes;
    let bs = 4;
    let mut m = BlockManager::new(8, bs);
    let a: Vec<u32> = (10..22).collect(); // 3 full blocks
    let ha = block_hashes(1, "", &a, bs);
    assert_eq!(ha.len(), 3);
    assert_ne!(block_hashes(2, "", &a, bs), ha, "the model's fingerprint seeds the chain");
    let salted = block_hashes(1, "tenant-a", &a, bs);
    assert!(salted.iter().all(|h| !ha.contains(h)), "a salt starts a chain of its own");
    assert_ne!(block_hashes(1, "tenant-b", &a, bs), salted);

    let first = m.admit_cached(1, a.len(), &ha).unwrap();
    assert_eq!(first.cached_tokens, 0);
    m.commit_cached(1, &ha);
    assert_eq!(m.cached_blocks(), 3);
    m.release(1);
    assert_eq!(m.free_blocks(), 8, "idle cached blocks are allocatable");

    // The same prompt: two blocks found, the third recomputed for the last token.
    let again = m.admit_cached(2, a.len(), &ha).unwrap();
    assert_eq!(again.cached_tokens, 8);
    assert_eq!(again.blocks[..2], first.blocks[..2]);
    // One token longer: all three found.
    let mut longer = a.clone();
    longer.push(99);
    let hl = block_hashes(1, "", &longer, bs);
    let third = m.admit_cached(3, longer.len(), &hl).unwrap();
    assert_eq!(third.cached_tokens, 12);
    assert_eq!(third.blocks[..3], first.blocks[..3]);
    // A prompt that differs in its second block shares only the first.
    let mut fork = a.clone();
    fork[5] = 7;
    let f = m.admit_cached(4, fork.len(), &block_hashes(1, "", &fork, bs)).unwrap();
    assert_eq!(f.cached_tokens, 4);
    for s in [2, 3, 4] {
        m.release(s);
    }
    assert_eq!(m.free_blocks(), 8);

    // Too big for what is free: refused, and the blocks it found are idle again.
    assert!(matches!(
        m.admit_cached(5, 40, &block_hashes(1, "", &(0..40).collect::<Vec<_>>(), bs)),
        Err(EngineError::OutOfBlocks { .. })
    ));
    let b: Vec<u32> = (10..50).collect(); // a's three blocks, then 7 more of the 5 left
    assert!(matches!(
        m.admit_cached(6, b.len(), &block_hashes(1, "", &b, bs)),
        Err(EngineError::OutOfBlocks { .. })
    ));
    assert_eq!((m.free_blocks(), m.cached_blocks(), m.sequences()), (8, 3, 0));

    // Taking every block evicts the cache; the oldest idle block goes first.
    m.admit(7, 5 * bs).unwrap();
    assert_eq!(m.cached_blocks(), 3, "empty blocks are taken before cached ones");
    m.admit(8, 2 * bs).unwrap();
    assert_eq!(m.cached_blocks(), 1);
    m.release(7);
    m.release(8);
    // The chain's tail went first: its head is still found.
    let last = m.admit_cached(9, a.len(), &ha).unwrap();
    assert_eq!(last.cached_tokens, 4, "the head is found, the evicted blocks are not");
    m.release(9);
    assert_eq!(m.free_blocks(), 8);
}

/// Random prompts over a few shared prefixes: every block stays either free (empty or
/// idle cached) or held, and every block found in the cache holds what the prompt
/// needs there (tracked here as the hash of the tokens last computed into it).
#[test]
fn random_cached_admissions_leak_nothing() {
    use engine::kv_cache::block_hashes;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let bs = 4;
    let mut m = BlockManager::new(64, bs);
    let mut live: Vec<u64> = Vec::new();
    let mut content: Vec<Option<engine::kv_cache::BlockHash>> = vec![None; 64];
    let (mut hits, mut next) = (0usize, 0u64);
    for _ in 0..2000 {
        if rng.random_range(0..3) > 0 || live.is_empty() {
            let base = rng.random_range(0..4u32) * 1000;
            let len = rng.random_range(1..40);
            let prompt: Vec<u32> = (0..len).map(|i| base + if i < 20 { i } else { rng.random_range(0..50) }).collect();
            let h = block_hashes(0, "", &prompt, bs);
            next += 1;
            match m.admit_cached(next, prompt.len(), &h) {
                Ok(a) => {
                    assert!(a.cached_tokens < prompt.len() && a.cached_tokens % bs == 0);
                    assert_eq!(a.blocks.len(), prompt.len().div_ceil(bs));
                    let found = a.cached_tokens / bs;
                    for (i, &b) in a.blocks.iter().enumerate() {
                        if i < found {
                            assert_eq!(content[b as usize], Some(h[i]), "block {b} found for other tokens");
                        } else {
                            // Computed now: a full block's tokens, or a partial one's.
                            content[b as usize] = h.get(i).copied();
                        }
                    }
                    hits += a.cached_tokens;
                    m.commit_cached(next, &h);
                    live.push(next);
                }
                Err(EngineError::OutOfBlocks { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        } else {
            let s = live.swap_remove(rng.random_range(0..live.len()));
            m.release(s);
        }
        let held: std::collections::HashSet<u32> = live.iter().flat_map(|s| m.table(*s).unwrap().to_vec()).collect();
        assert_eq!(held.len() + m.free_blocks(), m.total(), "a block is neither free nor held");
        assert!(m.cached_blocks() <= m.total());
    }
    assert!(hits > 0, "shared prefixes must hit");
    for s in live {
        m.release(s);
    }
    assert_eq!(m.free_blocks(), m.total());
}

/// KV events replayed from the start, or from a snapshot taken midway, rebuild exactly
/// the set of hashes the cache can hand out; their numbers run 1, 2, 3... with no gap.
#[test]
fn kv_events_replay_to_the_cache() {
    use engine::KvEvent;
    use engine::kv_cache::block_hashes;
    use std::collections::HashSet;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let bs = 4;
    let mut m = BlockManager::new(48, bs);
    m.record_events();
    let mut replica: HashSet<engine::BlockHash> = HashSet::new();
    let mut late: Option<HashSet<engine::BlockHash>> = None;
    let (mut live, mut next, mut seq, mut removed) = (Vec::new(), 0u64, 0u64, 0usize);
    for step in 0..1500 {
        if rng.random_range(0..3) > 0 || live.is_empty() {
            let base = rng.random_range(0..6u32) * 1000;
            let prompt: Vec<u32> = (0..rng.random_range(1..40))
                .map(|i| base + if i < 16 { i } else { rng.random_range(0..50) })
                .collect();
            let h = block_hashes(0, "", &prompt, bs);
            next += 1;
            if m.admit_cached(next, prompt.len(), &h).is_ok() {
                m.commit_cached(next, &h);
                live.push(next);
            }
        } else {
            m.release(live.swap_remove(rng.random_range(0..live.len())));
        }
        if step == 700 {
            // A subscriber joining now starts from the snapshot.
            let (at, hashes) = m.cache_snapshot();
            assert_eq!(at, seq);
            late = Some(hashes.into_iter().collect());
        }
        for (n, ev) in m.take_events() {
            seq += 1;
            assert_eq!(n, seq, "event numbers run without gaps");
            for set in std::iter::once(&mut replica).chain(late.as_mut()) {
                match &ev {
                    KvEvent::Stored { hashes, .. } => {
                        for h in hashes {
                            assert!(set.insert(*h), "stored twice without a removal");
                        }
                    }
                    KvEvent::Removed { hashes } => {
                        for h in hashes {
                            assert!(set.remove(h), "removed what was not stored");
                        }
                    }
                }
            }
            if matches!(ev, KvEvent::Removed { .. }) {
                removed += 1;
            }
        }
        let now: HashSet<_> = m.cache_snapshot().1.into_iter().collect();
        assert_eq!(replica, now, "step {step}: the events' replay differs from the cache");
        if let Some(l) = &late {
            assert_eq!(l, &now, "step {step}: snapshot + later events differ from the cache");
        }
    }
    assert!(
        removed > 0 && seq > 100,
        "the pool is small enough to evict ({removed} removals, {seq} events)"
    );
    // Without record_events nothing is kept.
    let mut quiet = BlockManager::new(8, bs);
    let h = block_hashes(0, "", &[1, 2, 3, 4, 5], bs);
    quiet.admit_cached(1, 5, &h).unwrap();
    quiet.commit_cached(1, &h);
    assert!(quiet.take_events().is_empty());
}
