//! The decode-server: the client API's back end. It tokenizes and validates a
//! request, reserves its KV blocks (waiting up to a deadline), has a prefill-server
//! write the prompt's KV straight into those blocks (or prefills short prompts
//! itself), waits for the write's notification, and then decodes the sequence in a
//! continuous batch, streaming tokens until a stop condition. Blocks are released
//! when a sequence finishes, fails or is cancelled.
mod scheduler;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use daemon::config::Validate;
use daemon::convert;
use daemon::status::{from_engine, from_transfer};
use engine::{Engine, EngineConfig, EngineError};
use kv_transfer::{Agent, Registration, TransferConfig};
use proto::v1 as pb;
use proto::v1::prefill_client::PrefillClient;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use scheduler::{Event, Job, Scheduler, Sent, release};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeConfig {
    /// gRPC address to serve on (client API and health).
    pub listen: String,
    /// Prometheus `/metrics` address, host:port (empty: no metrics endpoint).
    pub metrics_listen: String,
    /// TLS and mutual TLS on the gRPC port and to peers (see configs/README.md).
    pub tls: daemon::tls::TlsConfig,
    /// Bearer token the client API requires (empty: none).
    pub auth_token: String,
    pub engine: EngineConfig,
    pub transfer: TransferConfig,
    /// Prefill-servers, as `http://host:port`. Empty: prefill locally.
    pub prefill_servers: Vec<String>,
    /// Prompts shorter than this many tokens are prefilled here (no transfer); 0: never.
    pub local_prefill_below: usize,
    /// Most sequences decoded in one step.
    pub max_batch: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: u32,
    /// Longest prompt, in tokens (0: the model's maximum).
    pub max_prompt_tokens: usize,
    /// How long a request may wait for KV blocks before RESOURCE_EXHAUSTED.
    pub queue_deadline_ms: u64,
    /// Deadline of a prefill call, KV transfer included.
    pub prefill_deadline_ms: u64,
    /// How often unreachable prefill-servers are retried.
    pub handshake_interval_ms: u64,
    /// On SIGTERM, how long in-flight requests may take before they are cancelled.
    pub drain_deadline_ms: u64,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            listen: "127.0.0.1:50051".into(),
            metrics_listen: String::new(),
            tls: Default::default(),
            auth_token: String::new(),
            engine: EngineConfig::default(),
            transfer: TransferConfig::default(),
            prefill_servers: vec!["http://127.0.0.1:50061".into()],
            local_prefill_below: 0,
            max_batch: 32,
            max_tokens_limit: 4096,
            max_prompt_tokens: 0,
            queue_deadline_ms: 30_000,
            prefill_deadline_ms: 60_000,
            handshake_interval_ms: 1_000,
            drain_deadline_ms: 30_000,
        }
    }
}

impl Validate for DecodeConfig {
    fn validate(&self) -> Result<(), String> {
        self.tls.validate().map_err(|e| e.to_string())?;
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("listen: {:?} is not host:port ({e})", self.listen))?;
        for p in &self.prefill_servers {
            if !(p.starts_with("http://") || p.starts_with("https://")) {
                return Err(format!("prefill_servers: {p:?} must be a URL like http://host:port"));
            }
        }
        if self.max_batch == 0 || self.max_tokens_limit == 0 {
            return Err("max_batch and max_tokens_limit must be at least 1".into());
        }
        if self.queue_deadline_ms == 0 || self.prefill_deadline_ms == 0 {
            return Err("queue_deadline_ms and prefill_deadline_ms must be positive".into());
        }
        Ok(())
    }
}

/// A prefill-server and our session with it.
struct PrefillPeer {
    url: String,
    conn: tokio::sync::Mutex<Option<Conn>>,
    healthy: AtomicBool,
}

#[derive(Clone)]
struct Conn {
    client: PrefillClient<Channel>,
    session: u64,
    /// The prefill-server's transfer deadline: how long one of its writes may last.
    write_deadline: Duration,
}

pub struct DecodeService {
    engine: Arc<Engine>,
    agent: Agent,
    _regions: Vec<Registration>,
    region_ids: Vec<u32>,
    peers: Vec<Arc<PrefillPeer>>,
    rr: AtomicUsize,
    next_tag: AtomicU64,
    scheduler: Scheduler,
    cfg: DecodeConfig,
}

/// A request's KV blocks. Dropped, it releases them, unless the scheduler took them
/// over (`armed` false) or a prefill-server's write may still land in them (see
/// [`Lease::quarantine`]).
struct Lease {
    engine: Arc<Engine>,
    freed: Arc<tokio::sync::Notify>,
    seq: u64,
    blocks: Vec<u32>,
    armed: bool,
}

impl Lease {
    /// Keeps the blocks from other requests until `until`: a write a failed prefill
    /// started (or may start) could land in them before then.
    fn quarantine(mut self, until: tokio::time::Instant) {
        self.armed = false;
        let (engine, freed, seq) = (self.engine.clone(), self.freed.clone(), self.seq);
        warn!(
            seq,
            blocks = self.blocks.len(),
            hold_ms = until.saturating_duration_since(tokio::time::Instant::now()).as_millis() as u64,
            "a failed prefill's blocks are held until no write of it can land"
        );
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            release(&engine, &freed, seq);
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            release(&self.engine, &self.freed, self.seq);
        }
    }
}

/// A failed prefill: the status for the client, and until when its blocks must be
/// held because a prefill-server's write into them may still land (None: none can).
struct PrefillFailed {
    status: Status,
    hold_until: Option<tokio::time::Instant>,
}

impl From<Status> for PrefillFailed {
    fn from(status: Status) -> Self {
        PrefillFailed { status, hold_until: None }
    }
}

impl DecodeService {
    pub async fn new(cfg: DecodeConfig) -> anyhow::Result<Arc<Self>> {
        let engine_cfg = cfg.engine.clone();
        let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(&engine_cfg)).await??);
        let agent = Agent::start(&cfg.transfer).await?;
        let regions = daemon::register_pools(&engine, &agent)?;
        let region_ids = regions.iter().map(|r| r.id().0).collect();
        info!(backend = %agent.backend(), info = %agent.backend_info(), blocks = engine.total_blocks(), "data plane ready");
        let peers = cfg
            .prefill_servers
            .iter()
            .map(|u| {
                Arc::new(PrefillPeer {
                    url: u.clone(),
                    conn: Default::default(),
                    healthy: AtomicBool::new(false),
                })
            })
            .collect();
        let scheduler = Scheduler::start(engine.clone(), cfg.max_batch);
        Ok(Arc::new(DecodeService {
            engine,
            agent,
            _regions: regions,
            region_ids,
            peers,
            rr: AtomicUsize::new(0),
            next_tag: AtomicU64::new(1),
            scheduler,
            cfg,
        }))
    }

    /// Whether requests can be served: some prefill-server is handshaken, or we prefill locally.
    pub fn ready(&self) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|p| p.healthy.load(Ordering::Relaxed))
    }

    async fn handshake(&self, peer: &PrefillPeer) -> Result<(), String> {
        let ch = self
            .cfg
            .tls
            .endpoint(&peer.url)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = PrefillClient::new(ch).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
        let req = pb::HandshakeRequest {
            peer_name: self.agent.name().to_string(),
            layout: Some(convert::layout_to_wire(self.engine.layout())),
            backend: self.agent.backend().to_string(),
            transfer_metadata: self.agent.local_metadata().map_err(|e| e.to_string())?,
            pool_regions: self.region_ids.clone(),
        };
        let resp = client
            .handshake(req)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        *peer.conn.lock().await = Some(Conn {
            client,
            session: resp.session,
            write_deadline: Duration::from_millis(resp.write_deadline_ms),
        });
        peer.healthy.store(true, Ordering::Relaxed);
        info!(url = %peer.url, prefill = %resp.peer_name, session = resp.session, "prefill-server handshaken");
        Ok(())
    }

    /// Keeps every prefill-server handshaken: retries the unreachable ones.
    fn spawn_handshakes(self: &Arc<Self>) {
        for peer in self.peers.clone() {
            let svc = self.clone();
            tokio::spawn(async move {
                loop {
                    if !peer.healthy.load(Ordering::Relaxed)
                        && let Err(e) = svc.handshake(&peer).await
                    {
                        warn!(url = %peer.url, error = %e, "prefill-server handshake failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(svc.cfg.handshake_interval_ms)).await;
                }
            });
        }
    }

    /// The prefill-server our config names `url`.
    fn peer(&self, url: &str) -> Option<&Arc<PrefillPeer>> {
        self.peers.iter().find(|p| p.url == url)
    }

    /// The next healthy prefill-server, or `preferred` (the router's hint) if healthy.
    fn pick_peer(&self, preferred: Option<&str>) -> Option<Arc<PrefillPeer>> {
        if let Some(p) = preferred.and_then(|u| self.peer(u))
            && p.healthy.load(Ordering::Relaxed)
        {
            return Some(p.clone());
        }
        let n = self.peers.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.peers[(start + i) % n])
            .find(|p| p.healthy.load(Ordering::Relaxed))
            .cloned()
    }

    /// Tells the prefill-server at `url` (in the background, best effort: unclaimed, it
    /// goes after its hold anyway) to release the router's early start of `id`.
    fn drop_early(&self, url: &str, id: &str) {
        let Some(peer) = self.peer(url).cloned() else {
            return;
        };
        let request_id = id.to_string();
        tokio::spawn(async move {
            let Some(mut client) = peer.conn.lock().await.as_ref().map(|c| c.client.clone()) else {
                return;
            };
            let call = client.drop_early(pb::DropEarlyRequest { request_id });
            if let Ok(Err(s)) = tokio::time::timeout(DROP_EARLY_DEADLINE, call).await {
                warn!(url = %peer.url, code = ?s.code(), message = s.message(), "could not drop the early prefill");
            }
        });
    }

    /// Handshakes, in order, with the not-yet-handshaken peers outside `skip`; the first that answers.
    async fn handshake_any(&self, skip: &[String]) -> Option<Arc<PrefillPeer>> {
        for peer in self
            .peers
            .iter()
            .filter(|p| !p.healthy.load(Ordering::Relaxed) && !skip.contains(&p.url))
        {
            match self.handshake(peer).await {
                Ok(()) => return Some(peer.clone()),
                Err(e) => warn!(url = %peer.url, error = %e, "prefill-server handshake on demand failed"),
            }
        }
        None
    }

    fn max_prompt(&self) -> usize {
        if self.cfg.max_prompt_tokens == 0 {
            self.engine.max_model_len()
        } else {
            self.cfg.max_prompt_tokens
        }
    }

    /// Validation that answers the RPC itself (before any stream starts).
    fn validate(&self, req: &pb::GenerateRequest) -> Result<(Vec<u32>, engine::SamplingParams), Status> {
        let prompt = match &req.input {
            Some(pb::generate_request::Input::Text(t)) => {
                if t.is_empty() {
                    return Err(Status::invalid_argument("the prompt is empty"));
                }
                self.engine.tokenize(t).map_err(|e| from_engine(&e))?
            }
            Some(pb::generate_request::Input::TokenIds(ids)) => ids.ids.clone(),
            None => return Err(Status::invalid_argument("the request has no prompt: set text or token_ids")),
        };
        if prompt.len() > self.max_prompt() {
            return Err(Status::invalid_argument(format!(
                "prompt of {} tokens exceeds the limit of {}",
                prompt.len(),
                self.max_prompt()
            )));
        }
        let params = convert::sampling(req.sampling.as_ref());
        params.validate(self.cfg.max_tokens_limit).map_err(Status::invalid_argument)?;
        self.engine.check_prompt(&prompt, &params).map_err(|e| from_engine(&e))?;
        let need = self.engine.blocks_for(prompt.len() + params.max_tokens as usize);
        if need > self.engine.total_blocks() {
            return Err(Status::resource_exhausted(format!(
                "the request needs {need} KV blocks, the pool has {}",
                self.engine.total_blocks()
            )));
        }
        Ok((prompt, params))
    }

    /// Reserves blocks for `tokens`, waiting up to the queue deadline for others to finish.
    async fn lease(&self, tokens: usize) -> Result<Lease, Status> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.cfg.queue_deadline_ms);
        let seq = self.engine.next_sequence_id();
        loop {
            let freed = self.scheduler.blocks_freed.notified();
            match self.engine.admit(seq, tokens) {
                Ok(blocks) => {
                    metrics::gauge!(daemon::metrics::BLOCKS_FREE).set(self.engine.free_blocks() as f64);
                    return Ok(Lease {
                        engine: self.engine.clone(),
                        freed: self.scheduler.blocks_freed.clone(),
                        seq,
                        blocks,
                        armed: true,
                    });
                }
                Err(EngineError::OutOfBlocks { needed, free, total }) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(Status::resource_exhausted(format!(
                            "no KV blocks within queue_deadline_ms: need {needed}, {free} free of {total}"
                        )));
                    }
                }
                Err(e) => return Err(from_engine(&e)),
            }
        }
    }

    /// Prefill on a prefill-server (retrying once on another, unless the first token
    /// is out), or here. `on_first` gets the first token as soon as it is known, with
    /// the server's name and the blocks' lease; returns the final figures once the KV
    /// cache is in our pools. A retry after a failure that may still write gets fresh
    /// blocks, and the old ones are quarantined.
    async fn prefill(
        &self,
        id: &str,
        hint: Option<&str>,
        prompt: &[u32],
        lease: &mut Lease,
        params: &engine::SamplingParams,
        on_first: &mut OnFirst<'_>,
    ) -> Result<pb::PrefillResponse, PrefillFailed> {
        let local = self.peers.is_empty() || prompt.len() < self.cfg.local_prefill_below;
        if !local {
            let mut last = PrefillFailed::from(Status::unavailable("no prefill-server is reachable"));
            let mut tried: Vec<String> = Vec::new();
            for attempt in 0..2 {
                let hint = if attempt == 0 { hint } else { None };
                let peer = match self.pick_peer(hint).filter(|p| !tried.contains(&p.url)) {
                    Some(p) => p,
                    // None handshaken (yet): handshake now rather than wait for the background loop.
                    None => match self.handshake_any(&tried).await {
                        Some(p) => p,
                        None => break,
                    },
                };
                tried.push(peer.url.clone());
                if attempt > 0
                    && let Some(until) = last.hold_until
                {
                    let tokens = prompt.len() + params.max_tokens as usize;
                    let fresh = self.lease(tokens).await.map_err(|status| PrefillFailed {
                        status,
                        hold_until: Some(until),
                    })?;
                    std::mem::replace(lease, fresh).quarantine(until);
                }
                let mut first_out = false;
                let mut first = |r: &pb::PrefillResponse, server: &str, l: &Lease| {
                    first_out = true;
                    on_first(r, server, l)
                };
                let result = self.remote_prefill(&peer, id, prompt, lease, params, &mut first).await;
                match result {
                    Ok(r) => return Ok(r),
                    Err(PrefillFailed { status: s, hold_until })
                        if !first_out
                            && matches!(
                                s.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::FailedPrecondition
                                    | tonic::Code::DeadlineExceeded
                                    | tonic::Code::Unknown
                                    // A prefill-server killed while our call is on its
                                    // connection: the transport reports the call cancelled.
                                    | tonic::Code::Cancelled
                            ) =>
                    {
                        warn!(url = %peer.url, code = ?s.code(), message = s.message(), "prefill-server failed; marking it unhealthy");
                        peer.healthy.store(false, Ordering::Relaxed);
                        *peer.conn.lock().await = None;
                        // However the prefill-server failed, to the client it is unavailable.
                        last = PrefillFailed {
                            status: Status::unavailable(format!("prefill-server {} failed: {:?}: {}", peer.url, s.code(), s.message())),
                            hold_until,
                        };
                    }
                    Err(f) => return Err(f),
                }
            }
            return Err(last);
        }
        if let Some(url) = hint {
            self.drop_early(url, id);
        }
        let (first_token, prefill_ms) = daemon::prefill_first_token(&self.engine, prompt, &lease.blocks, params).await?;
        let r = pb::PrefillResponse {
            first_token,
            prefill_ms,
            ..Default::default()
        };
        on_first(&r, LOCAL, lease);
        Ok(r)
    }

    async fn remote_prefill(
        &self,
        peer: &PrefillPeer,
        id: &str,
        prompt: &[u32],
        lease: &Lease,
        params: &engine::SamplingParams,
        on_first: &mut OnFirst<'_>,
    ) -> Result<pb::PrefillResponse, PrefillFailed> {
        let Conn {
            mut client,
            session,
            write_deadline,
        } = peer
            .conn
            .lock()
            .await
            .clone()
            .ok_or_else(|| Status::unavailable("not handshaken"))?;
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let n = self.engine.blocks_for(prompt.len());
        let deadline = Duration::from_millis(self.cfg.prefill_deadline_ms);
        let mut req = Request::new(pb::PrefillRequest {
            request_id: id.to_string(),
            session,
            token_ids: prompt.to_vec(),
            dst_blocks: lease.blocks[..n].to_vec(),
            notify_tag: tag,
            sampling: Some(convert::sampling_to_wire(params)),
            write_by_ms: deadline.as_millis() as u64,
        });
        req.set_timeout(deadline);
        // The deadline travels as grpc-timeout, but tonic's client does not enforce it.
        let call = self.remote_prefill_call(&mut client, req, tag, &peer.url, lease, on_first);
        tokio::time::timeout(deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "the prefill took longer than prefill_deadline_ms ({} ms)",
                    deadline.as_millis()
                )))
            })
            .map_err(|status| {
                let now = tokio::time::Instant::now();
                let hold_until = if status.metadata().contains_key(daemon::KV_WRITE_OVER) {
                    // The prefill-server answered: it is done with the request; a
                    // refusal came before any write, and an abandoned write may land
                    // for a moment.
                    let refused = matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted
                    );
                    (!refused).then_some(now + WRITE_MARGIN)
                } else {
                    // Our deadline passed or the connection broke: the prefill-server
                    // may still be at it. It starts no write once it sees the call
                    // gone (nor past `write_by_ms`), and one it started ends within its
                    // write deadline. (A prefill-server that never sees the call go, on
                    // a half-open connection, could start one until `write_by_ms`.)
                    Some(now + write_deadline + WRITE_MARGIN)
                };
                PrefillFailed { status, hold_until }
            })
    }

    async fn remote_prefill_call(
        &self,
        client: &mut PrefillClient<Channel>,
        req: Request<pb::PrefillRequest>,
        tag: u64,
        url: &str,
        lease: &Lease,
        on_first: &mut OnFirst<'_>,
    ) -> Result<pb::PrefillResponse, Status> {
        let mut stream = client.prefill(req).await?.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("prefill-server ended the prefill without a first token"))?;
        on_first(&first, url, lease);
        let done = stream
            .message()
            .await?
            .filter(|m| m.kv_written)
            .ok_or_else(|| Status::unavailable("prefill-server ended the prefill before its KV write completed"))?;
        // The bytes are ours once the write's notification arrived.
        self.agent
            .wait_notification(tag, self.agent.deadline())
            .await
            .map_err(|e| from_transfer(&e))?;
        Ok(done)
    }

    async fn run(
        self: Arc<Self>,
        id: String,
        hint: Option<String>,
        prompt: Vec<u32>,
        params: engine::SamplingParams,
        tx: mpsc::UnboundedSender<Event>,
    ) {
        let received = Instant::now();
        let waiting = daemon::metrics::GaugeGuard::new(daemon::metrics::QUEUE_DEPTH);
        let mut lease = match self.lease(prompt.len() + params.max_tokens as usize).await {
            Ok(l) => l,
            Err(s) => {
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
            let sent = job.send_newest(&self.engine);
            early = Some((job, sent));
        };
        let prefilled = self
            .prefill(&id, hint.as_deref(), &prompt, &mut lease, &params, &mut on_first)
            .await;
        drop(waiting);
        match (prefilled, early) {
            (Ok(r), Some((mut job, sent))) => {
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
                if let Some(until) = hold_until {
                    lease.quarantine(until);
                }
                let _ = tx.send(Event::Failed(status));
            }
        }
    }
}

/// Called once with the first token of a prefill, the server that computed it, and
/// the blocks it went into.
type OnFirst<'a> = dyn FnMut(&pb::PrefillResponse, &str, &Lease) + Send + 'a;

/// How much longer than a prefill-server's own deadlines a failed prefill's blocks are
/// held: an abandoned write's last bytes, and the request's time on the wire.
const WRITE_MARGIN: Duration = Duration::from_secs(1);

/// Deadline of a DropEarly call (it only saves the prefill-server some memory).
const DROP_EARLY_DEADLINE: Duration = Duration::from_secs(2);

/// `prefill_server` of requests prefilled by the decode-server itself.
const LOCAL: &str = "local";

type EventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

/// The client API over a shared service.
#[derive(Clone)]
pub struct DecodeApi(pub Arc<DecodeService>);

#[tonic::async_trait]
impl pb::generation_server::Generation for DecodeApi {
    type GenerateStream = EventStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        // The prefill-server the router started this prompt on, if it did.
        let hint = req
            .metadata()
            .get(daemon::PREFILL_HINT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut r = req.into_inner();
        if r.request_id.is_empty() {
            r.request_id = daemon::new_request_id();
        }
        let span = info_span!("generate", request_id = %r.request_id);
        let (prompt, params) = span.in_scope(|| self.0.validate(&r)).inspect_err(|s| {
            span.in_scope(|| warn!(code = ?s.code(), message = s.message(), "refused"));
            daemon::metrics::request_done(Err(s.code()));
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(self.0.clone().run(r.request_id.clone(), hint, prompt, params, tx).instrument(span));
        use tokio_stream::StreamExt;
        let stream = UnboundedReceiverStream::new(rx).map(|e| match e {
            Event::Chunk(c) => Ok(pb::GenerateResponse {
                kind: Some(pb::generate_response::Kind::Chunk(c)),
            }),
            Event::Done(res) => {
                daemon::metrics::request_done(Ok(()));
                Ok(pb::GenerateResponse {
                    kind: Some(pb::generate_response::Kind::Result(res)),
                })
            }
            Event::Failed(s) => {
                daemon::metrics::request_done(Err(s.code()));
                Err(s)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn generate_once(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResult>, Status> {
        use tokio_stream::StreamExt;
        let mut stream = self.generate(req).await?.into_inner();
        while let Some(item) = stream.next().await {
            if let Some(pb::generate_response::Kind::Result(r)) = item?.kind {
                return Ok(Response::new(r));
            }
        }
        Err(Status::internal("generation ended without a result"))
    }
}

#[tonic::async_trait]
impl pb::decode_admin_server::DecodeAdmin for DecodeApi {
    async fn stats(&self, _: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let s = &self.0;
        Ok(Response::new(pb::StatsResponse {
            free_blocks: s.engine.free_blocks() as u32,
            total_blocks: s.engine.total_blocks() as u32,
            sequences: s.engine.sequences() as u32,
            healthy_prefill_servers: s.peers.iter().filter(|p| p.healthy.load(Ordering::Relaxed)).count() as u32,
        }))
    }
}

/// Serves until `shutdown` resolves, then drains in-flight requests (up to the drain
/// deadline) and releases the data plane.
pub async fn serve(cfg: DecodeConfig, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let addr: SocketAddr = cfg.listen.parse()?;
    let drain = Duration::from_millis(cfg.drain_deadline_ms);
    let (reporter, health) = tonic_health::server::health_reporter();
    type Svc = pb::generation_server::GenerationServer<DecodeApi>;
    reporter.set_not_serving::<Svc>().await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    daemon::metrics::install(&cfg.metrics_listen, "decode-server")?;
    info!(%addr, "decode-server listening; loading model");
    let (mut server, token) = (cfg.tls.server()?, daemon::tls::BearerToken::new(&cfg.auth_token));
    let svc = DecodeService::new(cfg).await?;
    svc.spawn_handshakes();
    daemon::systemd::ready("decode-server: model loaded, KV pools registered; health SERVING once a prefill-server is handshaken");
    // Serving once some prefill-server is handshaken; back to not serving if all are
    // lost, and for good once draining.
    let draining = Arc::new(AtomicBool::new(false));
    {
        let (svc, draining) = (svc.clone(), draining.clone());
        daemon::report_readiness::<Svc>(reporter.clone(), "decode-server", move || {
            svc.ready() && !draining.load(Ordering::Relaxed)
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_started = Arc::new(tokio::sync::Notify::new());
    {
        let drain_started = drain_started.clone();
        let reporter = reporter.clone();
        tokio::spawn(async move {
            shutdown.await;
            draining.store(true, Ordering::Relaxed);
            reporter.set_not_serving::<Svc>().await;
            drain_started.notify_one();
            let _ = stop_tx.send(());
        });
    }
    let api = pb::generation_server::GenerationServer::new(DecodeApi(svc.clone())).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
    let server = server
        .add_service(health)
        .add_service(daemon::reflection())
        .add_service(pb::decode_admin_server::DecodeAdminServer::new(DecodeApi(svc.clone())))
        .add_service(tonic::service::interceptor::InterceptedService::new(api, token))
        .serve_with_incoming_shutdown(daemon::incoming(listener), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        _ = async { drain_started.notified().await; tokio::time::sleep(drain).await } => {
            warn!("drain deadline passed; cancelling in-flight requests");
        }
    }
    svc.scheduler.stop();
    svc.agent.shutdown();
    info!("decode-server stopped");
    Ok(())
}
