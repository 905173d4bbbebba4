//! Batched, chunked prefill: several prompts in one forward pass, long ones cut into
//! chunks over several passes, give every prompt the tokens a prefill of its own gives
//! (the first token, and the later ones decoded from the K/V the passes wrote).
mod common;

use engine::synth::Preset;
use engine::{Arch, DecodeInput, Pick, PrefillPart, SamplingParams};

#[test]
fn batched_chunked_prefills_equal_prefills_alone() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 16);
    let lens = [5usize, 37, 64, 100, 16, 1];
    let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| common::prompt(n, i as u32, 512)).collect();
    let params: Vec<SamplingParams> = (0..prompts.len())
        .map(|i| SamplingParams {
            max_tokens: 6,
            ignore_eos: true,
            temperature: if i % 2 == 1 { 0.9 } else { 0.0 },
            seed: i as u64,
            ..Default::default()
        })
        .collect();
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&params)
        .map(|(p, sp)| engine::generate_local(&e, p, sp).unwrap().tokens)
        .collect();

    // Passes of at most 48 tokens, chunks of at most 32, first come first served.
    let (budget, chunk) = (48usize, 32usize);
    let seqs: Vec<u64> = prompts.iter().map(|_| e.next_sequence_id()).collect();
    let blocks: Vec<Vec<u32>> = seqs.iter().zip(&prompts).map(|(&s, p)| e.admit(s, p.len() + 6).unwrap()).collect();
    let mut done = vec![0usize; prompts.len()];
    let mut first = vec![None; prompts.len()];
    let mut passes = 0;
    while done.iter().zip(&prompts).any(|(d, p)| *d < p.len()) {
        let mut left = budget;
        let mut parts = Vec::new();
        let mut who = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let take = (p.len() - done[i]).min(chunk).min(left);
            if take == 0 {
                continue;
            }
            parts.push(PrefillPart {
                prompt: p,
                from: done[i],
                to: done[i] + take,
                blocks: &blocks[i],
                params: &params[i],
            });
            who.push(i);
            left -= take;
        }
        let picked = e.prefill_batch_pick(&parts).unwrap();
        for (k, &i) in who.iter().enumerate() {
            done[i] = parts[k].to;
            assert_eq!(
                picked[k].is_some(),
                done[i] == prompts[i].len(),
                "a first token exactly at a prompt's end"
            );
            if let Some(t) = picked[k] {
                first[i] = Some(t);
            }
        }
        passes += 1;
    }
    assert!(passes >= 5, "the prompts took {passes} passes");
    // Decode the rest together from the K/V the passes wrote.
    let mut tokens: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&first)
        .map(|(p, f)| {
            let mut t = p.clone();
            t.push(f.unwrap());
            t
        })
        .collect();
    for _ in 1..6 {
        let batch: Vec<DecodeInput> = tokens
            .iter()
            .zip(&blocks)
            .map(|(t, b)| DecodeInput {
                token: *t.last().unwrap(),
                pos: t.len() - 1,
                blocks: b,
            })
            .collect();
        let picks: Vec<Pick> = tokens
            .iter()
            .zip(&prompts)
            .zip(&params)
            .map(|((t, p), sp)| Pick {
                params: sp,
                history: t,
                step: (t.len() - p.len()) as u64,
            })
            .collect();
        let next = e.decode_pick(&batch, &picks).unwrap();
        drop(batch);
        for (t, n) in tokens.iter_mut().zip(next) {
            t.push(n);
        }
    }
    for (i, (t, p)) in tokens.iter().zip(&prompts).enumerate() {
        assert_eq!(&t[p.len()..], &want[i][..], "prompt {i} ({} tokens)", p.len());
    }
    for s in seqs {
        e.release(s);
    }
    assert_eq!(e.free_blocks(), e.total_blocks());
}

#[test]
fn bad_parts_are_refused() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 4);
    let p = common::prompt(20, 1, 512);
    let seq = e.next_sequence_id();
    let blocks = e.admit(seq, 20).unwrap();
    let sp = SamplingParams::default();
    for (from, to) in [(5, 5), (6, 5), (0, 21)] {
        let part = PrefillPart {
            prompt: &p,
            from,
            to,
            blocks: &blocks,
            params: &sp,
        };
        let err = e.prefill_batch_pick(&[part]).unwrap_err().to_string();
        assert!(err.contains("prefill from position"), "{err}");
    }
    assert!(e.prefill_batch_pick(&[]).is_err());
    e.release(seq);
}
