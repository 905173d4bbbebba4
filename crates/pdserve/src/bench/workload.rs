//! The requests a benchmark sends: random token prompts of fixed or uniformly drawn
//! lengths (optionally behind shared prefixes, as SGLang's `generated-shared-prefix`),
//! prompts from a JSONL file, or a trace replayed at its own arrival times (Mooncake's
//! format); the same seed gives the same workload.
use std::path::PathBuf;

use anyhow::{Context, bail};
use proto::v1 as pb;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Shared prefixes: `GROUPS:LEN`, GROUPS distinct prefixes of LEN tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedPrefix {
    pub groups: usize,
    pub len: usize,
}

impl std::str::FromStr for SharedPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("shared prefix {s:?}: want GROUPS:LEN, both at least 1");
        let (g, l) = s.split_once(':').ok_or_else(bad)?;
        let (groups, len) = (
            g.trim().parse::<usize>().map_err(|_| bad())?,
            l.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if groups == 0 || len == 0 || groups.saturating_mul(len) > MAX_TRACE_TOKENS {
            return Err(format!("{}, and GROUPS x LEN at most {MAX_TRACE_TOKENS}", bad()));
        }
        Ok(SharedPrefix { groups, len })
    }
}

/// A length: `512` (fixed) or `256:1024` (uniform, both ends included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LenRange {
    pub min: usize,
    pub max: usize,
}

impl std::str::FromStr for LenRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad length {p:?} (want N or MIN:MAX)"))
        };
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("length {s:?}: need 1 <= MIN <= MAX"));
        }
        Ok(LenRange { min, max })
    }
}

impl std::fmt::Display for LenRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}:{}", self.min, self.max)
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Requests to send (per load level).
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Prompt length in tokens: N, or MIN:MAX drawn uniformly; several, comma-separated,
    /// are measured one after the other.
    #[arg(long, default_value = "128", value_delimiter = ',')]
    pub input_len: Vec<LenRange>,
    /// Tokens to generate: N, or MIN:MAX drawn uniformly (EOS is ignored, so every
    /// request generates exactly this many).
    #[arg(long, default_value = "32")]
    pub output_len: LenRange,
    /// Prompts from a JSONL file instead: one object per line with `prompt` (text) or
    /// `token_ids`, and optionally `output_len`; used in order, round robin.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Random prompts behind shared prefixes: `GROUPS:LEN` (e.g. `8:512`) makes GROUPS
    /// random prefixes of LEN tokens, and each request one of them (drawn) followed by
    /// its own `--input-len` tokens: a shared system prompt, or a few documents asked
    /// many questions (prefix caching's workload).
    #[arg(long)]
    pub shared_prefix: Option<SharedPrefix>,
    /// Replays a trace: JSONL in Mooncake's format, one request per line with
    /// `timestamp` (ms), `input_length`, `output_length` and optionally `hash_ids` (one
    /// per `--trace-block` tokens: equal ids, equal tokens, so shared prefixes stay
    /// shared). Requests are sent at their timestamps (the first `--requests` lines);
    /// `--concurrency`/`--rate` do not apply.
    #[arg(long, conflicts_with_all = ["prompts", "shared_prefix"])]
    pub trace: Option<PathBuf>,
    /// Multi-turn chats of this many turns: each turn's prompt is the previous turn's
    /// prompt, an answer of its output length (random tokens standing in for the
    /// model's) and `--input-len` new tokens; a conversation's turns go one after the
    /// other (closed loop only). `--requests` counts turns.
    #[arg(long, conflicts_with_all = ["prompts", "shared_prefix", "trace"])]
    pub multi_turn: Option<usize>,
    /// Tokens per hash id of a trace (Mooncake's traces: 512).
    #[arg(long, default_value_t = 512)]
    pub trace_block: usize,
    /// Random prompt token ids are drawn below this (the model's vocabulary size or less).
    #[arg(long, default_value_t = 512)]
    pub vocab: u32,
    /// Seed for prompts, lengths, arrivals and sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
}

/// One request of the workload.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub input: pb::generate_request::Input,
    /// Prompt tokens when known before sending (token prompts); text prompts learn it from the answer.
    pub input_tokens: Option<usize>,
    pub output_len: usize,
    /// When to send it, seconds from the run's start (traces only).
    pub at_s: Option<f64>,
    /// The request it is the next turn of (multi-turn: sent only after that one ended).
    pub follows: Option<usize>,
}

/// The longest trace prompt taken (a clear error rather than an allocation failure).
const MAX_TRACE_TOKENS: usize = 1 << 20;

/// A trace block's generator seed: mixed (splitmix64) so that no hash id's blocks
/// equal the filler tokens drawn from `--seed` itself.
fn block_seed(seed: u64, hash: u64) -> u64 {
    let mut z = seed ^ 0x7472_6163_6562_6c6b ^ hash.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(serde::Deserialize)]
struct TraceLine {
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

#[derive(serde::Deserialize)]
struct Line {
    prompt: Option<String>,
    token_ids: Option<Vec<u32>>,
    output_len: Option<usize>,
}

impl WorkloadArgs {
    /// The requests for one of the prompt lengths (ignored with `--prompts`).
    pub fn build(&self, input_len: LenRange) -> anyhow::Result<Vec<Prompt>> {
        if self.requests == 0 {
            bail!("--requests must be at least 1");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let draw = |r: LenRange, rng: &mut ChaCha8Rng| rng.random_range(r.min..=r.max);
        if let Some(path) = &self.trace {
            return self.trace(path, &mut rng);
        }
        match &self.prompts {
            Some(_) if self.shared_prefix.is_some() => bail!("--shared-prefix makes random prompts: not with --prompts"),
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let mut lines = Vec::new();
                for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let line: Line = serde_json::from_str(l).with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
                    let (input, input_tokens) = match (line.prompt, line.token_ids) {
                        (Some(t), None) => (pb::generate_request::Input::Text(t), None),
                        (None, Some(ids)) => {
                            let n = ids.len();
                            (pb::generate_request::Input::TokenIds(pb::TokenIds { ids }), Some(n))
                        }
                        _ => bail!("{}:{}: give exactly one of `prompt` and `token_ids`", path.display(), i + 1),
                    };
                    lines.push((input, input_tokens, line.output_len));
                }
                if lines.is_empty() {
                    bail!("{} has no prompts", path.display());
                }
                Ok((0..self.requests)
                    .map(|i| {
                        let (input, input_tokens, out) = lines[i % lines.len()].clone();
                        let output_len = out.unwrap_or_else(|| draw(self.output_len, &mut rng));
                        Prompt {
                            input,
                            input_tokens,
                            output_len,
                            at_s: None,
                            follows: None,
                        }
                    })
                    .collect())
            }
            None => {
                if self.vocab < 2 {
                    bail!("--vocab must be at least 2");
                }
                let vocab = self.vocab;
                let random = |n: usize, rng: &mut ChaCha8Rng| -> Vec<u32> { (0..n).map(|_| rng.random_range(1..vocab)).collect() };
                let prefixes: Vec<Vec<u32>> = match self.shared_prefix {
                    Some(sp) => (0..sp.groups).map(|_| random(sp.len, &mut rng)).collect(),
                    None => Vec::new(),
                };
                if let Some(turns) = self.multi_turn {
                    if turns == 0 {
                        bail!("--multi-turn must be at least 1");
                    }
                    let mut out: Vec<Prompt> = Vec::with_capacity(self.requests);
                    let mut history: Vec<u32> = Vec::new();
                    for i in 0..self.requests {
                        let first = i % turns == 0;
                        if first {
                            history.clear();
                        }
                        history.extend(random(draw(input_len, &mut rng), &mut rng));
                        if history.len() > MAX_TRACE_TOKENS {
                            bail!("--multi-turn: a conversation grew past {MAX_TRACE_TOKENS} tokens");
                        }
                        let output_len = draw(self.output_len, &mut rng);
                        out.push(Prompt {
                            input_tokens: Some(history.len()),
                            input: pb::generate_request::Input::TokenIds(pb::TokenIds { ids: history.clone() }),
                            output_len,
                            at_s: None,
                            follows: (!first).then(|| i - 1),
                        });
                        // The answer's stand-in joins the history the next turn extends.
                        history.extend(random(output_len, &mut rng));
                    }
                    return Ok(out);
                }
                Ok((0..self.requests)
                    .map(|_| {
                        let mut ids = match prefixes.len() {
                            0 => Vec::new(),
                            g => prefixes[rng.random_range(0..g)].clone(),
                        };
                        let n = draw(input_len, &mut rng);
                        ids.extend(random(n, &mut rng));
                        Prompt {
                            input_tokens: Some(ids.len()),
                            input: pb::generate_request::Input::TokenIds(pb::TokenIds { ids }),
                            output_len: draw(self.output_len, &mut rng),
                            at_s: None,
                            follows: None,
                        }
                    })
                    .collect())
            }
        }
    }

    /// A trace's requests, in time order: each hash id stands for `trace_block` tokens
    /// drawn from a generator seeded by it (and `--seed`), cut or topped up to
    /// `input_length`.
    fn trace(&self, path: &std::path::Path, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<Prompt>> {
        if self.vocab < 2 || self.trace_block == 0 {
            bail!("--vocab must be at least 2 and --trace-block at least 1");
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let vocab = self.vocab;
        let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
        if lines.len() > self.requests {
            eprintln!(
                "bench: replaying the first {} of {} requests in {} (--requests)",
                self.requests,
                lines.len(),
                path.display()
            );
        }
        let mut timed = Vec::new();
        for (i, l) in lines.into_iter().take(self.requests) {
            let where_ = || format!("{}:{}", path.display(), i + 1);
            let t: TraceLine =
                serde_json::from_str(l).with_context(|| format!("{}: want timestamp, input_length, output_length", where_()))?;
            if t.input_length == 0 || t.output_length == 0 || t.input_length > MAX_TRACE_TOKENS || !t.timestamp.is_finite() {
                bail!(
                    "{}: lengths must be 1 to {MAX_TRACE_TOKENS} tokens and the timestamp a number",
                    where_()
                );
            }
            let mut ids: Vec<u32> = Vec::with_capacity(t.input_length);
            for h in &t.hash_ids {
                let n = self.trace_block.min(t.input_length - ids.len());
                if n == 0 {
                    break;
                }
                let mut block = ChaCha8Rng::seed_from_u64(block_seed(self.seed, *h));
                ids.extend((0..n).map(|_| block.random_range(1..vocab)));
            }
            while ids.len() < t.input_length {
                ids.push(rng.random_range(1..vocab));
            }
            let prompt = Prompt {
                input_tokens: Some(ids.len()),
                input: pb::generate_request::Input::TokenIds(pb::TokenIds { ids }),
                output_len: t.output_length,
                at_s: None,
                follows: None,
            };
            timed.push((t.timestamp, prompt));
        }
        if timed.is_empty() {
            bail!("{} has no requests", path.display());
        }
        // Sent in time order, from the earliest; a span past a day is a unit mistake.
        timed.sort_by(|a, b| a.0.total_cmp(&b.0));
        let t0 = timed[0].0;
        let span_s = (timed[timed.len() - 1].0 - t0) / 1000.0;
        if span_s > 86_400.0 {
            bail!(
                "{}: timestamps span {span_s:.0} s (want milliseconds, within a day)",
                path.display()
            );
        }
        Ok(timed
            .into_iter()
            .map(|(ts, p)| Prompt {
                at_s: Some((ts - t0) / 1000.0),
                ..p
            })
            .collect())
    }

    /// The prompts to warm up with: the workload's own first ones, except where they
    /// share prefixes with what follows (a trace, shared prefixes, chats): then unrelated
    /// random prompts, so the warm-up fills no cache the measured requests hit.
    pub fn warm_up_prompts(&self, prompts: &[Prompt], n: usize, input_len: LenRange) -> anyhow::Result<Vec<Prompt>> {
        if self.prompts.is_some() {
            return Ok(prompts.iter().take(n).cloned().collect());
        }
        if self.trace.is_none() && self.shared_prefix.is_none() && self.multi_turn.is_none() {
            // Random prompts of the measured lengths, but none of the measured ones: the
            // measured requests must not find theirs in the prefix caches.
            return WorkloadArgs {
                requests: n.max(1),
                seed: self.seed ^ 0x7761_726d,
                ..self.clone()
            }
            .build(input_len);
        }
        WorkloadArgs {
            requests: n.max(1),
            trace: None,
            shared_prefix: None,
            multi_turn: None,
            prompts: None,
            seed: self.seed ^ 0x7761_726d,
            output_len: LenRange { min: 4, max: 4 },
            ..self.clone()
        }
        .build(LenRange { min: 16, max: 16 })
    }

    /// The workload of run `k` (a prompt length at a load level): drawn from its own
    /// seed (the first run's is `--seed`), so that a run does not find the prompts of the
    /// runs before it in the servers' prefix caches.
    pub fn for_level(&self, k: usize) -> WorkloadArgs {
        WorkloadArgs {
            seed: self.seed.wrapping_add((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ..self.clone()
        }
    }

    /// The prompt lengths to measure: one pass for a prompts file or a trace.
    pub fn input_lens(&self) -> Vec<LenRange> {
        if self.prompts.is_some() || self.trace.is_some() {
            vec![LenRange { min: 1, max: 1 }]
        } else {
            self.input_len.clone()
        }
    }

    pub fn describe(&self, input_len: LenRange) -> String {
        if let Some(t) = &self.trace {
            return format!("up to {} requests replayed from {}", self.requests, t.display());
        }
        match &self.prompts {
            Some(p) => format!("{} requests from {}, output {}", self.requests, p.display(), self.output_len),
            None => format!(
                "{} requests, input {}{input_len} tokens, output {} tokens",
                self.requests,
                self.shared_prefix
                    .map(|sp| format!("{} (one of {} shared prefixes) + ", sp.len, sp.groups))
                    .or(self.multi_turn.map(|t| format!("({t}-turn chats, the history) + ")))
                    .unwrap_or_default(),
                self.output_len
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> WorkloadArgs {
        WorkloadArgs {
            requests: 50,
            input_len: vec!["5:9".parse().unwrap()],
            output_len: "3".parse().unwrap(),
            prompts: None,
            shared_prefix: None,
            trace: None,
            trace_block: 512,
            multi_turn: None,
            vocab: 100,
            seed: 7,
            temperature: 0.0,
        }
    }

    #[test]
    fn lengths_parse_and_are_checked() {
        assert_eq!("512".parse::<LenRange>().unwrap(), LenRange { min: 512, max: 512 });
        assert_eq!("2:8".parse::<LenRange>().unwrap(), LenRange { min: 2, max: 8 });
        assert!("0".parse::<LenRange>().is_err());
        assert!("9:2".parse::<LenRange>().is_err());
        assert!("x".parse::<LenRange>().is_err());
    }

    /// Neither the warm-up nor a later load level sends the prompts a level measures
    /// (the servers' prefix caches would answer them).
    #[test]
    fn warm_up_and_levels_draw_prompts_of_their_own() {
        let w = args();
        let len = w.input_len[0];
        let first = w.for_level(0).build(len).unwrap();
        assert_eq!(format!("{first:?}"), format!("{:?}", w.build(len).unwrap()), "level 0 is --seed's");
        let key = |p: &Prompt| format!("{:?}", p.input);
        let measured: std::collections::HashSet<String> = first.iter().map(key).collect();
        for other in [w.for_level(1).build(len).unwrap(), w.warm_up_prompts(&first, 4, len).unwrap()] {
            assert!(other.iter().all(|p| !measured.contains(&key(p))));
            assert!(other.iter().all(|p| (5..=9).contains(&p.input_tokens.unwrap())));
        }
    }

    #[test]
    fn random_workload_is_seeded_and_within_bounds() {
        let a = args().build(args().input_len[0]).unwrap();
        let b = args().build(args().input_len[0]).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        for p in &a {
            let n = p.input_tokens.unwrap();
            assert!((5..=9).contains(&n));
            assert_eq!(p.output_len, 3);
            let pb::generate_request::Input::TokenIds(ids) = &p.input else {
                panic!()
            };
            assert_eq!(ids.ids.len(), n);
            assert!(ids.ids.iter().all(|&t| (1..100).contains(&t)));
        }
        assert!(a.iter().any(|p| p.input_tokens == Some(5)) && a.iter().any(|p| p.input_tokens == Some(9)));
    }

    #[test]
    fn jsonl_prompts_are_used_in_order_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"prompt\": \"hello\", \"output_len\": 4}\n\n{\"token_ids\": [1, 2, 3]}\n").unwrap();
        let w = WorkloadArgs {
            prompts: Some(path.clone()),
            requests: 3,
            ..args()
        };
        let p = w.build(w.input_len[0]).unwrap();
        assert!(matches!(&p[0].input, pb::generate_request::Input::Text(t) if t == "hello"));
        assert_eq!((p[0].output_len, p[0].input_tokens), (4, None));
        assert_eq!((p[1].output_len, p[1].input_tokens), (3, Some(3)));
        assert!(matches!(&p[2].input, pb::generate_request::Input::Text(_)));
        std::fs::write(&path, "{\"prompt\": \"a\"}\n{\"nothing\": 1}\n").unwrap();
        let e = w.build(w.input_len[0]).unwrap_err().to_string();
        assert!(e.contains("p.jsonl:2"), "{e}");
    }

    #[test]
    fn shared_prefixes_are_shared_and_seeded() {
        let w = WorkloadArgs {
            shared_prefix: Some("3:20".parse().unwrap()),
            requests: 60,
            ..args()
        };
        let ids = |p: &Prompt| match &p.input {
            pb::generate_request::Input::TokenIds(t) => t.ids.clone(),
            _ => panic!("token prompts"),
        };
        let a = w.build(w.input_len[0]).unwrap();
        let b = w.build(w.input_len[0]).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let mut prefixes: Vec<Vec<u32>> = a.iter().map(|p| ids(p)[..20].to_vec()).collect();
        for p in &a {
            let n = ids(p).len();
            assert_eq!(p.input_tokens, Some(n));
            assert!((25..=29).contains(&n), "20 shared + 5..9 own tokens, got {n}");
        }
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 3, "every group used, and no more than 3 prefixes");
        assert!("0:5".parse::<SharedPrefix>().is_err() && "4".parse::<SharedPrefix>().is_err());
        let both = WorkloadArgs {
            prompts: Some("x.jsonl".into()),
            ..w
        };
        assert!(both.build(both.input_len[0]).unwrap_err().to_string().contains("--shared-prefix"));
    }

    #[test]
    fn traces_keep_shared_blocks_shared_and_their_arrival_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"timestamp\": 1000, \"input_length\": 10, \"output_length\": 3, \"hash_ids\": [7, 8, 9]}\n",
                "{\"timestamp\": 1500, \"input_length\": 6, \"output_length\": 2, \"hash_ids\": [7, 5]}\n",
                "{\"timestamp\": 2250, \"input_length\": 4, \"output_length\": 1}\n",
            ),
        )
        .unwrap();
        let w = WorkloadArgs {
            trace: Some(path.clone()),
            trace_block: 4,
            ..args()
        };
        let p = w.build(w.input_lens()[0]).unwrap();
        let ids = |p: &Prompt| match &p.input {
            pb::generate_request::Input::TokenIds(t) => t.ids.clone(),
            _ => panic!("token prompts"),
        };
        assert_eq!(p.len(), 3);
        assert_eq!(p.iter().map(|p| ids(p).len()).collect::<Vec<_>>(), [10, 6, 4]);
        assert_eq!(p.iter().map(|p| p.output_len).collect::<Vec<_>>(), [3, 2, 1]);
        assert_eq!(p.iter().map(|p| p.at_s.unwrap()).collect::<Vec<_>>(), [0.0, 0.5, 1.25]);
        // Lines out of time order are sent in time order, from the earliest.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.reverse();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let r = w.build(w.input_lens()[0]).unwrap();
        assert_eq!(format!("{r:?}"), format!("{p:?}"), "sorted by timestamp");
        std::fs::write(&path, text).unwrap();
        let (a, b) = (ids(&p[0]), ids(&p[1]));
        assert_eq!(a[..4], b[..4], "hash id 7: the same first block");
        assert_ne!(a[4..6], b[4..6], "hash ids 8 and 5: other tokens");
        assert_eq!(format!("{p:?}"), format!("{:?}", w.build(w.input_lens()[0]).unwrap()), "seeded");
        std::fs::write(&path, "{\"timestamp\": 0, \"input_length\": 0, \"output_length\": 1}\n").unwrap();
        assert!(w.build(w.input_lens()[0]).unwrap_err().to_string().contains("t.jsonl:1"));
    }

    #[test]
    fn multi_turn_prompts_extend_the_last_turn() {
        let w = WorkloadArgs {
            multi_turn: Some(3),
            requests: 7,
            ..args()
        };
        let p = w.build(w.input_len[0]).unwrap();
        let ids = |p: &Prompt| match &p.input {
            pb::generate_request::Input::TokenIds(t) => t.ids.clone(),
            _ => panic!("token prompts"),
        };
        assert_eq!(p.len(), 7);
        assert_eq!(
            p.iter().map(|p| p.follows).collect::<Vec<_>>(),
            [None, Some(0), Some(1), None, Some(3), Some(4), None]
        );
        for i in [1, 2, 4, 5] {
            let (prev, this) = (ids(&p[i - 1]), ids(&p[i]));
            // The previous prompt, its answer's stand-in, then 5-9 new tokens.
            let grown = this.len() - prev.len() - p[i - 1].output_len;
            assert!(this.starts_with(&prev) && (5..=9).contains(&grown), "turn {i}");
        }
        assert!((5..=9).contains(&ids(&p[3]).len()), "a new conversation starts fresh");
        assert!(
            w.warm_up_prompts(&p, 2, w.input_len[0])
                .unwrap()
                .iter()
                .all(|q| q.follows.is_none())
        );
    }
}
