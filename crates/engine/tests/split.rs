//! Prefill in one engine, KV blocks copied into another engine's pools (through
//! memory, no network), decode there: the same tokens as one engine alone. And a
//! continuous batch of sequences that join and leave equals each sequence alone.
mod common;

use engine::synth::Preset;
use engine::{Arch, DecodeInput, SamplingParams, block_runs, generate_local, sample};

fn params(seed: u64, max_tokens: u32, temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        seed,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn prefill_here_decode_there() {
    let a = common::engine(Arch::Llama, Preset::Tiny, 8);
    let b = common::engine(Arch::Llama, Preset::Tiny, 8);
    // Offset B's allocations so the copy really moves blocks to other ids.
    let filler = b.next_sequence_id();
    b.admit(filler, 3 * 16).unwrap();
    let (a_free, b_free) = (a.free_blocks(), b.free_blocks());
    for (i, len) in [1usize, 15, 16, 17, 40, 100].into_iter().enumerate() {
        for temperature in [0.0, 1.5] {
            let prompt = common::prompt(len, i as u32, 512);
            let p = params(i as u64, 12, temperature);
            let reference = generate_local(&a, &prompt, &p).unwrap();

            let seq_a = a.next_sequence_id();
            let blocks_a = a.admit(seq_a, prompt.len()).unwrap();
            let logits = a.prefill(&prompt, 0, &blocks_a).unwrap();
            let first = sample(&logits, &p, &prompt, 0);
            let seq_b = b.next_sequence_id();
            let blocks_b = b.admit(seq_b, prompt.len() + p.max_tokens as usize).unwrap();
            let n = a.blocks_for(prompt.len());
            assert_ne!(blocks_a[..n], blocks_b[..n], "the test must move blocks to other ids");
            let runs = block_runs(&blocks_a[..n], &blocks_b[..n]);
            assert!(runs.len() <= 2, "fresh allocations coalesce: {runs:?}");
            b.pools().copy_blocks_from(&a.pools(), &blocks_a[..n], &blocks_b[..n]).unwrap();
            a.release(seq_a);

            let mut tokens = prompt.clone();
            let mut next = first;
            for step in 1..p.max_tokens as u64 {
                tokens.push(next);
                let l = b
                    .decode(&[DecodeInput {
                        token: next,
                        pos: tokens.len() - 1,
                        blocks: &blocks_b,
                    }])
                    .unwrap();
                next = sample(&l[0], &p, &tokens, step);
            }
            tokens.push(next);
            b.release(seq_b);
            assert_eq!(
                tokens[prompt.len()..],
                reference.tokens[..],
                "prompt {len}, temperature {temperature}"
            );
        }
    }
    assert_eq!((a.free_blocks(), b.free_blocks()), (a_free, b_free), "every block returned");
}

struct Running {
    seq: u64,
    prompt_len: usize,
    tokens: Vec<u32>,
    blocks: Vec<u32>,
    params: SamplingParams,
}

#[test]
fn continuous_batch_equals_each_alone() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 8);
    let start_free = e.free_blocks();
    let lens = [3usize, 16, 17, 33, 1, 64, 9, 120];
    let jobs: Vec<(Vec<u32>, SamplingParams)> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            (
                common::prompt(l, 50 + i as u32, 512),
                params(i as u64, 4 + 3 * i as u32, if i % 2 == 0 { 0.0 } else { 1.2 }),
            )
        })
        .collect();
    let alone: Vec<Vec<u32>> = jobs.iter().map(|(p, sp)| generate_local(&e, p, sp).unwrap().tokens).collect();

    let mut running: Vec<Running> = Vec::new();
    let mut done: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut pending = jobs.iter().enumerate();
    let mut ids = std::collections::HashMap::new();
    for step in 0.. {
        // One sequence joins per step (prefill, first token), while others decode.
        if let Some((i, (prompt, p))) = pending.next() {
            let seq = e.next_sequence_id();
            let blocks = e.admit(seq, prompt.len() + p.max_tokens as usize).unwrap();
            let logits = e.prefill(prompt, 0, &blocks).unwrap();
            let mut tokens = prompt.clone();
            tokens.push(sample(&logits, p, prompt, 0));
            ids.insert(seq, i);
            running.push(Running {
                seq,
                prompt_len: prompt.len(),
                tokens,
                blocks,
                params: p.clone(),
            });
        }
        // Sequences that reached max_tokens leave.
        running.retain(|r| {
            let finished = r.tokens.len() - r.prompt_len >= r.params.max_tokens as usize;
            if finished {
                e.release(r.seq);
                done.push((ids[&r.seq], r.tokens[r.prompt_len..].to_vec()));
            }
            !finished
        });
        if running.is_empty() && done.len() == jobs.len() {
            break;
        }
        let batch: Vec<DecodeInput> = running
            .iter()
            .map(|r| DecodeInput {
                token: *r.tokens.last().unwrap(),
                pos: r.tokens.len() - 1,
                blocks: &r.blocks,
            })
            .collect();
        let logits = e.decode(&batch).unwrap();
        for (r, l) in running.iter_mut().zip(logits) {
            let step_no = (r.tokens.len() - r.prompt_len) as u64;
            let next = sample(&l, &r.params, &r.tokens, step_no);
            r.tokens.push(next);
        }
        assert!(step < 1000);
    }
    done.sort_by_key(|(i, _)| *i);
    for (i, tokens) in done {
        assert_eq!(tokens, alone[i], "sequence {i} (prompt {}) differs in the batch", lens[i]);
    }
    assert_eq!(e.free_blocks(), start_free);
}

/// Stop strings end generation, are left out of the text, and the reason says so.
#[test]
fn stop_strings_stop() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 8);
    let prompt = e.tokenize("The quick brown fox").unwrap();
    let free = generate_local(&e, &prompt, &params(3, 40, 1.5)).unwrap();
    let chars: Vec<char> = free.text.chars().filter(|c| *c != '\u{FFFD}').collect();
    assert!(chars.len() > 4, "the model must produce some text: {:?}", free.text);
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = free.text.find(&stop).unwrap();
    let stopped = generate_local(
        &e,
        &prompt,
        &SamplingParams {
            stop: vec![stop.clone()],
            ..params(3, 40, 1.5)
        },
    )
    .unwrap();
    assert_eq!(stopped.finish_reason, engine::FinishReason::Stop);
    assert_eq!(stopped.text, free.text[..cut], "text up to the stop string {stop:?}");
    assert!(stopped.tokens.len() < free.tokens.len());
}

/// Two checkpoints of one shape (other weights) have different KV layouts' fingerprints.
#[test]
fn other_weights_other_fingerprint() {
    let a = common::engine(Arch::Llama, Preset::Tiny, 1);
    let b = common::engine(Arch::Llama, Preset::Tiny, 1);
    assert!(a.layout().check_compatible(b.layout()).is_ok());
    let dir = tempfile::tempdir().unwrap();
    engine::synth::synthesize(Arch::Llama, Preset::Tiny, 99, dir.path()).unwrap();
    let c = engine::Engine::load(&engine::EngineConfig {
        model: dir.path().to_path_buf(),
        kv_cache_mib: 1,
        ..Default::default()
    })
    .unwrap();
    let why = a.layout().check_compatible(c.layout()).unwrap_err();
    assert!(why.contains("fingerprint"), "{why}");
}
