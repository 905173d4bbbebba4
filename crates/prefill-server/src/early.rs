//! The router's early starts, as a state machine per request id:
//!
//! - **started** (`begin`): the prompt is being computed, or computed and held for
//!   `hold`; its outcome waits in a channel;
//! - **running** (`claim`): a decode-server's Prefill of that id runs, with the early
//!   start's outcome (same tokens and sampling) or without one; a late EarlyPrefill of
//!   the id is not begun;
//! - **dropped before it began** (`drop`): the DropEarly overtook the router's
//!   EarlyPrefill; a tombstone (bounded, for `hold`) keeps the late start from beginning.
//!
//! An unclaimed start ends after its hold (`expire`), or earlier when a Prefill short
//! of blocks evicts the computed ones (`evict_ready`). Dropping a start's outcome
//! releases its blocks. Every table is capped at [`MAX_EARLY_STARTS`].
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::SamplingParams;
use tokio::sync::oneshot;
use tonic::Status;

/// Most request ids with an early start or a running Prefill at once, and most tombstones.
pub(crate) const MAX_EARLY_STARTS: usize = 1024;

pub(crate) fn outcome(outcome: &'static str) {
    metrics::counter!(daemon::metrics::EARLY_PREFILLS, "outcome" => outcome).increment(1);
}

/// A prompt the router started early, waiting for its decode-server's Prefill.
pub(crate) struct Early<T> {
    generation: u64,
    /// Set once the outcome is in `result`: only then may a Prefill short of blocks
    /// evict it (an early start still computing is about to be claimed).
    ready: Arc<AtomicBool>,
    tokens: Vec<u32>,
    params: SamplingParams,
    /// The computation's outcome. Dropped unclaimed, the computed blocks are released.
    pub(crate) result: oneshot::Receiver<Result<T, Status>>,
}

/// What `begin` hands the computation: where its outcome goes, and its identity.
pub(crate) struct Started<T> {
    pub(crate) generation: u64,
    pub(crate) tx: oneshot::Sender<Result<T, Status>>,
    ready: Arc<AtomicBool>,
}

impl<T> Started<T> {
    /// Delivers the outcome (claimed or not, it waits in the channel).
    pub(crate) fn finish(self, out: Result<T, Status>) {
        let _ = self.tx.send(out);
        self.ready.store(true, Ordering::Release);
    }
}

/// Why an early start was not begun.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotStarted {
    /// Its DropEarly came first.
    Dropped,
    /// The id is started or running already, or the table is full.
    Busy,
}

/// Request ids with an early start (`Some`), or with a Prefill running without one
/// (`None`).
type Map<T> = Mutex<HashMap<String, Option<Early<T>>>>;

pub(crate) struct EarlyStarts<T> {
    map: Map<T>,
    /// Ids dropped before their early start arrived; oldest out.
    tombstones: Mutex<VecDeque<(String, Instant)>>,
    next: AtomicU64,
    hold: Duration,
}

/// Ends a request id's running mark when the Prefill ends.
pub(crate) struct Running<'a, T>(&'a Map<T>, String);

impl<T> Drop for Running<'_, T> {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap();
        if matches!(m.get(&self.1), Some(None)) {
            m.remove(&self.1);
        }
    }
}

impl<T> EarlyStarts<T> {
    pub(crate) fn new(hold: Duration) -> Self {
        EarlyStarts {
            map: Mutex::default(),
            tombstones: Mutex::default(),
            next: AtomicU64::new(1),
            hold,
        }
    }

    pub(crate) fn hold(&self) -> Duration {
        self.hold
    }

    /// Starts `id` unless its DropEarly came first, it is started or running, or the
    /// table is full.
    pub(crate) fn begin(&self, id: &str, tokens: &[u32], params: &SamplingParams) -> Result<Started<T>, NotStarted> {
        {
            let mut d = self.tombstones.lock().unwrap();
            d.retain(|(_, at)| at.elapsed() < self.hold);
            if let Some(i) = d.iter().position(|(t, _)| t == id) {
                d.remove(i);
                outcome("dropped");
                return Err(NotStarted::Dropped);
            }
        }
        let mut m = self.map.lock().unwrap();
        if m.contains_key(id) || m.len() >= MAX_EARLY_STARTS {
            return Err(NotStarted::Busy);
        }
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, result) = oneshot::channel();
        let ready = Arc::new(AtomicBool::new(false));
        m.insert(
            id.to_string(),
            Some(Early {
                generation,
                ready: ready.clone(),
                tokens: tokens.to_vec(),
                params: params.clone(),
                result,
            }),
        );
        Ok(Started { generation, tx, ready })
    }

    /// Ends the start `generation` of `id` if nobody claimed it; true if it did.
    pub(crate) fn expire(&self, id: &str, generation: u64) -> bool {
        let mut m = self.map.lock().unwrap();
        if matches!(m.get(id), Some(Some(e)) if e.generation == generation) {
            m.remove(id);
            outcome("unclaimed");
            return true;
        }
        false
    }

    /// Releases the early start of `id`, which its decode-server will not claim; one
    /// not begun yet gets a tombstone. True if a start was dropped.
    pub(crate) fn drop_start(&self, id: &str) -> bool {
        let mut m = self.map.lock().unwrap();
        let dropped = matches!(m.get(id), Some(Some(_)));
        if !m.contains_key(id) {
            let mut d = self.tombstones.lock().unwrap();
            if d.len() >= MAX_EARLY_STARTS {
                d.pop_front();
            }
            d.push_back((id.to_string(), Instant::now()));
        }
        if dropped {
            m.remove(id);
            outcome("dropped");
        }
        dropped
    }

    /// Takes the early start of `id` if its tokens and sampling are these; marks the id
    /// as running either way (until the returned guard drops). A second Prefill of an
    /// id already running gets neither.
    pub(crate) fn claim(&self, id: &str, tokens: &[u32], params: &SamplingParams) -> (Option<Early<T>>, Option<Running<'_, T>>) {
        if id.is_empty() {
            return (None, None);
        }
        let mut m = self.map.lock().unwrap();
        let found = match m.remove(id) {
            Some(None) => {
                m.insert(id.to_string(), None);
                return (None, None);
            }
            Some(Some(e)) if e.tokens == tokens && e.params == *params => Some(e),
            Some(Some(_)) => {
                outcome("mismatch");
                None
            }
            None => None,
        };
        m.insert(id.to_string(), None);
        (found, Some(Running(&self.map, id.to_string())))
    }

    /// Drops every computed, unclaimed early start (releasing its blocks); how many.
    pub(crate) fn evict_ready(&self) -> usize {
        let mut m = self.map.lock().unwrap();
        let before = m.len();
        m.retain(|_, e| !e.as_ref().is_some_and(|e| e.ready.load(Ordering::Acquire)));
        let n = before - m.len();
        if n > 0 {
            metrics::counter!(daemon::metrics::EARLY_PREFILLS, "outcome" => "evicted").increment(n as u64);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts() -> EarlyStarts<u32> {
        EarlyStarts::new(Duration::from_secs(60))
    }

    #[test]
    fn a_start_is_claimed_once_with_matching_tokens_only() {
        let s = starts();
        let p = SamplingParams::default();
        let st = s.begin("a", &[1, 2], &p).unwrap();
        st.finish(Ok(7));
        // Different tokens: not this start (and the start is gone).
        let (e, run) = s.claim("a", &[1, 3], &p);
        assert!(e.is_none() && run.is_some());
        drop(run);
        let st = s.begin("b", &[1, 2], &p).unwrap();
        st.finish(Ok(9));
        let (e, run) = s.claim("b", &[1, 2], &p);
        let mut e = e.expect("claimed");
        assert_eq!(e.result.try_recv().unwrap().unwrap(), 9);
        // While it runs, a late start of the same id is not begun, nor a second claim.
        assert_eq!(s.begin("b", &[1, 2], &p).err(), Some(NotStarted::Busy));
        assert!(s.claim("b", &[1, 2], &p).1.is_none());
        drop(run);
        assert!(s.begin("b", &[1, 2], &p).is_ok(), "the mark ends with the Prefill");
    }

    #[test]
    fn a_drop_that_overtakes_the_start_keeps_it_from_beginning() {
        let s = starts();
        let p = SamplingParams::default();
        assert!(!s.drop_start("x"), "nothing to drop yet");
        assert_eq!(s.begin("x", &[1], &p).err(), Some(NotStarted::Dropped));
        // The tombstone is used up: a later start of the id begins.
        assert!(s.begin("x", &[1], &p).is_ok());
        assert!(s.drop_start("x"));
    }

    #[test]
    fn only_computed_starts_are_evicted_and_expiry_spares_newer_ones() {
        let s = starts();
        let p = SamplingParams::default();
        let computing = s.begin("c", &[1], &p).unwrap();
        let done = s.begin("d", &[1], &p).unwrap();
        let g = done.generation;
        done.finish(Ok(1));
        assert_eq!(s.evict_ready(), 1);
        assert!(!s.expire("d", g), "already evicted");
        assert!(s.expire("c", computing.generation));
        // A newer start of the same id is not expired by the old one's timer.
        let old = computing.generation;
        let newer = s.begin("c", &[1], &p).unwrap();
        assert!(!s.expire("c", old));
        assert!(s.expire("c", newer.generation));
    }

    #[test]
    fn tables_are_capped() {
        let s = starts();
        let p = SamplingParams::default();
        let held: Vec<_> = (0..MAX_EARLY_STARTS).map(|i| s.begin(&i.to_string(), &[1], &p).unwrap()).collect();
        assert_eq!(s.begin("one more", &[1], &p).err(), Some(NotStarted::Busy));
        drop(held);
        for i in 0..(MAX_EARLY_STARTS + 10) {
            s.drop_start(&format!("t{i}"));
        }
        assert!(s.tombstones.lock().unwrap().len() <= MAX_EARLY_STARTS);
    }
}
