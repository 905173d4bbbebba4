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
