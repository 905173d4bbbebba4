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
    let mut member = Member {
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
    };
    member.seal(d.internal_token);
    tracing::info!(key = %member.key(&cfg.prefix()), url = %member.url, "registering in etcd");
    Ok(Some(Registration::spawn(cfg.clone(), member)))
}

/// Whether a member may be used: sealed with the cluster's internal token (when one is
/// set); logs why not, once per member (`refused` remembers).
pub fn trusted(m: &Member, internal_token: &str, refused: &mut std::collections::HashSet<(String, String)>) -> bool {
    let ok = m.sealed_by(internal_token);
    if !ok && refused.insert((m.id.clone(), m.url.clone())) {
        tracing::warn!(id = %m.id, url = %m.url, role = m.role.name(), "discovery: member ignored: its record is not sealed with this cluster's internal_token");
    }
    ok
}

/// The first step of a drain: the key goes (watchers stop sending new work), then the
/// daemon keeps serving for `deregister_grace_ms` while they notice, before it stops
/// accepting.
pub async fn deregister(reg: Option<Registration>, cfg: &DiscoveryConfig) {
    if let Some(r) = reg {
        r.deregister().await;
        tokio::time::sleep(Duration::from_millis(cfg.deregister_grace_ms)).await;
    }
}
