//! Sampling: greedy, temperature, top-k, top-p, repetition penalty, with a seed per
//! request. The random draw of step `n` depends only on (seed, n), so the first token
//! (sampled by the prefill-server) and the rest (by the decode-server) come out as in
//! a single-process run.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: u32,
    /// 1 means off.
    pub top_p: f32,
    /// 1 means off; >1 discourages tokens already in the prompt or output.
    pub repetition_penalty: f32,
    pub seed: u64,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            max_tokens: 16,
            stop: vec![],
            ignore_eos: false,
        }
    }
}

/// Most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes: every string is looked for in the new text at each
/// step, on the decode thread.
pub const MAX_STOP_BYTES: usize = 256;

impl SamplingParams {
    /// Checks the parameters; the message names the field.
    pub fn validate(&self, max_tokens_limit: u32) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.max_tokens > max_tokens_limit {
            return Err(format!("max_tokens {} exceeds the limit of {max_tokens_limit}", self.max_tokens));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(format!("at most {MAX_STOP_STRINGS} stop strings, got {}", self.stop.len()));
        }
        if let Some(s) = self.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(format!(
                "stop strings must be 1 to {MAX_STOP_BYTES} bytes long, got one of {}",
                s.len()
            ));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Picks the next token from `logits`, given every token so far (prompt and output)
/// and the index of this generation step.
pub fn sample(logits: &[f32], params: &SamplingParams, history: &[u32], step: u64) -> u32 {
    // A copy only when the penalty changes logits (a vocabulary's worth per token).
    let mut l = std::borrow::Cow::Borrowed(logits);
    if params.repetition_penalty != 1.0 {
        let l = l.to_mut();
        let mut seen = std::collections::HashSet::new();
        for &t in history {
            if (t as usize) < l.len() && seen.insert(t) {
                let v = &mut l[t as usize];
                *v = if *v > 0.0 {
                    *v / params.repetition_penalty
                } else {
                    *v * params.repetition_penalty
                };
            }
        }
    }
    if params.is_greedy() {
        return crate::model::argmax(&l);
    }
    let mut idx: Vec<usize> = (0..l.len()).collect();
    // Highest first; ties by id, so the order is deterministic.
    idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    if params.top_k > 0 {
        idx.truncate(params.top_k as usize);
    }
    let max = l[idx[0]];
    let mut probs: Vec<f64> = idx.iter().map(|&i| (((l[i] - max) / params.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let r: f64 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if r < acc {
            return idx[i] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_penalty() {
        let p = SamplingParams::default();
        assert_eq!(sample(&[0.1, 3.0, 2.0], &p, &[], 0), 1);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(sample(&[0.1, 3.0, 2.0], &p, &[1], 0), 2, "3.0/2 < 2.0");
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let a: Vec<u32> = (0..20).map(|s| sample(&logits, &p, &[], s)).collect();
        let b: Vec<u32> = (0..20).map(|s| sample(&logits, &p, &[], s)).collect();
        assert_eq!(a, b);
        let q = SamplingParams { seed: 43, ..p.clone() };
        assert_ne!(a, (0..20).map(|s| sample(&logits, &q, &[], s)).collect::<Vec<_>>());
        let k = SamplingParams { top_k: 1, ..p };
        assert!(
            (0..20).all(|s| sample(&logits, &k, &[], s) == 6),
            "top-1 is greedy (lowest id among ties)"
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = [10.0f32, 9.9, -10.0, -10.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 1,
            ..Default::default()
        };
        assert!((0..200).all(|s| sample(&logits, &p, &[], s) < 2));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad.validate(100).unwrap_err().contains("temperature"));
        let bad = SamplingParams {
            max_tokens: 0,
            ..Default::default()
        };
        assert!(bad.validate(100).unwrap_err().contains("max_tokens"));
        let bad = SamplingParams {
            max_tokens: 1000,
            ..Default::default()
        };
        assert!(bad.validate(100).unwrap_err().contains("limit"));
    }
}
