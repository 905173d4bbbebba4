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
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::config::Validate;
use daemon::convert;
use daemon::status::{from_engine, from_transfer};
use engine::{Engine, EngineConfig, EngineError, SamplingParams, block_runs};
use kv_transfer::{Agent, PeerId, Registration, Segment, TransferConfig};
use proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefillConfig {
    /// gRPC address to serve on.
    pub listen: String,
    /// Prometheus `/metrics` address, host:port (empty: no metrics endpoint).
    pub metrics_listen: String,
    /// TLS and mutual TLS on the gRPC port and to peers (see configs/README.md).
    pub tls: daemon::tls::TlsConfig,
    pub engine: EngineConfig,
    pub transfer: TransferConfig,
    /// Longest prompt accepted, in tokens (0: the model's maximum).
    pub max_prompt_tokens: usize,
    /// How long a request may wait for the compute slot before it is refused.
    pub queue_deadline_ms: u64,
    /// How long a prompt started early (the router's EarlyPrefill) is held for its
    /// decode-server's Prefill once computed; unclaimed, its blocks are then released.
    pub early_hold_ms: u64,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        PrefillConfig {
            listen: "127.0.0.1:50061".into(),
            metrics_listen: String::new(),
            tls: Default::default(),
            engine: EngineConfig::default(),
            transfer: TransferConfig::default(),
            max_prompt_tokens: 0,
            queue_deadline_ms: 30_000,
            early_hold_ms: 2_000,
        }
    }
}

impl Validate for PrefillConfig {
    fn validate(&self) -> Result<(), String> {
        self.tls.validate().map_err(|e| e.to_string())?;
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("listen: {:?} is not host:port ({e})", self.listen))?;
        if self.engine.block_size == 0 {
            return Err("engine.block_size must be at least 1".into());
        }
        if self.transfer.deadline_ms == 0 || self.queue_deadline_ms == 0 {
            return Err("transfer.deadline_ms and queue_deadline_ms must be positive".into());
        }
        Ok(())
    }
}

/// A prompt computed into local blocks, its first token sampled. Dropped, it releases
/// the blocks.
struct Computed {
    engine: Arc<Engine>,
    /// Woken when the blocks are released.
    freed: Arc<tokio::sync::Notify>,
    seq: u64,
    blocks: Vec<u32>,
    first_token: u32,
    queue_ms: f64,
    prefill_ms: f64,
}

impl Drop for Computed {
    fn drop(&mut self) {
        self.engine.release(self.seq);
        metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
        self.freed.notify_waiters();
    }
}

/// A prompt the router started early, waiting for its decode-server's Prefill.
struct Early {
    generation: u64,
    /// Set once the outcome is in `result`: only then may a Prefill short of blocks
    /// evict it (an early start still computing is about to be claimed).
    ready: Arc<std::sync::atomic::AtomicBool>,
    tokens: Vec<u32>,
    params: SamplingParams,
    /// The computation's outcome. Dropped unclaimed, the computed blocks are released.
    result: oneshot::Receiver<Result<Computed, Status>>,
}

/// Request ids with an early start (`Some`), or with a Prefill running without one
/// (`None`: a late EarlyPrefill of that id is not started).
type EarlyMap = Mutex<HashMap<String, Option<Early>>>;

/// Removes a request id's `None` entry of the [`EarlyMap`] when the Prefill ends.
struct Running<'a>(&'a EarlyMap, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap();
        if matches!(m.get(&self.1), Some(None)) {
            m.remove(&self.1);
        }
    }
}

struct Session {
    name: String,
    peer: PeerId,
    regions: Vec<u32>,
    num_blocks: usize,
}

pub struct PrefillService {
    engine: Arc<Engine>,
    agent: Agent,
    regions: Vec<Registration>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    next_session: AtomicU64,
    /// One prefill computes at a time; others queue here.
    compute: tokio::sync::Semaphore,
    early: EarlyMap,
    next_early: AtomicU64,
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
            engine,
            agent,
            regions,
            sessions: Mutex::default(),
            next_session: AtomicU64::new(1),
            compute: tokio::sync::Semaphore::new(1),
            early: Mutex::default(),
            next_early: AtomicU64::new(1),
            freed: Default::default(),
            cfg,
        }))
    }

    fn max_prompt(&self) -> usize {
        if self.cfg.max_prompt_tokens == 0 {
            self.engine.max_model_len()
        } else {
            self.cfg.max_prompt_tokens
        }
    }

    fn check_prompt(&self, tokens: &[u32]) -> Result<(), Status> {
        if tokens.is_empty() {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
        if tokens.len() > self.max_prompt() {
            return Err(Status::invalid_argument(format!(
                "prompt of {} tokens exceeds the limit of {}",
                tokens.len(),
                self.max_prompt()
            )));
        }
        Ok(())
    }

    /// Computes `tokens` into fresh local blocks and samples the first token, after
    /// waiting (up to the queue deadline) for the compute slot. The slot is free again
    /// on return: the KV write overlaps the next prompt's compute. Short of blocks, a
    /// Prefill (`speculative` false) drops the computed early starts nobody has claimed,
    /// then waits for writes in flight to release theirs; an early start just fails.
    async fn compute(&self, tokens: &[u32], params: &SamplingParams, received: Instant, speculative: bool) -> Result<Computed, Status> {
        let deadline = tokio::time::Instant::from_std(received) + Duration::from_millis(self.cfg.queue_deadline_ms);
        let _permit = tokio::time::timeout_at(deadline, self.compute.acquire())
            .await
            .map_err(|_| Status::resource_exhausted("prefill queue is full: waited past queue_deadline_ms"))?
            .map_err(|_| Status::unavailable("shutting down"))?;
        let seq = self.engine.next_sequence_id();
        let blocks = loop {
            let freed = self.freed.notified();
            match self.engine.admit(seq, tokens.len()) {
                Err(EngineError::OutOfBlocks { needed, total, .. }) if !speculative && needed <= total => {
                    if self.evict_early() == 0 && tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(Status::resource_exhausted(format!(
                            "no free KV blocks on the prefill-server within queue_deadline_ms: need {needed} of {total}"
                        )));
                    }
                }
                other => break other.map_err(|e| from_engine(&e))?,
            }
        };
        let mut c = Computed {
            engine: self.engine.clone(),
            freed: self.freed.clone(),
            seq,
            blocks,
            first_token: 0,
            queue_ms: received.elapsed().as_secs_f64() * 1e3,
            prefill_ms: 0.0,
        };
        metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
        (c.first_token, c.prefill_ms) = daemon::prefill_first_token(&self.engine, tokens, &c.blocks, params).await?;
        Ok(c)
    }

    /// Drops every computed, unclaimed early start (releasing its blocks); returns how many.
    fn evict_early(&self) -> usize {
        let mut m = self.early.lock().unwrap();
        let before = m.len();
        m.retain(|_, e| !e.as_ref().is_some_and(|e| e.ready.load(Ordering::Acquire)));
        let n = before - m.len();
        if n > 0 {
            metrics::counter!(daemon::metrics::EARLY_PREFILLS, "outcome" => "evicted").increment(n as u64);
            info!(evicted = n, "out of KV blocks: unclaimed early prefills dropped");
        }
        n
    }

    /// Starts computing a prompt ahead of its Prefill (see the module's comment).
    fn early_prefill(self: &Arc<Self>, req: pb::GenerateRequest) -> Result<pb::EarlyPrefillResponse, Status> {
        let received = Instant::now();
        if req.request_id.is_empty() {
            return Err(Status::invalid_argument("an early prefill needs a request id"));
        }
        let tokens = match req.input {
            Some(pb::generate_request::Input::Text(t)) => self.engine.tokenize(&t).map_err(|e| from_engine(&e))?,
            Some(pb::generate_request::Input::TokenIds(ids)) => ids.ids,
            None => return Err(Status::invalid_argument("the request has no prompt")),
        };
        self.check_prompt(&tokens)?;
        let params = convert::sampling(req.sampling.as_ref());
        params.validate(u32::MAX).map_err(Status::invalid_argument)?;
        self.engine.check_prompt(&tokens, &params).map_err(|e| from_engine(&e))?;
        let generation = self.next_early.fetch_add(1, Ordering::Relaxed);
        let (tx, result) = oneshot::channel();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let mut m = self.early.lock().unwrap();
            if m.contains_key(&req.request_id) {
                return Ok(pb::EarlyPrefillResponse { started: false });
            }
            let early = Early {
                generation,
                ready: ready.clone(),
                tokens: tokens.clone(),
                params: params.clone(),
                result,
            };
            m.insert(req.request_id.clone(), Some(early));
        }
        let svc = self.clone();
        let span = info_span!("early_prefill", request_id = %req.request_id);
        let id = req.request_id;
        tokio::spawn(
            async move {
                let out = svc.compute(&tokens, &params, received, true).await;
                // Claimed or not, the outcome waits in the channel; dropped with an
                // unclaimed entry, it releases its blocks.
                let _ = tx.send(out);
                ready.store(true, Ordering::Release);
                tokio::time::sleep(Duration::from_millis(svc.cfg.early_hold_ms)).await;
                let mut m = svc.early.lock().unwrap();
                if matches!(m.get(&id), Some(Some(e)) if e.generation == generation) {
                    m.remove(&id);
                    early_outcome("unclaimed");
                    info!(hold_ms = svc.cfg.early_hold_ms, "early prefill not claimed: released");
                }
            }
            .instrument(span),
        );
        Ok(pb::EarlyPrefillResponse { started: true })
    }

    /// Releases the early start of `id`, which its decode-server will not claim.
    fn drop_early(&self, id: &str) -> pb::DropEarlyResponse {
        let mut m = self.early.lock().unwrap();
        let dropped = matches!(m.get(id), Some(Some(_)));
        if dropped {
            m.remove(id);
            early_outcome("dropped");
            info!(request_id = %id, "early prefill dropped: the decode-server prefills it itself");
        }
        pb::DropEarlyResponse { dropped }
    }

    /// Takes the early start of `id` if its tokens and sampling are these; marks the id
    /// as running either way (until the returned guard drops).
    fn claim_early(&self, id: &str, tokens: &[u32], params: &SamplingParams) -> (Option<Early>, Option<Running<'_>>) {
        if id.is_empty() {
            return (None, None);
        }
        let mut m = self.early.lock().unwrap();
        let found = match m.remove(id) {
            // Another Prefill of this id runs: it keeps the mark.
            Some(None) => {
                m.insert(id.to_string(), None);
                return (None, None);
            }
            Some(Some(e)) if e.tokens == tokens && e.params == *params => Some(e),
            Some(Some(_)) => {
                early_outcome("mismatch");
                None
            }
            None => None,
        };
        m.insert(id.to_string(), None);
        (found, Some(Running(&self.early, id.to_string())))
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
        let session = self
            .sessions
            .lock()
            .unwrap()
            .get(&req.session)
            .cloned()
            .ok_or_else(|| Status::failed_precondition(format!("unknown session {}: handshake again", req.session)))?;
        // Past this the decode-server may have given the blocks to another request.
        let write_by = (req.write_by_ms > 0).then(|| received + Duration::from_millis(req.write_by_ms));
        let tokens = req.token_ids;
        self.check_prompt(&tokens)?;
        let n = self.engine.blocks_for(tokens.len());
        if req.dst_blocks.len() < n {
            return Err(Status::invalid_argument(format!(
                "{} destination blocks cannot hold {} tokens",
                req.dst_blocks.len(),
                tokens.len()
            )));
        }
        if let Some(b) = req.dst_blocks.iter().find(|&&b| b as usize >= session.num_blocks) {
            return Err(Status::invalid_argument(format!(
                "destination block {b} is outside the peer's {} blocks",
                session.num_blocks
            )));
        }
        let params = convert::sampling(req.sampling.as_ref());
        let (early, _running) = self.claim_early(&req.request_id, &tokens, &params);
        let early = match early {
            Some(e) => match e.result.await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(s)) => {
                    early_outcome("failed");
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
                early_outcome("used");
                c
            }
            None => self.compute(&tokens, &params, received, false).await?,
        };
        let mut msg = pb::PrefillResponse {
            first_token: local.first_token,
            queue_ms: local.queue_ms,
            prefill_ms: local.prefill_ms,
            early: started_early,
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
        let segs = self.segments(&session, &local.blocks[..n], &req.dst_blocks[..n]);
        let bytes: u64 = segs.iter().map(|s| s.len).sum();
        let t = Instant::now();
        self.agent
            .write(session.peer, &segs, req.notify_tag)
            .await
            .map_err(|e| from_transfer(&e))?;
        let secs = t.elapsed().as_secs_f64();
        let kv_transfer_ms = secs * 1e3;
        let backend = self.agent.backend().as_str();
        metrics::histogram!(daemon::metrics::PREFILL_TIME).record(local.prefill_ms / 1e3);
        metrics::counter!(daemon::metrics::PROMPT_TOKENS).increment(tokens.len() as u64);
        metrics::counter!(daemon::metrics::KV_BYTES, "backend" => backend).increment(bytes);
        metrics::histogram!(daemon::metrics::KV_TIME, "backend" => backend).record(secs);
        if secs > 0.0 {
            metrics::histogram!(daemon::metrics::KV_BANDWIDTH, "backend" => backend).record(bytes as f64 / secs);
        }
        info!(tokens = tokens.len(), segments = segs.len(), bytes, prefill_ms = local.prefill_ms, kv_transfer_ms, early = started_early, peer = %session.name, "prefilled");
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

fn early_outcome(outcome: &'static str) {
    metrics::counter!(daemon::metrics::EARLY_PREFILLS, "outcome" => outcome).increment(1);
}

impl PrefillService {
    fn handshake(&self, r: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, Status> {
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
        if r.pool_regions.len() != self.regions.len() {
            return Err(Status::invalid_argument(format!(
                "expected {} pool regions, got {}",
                self.regions.len(),
                r.pool_regions.len()
            )));
        }
        let peer = self.agent.connect(&r.transfer_metadata).map_err(|e| from_transfer(&e))?;
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions.lock().unwrap().insert(
            session,
            Arc::new(Session {
                name: r.peer_name.clone(),
                peer,
                regions: r.pool_regions,
                num_blocks: theirs.num_blocks,
            }),
        );
        info!(peer = %r.peer_name, session, "decode-server handshaken");
        Ok(pb::HandshakeResponse {
            peer_name: self.agent.name().to_string(),
            layout: Some(convert::layout_to_wire(ours)),
            backend: self.agent.backend().to_string(),
            session,
            write_deadline_ms: self.cfg.transfer.deadline_ms,
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
        self.0.handshake(req.into_inner()).map(Response::new)
    }

    async fn early_prefill(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::EarlyPrefillResponse>, Status> {
        self.0.early_prefill(req.into_inner()).map(Response::new)
    }

    async fn drop_early(&self, req: Request<pb::DropEarlyRequest>) -> Result<Response<pb::DropEarlyResponse>, Status> {
        Ok(Response::new(self.0.drop_early(&req.into_inner().request_id)))
    }

    async fn prefill(&self, req: Request<pb::PrefillRequest>) -> Result<Response<Self::PrefillStream>, Status> {
        let waiting = daemon::metrics::GaugeGuard::new(daemon::metrics::QUEUE_DEPTH);
        let r = req.into_inner();
        let span = info_span!("prefill", request_id = %r.request_id);
        let (tx, rx) = mpsc::channel(2);
        let svc = self.0.clone();
        tokio::spawn(async move {
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
    let svc = PrefillService::new(cfg).await?;
    reporter.set_serving::<pb::prefill_server::PrefillServer<PrefillApi>>().await;
    info!("prefill-server ready");
    daemon::systemd::ready("prefill-server: model loaded, KV pools registered");
    let prefill = pb::prefill_server::PrefillServer::new(PrefillApi(svc.clone())).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
    server
        .add_service(health)
        .add_service(daemon::reflection())
        .add_service(prefill)
        .serve_with_incoming_shutdown(daemon::incoming(listener), shutdown)
        .await?;
    svc.agent.shutdown();
    info!("prefill-server stopped");
    Ok(())
}
