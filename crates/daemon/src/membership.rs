//! A daemon's place in etcd discovery (`[discovery]`, see the `discovery` crate): its
//! record, registered once it serves and removed first thing when it drains.
use std::time::Duration;

pub use discovery::{DiscoveryConfig, Member, Registration, Role};

/// What a daemon says about itself.
pub struct Describe<'a> {
    pub role: Role,
    pub listen: &'a str,
    pub tls: &'a crate::tls::TlsConfig,
    pub http: &'a str,
    pub metrics: &'a str,
    /// The model's KV layout, the data plane and the device (None for the router).
    pub engine: Option<(&'a engine::Engine, &'a kv_transfer::Agent, &'a str)>,
    pub max_batch: usize,
    /// The cluster's internal token: the record is sealed with it.
    pub internal_token: &'a str,
}

/// Checks a worker's model against the cluster's pinned one (`model_fingerprint`).
pub fn check_model(cfg: &DiscoveryConfig, layout: &engine::KvLayout) -> anyhow::Result<()> {
    match cfg.pinned_model() {
        Some(m) if cfg.enabled() && m != layout.model_fingerprint => anyhow::bail!(
            "discovery.model_fingerprint is {m:#x} but this daemon's model is {:#x}: it would be ignored by the cluster",
            layout.model_fingerprint
        ),
        _ => Ok(()),
    }
}

/// Registers the daemon (in the background; None without discovery).
pub fn register(cfg: &DiscoveryConfig, d: Describe) -> anyhow::Result<Option<Registration>> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let url = cfg.advertised(d.listen, d.tls.cert.is_some())?;
    let (layout, backend, device, kv_blocks) = match d.engine {
        Some((e, agent, device)) => (
            Some(e.layout().clone()),
            agent.backend().to_string(),
            device.to_string(),
            e.total_blocks() as u64,
        ),
        None => (None, String::new(), String::new(), 0),
    };
    let member = Member {
        id: cfg.member_id(&url),
        role: d.role,
        url,
        http: d.http.to_string(),
        metrics: d.metrics.to_string(),
        layout,
        backend,
        device,
        kv_blocks,
        max_batch: d.max_batch as u64,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        seal: String::new(),
        instance: String::new(),
    };
    tracing::info!(key = %member.key(&cfg.prefix()), url = %member.url, "registering in etcd");
    Ok(Some(Registration::spawn(cfg.clone(), member, d.internal_token)))
}

/// Members refused once, with why (logged once each; only those still in the view are
/// remembered).
#[derive(Default)]
pub struct Refused(std::collections::HashSet<(String, String)>);

impl Refused {
    /// Logs that `m` is ignored and why, the first time.
    pub fn note(&mut self, m: &Member, why: &str) {
        if self.0.insert((m.id.clone(), m.url.clone())) {
            tracing::warn!(id = %m.id, url = %m.url, role = m.role.name(), reason = %why, "discovery: member ignored");
        }
    }

    /// Forgets the members no longer in `view` (a record that returns is judged anew).
    pub fn keep_only(&mut self, view: &discovery::View) {
        self.0
            .retain(|(id, url)| view.members.values().any(|e| &e.member.id == id && &e.member.url == url));
    }
}

/// Whether `m` can be reached the way this daemon talks to peers: with `[tls]` trusting
/// a CA (`tls.ca`), only over https (a record naming http:// would downgrade the link).
pub fn reachable(m: &Member, tls: &crate::tls::TlsConfig, refused: &mut Refused) -> bool {
    let ok = tls.ca.is_none() || m.url.starts_with("https://");
    if !ok {
        refused.note(m, "its URL is http:// but this daemon talks to peers over TLS");
    }
    ok
}

/// The first step of a drain: the key goes (watchers stop sending new work), then the
/// daemon keeps serving for `deregister_grace_ms` while they notice, before it stops
/// accepting.
pub async fn deregister(reg: Option<Registration>, cfg: &DiscoveryConfig) {
    if let Some(r) = reg {
        // Not deleted: the key lives until its lease runs out; so does the grace.
        let grace = match r.deregister().await {
            true => Duration::from_millis(cfg.deregister_grace_ms),
            false => Duration::from_secs(cfg.lease_ttl_s).max(Duration::from_millis(cfg.deregister_grace_ms)),
        };
        tokio::time::sleep(grace).await;
    }
}
