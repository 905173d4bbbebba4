//! The router: a thin front for clients. It keeps the decode-servers' health (gRPC
//! health checks), picks one per request (round-robin or least outstanding requests,
//! by config), and forwards the stream. No model, no tokenizer.
//!
//! With `prefill_servers` set, it also sends each request to one of them
//! (`EarlyPrefill`, round-robin over the healthy ones) as it forwards it, and tells the
//! decode-server which one: the prompt is being computed while the decode-server
//! reserves its blocks, so the first token skips the decode-server's hop.
pub mod shed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use daemon::config::Validate;
use proto::v1 as pb;
use proto::v1::generation_client::GenerationClient;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, error, info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    RoundRobin,
    LeastOutstanding,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// gRPC address clients connect to.
    pub listen: String,
    /// OpenAI-compatible HTTP address, host:port (empty: no HTTP API).
    pub http_listen: String,
    /// The model name the HTTP API serves (`GET /v1/models`; requests naming another are 404).
    pub served_model_name: String,
    /// Prometheus `/metrics` address, host:port (empty: no metrics endpoint).
    pub metrics_listen: String,
    /// TLS and mutual TLS on the gRPC port and to peers (see configs/README.md).
    pub tls: daemon::tls::TlsConfig,
    /// Bearer token the client API requires (empty: none); also sent to decode-servers.
    pub auth_token: String,
    /// The cluster's shared secret, sent on the early prefills to prefill-servers.
    pub internal_token: String,
    /// Decode-servers, as `http://host:port`.
    pub decode_servers: Vec<String>,
    /// Prefill-servers to start prompts on early, named exactly as in the
    /// decode-servers' `prefill_servers` (empty: the decode-servers pick alone).
    pub prefill_servers: Vec<String>,
    /// `round_robin` or `least_outstanding`.
    pub policy: Policy,
    /// How often each decode-server's health is checked.
    pub health_interval_ms: u64,
    /// Deadline for connecting to a decode-server, and for each health check.
    pub connect_timeout_ms: u64,
    /// Most requests in flight through the router; past it, RESOURCE_EXHAUSTED at once.
    pub max_inflight: usize,
    /// No early prefill when the chosen decode-server already has this many requests
    /// outstanding: under load its KV blocks come late, the early start would be
    /// dropped after its hold and computed again.
    pub early_prefill_max_outstanding: usize,
    /// Load shedding on queueing delay: while even the fastest first token of the last
    /// 100 ms took longer than this, new requests are refused at once
    /// (RESOURCE_EXHAUSTED, reason `router_shed`). 0: off (requests wait their turn).
    pub shed_ttft_ms: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: "127.0.0.1:50050".into(),
            http_listen: String::new(),
            served_model_name: "default".into(),
            metrics_listen: String::new(),
            tls: Default::default(),
            auth_token: String::new(),
            internal_token: String::new(),
            decode_servers: vec!["http://127.0.0.1:50051".into()],
            prefill_servers: vec![],
            policy: Policy::RoundRobin,
            health_interval_ms: 500,
            connect_timeout_ms: 2_000,
            max_inflight: 1024,
            early_prefill_max_outstanding: 64,
            shed_ttft_ms: 0,
        }
    }
}

impl Validate for RouterConfig {
    fn validate(&self) -> Result<(), String> {
        daemon::config::check_listen(&self.tls, &self.listen, &self.http_listen)?;
        if self.decode_servers.is_empty() {
            return Err("decode_servers: at least one is needed".into());
        }
        for (key, urls) in [("decode_servers", &self.decode_servers), ("prefill_servers", &self.prefill_servers)] {
            for u in urls {
                Endpoint::from_shared(u.clone()).map_err(|e| format!("{key}: {u:?} is not a URL ({e})"))?;
            }
        }
        if self.health_interval_ms == 0 || self.connect_timeout_ms == 0 || self.max_inflight == 0 {
            return Err("health_interval_ms, connect_timeout_ms and max_inflight must be positive".into());
        }
        Ok(())
    }
}

struct Backend {
    url: String,
    /// The gRPC health service name checked.
    service: &'static str,
    channel: Channel,
    healthy: AtomicBool,
    outstanding: AtomicUsize,
}

pub struct Router {
    backends: Vec<Arc<Backend>>,
    prefill: Vec<Arc<Backend>>,
    policy: Policy,
    rr: AtomicUsize,
    prefill_rr: AtomicUsize,
    timeout: Duration,
    /// Sent to the decode-servers (which check the same token).
    token: daemon::auth::BearerToken,
    /// Sent to the prefill-servers.
    internal_token: String,
    inflight: AtomicUsize,
    max_inflight: usize,
    early_prefill_max_outstanding: usize,
    shed: Arc<shed::Shedder>,
}

/// A request in flight through the router (its place when it came); leaves the count
/// when its answer ends.
pub struct InFlight(usize, Arc<Router>);

impl InFlight {
    fn enter(r: &Arc<Router>) -> InFlight {
        InFlight(r.inflight.fetch_add(1, Ordering::AcqRel) + 1, r.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.1.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a routed request holds until its answer ends.
struct Held {
    outstanding: Outstanding,
    _inflight: InFlight,
    /// Its wait for the first token (for load shedding), ended by the first message.
    waiting: shed::Waiting,
}

/// Decrements a backend's outstanding count when the response stream ends.
struct Outstanding(Arc<Backend>);
impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(daemon::metrics::OUTSTANDING, "decode" => self.0.url.clone()).decrement(1.0);
    }
}

impl Router {
    pub fn new(cfg: &RouterConfig) -> anyhow::Result<Arc<Router>> {
        let timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let connect = |urls: &[String], service: &'static str| {
            urls.iter()
                .map(|u| {
                    let channel = cfg.tls.endpoint(u)?.connect_timeout(timeout).tcp_nodelay(true).connect_lazy();
                    Ok(Arc::new(Backend {
                        url: u.clone(),
                        service,
                        channel,
                        healthy: AtomicBool::new(false),
                        outstanding: AtomicUsize::new(0),
                    }))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        Ok(Arc::new(Router {
            backends: connect(&cfg.decode_servers, "pdserve.v1.Generation")?,
            prefill: connect(&cfg.prefill_servers, "pdserve.v1.Prefill")?,
            token: daemon::auth::BearerToken::new(&cfg.auth_token),
            internal_token: cfg.internal_token.clone(),
            policy: cfg.policy,
            rr: AtomicUsize::new(0),
            prefill_rr: AtomicUsize::new(0),
            timeout,
            inflight: AtomicUsize::new(0),
            max_inflight: cfg.max_inflight,
            early_prefill_max_outstanding: cfg.early_prefill_max_outstanding,
            shed: shed::Shedder::new(Duration::from_millis(cfg.shed_ttft_ms)),
        }))
    }

    pub fn any_healthy(&self) -> bool {
        self.backends.iter().any(|b| b.healthy.load(Ordering::Relaxed))
    }

    /// Healthy backends in the order to try them.
    fn candidates(&self) -> Vec<Arc<Backend>> {
        let n = self.backends.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut v: Vec<Arc<Backend>> = (0..n)
            .map(|i| self.backends[(start + i) % n].clone())
            .filter(|b| b.healthy.load(Ordering::Relaxed))
            .collect();
        if self.policy == Policy::LeastOutstanding {
            v.sort_by_key(|b| b.outstanding.load(Ordering::Relaxed));
        }
        v
    }

    /// Every decode-server not in `tried`, in configured order.
    fn backends_except<'a>(&'a self, tried: &'a [Arc<Backend>]) -> impl Iterator<Item = Arc<Backend>> + 'a {
        self.backends.iter().filter(|b| !tried.iter().any(|t| Arc::ptr_eq(b, t))).cloned()
    }

    /// Starts `req` on the next healthy prefill-server (in the background, with the
    /// connect timeout as its deadline); returns that server's URL.
    fn start_early(&self, req: &pb::GenerateRequest) -> Option<String> {
        let n = self.prefill.len();
        let start = self.prefill_rr.fetch_add(1, Ordering::Relaxed);
        let b = (0..n)
            .map(|i| &self.prefill[(start + i) % n])
            .find(|b| b.healthy.load(Ordering::Relaxed))?;
        let mut client = daemon::auth::prefill_client(b.channel.clone(), &self.internal_token);
        let (req, timeout, url, id) = (req.clone(), self.timeout, b.url.clone(), req.request_id.clone());
        daemon::tasks::spawn(async move {
            match tokio::time::timeout(timeout, client.early_prefill(req)).await {
                Ok(Ok(r)) if r.get_ref().started => {}
                Ok(Ok(_)) => debug!(request_id = %id, prefill = %url, "early prefill not started: the id is in use"),
                Ok(Err(s)) if s.code() == tonic::Code::Unauthenticated => {
                    error!(prefill = %url, "the prefill-server refused the router's internal_token: set the same in every daemon")
                }
                Ok(Err(s)) => debug!(request_id = %id, prefill = %url, code = ?s.code(), message = s.message(), "early prefill refused"),
                Err(_) => debug!(request_id = %id, prefill = %url, "early prefill timed out"),
            }
        });
        Some(b.url.clone())
    }

    fn spawn_health_checks(self: &Arc<Self>, interval: Duration, timeout: Duration) {
        for b in self.backends.iter().chain(&self.prefill).cloned() {
            // For the process's life: not tracked (a drain would wait for it in vain).
            tokio::spawn(async move {
                let mut client = HealthClient::new(b.channel.clone());
                loop {
                    let req = tonic_health::pb::HealthCheckRequest { service: b.service.into() };
                    let ok = matches!(
                        tokio::time::timeout(timeout, client.check(req)).await,
                        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
                    );
                    if ok != b.healthy.swap(ok, Ordering::Relaxed) {
                        info!(url = %b.url, service = b.service, healthy = ok, "health changed");
                    }
                    tokio::time::sleep(interval).await;
                }
            });
        }
    }

    /// Checks what needs no model (bad requests go no further) and names the request.
    fn prepare(req: &mut pb::GenerateRequest) -> Result<(), Status> {
        daemon::validate::routed(req)?;
        if req.request_id.is_empty() {
            req.request_id = daemon::new_request_id();
        }
        Ok(())
    }
}

/// The decode-server is not there (or died as it took the call): try the next one.
fn unreachable(s: &Status) -> bool {
    // UNAVAILABLE before any answer: no connection. UNKNOWN: the transport broke under
    // the call (a decode-server killed as it took the request); it is gone either way.
    (s.code() == tonic::Code::Unavailable && s.metadata().is_empty())
        || s.code() == tonic::Code::Unknown
        || daemon::status::transport_made(s)
}

#[derive(Clone)]
pub struct RouterApi(pub Arc<Router>);

type EventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl RouterApi {
    /// Sends `req` to the healthy decode-servers in policy order until one takes it; a
    /// server that cannot be reached is marked unhealthy and the next one tried. The
    /// returned guard keeps the server's outstanding count until it is dropped.
    /// `streams`: the answer streams, and its first message ends the request's wait
    /// for load shedding (unary calls are only checked at admission).
    async fn route<T, F, Fut>(&self, mut req: pb::GenerateRequest, streams: bool, call: F) -> Result<(T, Held), Status>
    where
        F: Fn(GenerationClient<Channel>, Request<pb::GenerateRequest>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let inflight = InFlight::enter(&self.0);
        if inflight.0 > self.0.max_inflight {
            let s = daemon::metrics::rejected(
                "router_busy",
                format!("overloaded: {} requests in flight (max_inflight); retry later", self.0.max_inflight),
                ROUTER_RETRY_AFTER_MS,
            );
            daemon::metrics::request_done(Err(s.code()));
            return Err(s);
        }
        Router::prepare(&mut req).inspect_err(|s| daemon::metrics::request_done(Err(s.code())))?;
        let Some(waiting) = self.0.shed.admit(streams) else {
            let s = daemon::metrics::rejected(
                "router_shed",
                format!(
                    "overloaded: first tokens take longer than {} ms (shed_ttft_ms); retry later",
                    self.0.shed.target().as_millis()
                ),
                SHED_RETRY_AFTER_MS,
            );
            daemon::metrics::request_done(Err(s.code()));
            return Err(s);
        };
        let candidates = self.0.candidates();
        // No decode-server to take it: nothing to start early either; nor when the
        // first choice is busy (its blocks would come after the early start's hold).
        let early = match candidates.first() {
            None => None,
            Some(b) if !self.0.prefill.is_empty() && b.outstanding.load(Ordering::Relaxed) >= self.0.early_prefill_max_outstanding => {
                metrics::counter!(daemon::metrics::EARLY_PREFILLS, "outcome" => "skipped_busy").increment(1);
                None
            }
            Some(_) => self.0.start_early(&req),
        };
        if early.is_some() {
            // The early call's task sits in this worker's next-task slot: let it send
            // its request before ours, since the prefill-server's compute is the
            // first token's critical path.
            tokio::task::yield_now().await;
        }
        let mut last = Status::unavailable("no healthy decode-server");
        // Health checks lag: when every healthy server turns out unreachable, the ones
        // marked unhealthy are tried too, as a last resort, before the client hears no.
        // (Chain asks for them only then; with no healthy server there is no last resort.)
        let rest = std::iter::once(())
            .filter(|_| !candidates.is_empty())
            .flat_map(|_| self.0.backends_except(&candidates));
        for b in candidates.iter().cloned().chain(rest) {
            b.outstanding.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(daemon::metrics::OUTSTANDING, "decode" => b.url.clone()).increment(1.0);
            let guard = Outstanding(b.clone());
            let client = GenerationClient::new(b.channel.clone()).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
            let mut request = Request::new(req.clone());
            self.0.token.attach(&mut request);
            if let Some(url) = early.as_deref().and_then(|u| tonic::metadata::MetadataValue::try_from(u).ok()) {
                request.metadata_mut().insert(daemon::PREFILL_HINT, url);
            }
            match call(client, request).await {
                Ok(resp) => {
                    info!(request_id = %req.request_id, decode = %b.url, "routed");
                    return Ok((
                        resp.into_inner(),
                        Held {
                            outstanding: guard,
                            _inflight: inflight,
                            waiting,
                        },
                    ));
                }
                Err(s) if unreachable(&s) => {
                    warn!(request_id = %req.request_id, decode = %b.url, error = %s.message(), "decode-server unreachable; trying another");
                    b.healthy.store(false, Ordering::Relaxed);
                    last = s;
                }
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    // The client passed our check: the decode-server wants another token.
                    error!(decode = %b.url, "the decode-server refused the router's auth_token: set the same on both");
                    let s = Status::unavailable("the decode-server refused the router's credentials (a deployment error)");
                    daemon::metrics::request_done(Err(s.code()));
                    return Err(s);
                }
                Err(s) => {
                    daemon::metrics::request_done(Err(s.code()));
                    return Err(s);
                }
            }
        }
        daemon::metrics::request_done(Err(last.code()));
        Err(last)
    }
}

#[tonic::async_trait]
impl pb::generation_server::Generation for RouterApi {
    type GenerateStream = EventStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let (stream, guard) = self
            .route(req.into_inner(), true, |mut c, r| async move { c.generate(r).await })
            .await?;
        // The decode-server counts as busy with this request until the stream ends.
        let mut guard = guard;
        let stream = stream.map(move |item| {
            // The whole guard, not just the fields used below (a closure captures only
            // those): its in-flight count must live as long as the stream.
            let guard = &mut guard;
            if item.is_ok() {
                guard.waiting.first_token();
            }
            // A decode-server that dies mid-answer, or whose link fails, breaks the
            // connection: the transport reports UNKNOWN or INTERNAL ("h2 protocol
            // error"); to the client it is unavailable.
            let item = item.map_err(|s| {
                if s.code() == tonic::Code::Unknown || daemon::status::transport_made(&s) {
                    warn!(decode = %guard.outstanding.0.url, error = %s.message(), "decode-server failed mid-answer");
                    Status::unavailable(format!(
                        "decode-server {} failed mid-answer: {}",
                        guard.outstanding.0.url,
                        s.message()
                    ))
                } else {
                    s
                }
            });
            match &item {
                Ok(pb::GenerateResponse {
                    kind: Some(pb::generate_response::Kind::Result(_)),
                }) => daemon::metrics::request_done(Ok(())),
                Err(s) => daemon::metrics::request_done(Err(s.code())),
                _ => {}
            }
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn generate_once(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResult>, Status> {
        let (result, _guard) = self
            .route(req.into_inner(), false, |mut c, r| async move { c.generate_once(r).await })
            .await?;
        daemon::metrics::request_done(Ok(()));
        Ok(Response::new(result))
    }
}

/// The retry hint of a request refused because the router is full.
const ROUTER_RETRY_AFTER_MS: u64 = 1_000;
/// A shed request's hint: about when the standing queue is re-judged and, under
/// sustained overload, drained.
const SHED_RETRY_AFTER_MS: u64 = 200;

/// How long open HTTP answers may take after SIGTERM.
const HTTP_DRAIN_DEADLINE: Duration = Duration::from_secs(30);

pub async fn serve(cfg: RouterConfig, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let addr: SocketAddr = cfg.listen.parse()?;
    let router = Router::new(&cfg)?;
    daemon::metrics::install(&cfg.metrics_listen, "router")?;
    router.spawn_health_checks(
        Duration::from_millis(cfg.health_interval_ms),
        Duration::from_millis(cfg.connect_timeout_ms),
    );
    let (reporter, health) = tonic_health::server::health_reporter();
    type Svc = pb::generation_server::GenerationServer<RouterApi>;
    reporter.set_not_serving::<Svc>().await;
    {
        let router = router.clone();
        daemon::report_readiness::<Svc>(reporter.clone(), "router", move || router.any_healthy());
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, backends = cfg.decode_servers.len(), "router listening");
    // One shutdown for both fronts.
    let stop = tokio_util::sync::CancellationToken::new();
    let ready = router.clone();
    let api = openai::Api::new(
        RouterApi(router.clone()),
        cfg.served_model_name.clone(),
        &cfg.auth_token,
        move || ready.any_healthy(),
    );
    let http = openai::start(&cfg.http_listen, api, stop.clone().cancelled_owned()).await?;
    daemon::systemd::ready("router: listening");
    let api = pb::generation_server::GenerationServer::new(RouterApi(router)).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
    let (reflection, reflection_alpha) = daemon::reflection(&["pdserve.v1.Generation"]);
    let grpc = cfg
        .tls
        .server()?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(InterceptedService::new(api, daemon::auth::BearerToken::new(&cfg.auth_token)))
        .serve_with_incoming_shutdown(daemon::incoming(listener), stop.clone().cancelled_owned());
    let signal = stop.clone();
    daemon::tasks::spawn(async move {
        shutdown.await;
        signal.cancel();
    });
    grpc.await?;
    stop.cancel();
    // The HTTP front finishes its open answers, up to a deadline: a client that stopped
    // reading an event stream must not keep the router from exiting.
    if let Some(mut h) = http {
        match tokio::time::timeout(HTTP_DRAIN_DEADLINE, &mut h).await {
            Ok(r) => r??,
            Err(_) => {
                warn!("HTTP answers still open after {HTTP_DRAIN_DEADLINE:?}; closing them");
                h.abort();
            }
        }
    }
    info!("router stopped");
    Ok(())
}
