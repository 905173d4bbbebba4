//! What one request measured, and the summary statistics over many (the figures vLLM's
//! and DistServe's benchmarks report: TTFT, TPOT, ITL, end to end, goodput under an SLO).
use serde::{Deserialize, Serialize};

use crate::units::quantile;

/// One request, as the client saw it and as the server reported it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub index: usize,
    pub request_id: String,
    /// Seconds from the start of the run to sending the request.
    pub sent_s: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
    /// Leading prompt tokens the server took from its prefix cache.
    pub cached_tokens: usize,
    /// Leading prompt tokens the decode-server held already (their KV did not travel).
    #[serde(default)]
    pub decode_cached_tokens: usize,
    /// Times the sequence was preempted on the decode-server.
    #[serde(default)]
    pub preemptions: u32,
    /// `None` when the request succeeded; otherwise the gRPC code and message.
    pub error: Option<String>,
    /// Client clock: send to first token.
    pub ttft_ms: f64,
    /// Client clock: send to the final message.
    pub e2e_ms: f64,
    /// Client clock: (e2e - ttft) / (output tokens - 1); 0 for a single token.
    pub tpot_ms: f64,
    /// Client clock: gaps between tokens (a chunk of k tokens counts k gaps of its share).
    pub itl_ms: Vec<f64>,
    /// Server clock (the final message's timings).
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub kv_transfer_ms: f64,
    pub kv_bytes: u64,
    pub server_first_token_ms: f64,
    pub server_total_ms: f64,
    pub prefill_server: String,
    pub kv_backend: String,
}

impl Record {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
    /// Decode time on the server: after the first token until the last.
    pub fn decode_ms(&self) -> f64 {
        (self.server_total_ms - self.server_first_token_ms).max(0.0)
    }
}

/// Mean and percentiles of one metric, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Dist {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        v.sort_by(f64::total_cmp);
        Dist {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: quantile(&v, 0.5),
            p90: quantile(&v, 0.9),
            p99: quantile(&v, 0.99),
        }
    }
}

/// Service-level objective for goodput; `None` means no bound on that metric.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    pub fn met(&self, r: &Record) -> bool {
        r.ok() && self.ttft_ms.is_none_or(|b| r.ttft_ms <= b) && self.tpot_ms.is_none_or(|b| r.tpot_ms <= b)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Dist,
    pub tpot_ms: Dist,
    pub itl_ms: Dist,
    pub e2e_ms: Dist,
    pub queue_ms: Dist,
    pub prefill_ms: Dist,
    pub kv_transfer_ms: Dist,
    pub decode_ms: Dist,
    pub server_total_ms: Dist,
    pub mean_kv_bytes: f64,
    /// Share of the prompt tokens found in the prefix cache (not computed).
    #[serde(default)]
    pub prefix_hit_rate: f64,
    /// Prompt tokens the prefill computed (not found in the cache), all requests.
    #[serde(default)]
    pub prefill_tokens_computed: usize,
    /// Share of the prompt tokens whose KV the decode-servers held already.
    #[serde(default)]
    pub decode_hit_rate: f64,
    /// Preemptions of the requests' sequences, in all.
    #[serde(default)]
    pub preemptions: u64,
    pub slo: Slo,
    /// Share of all requests (failed ones included) that met the SLO.
    pub slo_attainment: f64,
    /// Requests per second that met the SLO.
    pub goodput: f64,
}

impl Summary {
    pub fn of(records: &[Record], duration_s: f64, slo: Slo) -> Summary {
        let ok: Vec<&Record> = records.iter().filter(|r| r.ok()).collect();
        let dist = |f: &dyn Fn(&Record) -> f64| Dist::of(ok.iter().map(|r| f(r)).collect());
        let out: usize = ok.iter().map(|r| r.output_tokens).sum();
        let inp: usize = ok.iter().map(|r| r.input_tokens).sum();
        let cached: usize = ok.iter().map(|r| r.cached_tokens.min(r.input_tokens)).sum();
        let per_s = |n: f64| if duration_s > 0.0 { n / duration_s } else { 0.0 };
        let good = records.iter().filter(|r| slo.met(r)).count();
        Summary {
            requests: records.len(),
            completed: ok.len(),
            failed: records.len() - ok.len(),
            duration_s,
            request_throughput: per_s(ok.len() as f64),
            output_token_throughput: per_s(out as f64),
            total_token_throughput: per_s((out + inp) as f64),
            ttft_ms: dist(&|r| r.ttft_ms),
            // A one-token answer has no time per output token.
            tpot_ms: Dist::of(ok.iter().filter(|r| r.output_tokens > 1).map(|r| r.tpot_ms).collect()),
            itl_ms: Dist::of(ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect()),
            e2e_ms: dist(&|r| r.e2e_ms),
            queue_ms: dist(&|r| r.queue_ms),
            prefill_ms: dist(&|r| r.prefill_ms),
            kv_transfer_ms: dist(&|r| r.kv_transfer_ms),
            decode_ms: dist(&|r| r.decode_ms()),
            server_total_ms: dist(&|r| r.server_total_ms),
            mean_kv_bytes: if ok.is_empty() {
                0.0
            } else {
                ok.iter().map(|r| r.kv_bytes as f64).sum::<f64>() / ok.len() as f64
            },
            prefix_hit_rate: if inp == 0 { 0.0 } else { cached as f64 / inp as f64 },
            prefill_tokens_computed: inp - cached,
            decode_hit_rate: if inp == 0 {
                0.0
            } else {
                ok.iter().map(|r| r.decode_cached_tokens.min(r.input_tokens)).sum::<usize>() as f64 / inp as f64
            },
            preemptions: ok.iter().map(|r| u64::from(r.preemptions)).sum(),
            slo,
            slo_attainment: if records.is_empty() {
                0.0
            } else {
                good as f64 / records.len() as f64
            },
            goodput: per_s(good as f64),
        }
    }

    /// The Markdown table `pdserve bench` prints.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s += "| metric | mean | p50 | p90 | p99 |\n|---|---|---|---|---|\n";
        for (name, d) in [
            ("TTFT ms", self.ttft_ms),
            ("TPOT ms", self.tpot_ms),
            ("ITL ms", self.itl_ms),
            ("end to end ms", self.e2e_ms),
            ("queue ms (server)", self.queue_ms),
            ("prefill ms (server)", self.prefill_ms),
            ("KV transfer ms (server)", self.kv_transfer_ms),
            ("decode ms (server)", self.decode_ms),
        ] {
            s += &format!("| {name} | {:.3} | {:.3} | {:.3} | {:.3} |\n", d.mean, d.p50, d.p90, d.p99);
        }
        s += &format!(
            "\n| requests | completed | failed | duration s | req/s | output tok/s | total tok/s | KV bytes/req | prefix hit rate | prompt tokens computed | SLO met | goodput req/s |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {:.1}% | {} | {:.1}% | {:.2} |\n",
            self.requests,
            self.completed,
            self.failed,
            self.duration_s,
            self.request_throughput,
            self.output_token_throughput,
            self.total_token_throughput,
            self.mean_kv_bytes,
            self.prefix_hit_rate * 100.0,
            self.prefill_tokens_computed,
            self.slo_attainment * 100.0,
            self.goodput
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ttft: f64, tpot: f64, out: usize) -> Record {
        Record {
            input_tokens: 10,
            output_tokens: out,
            ttft_ms: ttft,
            tpot_ms: tpot,
            e2e_ms: ttft + tpot * (out.saturating_sub(1)) as f64,
            itl_ms: vec![tpot; out.saturating_sub(1)],
            server_first_token_ms: ttft,
            server_total_ms: ttft + 5.0,
            ..Default::default()
        }
    }

    #[test]
    fn distribution_on_known_samples() {
        let d = Dist::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(
            d,
            Dist {
                mean: 50.5,
                p50: 50.0,
                p90: 90.0,
                p99: 99.0
            }
        );
        assert_eq!(Dist::of(vec![]), Dist::default());
    }

    #[test]
    fn goodput_counts_requests_meeting_both_bounds() {
        let mut rs = vec![rec(10.0, 1.0, 4), rec(30.0, 1.0, 4), rec(10.0, 3.0, 4), rec(5.0, 0.5, 1)];
        rs.push(Record {
            error: Some("Unavailable: gone".into()),
            ..rec(1.0, 0.1, 4)
        });
        let slo = Slo {
            ttft_ms: Some(20.0),
            tpot_ms: Some(2.0),
        };
        let s = Summary::of(&rs, 2.0, slo);
        assert_eq!((s.requests, s.completed, s.failed), (5, 4, 1));
        // Met: the first and the one-token answer; not the slow first token, the slow
        // decode, or the failure.
        assert_eq!(s.slo_attainment, 2.0 / 5.0);
        assert_eq!(s.goodput, 1.0);
        assert_eq!(s.request_throughput, 2.0);
        assert_eq!(s.output_token_throughput, 13.0 / 2.0);
        assert_eq!(s.total_token_throughput, 53.0 / 2.0);
        // TPOT leaves out the one-token answer.
        assert_eq!(s.tpot_ms.mean, 5.0 / 3.0);
        assert_eq!(s.itl_ms.p50, 1.0);
        assert_eq!(s.decode_ms.mean, 5.0);
        // No bounds: every success meets it.
        let s = Summary::of(&rs, 2.0, Slo::default());
        assert_eq!(s.slo_attainment, 4.0 / 5.0);
    }

    #[test]
    fn prefix_hit_rate_counts_successful_prompts_only() {
        let rs = [
            Record {
                cached_tokens: 8,
                ..rec(1.0, 1.0, 2)
            },
            Record {
                cached_tokens: 0,
                ..rec(1.0, 1.0, 2)
            },
            // A server that reports more than the prompt is capped at the prompt.
            Record {
                cached_tokens: 99,
                ..rec(1.0, 1.0, 2)
            },
            Record {
                cached_tokens: 10,
                error: Some("Unavailable: gone".into()),
                ..rec(1.0, 1.0, 2)
            },
        ];
        let s = Summary::of(&rs, 1.0, Slo::default());
        assert_eq!(s.prefix_hit_rate, 18.0 / 30.0);
        assert_eq!(s.prefill_tokens_computed, 12);
        assert!(s.markdown().contains("| 60.0% | 12 |"), "{}", s.markdown());
    }
}
