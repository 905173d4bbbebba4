//! The decode-server: the client API's back end. It tokenizes and validates a
//! request, reserves its KV blocks (waiting up to a deadline), has a prefill-server
//! write the prompt's KV straight into those blocks (or prefills short prompts
//! itself), waits for the write's notification, and then decodes the sequence in a
//! continuous batch, streaming tokens until a stop condition. Blocks are released
//! when a sequence finishes, fails or is cancelled.
mod admission;
mod api;
mod config;
mod peers;
mod prefill;
mod scheduler;

pub use api::{DecodeApi, serve};
pub use config::DecodeConfig;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use engine::Engine;
use kv_transfer::{Agent, Registration};
use proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::info;

use admission::Lease;
use peers::PrefillPeer;
use prefill::PrefillFailed;
use scheduler::{Event, Job, Scheduler, Sent};

pub struct DecodeService {
    engine: Arc<Engine>,
    agent: Agent,
    _regions: Vec<Registration>,
    region_ids: Vec<u32>,
    /// The static ones, then those found through discovery.
    peers: std::sync::RwLock<Vec<Arc<PrefillPeer>>>,
    /// Discovery has read the membership at least once.
    discovery_synced: AtomicBool,
    rr: AtomicUsize,
    scheduler: Scheduler,
    /// The line for KV blocks (see `lease`), and how many stand in it.
    line: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    cfg: DecodeConfig,
}

impl DecodeService {
    pub async fn new(cfg: DecodeConfig) -> anyhow::Result<Arc<Self>> {
        let engine_cfg = cfg.engine.clone();
        let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(&engine_cfg)).await??);
        let agent = Agent::start(&cfg.transfer).await?;
        let regions = daemon::register_pools(&engine, &agent)?;
        let region_ids = regions.iter().map(|r| r.id().0).collect();
        info!(backend = %agent.backend(), info = %agent.backend_info(), blocks = engine.total_blocks(), "data plane ready");
        let peers = cfg.static_prefill_servers().iter().map(|u| PrefillPeer::new(u, false)).collect();
        let scheduler = Scheduler::start(engine.clone(), cfg.max_batch, cfg.resume_chunk_tokens);
        Ok(Arc::new(DecodeService {
            engine,
            agent,
            _regions: regions,
            region_ids,
            peers: std::sync::RwLock::new(peers),
            discovery_synced: AtomicBool::new(false),
            rr: AtomicUsize::new(0),
            scheduler,
            line: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            cfg,
        }))
    }

    /// Whether requests can be served: some prefill-server is handshaken, or we prefill
    /// locally (none configured, and with discovery none registered once it has read
    /// the membership).
    pub fn ready(&self) -> bool {
        self.peer_list().iter().any(|p| p.healthy.load(Ordering::Relaxed)) || self.prefills_alone()
    }

    /// Whether this decode-server prefills every prompt itself: no prefill-server is
    /// configured, and with discovery none registered is handshaken (a joining one is
    /// used once handshaken; until then prompts do not wait for it).
    pub(crate) fn prefills_alone(&self) -> bool {
        if !self.cfg.static_prefill_servers().is_empty() {
            return false;
        }
        if !self.cfg.discovery.enabled() {
            return true;
        }
        self.discovery_synced.load(Ordering::Relaxed) && !self.peer_list().iter().any(|p| p.healthy.load(Ordering::Relaxed))
    }

    /// The prefix-cache metrics of a prompt whose K/V is in our blocks.
    fn count_cache(&self, prompt_len: usize, cached_tokens: usize) {
        if !self.engine.prefix_caching() {
            return;
        }
        metrics::counter!(daemon::metrics::PREFIX_QUERIES).increment(prompt_len as u64);
        metrics::counter!(daemon::metrics::PREFIX_HITS).increment(cached_tokens as u64);
        metrics::gauge!(daemon::metrics::BLOCKS_CACHED).set(self.engine.cached_blocks() as f64);
    }

    async fn run(
        self: Arc<Self>,
        id: String,
        hint: Option<String>,
        (prompt, cache_salt): (Vec<u32>, String),
        params: engine::SamplingParams,
        tx: mpsc::UnboundedSender<Event>,
        cancel: CancellationToken,
    ) {
        let received = Instant::now();
        let waiting = daemon::metrics::GaugeGuard::new(daemon::metrics::QUEUE_DEPTH);
        let gone = || {
            if cancel.is_cancelled() {
                metrics::counter!(daemon::metrics::REQUESTS_CANCELLED).increment(1);
                info!("the client went away: request cancelled");
            }
        };
        // Our prefix cache: the prompt's leading blocks held here need not travel.
        let hashes = self.engine.prompt_hashes(&prompt, &cache_salt);
        let mut lease = match self.lease(prompt.len(), params.max_tokens, &hashes, &cancel).await {
            Ok(l) => l,
            Err(s) => {
                gone();
                // The router's early start of it would wait for nothing.
                if let Some(url) = &hint {
                    self.drop_early(url, &id);
                }
                let _ = tx.send(Event::Failed(s));
                return;
            }
        };
        let queue_ms = received.elapsed().as_secs_f64() * 1e3;
        // The first token goes to the client as soon as it is sampled, while the KV
        // cache moves; the sequence joins the decode batch once the cache is here.
        let mut early: Option<(Job, Sent)> = None;
        let backend = self.agent.backend().to_string();
        let mut on_first = |r: &pb::PrefillResponse, server: &str, l: &Lease| {
            let mut job = Job::new(
                id.clone(),
                l.seq,
                prompt.clone(),
                r.first_token,
                l.blocks.clone(),
                params.clone(),
                tx.clone(),
                received,
                queue_ms,
                *r,
                server.to_string(),
                backend.clone(),
            );
            job.set_cache(hashes.clone(), l.cached_tokens);
            let sent = job.send_newest(&self.engine);
            early = Some((job, sent));
        };
        let prefilled = self
            .prefill(
                &id,
                hint.as_deref(),
                (&prompt, &cache_salt),
                &mut lease,
                &params,
                &mut on_first,
                &cancel,
            )
            .await;
        drop(waiting);
        match (prefilled, early) {
            (Ok(r), Some((mut job, sent))) => {
                // The prompt's K/V is all here now: its full blocks may be found.
                self.engine.commit_prompt(lease.seq, &hashes);
                self.count_cache(prompt.len(), lease.cached_tokens);
                job.set_prefill(r);
                match sent {
                    Sent::More => {
                        lease.armed = false;
                        self.scheduler.submit(job);
                    }
                    // Over at the first token: the blocks are released (the lease)
                    // now that no write into them is pending.
                    Sent::Finished(reason) => job.complete(reason),
                    Sent::Failed => {}
                }
            }
            (Ok(_), None) => {
                let _ = tx.send(Event::Failed(Status::internal("prefill ended without a first token")));
            }
            (Err(PrefillFailed { status, hold_until }), _) => {
                gone();
                if let Some(until) = hold_until {
                    lease.quarantine(until);
                }
                let _ = tx.send(Event::Failed(status));
            }
        }
    }
}
