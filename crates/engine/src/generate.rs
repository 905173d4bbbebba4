//! The generation loop's pieces shared by the colocated reference and the
//! decode-server: stop conditions, incremental text, and the local (single-process)
//! reference run.
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Pick};
use crate::error::Result;
use crate::model::DecodeInput;
use crate::sampling::SamplingParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// A stop string appeared in the text.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// Follows one sequence's output: the text so far, what is new since the last call,
/// and whether to stop.
pub struct TextStream {
    prompt_len: usize,
    emitted: usize,
    text: String,
}

impl TextStream {
    pub fn new(prompt_len: usize) -> Self {
        TextStream {
            prompt_len,
            emitted: 0,
            text: String::new(),
        }
    }

    /// Takes the sequence's tokens so far (prompt and output) after a new one was added;
    /// returns the text delta to stream and the finish reason, if any.
    pub fn push(&mut self, engine: &Engine, tokens: &[u32], params: &SamplingParams) -> Result<(String, Option<FinishReason>)> {
        let out = &tokens[self.prompt_len..];
        let last = *out.last().expect("a token was pushed");
        self.text = engine.detokenize(out)?;
        let mut finish = None;
        if !params.ignore_eos && engine.is_eos(last) {
            finish = Some(FinishReason::Eos);
        }
        if let Some(at) = params.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(at);
            finish = Some(FinishReason::Stop);
        }
        if finish.is_none() && out.len() >= params.max_tokens as usize {
            finish = Some(FinishReason::Length);
        }
        // Hold back an incomplete multi-byte character, and anything that could still
        // grow into a stop string, until it is settled.
        let mut ready = self.text.len();
        if finish.is_none() {
            if self.text.ends_with('\u{FFFD}') {
                ready = self.text.trim_end_matches('\u{FFFD}').len();
            }
            for s in &params.stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.text[..ready].ends_with(&s[..k]) {
                        ready = ready.min(self.text[..ready].len() - k);
                        break;
                    }
                }
            }
        }
        let ready = ready.max(self.emitted);
        let delta = self.text.get(self.emitted..ready).unwrap_or_default().to_string();
        self.emitted = ready;
        Ok((delta, finish))
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The result of a local (colocated) generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prefill_ms: f64,
    pub first_token_ms: f64,
    pub total_ms: f64,
}

/// Generates in one process: the reference the disaggregated path must equal.
pub fn generate_local(engine: &Engine, prompt: &[u32], params: &SamplingParams) -> Result<Generation> {
    let start = Instant::now();
    engine.check_prompt(prompt, params)?;
    let seq = engine.next_sequence_id();
    let blocks = engine.admit(seq, prompt.len() + params.max_tokens as usize)?;
    let result = (|| {
        let mut next = engine.prefill_pick(prompt, 0, &blocks, params)?;
        let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        let mut tokens = prompt.to_vec();
        let mut stream = TextStream::new(prompt.len());
        let first_token_ms = start.elapsed().as_secs_f64() * 1e3;
        loop {
            tokens.push(next);
            let (_, finish) = stream.push(engine, &tokens, params)?;
            if let Some(reason) = finish {
                return Ok(Generation {
                    prompt_tokens: prompt.to_vec(),
                    tokens: tokens[prompt.len()..].to_vec(),
                    text: stream.text().to_string(),
                    finish_reason: reason,
                    prefill_ms,
                    first_token_ms,
                    total_ms: start.elapsed().as_secs_f64() * 1e3,
                });
            }
            let pos = tokens.len() - 1;
            let pick = Pick {
                params,
                history: &tokens,
                step: (tokens.len() - prompt.len()) as u64,
            };
            let input = DecodeInput {
                token: next,
                pos,
                blocks: &blocks,
            };
            next = engine.decode_pick(&[input], &[pick])?[0];
        }
    })();
    engine.release(seq);
    result
}
