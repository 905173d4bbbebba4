//! `Engine::trace_prefill`, what `pdserve numerics` dumps for comparing numerics with a
//! reference: one f32 tap per layer over the whole prompt, the logits of an ordinary
//! prefill, causal (a prefix's taps are the prompt's first rows), no block kept.
mod common;

use engine::synth::Preset;
use engine::{Arch, Engine, EngineConfig};

#[test]
fn taps_cover_every_layer_and_keep_nothing() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 8);
    let (layers, hidden) = (e.config().num_layers, e.config().hidden_size);
    let prompt = common::prompt(21, 3, e.config().vocab_size);
    let free = e.free_blocks();
    let (taps, logits) = e.trace_prefill(&prompt, true).unwrap();
    assert_eq!(
        e.trace_prefill(&prompt, false).unwrap(),
        (vec![], logits.clone()),
        "no taps unless asked"
    );
    assert_eq!(e.free_blocks(), free, "the trace's blocks are released");
    assert_eq!(taps.len(), layers);
    assert!(taps.iter().all(|t| t.len() == prompt.len() * hidden));
    for w in taps.windows(2) {
        assert_ne!(w[0], w[1], "each layer changes the residual stream");
    }

    let seq = e.next_sequence_id();
    let blocks = e.admit(seq, prompt.len()).unwrap();
    assert_eq!(e.prefill(&prompt, 0, &blocks).unwrap(), logits, "the same logits as a prefill");
    e.release(seq);

    // Position i's stream depends on tokens 0..=i only.
    let k = 9;
    let (short, _) = e.trace_prefill(&prompt[..k], true).unwrap();
    for (a, b) in short.iter().zip(&taps) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a.iter().zip(&b[..k * hidden]).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale, "prefix taps differ by {err} (scale {scale})");
    }
}

#[test]
fn bad_prompts_and_settings_are_refused() {
    let e = common::engine(Arch::Llama, Preset::Tiny, 8);
    assert!(e.trace_prefill(&[], true).unwrap_err().to_string().contains("empty"));
    let err = e.trace_prefill(&[u32::MAX], true).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let err = Engine::load(&EngineConfig {
        model: common::model_dir(Arch::Llama, Preset::Tiny),
        precision: "f64".into(),
        ..Default::default()
    })
    .err()
    .expect("an unknown precision is refused")
    .to_string();
    assert!(err.contains("precision \"f64\" is not f32 or model"), "{err}");
}
