//! Prefix caching in the engine: a prompt whose leading blocks another prompt computed
//! takes them and computes only the rest, with the logits of a full prefill; a prompt
//! that differs takes nothing; with caching off nothing is found.
mod common;

use engine::synth::Preset;
use engine::{Arch, Engine, EngineConfig, SamplingParams};

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn argmax(v: &[f32]) -> usize {
    engine::model::argmax(v) as usize
}

#[test]
fn a_cached_prefix_computes_only_the_rest_with_the_same_logits() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 8);
    let bs = e.layout().block_size;
    let base = common::prompt(3 * bs + 5, 4, 512);
    let s1 = e.next_sequence_id();
    let first = e.admit_prompt(s1, base.len(), &e.prompt_hashes(&base, "")).unwrap();
    assert_eq!(first.cached_tokens, 0, "a cold cache finds nothing");
    let greedy = SamplingParams::default();
    e.prefill_pick(&base, 0, &first.blocks, &greedy).unwrap();
    e.commit_prompt(s1, &e.prompt_hashes(&base, ""));
    e.release(s1);
    assert_eq!(e.cached_blocks(), 3);

    for (i, shared) in [2 * bs + 3, 3 * bs, 3 * bs + 5].into_iter().enumerate() {
        let mut p = base[..shared].to_vec();
        p.extend(common::prompt(7, 40 + i as u32, 512));
        let seq = e.next_sequence_id();
        let a = e.admit_prompt(seq, p.len(), &e.prompt_hashes(&p, "")).unwrap();
        assert_eq!(a.cached_tokens, shared / bs * bs, "whole blocks of the {shared} shared tokens");
        let cached = e.prefill(&p[a.cached_tokens..], a.cached_tokens, &a.blocks).unwrap();
        e.release(seq);
        let fresh = e.next_sequence_id();
        let blocks = e.admit(fresh, p.len()).unwrap();
        let full = e.prefill(&p, 0, &blocks).unwrap();
        e.release(fresh);
        assert!(rel_err(&cached, &full) < 1e-5, "logits differ by {}", rel_err(&cached, &full));
        assert_eq!(argmax(&cached), argmax(&full));
    }
    let other = common::prompt(3 * bs + 5, 99, 512);
    let seq = e.next_sequence_id();
    assert_eq!(
        e.admit_prompt(seq, other.len(), &e.prompt_hashes(&other, ""))
            .unwrap()
            .cached_tokens,
        0
    );
    e.release(seq);
    let err = e.prefill_pick(&base, base.len(), &first.blocks, &greedy).unwrap_err().to_string();
    assert!(err.contains("prefill from position"), "{err}");
}

#[test]
fn with_caching_off_nothing_is_found() {
    let e = Engine::load(&EngineConfig {
        model: common::model_dir(Arch::Llama, Preset::Tiny),
        kv_cache_mib: 8,
        prefix_caching: false,
        ..Default::default()
    })
    .unwrap();
    let p = common::prompt(40, 1, 512);
    for _ in 0..2 {
        let seq = e.next_sequence_id();
        assert!(e.prompt_hashes(&p, "").is_empty());
        let a = e.admit_prompt(seq, p.len(), &e.prompt_hashes(&p, "")).unwrap();
        assert_eq!(a.cached_tokens, 0);
        e.prefill(&p, 0, &a.blocks).unwrap();
        e.commit_prompt(seq, &e.prompt_hashes(&p, ""));
        e.release(seq);
    }
    assert_eq!(e.cached_blocks(), 0);
}

/// A sequence shares cached blocks only below the block its own K/V writes start in:
/// the block of its prompt's last token is never shared (it is computed, or written by
/// a prefill-server, for this sequence alone), at block boundaries too.
#[test]
fn admitted_sequences_never_share_the_block_they_write() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 8);
    let bs = e.layout().block_size;
    let base = common::prompt(4 * bs + 1, 11, 512);
    let hashes = e.prompt_hashes(&base, "");
    assert_eq!(hashes.len(), 4);
    let s = e.next_sequence_id();
    let a = e.admit_sequence(s, base.len(), base.len(), &hashes).unwrap();
    e.prefill(&base, 0, &a.blocks).unwrap();
    e.commit_prompt(s, &hashes);
    e.release(s);
    assert_eq!(e.cached_blocks(), 4);
    let cached_ids: Vec<u32> = a.blocks[..4].to_vec();
    // (prompt tokens, shared tokens): the prompt's last token's block is fresh.
    for (len, want) in [
        (bs, 0),
        (bs + 1, bs),
        (2 * bs, bs),
        (2 * bs + 1, 2 * bs),
        (4 * bs, 3 * bs),
        (4 * bs + 1, 4 * bs),
    ] {
        let seq = e.next_sequence_id();
        let got = e.admit_sequence(seq, len, len + 8, &e.prompt_hashes(&base[..len], "")).unwrap();
        assert_eq!(got.cached_tokens, want, "{len}-token prompt");
        let last = got.blocks[(len - 1) / bs];
        assert!(
            !cached_ids.contains(&last),
            "{len}-token prompt: its last token's block {last} is shared"
        );
        assert_eq!(got.blocks.len(), (len + 8).div_ceil(bs));
        e.release(seq);
    }
    assert_eq!(e.free_blocks(), e.total_blocks());
}
