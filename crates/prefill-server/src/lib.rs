//! The prefill-server: runs prompts through the model and writes their KV blocks
//! straight into a decode-server's pools through the data plane, then answers with
//! the first token. Decode-servers handshake once (layouts compared, data-plane
//! metadata exchanged) and then name their session in each request.
//!
//! The router may start a prompt before its decode-server asks (`EarlyPrefill`): the
//! prompt is computed into local blocks at once and held, and the decode-server's
//! Prefill of the same request id, tokens and sampling then only adds the KV write.
//! This takes the decode-server's hop off the first token's path. Anything that does
//! not match exactly is ignored, and the Prefill computes afresh.
mod batcher;
mod early;
mod sessions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon::config::Validate;
use daemon::status::{from_engine, from_transfer};
use daemon::{convert, validate};
use engine::{Engine, EngineConfig, EngineError, SamplingParams, block_runs};
use kv_transfer::{Agent, Registration, Segment, TransferConfig};
use proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use batcher::{Batcher, Budget, Work};
use early::{EarlyStarts, NotStarted};
use sessions::{Session, Sessions};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefillConfig {
    /// gRPC address to serve on.
    pub listen: String,
    /// Prometheus `/metrics` address, host:port (empty: no metrics endpoint).
    pub metrics_listen: String,
    /// TLS and mutual TLS on the gRPC port and to peers (see configs/README.md).
    pub tls: daemon::tls::TlsConfig,
    /// The cluster's shared secret that every internal call must carry (or use mTLS).
    pub internal_token: String,
    /// Serve the internal API without credentials on a non-loopback address.
    pub allow_insecure_internal: bool,
    /// Most decode-servers with a session at once; past it, the least recently used
    /// session is dropped (its decode-server handshakes again when it next calls).
    pub max_sessions: usize,
    pub engine: EngineConfig,
    pub transfer: TransferConfig,
    /// Longest prompt accepted, in tokens (0: the model's maximum).
    pub max_prompt_tokens: usize,
    /// How long a request may wait for its blocks and its first chunk's pass before it
    /// is refused.
    pub queue_deadline_ms: u64,
    /// Most prompts waiting to be computed; past it a prompt is refused at once
    /// with RESOURCE_EXHAUSTED (to the client: HTTP 429 with a retry hint), instead of
    /// queueing until every waiter misses its first-token target.
    pub max_waiting: usize,
    /// Most prompt tokens in one forward pass (prompts are batched up to it, first come
    /// first served).
    pub max_batch_tokens: usize,
    /// Most prompts in one forward pass.
    pub max_batch_prompts: usize,
    /// Longest piece of one prompt computed in one pass (chunked prefill): a long
    /// prompt takes several passes, and shorter prompts join them.
    pub chunk_tokens: usize,
    /// How long a prompt started early (the router's EarlyPrefill) is held for its
    /// decode-server's Prefill once computed; unclaimed, its blocks are then released.
    pub early_hold_ms: u64,
    /// Service discovery on etcd (off unless `etcd` is set; see configs/README.md).
    pub discovery: daemon::membership::DiscoveryConfig,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        PrefillConfig {
            listen: "127.0.0.1:50061".into(),
            metrics_listen: String::new(),
            tls: Default::default(),
            internal_token: String::new(),
            allow_insecure_internal: false,
            max_sessions: 256,
            engine: EngineConfig::default(),
            transfer: TransferConfig::default(),
            max_prompt_tokens: 0,
            queue_deadline_ms: 30_000,
            max_waiting: 64,
            max_batch_tokens: 8192,
            max_batch_prompts: 64,
            chunk_tokens: 2048,
            early_hold_ms: 2_000,
            discovery: Default::default(),
        }
    }
}

impl Validate for PrefillConfig {
    fn validate(&self) -> Result<(), String> {
        daemon::config::check_listen(&self.tls, &self.listen, "")?;
        self.discovery
            .check_daemon(&self.listen, self.tls.cert.is_some(), &self.internal_token)?;
        if self.engine.block_size == 0 {
            return Err("engine.block_size must be at least 1".into());
        }
        if self.transfer.deadline_ms == 0 || self.queue_deadline_ms == 0 || self.max_sessions == 0 || self.max_waiting == 0 {
            return Err("transfer.deadline_ms, queue_deadline_ms, max_sessions and max_waiting must be positive".into());
        }
        if self.max_batch_tokens == 0 || self.max_batch_prompts == 0 || self.chunk_tokens == 0 {
            return Err("max_batch_tokens, max_batch_prompts and chunk_tokens must be at least 1".into());
        }
        daemon::auth::check_exposure(&self.listen, &self.internal_token, &self.tls, self.allow_insecure_internal)
    }
}

/// A prompt computed into local blocks, its first token sampled. Dropped, it releases
/// the blocks.
pub(crate) struct Computed {
    engine: Arc<Engine>,
    /// Woken when the blocks are released.
    freed: Arc<tokio::sync::Notify>,
    seq: u64,
    blocks: Vec<u32>,
    /// Leading prompt tokens found in the prefix cache (not computed).
    cached_tokens: usize,
    first_token: u32,
    queue_ms: f64,
    prefill_ms: f64,
}

impl Drop for Computed {
    fn drop(&mut self) {
        self.engine.release(self.seq);
        metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
        metrics::gauge!(daemon::metrics::BLOCKS_CACHED).set(self.engine.cached_blocks() as f64);
        self.freed.notify_waiters();
    }
}

pub struct PrefillService {
    engine: Arc<Engine>,
    agent: Agent,
    regions: Vec<Registration>,
    sessions: Sessions,
    /// Computes the admitted prompts, batched and chunked.
    batcher: Batcher,
    /// Prompts waiting to be computed now (bounded by `max_waiting`).
    waiting: std::sync::atomic::AtomicUsize,
    early: EarlyStarts<Computed>,
    /// Notified whenever a prompt's local blocks are released.
    freed: Arc<tokio::sync::Notify>,
    cfg: PrefillConfig,
}

impl PrefillService {
    pub async fn new(cfg: PrefillConfig) -> anyhow::Result<Arc<Self>> {
        let engine_cfg = cfg.engine.clone();
        let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(&engine_cfg)).await??);
        let agent = Agent::start(&cfg.transfer).await?;
        let regions = daemon::register_pools(&engine, &agent)?;
        info!(backend = %agent.backend(), info = %agent.backend_info(), blocks = engine.total_blocks(), "data plane ready");
        Ok(Arc::new(PrefillService {
            engine: engine.clone(),
            agent,
            regions,
            sessions: Sessions::new(cfg.max_sessions),
            batcher: Batcher::start(
                engine.clone(),
                Budget {
                    max_batch_tokens: cfg.max_batch_tokens,
                    max_batch_prompts: cfg.max_batch_prompts,
                    chunk_tokens: cfg.chunk_tokens,
                },
            ),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            early: EarlyStarts::new(Duration::from_millis(cfg.early_hold_ms)),
            freed: Default::default(),
            cfg,
        }))
    }

    fn limits(&self) -> validate::Limits {
        // The decode-server caps max_tokens; here it only has to fit the model.
        validate::Limits::new(&self.engine, self.cfg.max_prompt_tokens, u32::MAX)
    }

    /// Computes `tokens` into local blocks (those of its longest cached prefix shared,
    /// the rest fresh, see `prefix_caching`) and samples the first token: once its
    /// blocks are admitted, the prompt joins the batcher's passes (see `batcher`);
    /// its first chunk must start within the queue deadline. The KV write, after
    /// return, overlaps the next passes. Short of blocks, a Prefill (`speculative`
    /// false) drops the computed early starts nobody has claimed, then waits for writes
    /// in flight to release theirs; an early start just fails.
    ///
    /// `caller`: the Prefill's response channel; once its decode-server has gone, the
    /// waits end at once and the batcher drops the prompt before its next pass
    /// (nothing more is computed for nobody). The blocks stay with the batcher while a
    /// pass may write into them.
    async fn compute(
        &self,
        tokens: &[u32],
        cache_salt: &str,
        params: &SamplingParams,
        received: Instant,
        speculative: bool,
        caller: Option<&mpsc::Sender<Result<pb::PrefillResponse, Status>>>,
    ) -> Result<Computed, Status> {
        let deadline = tokio::time::Instant::from_std(received) + Duration::from_millis(self.cfg.queue_deadline_ms);
        let gone = async {
            match caller {
                Some(c) => c.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(gone);
        let cancelled = || {
            metrics::counter!(daemon::metrics::REQUESTS_CANCELLED).increment(1);
            Status::cancelled("the decode-server went away while the prompt waited: nothing computed")
        };
        let _waiting = match daemon::metrics::Waiting::enter(&self.waiting, self.cfg.max_waiting) {
            Some(w) => w,
            None => {
                return Err(daemon::metrics::rejected(
                    "prefill_queue_full",
                    format!(
                        "{} prompts already wait for this prefill-server (max_waiting)",
                        self.cfg.max_waiting
                    ),
                    1_000,
                ));
            }
        };
        let seq = self.engine.next_sequence_id();
        let hashes = self.engine.prompt_hashes(tokens, cache_salt);
        let admitted = loop {
            let freed = self.freed.notified();
            match self.engine.admit_prompt(seq, tokens.len(), &hashes) {
                Err(EngineError::OutOfBlocks { needed, total, .. }) if !speculative && needed <= total => {
                    if self.evict_early_starts() == 0 {
                        tokio::select! {
                            biased;
                            _ = &mut gone => return Err(cancelled()),
                            r = tokio::time::timeout_at(deadline, freed) => if r.is_err() {
                                return Err(Status::resource_exhausted(format!(
                                    "no free KV blocks on the prefill-server within queue_deadline_ms: need {needed} of {total}"
                                )));
                            },
                        }
                    }
                }
                other => break other.map_err(|e| from_engine(&e))?,
            }
        };
        let computed = Computed {
            engine: self.engine.clone(),
            freed: self.freed.clone(),
            seq,
            blocks: admitted.blocks,
            cached_tokens: admitted.cached_tokens,
            first_token: 0,
            queue_ms: 0.0,
            prefill_ms: 0.0,
        };
        metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
        let (reply, result) = tokio::sync::oneshot::channel();
        self.batcher.submit(Work {
            computed,
            prompt: tokens.to_vec(),
            params: params.clone(),
            received,
            start_by: deadline.into_std(),
            reply,
        });
        let c = tokio::select! {
            biased;
            _ = &mut gone => return Err(cancelled()),
            r = result => r.map_err(|_| Status::unavailable("prefill-server is shutting down"))??,
        };
        // Only now do the blocks hold the prompt's K/V: from here on they may be found.
        self.engine.commit_prompt(seq, &hashes);
        // Counted per prompt computed (an early start and a Prefill that both compute
        // count twice, the second mostly as hits).
        metrics::counter!(daemon::metrics::PREFIX_QUERIES).increment(tokens.len() as u64);
        metrics::counter!(daemon::metrics::PREFIX_HITS).increment(c.cached_tokens as u64);
        metrics::gauge!(daemon::metrics::BLOCKS_CACHED).set(self.engine.cached_blocks() as f64);
        Ok(c)
    }

    /// Starts computing a prompt ahead of its Prefill (see the module's comment).
    async fn early_prefill(self: &Arc<Self>, req: pb::GenerateRequest) -> Result<pb::EarlyPrefillResponse, Status> {
        let received = Instant::now();
        if req.request_id.is_empty() {
            return Err(Status::invalid_argument("an early prefill needs a request id"));
        }
        let (tokens, params) = validate::generate(&self.engine, &req, self.limits()).await?;
        let started = match self.early.begin(&req.request_id, &tokens, &params) {
            Ok(s) => s,
            Err(NotStarted::Dropped) => {
                info!(request_id = %req.request_id, "early prefill dropped before it started: the decode-server prefills it itself");
                return Ok(pb::EarlyPrefillResponse { started: false });
            }
            Err(NotStarted::Busy) => return Ok(pb::EarlyPrefillResponse { started: false }),
        };
        let svc = self.clone();
        let span = info_span!("early_prefill", request_id = %req.request_id);
        let (id, salt) = (req.request_id, req.cache_salt);
        daemon::tasks::spawn(
            async move {
                let generation = started.generation;
                // The router's start of the same GenerateRequest: a Prefill that claims
                // it carries the same salt.
                started.finish(svc.compute(&tokens, &salt, &params, received, true, None).await);
                // A Prefill short of blocks may evict it now that it is computed.
                svc.freed.notify_waiters();
                tokio::time::sleep(svc.early.hold()).await;
                if svc.early.expire(&id, generation) {
                    info!(hold_ms = svc.cfg.early_hold_ms, "early prefill not claimed: released");
                }
            }
            .instrument(span),
        );
        Ok(pb::EarlyPrefillResponse { started: true })
    }

    /// Releases the early start of `id`, which its decode-server will not claim.
    fn drop_early(&self, id: &str) -> pb::DropEarlyResponse {
        let dropped = self.early.drop_start(id);
        if dropped {
            info!(request_id = %id, "early prefill dropped: the decode-server prefills it itself");
        }
        pb::DropEarlyResponse { dropped }
    }

    /// Prefills (or takes the early start's result), sends the first token on `first`
    /// as soon as it is sampled, writes the KV cache; returns the final message (the
    /// transfer's figures).
    async fn prefill(
        &self,
        req: pb::PrefillRequest,
        first: &mpsc::Sender<Result<pb::PrefillResponse, Status>>,
    ) -> Result<pb::PrefillResponse, Status> {
        let received = Instant::now();
        validate::peer_name(&req.peer_name)?;
        let session = self.sessions.get(&req.session, &req.boot_id, &req.peer_name)?;
        let params = validate::prefill(&self.engine, &req, self.limits())?;
        // Past this the decode-server may have given the blocks to another request.
        let write_by = (req.write_by_ms > 0).then(|| received + Duration::from_millis(req.write_by_ms));
        let tokens = req.token_ids;
        let n = self.engine.blocks_for(tokens.len());
        if req.dst_blocks.len() < n {
            return Err(Status::invalid_argument(format!(
                "{} destination blocks cannot hold {} tokens",
                req.dst_blocks.len(),
                tokens.len()
            )));
        }
        // Leading blocks the decode-server holds already: computed here, not written.
        let skip = req.dst_cached_blocks as usize;
        if skip >= n {
            return Err(Status::invalid_argument(format!(
                "dst_cached_blocks {skip} leaves nothing of a {n}-block prompt to write (the last block always travels)"
            )));
        }
        if let Some(b) = req.dst_blocks.iter().find(|&&b| b as usize >= session.num_blocks) {
            return Err(Status::invalid_argument(format!(
                "destination block {b} is outside the peer's {} blocks",
                session.num_blocks
            )));
        }
        let (early, _running) = self.early.claim(&req.request_id, &tokens, &params);
        let early = match early {
            Some(e) => match tokio::select! {
                biased;
                _ = first.closed() => {
                    metrics::counter!(daemon::metrics::REQUESTS_CANCELLED).increment(1);
                    return Err(Status::cancelled("the decode-server went away while its early start ran: nothing written"));
                }
                r = e.result => r,
            } {
                Ok(Ok(c)) => Some(c),
                Ok(Err(s)) => {
                    early::outcome("failed");
                    warn!(code = ?s.code(), message = s.message(), "early prefill failed; computing again");
                    None
                }
                Err(_) => None,
            },
            None => None,
        };
        let started_early = early.is_some();
        let local = match early {
            Some(c) => {
                early::outcome("used");
                c
            }
            None => {
                self.compute(&tokens, &req.cache_salt, &params, received, false, Some(first))
                    .await?
            }
        };
        let mut msg = pb::PrefillResponse {
            first_token: local.first_token,
            queue_ms: local.queue_ms,
            prefill_ms: local.prefill_ms,
            early: started_early,
            cached_tokens: local.cached_tokens as u32,
            ..Default::default()
        };
        // If the decode-server has gone, the checks below skip the write (ours
        // are released either way).
        let _ = first.send(Ok(msg)).await;
        // Let the response task (woken into this worker's LIFO slot, where no other
        // worker steals it) send the token before the write keeps this thread busy:
        // the tcp backend's staging copies and socket writes rarely yield.
        tokio::task::yield_now().await;
        if first.is_closed() {
            return Err(Status::cancelled(
                "the decode-server went away before the KV write: nothing written",
            ));
        }
        if write_by.is_some_and(|w| Instant::now() >= w) {
            return Err(Status::deadline_exceeded(
                "the decode-server's deadline passed before the KV write could start: nothing written",
            ));
        }
        let segs = self.segments(&session, &local.blocks[skip..n], &req.dst_blocks[skip..n]);
        let bytes: u64 = segs.iter().map(|s| s.len).sum();
        let t = Instant::now();
        let backend = self.agent.backend().as_str();
        if let Err(e) = self.agent.write(session.peer, &segs, req.notify_tag).await {
            return Err(self.write_failed(&e, &session, local, backend));
        }
        let secs = t.elapsed().as_secs_f64();
        let kv_transfer_ms = secs * 1e3;
        metrics::histogram!(daemon::metrics::PREFILL_TIME).record(local.prefill_ms / 1e3);
        metrics::counter!(daemon::metrics::PROMPT_TOKENS).increment(tokens.len() as u64);
        metrics::counter!(daemon::metrics::KV_BYTES, "backend" => backend).increment(bytes);
        metrics::histogram!(daemon::metrics::KV_TIME, "backend" => backend).record(secs);
        if secs > 0.0 {
            metrics::histogram!(daemon::metrics::KV_BANDWIDTH, "backend" => backend).record(bytes as f64 / secs);
        }
        info!(tokens = tokens.len(), cached_tokens = local.cached_tokens, skipped_blocks = skip, segments = segs.len(), bytes, prefill_ms = local.prefill_ms, kv_transfer_ms, early = started_early, peer = %session.name, "prefilled");
        msg.kv_transfer_ms = kv_transfer_ms;
        msg.kv_bytes = bytes;
        msg.kv_written = true;
        Ok(msg)
    }

    /// One segment per pool per run of blocks contiguous on both sides.
    fn segments(&self, s: &Session, src: &[u32], dst: &[u32]) -> Vec<Segment> {
        let bb = self.engine.layout().block_bytes();
        let runs = block_runs(src, dst);
        let mut segs = Vec::with_capacity(runs.len() * self.regions.len());
        for (local, &remote) in self.regions.iter().zip(&s.regions) {
            for r in &runs {
                segs.push(Segment {
                    local: local.id(),
                    local_offset: r.src as u64 * bb,
                    remote,
                    remote_offset: r.dst as u64 * bb,
                    len: r.count as u64 * bb,
                });
            }
        }
        segs
    }
}

impl PrefillService {
    /// Drops every computed, unclaimed early start (releasing its blocks); how many.
    fn evict_early_starts(&self) -> usize {
        let n = self.early.evict_ready();
        if n > 0 {
            info!(evicted = n, "out of KV blocks: unclaimed early prefills dropped");
        }
        n
    }

    /// A KV write that failed. One that was abandoned (its connection force-closed,
    /// bytes perhaps still on the way) keeps its source blocks out of circulation until
    /// nothing can read them, ends the session (the decode-server handshakes again, on
    /// a fresh connection), and tells the decode-server how long its blocks must wait.
    fn write_failed(&self, e: &kv_transfer::TransferError, session: &Arc<Session>, local: Computed, backend: &'static str) -> Status {
        let mut status = from_transfer(e);
        let Some(until) = e.may_land_until() else {
            return status;
        };
        metrics::counter!(daemon::metrics::KV_WRITES_ABANDONED, "backend" => backend).increment(1);
        let left = until.saturating_duration_since(Instant::now());
        warn!(peer = %session.name, error = %e, may_land_ms = left.as_millis() as u64, "KV write abandoned: its source blocks are held and the session is closed");
        let blocks = local.blocks.len();
        daemon::metrics::quarantine(local, blocks, tokio::time::Instant::from_std(until));
        if self.sessions.remove(session) {
            self.agent.disconnect(session.peer);
        }
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(left.as_millis().to_string()) {
            status.metadata_mut().insert(daemon::KV_MAY_LAND_MS, v);
        }
        status
    }

    async fn handshake(&self, r: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, Status> {
        validate::peer_name(&r.peer_name)?;
        let ours = self.engine.layout();
        if r.backend != self.agent.backend().as_str() {
            return Err(Status::failed_precondition(format!(
                "data-plane backend mismatch: peer {} uses {:?}, this prefill-server uses {}",
                r.peer_name,
                r.backend,
                self.agent.backend()
            )));
        }
        let theirs = convert::layout_from_wire(
            r.layout
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("handshake without a KV layout"))?,
        );
        ours.check_compatible(&theirs)
            .map_err(|why| Status::failed_precondition(format!("peer {} is incompatible: {why}", r.peer_name)))?;
        // The session is bound to the name the data plane will know the peer by.
        let md = kv_transfer::Metadata::decode(&r.transfer_metadata, self.agent.backend()).map_err(|e| from_transfer(&e))?;
        if r.peer_name.is_empty() || md.agent != r.peer_name {
            return Err(Status::invalid_argument(format!(
                "peer_name {:?} is not the agent named in the data-plane metadata ({:?})",
                r.peer_name, md.agent
            )));
        }
        if r.pool_regions.len() != self.regions.len() {
            return Err(Status::invalid_argument(format!(
                "expected {} pool regions, got {}",
                self.regions.len(),
                r.pool_regions.len()
            )));
        }
        let peer = self
            .agent
            .connect(&r.transfer_metadata, &r.data_plane_key)
            .await
            .map_err(|e| from_transfer(&e))?;
        let (session, displaced) = self
            .sessions
            .insert(Session::new(r.peer_name.clone(), peer, r.pool_regions, theirs.num_blocks));
        for old in displaced {
            // Writes still using an old session fail; its decode-server retries them.
            self.agent.disconnect(old.peer);
            info!(peer = %old.name, "session replaced or evicted: its data-plane peer is disconnected");
        }
        info!(peer = %r.peer_name, sessions = self.sessions.len(), "decode-server handshaken");
        Ok(pb::HandshakeResponse {
            peer_name: self.agent.name().to_string(),
            layout: Some(convert::layout_to_wire(ours)),
            backend: self.agent.backend().to_string(),
            session: session.to_vec(),
            boot_id: self.sessions.boot_id().to_vec(),
            write_deadline_ms: self.cfg.transfer.deadline_ms,
            skips_cached_blocks: true,
        })
    }
}

/// The gRPC service over a shared [`PrefillService`] (a prefill outlives its handler:
/// it streams two messages from a task of its own).
#[derive(Clone)]
pub struct PrefillApi(pub Arc<PrefillService>);

#[tonic::async_trait]
impl pb::prefill_server::Prefill for PrefillApi {
    type PrefillStream = ReceiverStream<Result<pb::PrefillResponse, Status>>;

    async fn handshake(&self, req: Request<pb::HandshakeRequest>) -> Result<Response<pb::HandshakeResponse>, Status> {
        self.0.handshake(req.into_inner()).await.map(Response::new)
    }

    async fn early_prefill(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::EarlyPrefillResponse>, Status> {
        self.0.early_prefill(req.into_inner()).await.map(Response::new)
    }

    async fn drop_early(&self, req: Request<pb::DropEarlyRequest>) -> Result<Response<pb::DropEarlyResponse>, Status> {
        let id = req.into_inner().request_id;
        validate::request_id(&id)?;
        Ok(Response::new(self.0.drop_early(&id)))
    }

    async fn prefill(&self, req: Request<pb::PrefillRequest>) -> Result<Response<Self::PrefillStream>, Status> {
        let waiting = daemon::metrics::GaugeGuard::new(daemon::metrics::QUEUE_DEPTH);
        let r = req.into_inner();
        let span = info_span!("prefill", request_id = %r.request_id);
        let (tx, rx) = mpsc::channel(2);
        let svc = self.0.clone();
        daemon::tasks::spawn(async move {
            let out = svc.prefill(r, &tx).instrument(span.clone()).await.map_err(|mut s| {
                s.metadata_mut()
                    .insert(daemon::KV_WRITE_OVER, tonic::metadata::MetadataValue::from_static("1"));
                s
            });
            drop(waiting);
            if let Err(s) = &out {
                span.in_scope(|| warn!(code = ?s.code(), message = s.message(), "prefill failed"));
            }
            daemon::metrics::request_done(out.as_ref().map(|_| ()).map_err(|s| s.code()));
            let _ = tx.send(out).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves until `shutdown` resolves, then drains (in-flight prefills finish) and
/// releases the data plane.
pub async fn serve(cfg: PrefillConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let addr: SocketAddr = cfg.listen.parse()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<pb::prefill_server::PrefillServer<PrefillApi>>().await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    daemon::metrics::install(&cfg.metrics_listen, "prefill-server")?;
    info!(%addr, "prefill-server listening; loading model");
    let mut server = cfg.tls.server()?;
    daemon::auth::warn_if_open(&cfg.listen, &cfg.internal_token, &cfg.tls);
    let internal = daemon::auth::InternalAuth::new(&cfg.internal_token, &cfg.tls);
    let discovery = cfg.discovery.clone();
    let svc = PrefillService::new(cfg.clone()).await?;
    daemon::membership::check_model(&discovery, svc.engine.layout())?;
    reporter.set_serving::<pb::prefill_server::PrefillServer<PrefillApi>>().await;
    let registration = daemon::membership::register(
        &discovery,
        daemon::membership::Describe {
            role: daemon::membership::Role::Prefill,
            listen: &cfg.listen,
            tls: &cfg.tls,
            http: "",
            metrics: &cfg.metrics_listen,
            engine: Some((&svc.engine, &svc.agent, &cfg.engine.device)),
            max_batch: 0,
            internal_token: &cfg.internal_token,
        },
    )?;
    info!("prefill-server ready");
    daemon::systemd::ready("prefill-server: model loaded, KV pools registered");
    let prefill = pb::prefill_server::PrefillServer::new(PrefillApi(svc.clone())).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
    let (reflection, reflection_alpha) = daemon::reflection(&["pdserve.v1.Prefill", "pdserve.v1.KvEvents"]);
    // KV-event streams never end on their own: they end when the shutdown begins.
    let events_stop = tokio_util::sync::CancellationToken::new();
    let events = daemon::kv_events::KvEventsApi::new(svc.engine.clone(), events_stop.clone());
    server
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(tonic::service::interceptor::InterceptedService::new(prefill, internal.clone()))
        .add_service(events.service(internal))
        .serve_with_incoming_shutdown(daemon::incoming(listener), async move {
            shutdown.await;
            // Out of the membership first: decode-servers and routers stop sending
            // new prompts before the listener closes.
            daemon::membership::deregister(registration, &discovery).await;
            events_stop.cancel();
        })
        .await?;
    daemon::drain_tasks("prefill-server").await;
    svc.batcher.stop();
    svc.agent.shutdown();
    info!("prefill-server stopped");
    Ok(())
}
