//! The router: a thin front for clients. It keeps the decode-servers' health (gRPC
//! health checks), picks one per request (round-robin, least outstanding requests, or
//! KV-aware, by config), and forwards the stream. No model weights: with `kv_aware` it
//! loads the model's tokenizer to find each prompt's cached blocks ([`kv_aware`]).
//!
//! With `prefill_servers` set, it also sends each request to one of them
//! (`EarlyPrefill`; round-robin over the healthy ones, or the one holding most of the
//! prompt under `kv_aware`) as it forwards it, and tells the decode-server which one:
//! the prompt is being computed while the decode-server reserves its blocks, so the
//! first token skips the decode-server's hop.
pub mod index;
pub mod kv_aware;
mod members;
pub mod shed;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use members::{Backend, Members};
use std::sync::{Arc, RwLock};
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
    /// By the prompt's cached prefix on each worker, against their load ([`kv_aware`]).
    KvAware,
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
    /// Start each prompt on its prefill-server as the request is forwarded
    /// (`EarlyPrefill`); false: only name it to the decode-server, which asks it.
    pub early_prefill: bool,
    /// `round_robin`, `least_outstanding` or `kv_aware`; switchable at run time (SIGHUP
    /// reloads the config file).
    pub policy: Policy,
    /// The model directory whose tokenizer and chat template `kv_aware` tokenizes text
    /// and chat prompts with (empty: only token-id prompts are placed by their prefix).
    pub model: PathBuf,
    /// `kv_aware`: how much a cached prompt token counts against one the chosen
    /// prefill-server still has to compute for earlier requests (1: equal; higher
    /// favours cache hits over spreading load).
    pub overlap_weight: f64,
    /// `kv_aware`: prompts whose part not cached on the chosen decode-server is shorter
    /// than this many tokens are prefilled by that decode-server alone (0: never).
    pub local_prefill_below: usize,
    /// How often each worker's KV-event stream sends its load when nothing changed.
    pub kv_events_heartbeat_ms: u64,
    /// A worker silent this long counts as cold (holding nothing) until it resubscribes.
    pub kv_events_timeout_ms: u64,
    /// Most blocks the KV index holds for one worker; its blocks past it are not
    /// indexed (their prompts route as if uncached). ~80 bytes each.
    pub kv_index_max_blocks: usize,
    /// How often each decode-server's health is checked.
    pub health_interval_ms: u64,
    /// Deadline for connecting to a decode-server, and for each health check.
    pub connect_timeout_ms: u64,
    /// Most requests in flight through the router; past it, RESOURCE_EXHAUSTED at once.
    pub max_inflight: usize,
    /// Service discovery on etcd (off unless `etcd` is set): follows the prefill- and
    /// decode-servers registered, beside the static lists (see configs/README.md).
    pub discovery: discovery::DiscoveryConfig,
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
            early_prefill: true,
            policy: Policy::RoundRobin,
            model: PathBuf::new(),
            overlap_weight: 1.0,
            local_prefill_below: 0,
            kv_events_heartbeat_ms: 1_000,
            kv_events_timeout_ms: 5_000,
            kv_index_max_blocks: 1 << 18,
            health_interval_ms: 500,
            connect_timeout_ms: 2_000,
            max_inflight: 1024,
            discovery: Default::default(),
            early_prefill_max_outstanding: 64,
            shed_ttft_ms: 0,
        }
    }
}

impl RouterConfig {
    /// Whether the KV index can hold every worker (a bit each).
    fn kv_indexable(&self) -> bool {
        self.decode_servers.len() <= index::MAX_WORKERS && self.prefill_servers.len() <= index::MAX_WORKERS
    }
}

impl Validate for RouterConfig {
    fn validate(&self) -> Result<(), String> {
        daemon::config::check_listen(&self.tls, &self.listen, &self.http_listen)?;
        self.discovery
            .check_daemon(&self.listen, self.tls.cert.is_some(), &self.internal_token)?;
        if self.decode_servers.is_empty() && !self.discovery.enabled() {
            return Err("decode_servers: at least one is needed (or discovery.etcd)".into());
        }
        for (key, urls) in [("decode_servers", &self.decode_servers), ("prefill_servers", &self.prefill_servers)] {
            for u in urls {
                Endpoint::from_shared(u.clone()).map_err(|e| format!("{key}: {u:?} is not a URL ({e})"))?;
            }
        }
        if self.health_interval_ms == 0 || self.connect_timeout_ms == 0 || self.max_inflight == 0 {
            return Err("health_interval_ms, connect_timeout_ms and max_inflight must be positive".into());
        }
        if !(self.overlap_weight.is_finite() && self.overlap_weight >= 0.0) {
            return Err(format!("overlap_weight {} must be a number >= 0", self.overlap_weight));
        }
        let beat = daemon::kv_events::HEARTBEAT_MS;
        if !(u64::from(*beat.start())..=u64::from(*beat.end())).contains(&self.kv_events_heartbeat_ms) {
            return Err(format!("kv_events_heartbeat_ms must be within {}..={}", beat.start(), beat.end()));
        }
        if self.kv_events_timeout_ms <= self.kv_events_heartbeat_ms {
            return Err("kv_events_timeout_ms must be longer than kv_events_heartbeat_ms".into());
        }
        if self.policy == Policy::KvAware && !self.kv_indexable() {
            return Err(format!(
                "kv_aware indexes at most {} decode_servers and {} prefill_servers",
                index::MAX_WORKERS,
                index::MAX_WORKERS
            ));
        }
        if !self.model.as_os_str().is_empty() && !self.model.join("tokenizer.json").is_file() {
            return Err(format!("model: {} has no tokenizer.json", self.model.display()));
        }
        Ok(())
    }
}

/// What a config reload may change while the router serves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    pub policy: Policy,
    pub overlap_weight: f64,
    pub local_prefill_below: usize,
}

impl Tuning {
    fn of(cfg: &RouterConfig) -> Tuning {
        Tuning {
            policy: cfg.policy,
            overlap_weight: cfg.overlap_weight,
            local_prefill_below: cfg.local_prefill_below,
        }
    }
}

pub struct Router {
    backends: Members,
    prefill: Members,
    /// Membership changes and the start of KV-event following, one at a time.
    changes: std::sync::Mutex<()>,
    /// Under discovery, the model every worker must have (pinned, or adopted from the
    /// longest-registered decode-server).
    cluster_model: std::sync::Mutex<(Option<engine::KvLayout>, Option<std::time::Instant>)>,
    tuning: RwLock<Tuning>,
    /// The workers' caches as their KV events tell (followed from the first time
    /// `kv_aware` is in force), and what this router sent each; None with more
    /// workers than the index holds (then `kv_aware` is refused).
    kv: Option<Arc<kv_aware::KvState>>,
    kv_following: AtomicBool,
    kv_hits: AtomicU64,
    kv_prompt_tokens: AtomicU64,
    cfg: RouterConfig,
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

/// Where `kv_aware` found a request's prompt cached.
struct Plan {
    lookup: kv_aware::Lookup,
    kv: Arc<kv_aware::KvState>,
}

/// Prompt tokens a prefill-server has yet to compute for a routed request: its load
/// under `kv_aware`, from routing until the first token (or the request's end).
struct Pending(Option<(Arc<Backend>, usize)>);

impl Pending {
    fn add(prefill: &Arc<Backend>, tokens: usize) -> Pending {
        prefill.pending.fetch_add(tokens, Ordering::Relaxed);
        Pending(Some((prefill.clone(), tokens)))
    }

    fn done(&mut self) {
        if let Some((b, n)) = self.0.take() {
            b.pending.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.done();
    }
}

/// What a routed request holds until its answer ends.
struct Held {
    pending: Pending,
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
        let prompter = match cfg.model.as_os_str().is_empty() {
            true => None,
            false => Some(Arc::new(prompt::Prompter::load(&cfg.model)?)),
        };
        // Under discovery every role has the index's room; without, its static list.
        let room = |n: usize| if cfg.discovery.enabled() { n.max(index::MAX_WORKERS) } else { n };
        let members = |urls: &[String], service: &'static str| -> anyhow::Result<Members> {
            let m = Members::new(service, room(urls.len()));
            for u in urls {
                m.add(u, Router::channel(cfg, u)?, false).expect("room for every static worker");
            }
            Ok(m)
        };
        // With discovery on, the built-in default decode-server (one on this host) is
        // not listed: the members come from etcd.
        let listed = match cfg.discovery.enabled() && cfg.decode_servers == RouterConfig::default().decode_servers {
            true => &[][..],
            false => &cfg.decode_servers[..],
        };
        let (backends, prefill) = (
            members(listed, "pdserve.v1.Generation")?,
            members(&cfg.prefill_servers, "pdserve.v1.Prefill")?,
        );
        let kv = cfg.kv_indexable().then(|| {
            Arc::new(kv_aware::KvState::new(
                prefill.capacity(),
                backends.capacity(),
                cfg.kv_index_max_blocks,
                prompter,
            ))
        });
        Ok(Arc::new(Router {
            backends,
            prefill,
            changes: Default::default(),
            cluster_model: Default::default(),
            token: daemon::auth::BearerToken::new(&cfg.auth_token),
            internal_token: cfg.internal_token.clone(),
            tuning: RwLock::new(Tuning::of(cfg)),
            kv,
            kv_following: AtomicBool::new(false),
            kv_hits: AtomicU64::new(0),
            kv_prompt_tokens: AtomicU64::new(0),
            cfg: cfg.clone(),
            rr: AtomicUsize::new(0),
            prefill_rr: AtomicUsize::new(0),
            timeout,
            inflight: AtomicUsize::new(0),
            max_inflight: cfg.max_inflight,
            early_prefill_max_outstanding: cfg.early_prefill_max_outstanding,
            shed: shed::Shedder::new(Duration::from_millis(cfg.shed_ttft_ms)),
        }))
    }

    /// A lazy channel to the worker at `url`.
    fn channel(cfg: &RouterConfig, url: &str) -> anyhow::Result<Channel> {
        let timeout = Duration::from_millis(cfg.connect_timeout_ms);
        Ok(cfg.tls.endpoint(url)?.connect_timeout(timeout).tcp_nodelay(true).connect_lazy())
    }

    pub fn any_healthy(&self) -> bool {
        self.backends.live().iter().any(|b| b.healthy.load(Ordering::Relaxed))
    }

    pub fn tuning(&self) -> Tuning {
        *self.tuning.read().unwrap()
    }

    /// Applies a reloaded config: the run-time keys ([`Tuning`]) take effect for the
    /// next request; a change to any other key is logged and ignored (it needs a restart).
    pub fn reload(self: &Arc<Self>, cfg: &RouterConfig) {
        let mut rest = cfg.clone();
        (rest.policy, rest.overlap_weight, rest.local_prefill_below) =
            (self.cfg.policy, self.cfg.overlap_weight, self.cfg.local_prefill_below);
        if serde_json::to_value(&rest).ok() != serde_json::to_value(&self.cfg).ok() {
            warn!("config reload: only policy, overlap_weight and local_prefill_below change at run time; restart for the other keys");
        }
        let new = Tuning::of(cfg);
        if new.policy == Policy::KvAware && self.kv.is_none() {
            error!(
                "config reload refused, nothing changed: kv_aware indexes at most {} workers per role",
                index::MAX_WORKERS
            );
            return;
        }
        let old = std::mem::replace(&mut *self.tuning.write().unwrap(), new);
        if new.policy == Policy::KvAware {
            self.follow_kv_events();
        }
        info!(?old, ?new, "config reloaded");
    }

    /// Starts following every worker's KV events, once (from the first time `kv_aware`
    /// is in force: other policies need no index); workers that join later are
    /// followed as they join.
    fn follow_kv_events(self: &Arc<Self>) {
        let _one = self.changes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.kv.is_none() || self.kv_following.swap(true, Ordering::AcqRel) {
            return;
        }
        for (role, list) in [(kv_aware::Role::Prefill, &self.prefill), (kv_aware::Role::Decode, &self.backends)] {
            for b in list.live() {
                self.subscribe(role, &b);
            }
        }
    }

    /// Follows `b`'s KV events until it leaves.
    fn subscribe(&self, role: kv_aware::Role, b: &Arc<Backend>) {
        let Some(kv) = self.kv.clone() else { return };
        let client = pb::kv_events_client::KvEventsClient::with_interceptor(
            b.channel.clone(),
            daemon::auth::Attach(daemon::auth::BearerToken::new(&self.internal_token)),
        )
        .max_decoding_message_size(kv_aware::MAX_EVENT_MESSAGE_BYTES);
        let health = b.clone();
        kv_aware::Subscriber {
            state: kv,
            role,
            worker: b.slot,
            url: b.url.clone(),
            client,
            heartbeat: Duration::from_millis(self.cfg.kv_events_heartbeat_ms),
            timeout: Duration::from_millis(self.cfg.kv_events_timeout_ms),
            connect_timeout: self.timeout,
            healthy: Arc::new(move || health.healthy.load(Ordering::Relaxed)),
            full: Default::default(),
            gone: b.gone.clone(),
        }
        .spawn();
    }

    /// Reloads the config file on SIGHUP ([`Router::reload`]); a file that no longer
    /// loads is logged and changes nothing.
    fn spawn_reloads(self: &Arc<Self>) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            warn!("cannot listen for SIGHUP: no config reloads");
            return;
        };
        let router = self.clone();
        // For the process's life: not tracked (a drain would wait for it in vain).
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(path) = daemon::config_path() else {
                    error!("config reload refused: the router was started without --config (nothing to reload)");
                    continue;
                };
                for key in ["PDSERVE_POLICY", "PDSERVE_OVERLAP_WEIGHT", "PDSERVE_LOCAL_PREFILL_BELOW"] {
                    if std::env::var_os(key).is_some() {
                        warn!("config reload: {key} is set in the environment and overrides the file's value");
                    }
                }
                match daemon::load_config::<RouterConfig>(Some(&path)) {
                    Ok(cfg) => router.reload(&cfg),
                    Err(e) => error!("config reload refused, nothing changed: {e}"),
                }
            }
        });
    }

    /// Healthy decode-servers in the order to try them: round-robin; by outstanding
    /// requests; or, with `kv_aware` and the prompt placed, those with room for it
    /// first (by their last reported free blocks), then fewest outstanding, longest
    /// cached prefix, most free blocks.
    fn candidates(&self, policy: Policy, plan: Option<&Plan>, need_blocks: usize) -> Vec<Arc<Backend>> {
        let mut v = rotated(self.backends.live(), &self.rr);
        v.retain(|b| b.healthy.load(Ordering::Relaxed));
        match (policy, plan) {
            (Policy::RoundRobin, _) => {}
            (Policy::KvAware, Some(p)) => v.sort_by_key(|b| {
                let free = p.kv.decode_free[b.slot].load(Ordering::Relaxed) as usize;
                (
                    free < need_blocks,
                    b.outstanding.load(Ordering::Relaxed),
                    std::cmp::Reverse(p.lookup.decode_cached[b.slot]),
                    std::cmp::Reverse(free),
                )
            }),
            _ => v.sort_by_key(|b| b.outstanding.load(Ordering::Relaxed)),
        }
        v
    }

    /// Every decode-server not in `tried`, in slot order.
    fn backends_except(&self, tried: &[Arc<Backend>]) -> Vec<Arc<Backend>> {
        let mut v = self.backends.live();
        v.retain(|b| !tried.iter().any(|t| Arc::ptr_eq(b, t)));
        v
    }

    /// The prefill-server for a request: the next healthy one round-robin, or with a
    /// placed prompt under `kv_aware` the one with the least work before its first
    /// token: tokens it still computes for earlier requests, plus this prompt's,
    /// less `overlap_weight` x the prompt's tokens it holds (ties: round-robin).
    fn pick_prefill(&self, plan: Option<&Plan>, weight: f64) -> Option<Arc<Backend>> {
        let healthy = rotated(self.prefill.live(), &self.prefill_rr)
            .into_iter()
            .filter(|b| b.healthy.load(Ordering::Relaxed));
        match plan {
            None => healthy.into_iter().next(),
            Some(p) => healthy.min_by(|a, b| {
                let cost = |b: &Backend| {
                    let pending = b.pending.load(Ordering::Relaxed) as f64;
                    pending + p.lookup.prompt_tokens as f64 - weight * p.lookup.prefill_cached[b.slot] as f64
                };
                cost(a).total_cmp(&cost(b))
            }),
        }
    }

    /// Starts `req` on prefill-server `b` (in the background, with the connect timeout
    /// as its deadline).
    fn start_early(&self, req: &pb::GenerateRequest, b: &Backend) {
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
    }

    /// Where `kv_aware` places a request: its prompt looked up in both indexes (None
    /// when the router cannot tokenize it: it routes by load alone).
    async fn plan(&self, req: &pb::GenerateRequest) -> Option<Plan> {
        let kv = self.kv.clone()?;
        let tokens = kv.tokens(req).await?;
        // Hashing a long prompt takes a while: off the runtime's threads.
        let (k, salt) = (kv.clone(), req.cache_salt.clone());
        let lookup = tokio::task::spawn_blocking(move || k.lookup(&tokens, &salt)).await.ok()?;
        Some(Plan { lookup, kv })
    }

    /// Counts a routed prompt's cache hit on its prefill-server in the router's metrics.
    fn count_hit(&self, plan: &Plan, prefill: usize) {
        let (cached, blocks) = (plan.lookup.prefill_cached[prefill], plan.lookup.prefill_cached_blocks[prefill]);
        let hits = self.kv_hits.fetch_add(cached as u64, Ordering::Relaxed) + cached as u64;
        let total = self.kv_prompt_tokens.fetch_add(plan.lookup.prompt_tokens as u64, Ordering::Relaxed) + plan.lookup.prompt_tokens as u64;
        metrics::counter!(daemon::metrics::ROUTER_OVERLAP_BLOCKS).increment(blocks as u64);
        if total > 0 {
            metrics::gauge!(daemon::metrics::ROUTER_KV_HIT_RATE).set(hits as f64 / total as f64);
        }
    }

    fn spawn_health_checks(self: &Arc<Self>) {
        for b in self.backends.live().into_iter().chain(self.prefill.live()) {
            self.spawn_health_check(b);
        }
    }

    /// Checks `b`'s health until it leaves the membership.
    fn spawn_health_check(&self, b: Arc<Backend>) {
        let (interval, timeout) = (Duration::from_millis(self.cfg.health_interval_ms), self.timeout);
        // For the worker's membership: not tracked (a drain would wait for it in vain).
        tokio::spawn(async move {
            let mut client = HealthClient::new(b.channel.clone());
            let gone = b.gone.clone();
            loop {
                let req = tonic_health::pb::HealthCheckRequest { service: b.service.into() };
                let ok = tokio::select! {
                    _ = gone.cancelled() => return,
                    r = tokio::time::timeout(timeout, client.check(req)) => {
                        matches!(r, Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32)
                    }
                };
                if ok != b.healthy.swap(ok, Ordering::Relaxed) {
                    info!(url = %b.url, service = b.service, healthy = ok, "health changed");
                }
                tokio::select! {
                    _ = gone.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }

    /// Follows the workers registered in etcd (with `[discovery]`): adds those of the
    /// cluster's model, drops those that leave; the static ones stay.
    fn follow_discovery(self: &Arc<Self>) {
        if !self.cfg.discovery.enabled() {
            return;
        }
        let mut view = discovery::watch(self.cfg.discovery.clone(), &self.internal_token);
        let router = self.clone();
        // For the process's life: not tracked (a drain would wait for it in vain).
        tokio::spawn(async move {
            let mut refused = daemon::membership::Refused::default();
            while view.changed().await.is_ok() {
                let v = view.borrow_and_update().clone();
                router.apply_membership(&v, &mut refused);
            }
        });
    }

    /// Makes the discovered workers those of `view` that serve the cluster's model.
    fn apply_membership(self: &Arc<Self>, view: &discovery::View, refused: &mut daemon::membership::Refused) {
        use discovery::Role as R;
        refused.keep_only(view);
        let model = {
            let mut guard = self.cluster_model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (m, lost_since) = &mut *guard;
            let tls_ok = |e: &&discovery::Entry| self.cfg.tls.ca.is_none() || e.member.url.starts_with("https://");
            let decode: Vec<engine::KvLayout> = view
                .of(R::Decode)
                .into_iter()
                .filter(tls_ok)
                .filter_map(|e| e.member.layout.clone())
                .collect();
            // Adopted from the longest-registered decode-server, and again when no
            // decode-server has had the adopted model for a lease and a deadline (one
            // of another model that came first must not lock the router to it; a
            // rolling restart must not flip it).
            let missing = m.as_ref().is_some_and(|l| !decode.iter().any(|d| l.check_compatible(d).is_ok()));
            let now = std::time::Instant::now();
            let patience = Duration::from_secs(self.cfg.discovery.lease_ttl_s) + self.cfg.discovery.timeout();
            let lost = match (missing, *lost_since) {
                (false, _) => {
                    *lost_since = None;
                    false
                }
                (true, None) => {
                    *lost_since = Some(now);
                    false
                }
                (true, Some(t)) => now.duration_since(t) >= patience,
            };
            if m.is_none() || lost {
                *lost_since = None;
                let pinned = self.cfg.discovery.pinned_model();
                let found = decode.into_iter().find(|l| pinned.is_none_or(|p| p == l.model_fingerprint));
                if found.is_some() || m.is_none() {
                    *m = found;
                }
                if let Some(l) = m.as_ref() {
                    info!(model = format!("{:#x}", l.model_fingerprint), "discovery: the cluster's model");
                }
            }
            m.clone()
        };
        let _one = self.changes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (role, kv_role, members) in [
            (R::Prefill, kv_aware::Role::Prefill, &self.prefill),
            (R::Decode, kv_aware::Role::Decode, &self.backends),
        ] {
            let mut wanted = Vec::new();
            for e in view.of(role) {
                let m = &e.member;
                if !daemon::membership::reachable(m, &self.cfg.tls, refused) {
                    continue;
                }
                let fit = match (&model, &m.layout) {
                    (None, _) => Err("no decode-server names the cluster's model yet".to_string()),
                    (_, None) => Err("it names no KV layout".to_string()),
                    (Some(want), Some(l)) => want.check_compatible(l),
                };
                match fit {
                    Ok(()) => wanted.push(m.url.clone()),
                    Err(why) => refused.note(m, &why),
                }
            }
            for b in members.retain_discovered(&wanted) {
                info!(url = %b.url, role = role.name(), "discovery: worker dropped");
            }
            for u in wanted {
                if members.by_url(&u).is_some() {
                    continue;
                }
                let channel = match Router::channel(&self.cfg, &u) {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(url = %u, error = %e, "discovery: cannot reach this member");
                        continue;
                    }
                };
                let Some(b) = members.add(&u, channel, true) else {
                    warn!(url = %u, role = role.name(), "discovery: {} workers of this role already; ignored", members.capacity());
                    continue;
                };
                info!(url = %u, role = role.name(), "discovery: worker added");
                self.spawn_health_check(b.clone());
                if self.kv_following.load(Ordering::Acquire) {
                    self.subscribe(kv_role, &b);
                }
            }
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

/// `v` from the next round-robin start on.
fn rotated<T>(mut v: Vec<T>, rr: &AtomicUsize) -> Vec<T> {
    if !v.is_empty() {
        let start = rr.fetch_add(1, Ordering::Relaxed) % v.len();
        v.rotate_left(start);
    }
    v
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
        let tuning = self.0.tuning();
        let plan = match tuning.policy {
            Policy::KvAware => self.0.plan(&req).await,
            _ => None,
        };
        let need_blocks = plan.as_ref().map_or(0, |p| {
            // Unset: the decode-server's default of 16.
            let max_tokens = req.sampling.as_ref().and_then(|s| s.max_tokens).unwrap_or(16) as usize;
            (p.lookup.prompt_tokens + max_tokens).div_ceil(p.lookup.decode_block_size.max(1))
        });
        let candidates = self.0.candidates(tuning.policy, plan.as_ref(), need_blocks);
        // Conditional disaggregation: a prompt whose part not cached on a decode-server
        // is short is prefilled there, saving the transfer (judged per decode-server).
        let local_on = |b: &Arc<Backend>| match &plan {
            Some(p) if tuning.local_prefill_below > 0 => {
                p.lookup.prompt_tokens.saturating_sub(p.lookup.decode_cached[b.slot]) < tuning.local_prefill_below
            }
            _ => false,
        };
        let local = candidates.first().is_some_and(local_on);
        let prefill = match candidates.first() {
            Some(_) if !local => self.0.pick_prefill(plan.as_ref(), tuning.overlap_weight),
            _ => None,
        };
        let mut pending = Pending(None);
        if let (Some(p), Some(i)) = (&plan, &prefill) {
            self.0.count_hit(p, i.slot);
            pending = Pending::add(i, p.lookup.prompt_tokens.saturating_sub(p.lookup.prefill_cached[i.slot]));
            info!(
                request_id = %req.request_id,
                prefill = %i.url,
                prompt_tokens = p.lookup.prompt_tokens,
                cached_tokens = p.lookup.prefill_cached[i.slot],
                "kv_aware: prefill-server chosen"
            );
        }
        // No decode-server to take it: nothing to start early either; nor when the
        // first choice is busy (its blocks would come after the early start's hold).
        let early = match (candidates.first(), &prefill) {
            (Some(b), Some(_))
                if self.0.cfg.early_prefill && b.outstanding.load(Ordering::Relaxed) >= self.0.early_prefill_max_outstanding =>
            {
                metrics::counter!(daemon::metrics::EARLY_PREFILLS, "outcome" => "skipped_busy").increment(1);
                false
            }
            (Some(_), Some(i)) if self.0.cfg.early_prefill => {
                self.0.start_early(&req, i);
                true
            }
            _ => false,
        };
        // The decode-server's prefill-server: the one started early, or under kv_aware
        // the one chosen even when nothing was started early (or `local`, per server).
        let chosen = match (early, &prefill) {
            (true, Some(i)) => Some(i.url.clone()),
            (false, Some(i)) if plan.is_some() || !self.0.cfg.early_prefill => Some(i.url.clone()),
            _ => None,
        };
        if early {
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
            let hint = if local_on(&b) {
                Some(daemon::LOCAL_PREFILL)
            } else {
                chosen.as_deref()
            };
            if let Some(url) = hint.and_then(|u| tonic::metadata::MetadataValue::try_from(u).ok()) {
                request.metadata_mut().insert(daemon::PREFILL_HINT, url);
            }
            match call(client, request).await {
                Ok(resp) => {
                    info!(request_id = %req.request_id, decode = %b.url, "routed");
                    return Ok((
                        resp.into_inner(),
                        Held {
                            pending,
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
                guard.pending.done();
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
    router.spawn_health_checks();
    router.follow_discovery();
    if cfg.policy == Policy::KvAware {
        router.follow_kv_events();
    }
    router.spawn_reloads();
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
    let registration = daemon::membership::register(
        &cfg.discovery,
        daemon::membership::Describe {
            role: daemon::membership::Role::Router,
            listen: &cfg.listen,
            tls: &cfg.tls,
            http: &cfg.http_listen,
            metrics: &cfg.metrics_listen,
            engine: None,
            max_batch: 0,
            internal_token: &cfg.internal_token,
        },
    )?;
    let (signal, discovery) = (stop.clone(), cfg.discovery.clone());
    daemon::tasks::spawn(async move {
        shutdown.await;
        daemon::membership::deregister(registration, &discovery).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kv_aware_bounds_the_worker_count() {
        let many = RouterConfig {
            decode_servers: (0..65).map(|i| format!("http://127.0.0.1:{}", 20_000 + i)).collect(),
            ..Default::default()
        };
        assert!(many.validate().is_ok(), "round_robin takes any number of decode-servers");
        let kv = RouterConfig {
            policy: Policy::KvAware,
            ..many.clone()
        };
        assert!(kv.validate().unwrap_err().contains("at most 64"));
        let bad = RouterConfig {
            overlap_weight: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = RouterConfig {
            kv_events_timeout_ms: 500,
            kv_events_heartbeat_ms: 1000,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
