//! KV-aware routing: the router follows every worker's KV events (a snapshot, then each
//! block stored or evicted) into one index per role, and sends each request to the
//! prefill-server that already holds the longest part of its prompt, weighed against
//! the prompt tokens that server still has to compute for others (as Dynamo's router
//! does), and to the decode-server with room for it.
//!
//! A worker counts as cold (holding nothing) until its snapshot is complete, and again
//! as soon as its stream fails, falls silent past `kv_events_timeout_ms`, skips an event
//! number, or claims more blocks than its pool has: a wrong index costs a recomputed
//! prefix, never a wrong token (the worker looks blocks up itself).
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prompt::{BlockHash, Prompter};
use proto::v1 as pb;
use tokio_stream::StreamExt;
use tracing::{debug, warn};

use crate::index::{HashParams, KvIndex};

/// Hashes one KV-event message may carry (workers send at most 4096).
const MAX_HASHES_PER_MESSAGE: usize = 16_384;
/// Largest KV-event message the router decodes (16,384 hashes are ~560 KB).
pub const MAX_EVENT_MESSAGE_BYTES: usize = 1 << 20;
/// Prompts longer than this are routed by load alone: hashing them would hold a
/// runtime thread for longer than the placement is worth.
pub const MAX_PLACED_TOKENS: usize = 1 << 18;
/// Wait between a failed subscription and the next try.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

/// Which index a worker is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// The router's view of each worker's cache, and what it routed to it.
pub struct KvState {
    prefill: Mutex<KvIndex>,
    decode: Mutex<KvIndex>,
    /// Each decode-server's free KV blocks (by slot), as it last reported them.
    pub decode_free: Vec<AtomicU32>,
    prompter: Option<Arc<Prompter>>,
}

/// A request's place in both indexes, computed once before routing.
#[derive(Debug, Default)]
pub struct Lookup {
    pub prompt_tokens: usize,
    /// Per prefill-server and per decode-server: leading blocks cached there, in tokens.
    pub prefill_cached: Vec<usize>,
    pub decode_cached: Vec<usize>,
    /// The same for the prefill-servers, in blocks.
    pub prefill_cached_blocks: Vec<usize>,
    /// Tokens per block on the decode-servers (0: none live yet).
    pub decode_block_size: usize,
}

impl KvState {
    pub fn new(prefill: usize, decode: usize, max_entries: usize, prompter: Option<Arc<Prompter>>) -> KvState {
        KvState {
            prefill: Mutex::new(KvIndex::new(prefill, max_entries)),
            decode: Mutex::new(KvIndex::new(decode, max_entries)),
            decode_free: (0..decode).map(|_| AtomicU32::new(u32::MAX)).collect(),
            prompter,
        }
    }

    /// A role's index, locked. A panic elsewhere while it was held leaves it poisoned
    /// but whole (every update keeps its counts consistent step by step): routing goes on.
    fn index(&self, role: Role) -> MutexGuard<'_, KvIndex> {
        let ix = match role {
            Role::Prefill => &self.prefill,
            Role::Decode => &self.decode,
        };
        ix.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The prompt's tokens as the workers will see them: token ids as given; text and
    /// chat through the model's tokenizer and template (None without a `model`, or
    /// when they fail: the worker will say why, the router just cannot place it).
    pub async fn tokens(&self, req: &pb::GenerateRequest) -> Option<Vec<u32>> {
        use pb::generate_request::Input;
        let input = req.input.clone()?;
        if let Input::TokenIds(ids) = input {
            return (ids.ids.len() <= MAX_PLACED_TOKENS).then_some(ids.ids);
        }
        let p = self.prompter.clone()?;
        tokio::task::spawn_blocking(move || match input {
            Input::Text(t) => p.tokenize(&t).ok(),
            Input::Chat(c) => p.chat_prompt(&daemon::convert::chat_from_wire(&c)).ok(),
            Input::TokenIds(_) => None,
        })
        .await
        .ok()
        .flatten()
        .filter(|t| t.len() <= MAX_PLACED_TOKENS)
    }

    /// Each worker's cached leading blocks for this prompt, in tokens.
    pub fn lookup(&self, tokens: &[u32], salt: &str) -> Lookup {
        // The hash parameters in use (workers of one model share one set; a role with
        // nothing indexed needs none), hashed once each, outside the locks.
        let live = |role| {
            let ix = self.index(role);
            let p = (0..ix.len()).find_map(|w| ix.params(w));
            (p, ix.entries() > 0)
        };
        let ((pp, p_any), (dp, d_any)) = (live(Role::Prefill), live(Role::Decode));
        let mut chains: Vec<(HashParams, Vec<BlockHash>)> = Vec::new();
        for p in [pp.filter(|_| p_any), dp.filter(|_| d_any)].into_iter().flatten() {
            if !chains.iter().any(|(q, _)| *q == p) {
                chains.push((p, prompt::block_hashes(p.fingerprint, salt, tokens, p.block_size)));
            }
        }
        let look = |role| {
            let ix = self.index(role);
            let (mut cached, mut blocks) = (vec![0usize; ix.len()], vec![0usize; ix.len()]);
            for (p, hashes) in &chains {
                let mut out = vec![0usize; ix.len()];
                ix.overlaps(*p, hashes, &mut out);
                for (i, n) in out.into_iter().enumerate().filter(|(_, n)| *n > 0) {
                    (blocks[i], cached[i]) = (n, n * p.block_size);
                }
            }
            (cached, blocks)
        };
        let (prefill_cached, prefill_cached_blocks) = look(Role::Prefill);
        let (decode_cached, _) = look(Role::Decode);
        Lookup {
            prompt_tokens: tokens.len(),
            prefill_cached,
            decode_cached,
            prefill_cached_blocks,
            decode_block_size: dp.map_or(0, |p| p.block_size),
        }
    }
}

/// Why a worker's stream was given up (it is cold until it resubscribes).
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("subscribe: {0}")]
    Subscribe(String),
    #[error("stream: {0}")]
    Stream(String),
    #[error("the stream ended")]
    Ended,
    #[error("silent for {0:?}")]
    Silent(Duration),
    #[error("event number {got} after {last}: events were lost")]
    Gap { last: u64, got: u64 },
    #[error("bad message: {0}")]
    Bad(String),
    #[error("its blocks are named by {0}")]
    Mismatch(String),
    #[error("it left the membership")]
    Left,
}

/// Wait before subscribing again to a worker whose hash parameters differ from its
/// role's (a misconfiguration: no use asking twice a second).
const MISMATCH_BACKOFF: Duration = Duration::from_secs(30);

fn hashes(raw: Vec<Vec<u8>>) -> Result<Vec<BlockHash>, StreamEnd> {
    if raw.len() > MAX_HASHES_PER_MESSAGE {
        return Err(StreamEnd::Bad(format!(
            "{} hashes in one message (at most {MAX_HASHES_PER_MESSAGE})",
            raw.len()
        )));
    }
    raw.into_iter()
        .map(|h| BlockHash::try_from(h.as_slice()).map_err(|_| StreamEnd::Bad(format!("a block hash of {} bytes", h.len()))))
        .collect()
}

/// What one worker's subscriber needs.
pub struct Subscriber {
    pub state: Arc<KvState>,
    pub role: Role,
    pub worker: usize,
    pub url: String,
    pub client: pb::kv_events_client::KvEventsClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, daemon::auth::Attach>,
    >,
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// False while the worker's health check fails: it is cold meanwhile.
    pub healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The index is full for this worker (logged once).
    pub full: std::sync::atomic::AtomicBool,
    /// Cancelled when the worker leaves the membership: the subscriber clears its
    /// slot and ends.
    pub gone: tokio_util::sync::CancellationToken,
}

impl Subscriber {
    /// Follows the worker's events while it is a member, resubscribing after any
    /// failure; the worker is cold (nothing indexed) whenever its stream is not live.
    pub fn spawn(mut self) {
        // For the worker's membership: not tracked (a drain would wait for it in vain).
        tokio::spawn(async move {
            let gone = self.gone.clone();
            loop {
                let mut pause = RESUBSCRIBE_AFTER;
                if (self.healthy)() {
                    let e = tokio::select! {
                        _ = gone.cancelled() => StreamEnd::Left,
                        e = self.follow() => e,
                    };
                    warn!(worker = %self.url, role = self.role.name(), error = %e, "KV events lost; the worker counts as cold until it resubscribes");
                    if matches!(e, StreamEnd::Mismatch(_)) {
                        pause = MISMATCH_BACKOFF;
                    }
                }
                self.state.index(self.role).clear(self.worker);
                if self.role == Role::Decode {
                    // Unknown again: a cold worker's last report must not steer choices.
                    self.state.decode_free[self.worker].store(u32::MAX, Ordering::Relaxed);
                }
                self.report();
                tokio::select! {
                    _ = gone.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
    }

    /// Says that the index is full for this worker (once per stream: it stays full).
    fn dropped(&self, n: usize) {
        if n > 0 && !self.full.swap(true, Ordering::Relaxed) {
            warn!(worker = %self.url, role = self.role.name(), "the KV index holds kv_index_max_blocks for this worker: its newer blocks are not indexed");
        }
    }

    fn report(&self) {
        let n = self.state.index(self.role).worker_blocks(self.worker);
        metrics::gauge!(daemon::metrics::ROUTER_INDEX_BLOCKS, "role" => self.role.name(), "worker" => self.url.clone()).set(n as f64);
    }

    async fn follow(&mut self) -> StreamEnd {
        self.full.store(false, Ordering::Relaxed);
        let req = pb::SubscribeKvEventsRequest {
            heartbeat_ms: self.heartbeat.as_millis() as u32,
        };
        let mut stream = match tokio::time::timeout(self.connect_timeout, self.client.subscribe_kv_events(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return StreamEnd::Subscribe(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => return StreamEnd::Subscribe(format!("no answer within {:?}", self.connect_timeout)),
        };
        let mut last: Option<u64> = None;
        let mut loading: Option<HashParams> = None;
        loop {
            let msg = match tokio::time::timeout(self.timeout, stream.next()).await {
                Err(_) => return StreamEnd::Silent(self.timeout),
                Ok(None) => return StreamEnd::Ended,
                Ok(Some(Err(s))) => return StreamEnd::Stream(format!("{:?}: {}", s.code(), s.message())),
                Ok(Some(Ok(m))) => m,
            };
            if let Err(e) = self.apply(msg, &mut last, &mut loading) {
                return e;
            }
        }
    }

    /// One message into the index; an error ends the stream (the worker goes cold).
    fn apply(&self, m: pb::KvEventsMessage, last: &mut Option<u64>, loading: &mut Option<HashParams>) -> Result<(), StreamEnd> {
        use pb::kv_events_message::Kind;
        let mut ix = self.state.index(self.role);
        match m.kind {
            Some(Kind::Snapshot(s)) => {
                if s.first {
                    if s.block_size == 0 {
                        return Err(StreamEnd::Bad("block_size 0".into()));
                    }
                    let params = HashParams {
                        fingerprint: s.model_fingerprint,
                        block_size: s.block_size as usize,
                    };
                    // One model per role: a worker whose blocks are named otherwise
                    // (another model or block size) can share nothing with the others.
                    if let Some(other) = ix.params_of_others(self.worker)
                        && other != params
                    {
                        return Err(StreamEnd::Mismatch(format!(
                            "{params:?}, the other workers' {other:?} (another model?)"
                        )));
                    }
                    ix.snapshot_begin(self.worker, params);
                    *loading = Some(params);
                    *last = Some(m.seq);
                } else if loading.is_none() || *last != Some(m.seq) {
                    return Err(StreamEnd::Bad("a snapshot part out of order".into()));
                }
                let dropped = ix.store(self.worker, hashes(s.hashes)?);
                self.dropped(dropped);
                if s.last {
                    loading.take();
                    ix.snapshot_done(self.worker);
                    debug!(worker = %self.url, role = self.role.name(), blocks = ix.worker_blocks(self.worker), "KV snapshot loaded");
                }
            }
            kind => {
                let Some(prev) = *last else {
                    return Err(StreamEnd::Bad("an event before the snapshot".into()));
                };
                if loading.is_some() {
                    return Err(StreamEnd::Bad("an event inside a snapshot".into()));
                }
                // Several messages of one event share its number; a heartbeat repeats it.
                if m.seq != prev && Some(m.seq) != prev.checked_add(1) {
                    return Err(StreamEnd::Gap { last: prev, got: m.seq });
                }
                *last = Some(m.seq);
                match kind {
                    Some(Kind::Stored(s)) => {
                        let dropped = ix.store(self.worker, hashes(s.hashes)?);
                        self.dropped(dropped);
                    }
                    Some(Kind::Removed(r)) => ix.remove(self.worker, hashes(r.hashes)?),
                    Some(Kind::Heartbeat(_)) => {}
                    Some(Kind::Snapshot(_)) => unreachable!("matched above"),
                    None => return Err(StreamEnd::Bad("a message of no kind".into())),
                }
            }
        }
        if let Some(load) = m.load {
            // A worker cannot cache more blocks than its pool has: one that claims to
            // is not believed at all.
            if ix.worker_blocks(self.worker) > load.total_blocks as usize {
                return Err(StreamEnd::Bad(format!(
                    "{} blocks indexed, more than its pool of {}",
                    ix.worker_blocks(self.worker),
                    load.total_blocks
                )));
            }
            if self.role == Role::Decode {
                self.state.decode_free[self.worker].store(load.free_blocks, Ordering::Relaxed);
            }
        }
        drop(ix);
        self.report();
        Ok(())
    }
}
