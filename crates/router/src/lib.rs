//! The router: a thin front for clients. It keeps the decode-servers' health (gRPC
//! health checks), picks one per request (round-robin or least outstanding requests,
//! by config), and forwards the stream. No model, no tokenizer.
//!
//! With `prefill_servers` set, it also sends each request to one of them
//! (`EarlyPrefill`, round-robin over the healthy ones) as it forwards it, and tells the
//! decode-server which one: the prompt is being computed while the decode-server
//! reserves its blocks, so the first token skips the decode-server's hop.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use daemon::config::Validate;
use proto::v1 as pb;
use proto::v1::generation_client::GenerationClient;
use proto::v1::prefill_client::PrefillClient;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, info, warn};

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
    /// Prometheus `/metrics` address, host:port (empty: no metrics endpoint).
    pub metrics_listen: String,
    /// TLS and mutual TLS on the gRPC port and to peers (see configs/README.md).
    pub tls: daemon::tls::TlsConfig,
    /// Bearer token the client API requires (empty: none).
    pub auth_token: String,
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
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: "127.0.0.1:50050".into(),
            metrics_listen: String::new(),
            tls: Default::default(),
            auth_token: String::new(),
            decode_servers: vec!["http://127.0.0.1:50051".into()],
            prefill_servers: vec![],
            policy: Policy::RoundRobin,
            health_interval_ms: 500,
            connect_timeout_ms: 2_000,
        }
    }
}

impl Validate for RouterConfig {
    fn validate(&self) -> Result<(), String> {
        self.tls.validate().map_err(|e| e.to_string())?;
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| format!("listen: {:?} is not host:port ({e})", self.listen))?;
        if self.decode_servers.is_empty() {
            return Err("decode_servers: at least one is needed".into());
        }
        for (key, urls) in [("decode_servers", &self.decode_servers), ("prefill_servers", &self.prefill_servers)] {
            for u in urls {
                Endpoint::from_shared(u.clone()).map_err(|e| format!("{key}: {u:?} is not a URL ({e})"))?;
            }
        }
        if self.health_interval_ms == 0 || self.connect_timeout_ms == 0 {
            return Err("health_interval_ms and connect_timeout_ms must be positive".into());
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
    token: daemon::tls::BearerToken,
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
            token: daemon::tls::BearerToken::new(&cfg.auth_token),
            policy: cfg.policy,
            rr: AtomicUsize::new(0),
            prefill_rr: AtomicUsize::new(0),
            timeout,
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
        let mut client = PrefillClient::new(b.channel.clone()).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
        let (req, timeout, url, id) = (req.clone(), self.timeout, b.url.clone(), req.request_id.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, client.early_prefill(req)).await {
                Ok(Ok(r)) if r.get_ref().started => {}
                Ok(Ok(_)) => debug!(request_id = %id, prefill = %url, "early prefill not started: the id is in use"),
                Ok(Err(s)) => debug!(request_id = %id, prefill = %url, code = ?s.code(), message = s.message(), "early prefill refused"),
                Err(_) => debug!(request_id = %id, prefill = %url, "early prefill timed out"),
            }
        });
        Some(b.url.clone())
    }

    fn spawn_health_checks(self: &Arc<Self>, interval: Duration, timeout: Duration) {
        for b in self.backends.iter().chain(&self.prefill).cloned() {
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

    fn prepare(req: &mut pb::GenerateRequest) {
        if req.request_id.is_empty() {
            req.request_id = daemon::new_request_id();
        }
    }
}

/// A connection-level failure: the request never reached the decode-server.
fn unreachable(s: &Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.metadata().is_empty()
}

#[derive(Clone)]
pub struct RouterApi(pub Arc<Router>);

type EventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl RouterApi {
    /// Sends `req` to the healthy decode-servers in policy order until one takes it; a
    /// server that cannot be reached is marked unhealthy and the next one tried. The
    /// returned guard keeps the server's outstanding count until it is dropped.
    async fn route<T, F, Fut>(&self, mut req: pb::GenerateRequest, call: F) -> Result<(T, Outstanding), Status>
    where
        F: Fn(GenerationClient<Channel>, Request<pb::GenerateRequest>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        Router::prepare(&mut req);
        let candidates = self.0.candidates();
        // No decode-server to take it: nothing to start early either.
        let early = if candidates.is_empty() { None } else { self.0.start_early(&req) };
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
                    return Ok((resp.into_inner(), guard));
                }
                Err(s) if unreachable(&s) => {
                    warn!(request_id = %req.request_id, decode = %b.url, error = %s.message(), "decode-server unreachable; trying another");
                    b.healthy.store(false, Ordering::Relaxed);
                    last = s;
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
        let (stream, guard) = self.route(req.into_inner(), |mut c, r| async move { c.generate(r).await }).await?;
        // The decode-server counts as busy with this request until the stream ends.
        let stream = stream.map(move |item| {
            let _held = &guard;
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
            .route(req.into_inner(), |mut c, r| async move { c.generate_once(r).await })
            .await?;
        daemon::metrics::request_done(Ok(()));
        Ok(Response::new(result))
    }
}

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
    daemon::systemd::ready("router: listening");
    let api = pb::generation_server::GenerationServer::new(RouterApi(router)).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES);
    cfg.tls
        .server()?
        .add_service(health)
        .add_service(daemon::reflection())
        .add_service(InterceptedService::new(api, daemon::tls::BearerToken::new(&cfg.auth_token)))
        .serve_with_incoming_shutdown(daemon::incoming(listener), shutdown)
        .await?;
    info!("router stopped");
    Ok(())
}
