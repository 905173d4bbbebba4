//! Load shedding on queueing delay (CoDel's rule, applied to time to first token).
//!
//! Under overload a queue that only bounds its length still lets every admitted
//! request wait until its first token is too late to be of use: goodput collapses
//! while the daemons stay busy. The router sees every request's wait for its first
//! token (prefill queue, compute, KV transfer, decode admission), so it refuses new
//! requests at once (RESOURCE_EXHAUSTED, in microseconds) while that wait stands above
//! a target, and admits again as soon as it drops.
//!
//! "Stands": the smallest wait seen over an interval, not the largest, so one slow or
//! hung request does not shed everyone; only when even the fastest first token of the
//! interval came too late is there a standing queue. When no first token came in an
//! interval, there is one if at least two requests have waited longer than the target.
//! A line of one request is no queue (CoDel's one-packet rule): never shed for it. While
//! shedding, one streaming request per interval is let through as a probe: its first
//! token tells whether the line still stands, so shedding ends without waiting for the
//! line to drain.
//!
//! Time to first token includes the prompt's own compute: the target must stand well
//! above the longest prompt's prefill time, or two long prompts alone would shed.
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the standing delay is re-evaluated (CoDel's interval is 100 ms), and how
/// often a probe is let through while shedding.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// Gauge: 1 while the router sheds new requests.
pub const SHEDDING: &str = "pdserve_router_shedding";

pub struct Shedder {
    target: Duration,
    state: Mutex<State>,
}

struct State {
    /// Requests waiting for their first token: (arrival, sequence number).
    waiting: BTreeSet<(Instant, u64)>,
    next: u64,
    window_start: Instant,
    /// The smallest time to first token seen in this window.
    window_min: Option<Duration>,
    shedding: bool,
    /// When the last probe was let through while shedding.
    last_probe: Instant,
}

/// One request's wait for its first token; ends at [`Waiting::first_token`] or drop.
pub struct Waiting {
    shed: Arc<Shedder>,
    key: Option<(Instant, u64)>,
}

impl Shedder {
    /// `target` zero: never sheds.
    pub fn new(target: Duration) -> Arc<Shedder> {
        Arc::new(Shedder {
            target,
            state: Mutex::new(State {
                waiting: BTreeSet::new(),
                next: 0,
                window_start: Instant::now(),
                window_min: None,
                shedding: false,
                last_probe: Instant::now(),
            }),
        })
    }

    pub fn target(&self) -> Duration {
        self.target
    }

    pub fn enabled(&self) -> bool {
        !self.target.is_zero()
    }

    /// Whether a request arriving now is refused; otherwise its wait, to end at its
    /// first token. `streams`: its first token will be seen (a unary call's is not:
    /// it is never a probe, and leaves the line at once).
    pub fn admit(self: &Arc<Self>, streams: bool) -> Option<Waiting> {
        let mut w = self.admit_at(Instant::now(), streams)?;
        if !streams {
            w.leave();
        }
        Some(w)
    }

    fn admit_at(self: &Arc<Self>, now: Instant, probe_ok: bool) -> Option<Waiting> {
        if !self.enabled() {
            return Some(Waiting {
                shed: self.clone(),
                key: None,
            });
        }
        let mut s = self.state.lock().unwrap();
        if now.duration_since(s.window_start) >= INTERVAL {
            // No first token in the window: a standing queue if two requests have
            // waited past the target (one may just be slow or hung).
            let standing = s.window_min.or_else(|| {
                let old = now.checked_sub(self.target)?;
                s.waiting.range(..(old, 0)).nth(1).map(|(t, _)| now.duration_since(*t))
            });
            let shedding = standing.is_some_and(|d| d > self.target);
            if shedding != s.shedding {
                s.last_probe = now;
                metrics::gauge!(SHEDDING).set(if shedding { 1.0 } else { 0.0 });
                match standing {
                    Some(d) if shedding => tracing::warn!(
                        standing_ms = d.as_millis() as u64,
                        waiting = s.waiting.len(),
                        "first tokens stand above shed_ttft_ms: refusing new requests"
                    ),
                    _ => tracing::info!("first tokens came in time again: admitting"),
                }
            }
            s.shedding = shedding;
            s.window_start = now;
            s.window_min = None;
        }
        // A line of one (or none) is no queue, whatever the last window said.
        if s.shedding && s.waiting.len() > 1 {
            if !probe_ok || now.duration_since(s.last_probe) < INTERVAL {
                return None;
            }
            s.last_probe = now;
        }
        let key = (now, s.next);
        s.next += 1;
        s.waiting.insert(key);
        Some(Waiting {
            shed: self.clone(),
            key: Some(key),
        })
    }

    fn done(&self, key: (Instant, u64), first_token: Option<Instant>) {
        let mut s = self.state.lock().unwrap();
        s.waiting.remove(&key);
        if let Some(at) = first_token {
            let ttft = at.duration_since(key.0);
            s.window_min = Some(s.window_min.map_or(ttft, |m| m.min(ttft)));
        }
    }
}

impl Waiting {
    /// Leaves the line without a verdict: a unary call, whose first token the router
    /// never sees (its answer comes whole), is checked at admission only.
    pub fn leave(&mut self) {
        if let Some(key) = self.key.take() {
            self.shed.done(key, None);
        }
    }

    /// The request's first token (or its whole answer) came: its wait counts.
    pub fn first_token(&mut self) {
        self.first_token_at(Instant::now());
    }

    fn first_token_at(&mut self, at: Instant) {
        if let Some(key) = self.key.take() {
            self.shed.done(key, Some(at));
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Failed or cancelled before its first token: it leaves the line, its wait
        // says nothing about the queue.
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn off_admits_everything() {
        let s = Shedder::new(Duration::ZERO);
        let held: Vec<_> = (0..1000).map(|_| s.admit(true).expect("admitted")).collect();
        assert_eq!(held.len(), 1000);
    }

    #[test]
    fn a_standing_queue_sheds_probes_and_ends_on_a_fast_probe() {
        let s = Shedder::new(100 * MS);
        let t0 = Instant::now();
        let mut a = s.admit_at(t0, true).unwrap();
        let _b = s.admit_at(t0 + MS, true).unwrap();
        let _c = s.admit_at(t0 + 2 * MS, true).unwrap();
        // Every first token of the window came 300 ms late: a standing queue.
        a.first_token_at(t0 + 300 * MS);
        assert!(s.admit_at(t0 + 301 * MS, true).is_none(), "a standing queue must shed");
        assert!(s.admit_at(t0 + 350 * MS, true).is_none(), "within the interval the verdict holds");
        // An interval after shedding began, one probe goes through.
        let mut probe = s.admit_at(t0 + 402 * MS, true).expect("a probe each interval");
        assert!(s.admit_at(t0 + 403 * MS, true).is_none(), "one probe per interval");
        // The probe's first token comes in time: the next verdict admits.
        probe.first_token_at(t0 + 420 * MS);
        assert!(s.admit_at(t0 + 510 * MS, true).is_some(), "a fast probe ends the shedding");
    }

    #[test]
    fn a_line_of_one_is_no_queue() {
        let s = Shedder::new(100 * MS);
        let t0 = Instant::now();
        let mut a = s.admit_at(t0, true).unwrap();
        let _b = s.admit_at(t0 + MS, true).unwrap();
        a.first_token_at(t0 + 300 * MS);
        // Slow verdict, but only b waits.
        assert!(s.admit_at(t0 + 301 * MS, true).is_some());
    }

    #[test]
    fn one_slow_request_does_not_shed_when_others_are_fast() {
        let s = Shedder::new(100 * MS);
        let t0 = Instant::now();
        let _hung = s.admit_at(t0, true).unwrap();
        let mut fast = s.admit_at(t0 + 150 * MS, true).unwrap();
        fast.first_token_at(t0 + 160 * MS);
        // The hung one has waited 500 ms, but a first token of this window took 10 ms.
        assert!(s.admit_at(t0 + 500 * MS, true).is_some());
    }

    #[test]
    fn no_first_token_in_a_window_sheds_when_two_have_waited_too_long() {
        let s = Shedder::new(100 * MS);
        let t0 = Instant::now();
        let _a = s.admit_at(t0, true).unwrap();
        let _b = s.admit_at(t0 + 20 * MS, true).unwrap();
        // The first window closes at 120 ms with no first token and one request past
        // the target: admitted.
        let _c = s.admit_at(t0 + 120 * MS, true).unwrap();
        // The next closes at 400 ms, again with no first token: three past the target.
        assert!(s.admit_at(t0 + 400 * MS, true).is_none(), "a line standing 280-400 ms must shed");
        // A unary call is never the probe.
        assert!(s.admit_at(t0 + 520 * MS, false).is_none());
        assert!(s.admit_at(t0 + 521 * MS, true).is_some(), "a streaming probe goes through");
    }

    #[test]
    fn a_drained_queue_admits_at_once() {
        let s = Shedder::new(100 * MS);
        let t0 = Instant::now();
        let mut a = s.admit_at(t0, true).unwrap();
        a.first_token_at(t0 + 300 * MS);
        // Shedding verdict, but nobody is waiting any more: the queue is gone.
        assert!(s.admit_at(t0 + 301 * MS, true).is_some());
    }

    #[test]
    fn failed_requests_leave_the_line_without_a_verdict() {
        let s = Shedder::new(100 * MS);
        let t0 = Instant::now();
        drop(s.admit_at(t0, true).unwrap());
        assert!(s.state.lock().unwrap().waiting.is_empty());
        assert!(s.state.lock().unwrap().window_min.is_none());
    }
}
