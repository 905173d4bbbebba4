//! `pdserve cluster ls`: the members registered in etcd, with each one's health (its
//! gRPC health check) and load (free KV blocks and sequences, from its KV-event stream,
//! which needs the internal token).
use std::time::Duration;

use discovery::{DiscoveryConfig, Entry, Role};
use proto::v1 as pb;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List the cluster's members: role, id, URL, health, load, model.
    Ls(LsArgs),
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// etcd endpoint(s), comma-separated.
    #[arg(long, env = "PDSERVE_ETCD", value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// The cluster name.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// The cluster's internal token: records not sealed with it show as UNSEALED and
    /// are not contacted; the workers' load is read with it (without it, '-').
    #[arg(long, env = "PDSERVE_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// TLS to etcd: its CA (PEM), and a client certificate and key when etcd requires
    /// them (`--client-cert-auth`).
    #[arg(long)]
    pub etcd_ca: Option<std::path::PathBuf>,
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<std::path::PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd authentication.
    #[arg(long, env = "PDSERVE_ETCD_USER")]
    pub etcd_user: Option<String>,
    #[arg(long, env = "PDSERVE_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// How long each member's health and load may take.
const PROBE: Duration = Duration::from_secs(2);

#[derive(serde::Serialize)]
struct Row {
    role: &'static str,
    id: String,
    url: String,
    healthy: bool,
    /// Sealed with the given internal token (an unsealed member is not contacted: it
    /// may be anyone's, and the token must not reach it).
    sealed: bool,
    free_blocks: Option<u32>,
    total_blocks: Option<u32>,
    sequences: Option<u32>,
    model: String,
    backend: String,
    device: String,
    age_s: u64,
}

pub async fn run(c: Command) -> anyhow::Result<i32> {
    let Command::Ls(a) = c;
    let cfg = DiscoveryConfig {
        etcd: a.etcd.clone(),
        cluster: a.cluster.clone(),
        ca_file: a.etcd_ca.clone().unwrap_or_default(),
        cert_file: a.etcd_cert.clone().unwrap_or_default(),
        key_file: a.etcd_key.clone().unwrap_or_default(),
        username: a.etcd_user.clone().unwrap_or_default(),
        password: a.etcd_password.clone().unwrap_or_default(),
        ..Default::default()
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    let token = a.internal_token.clone().unwrap_or_default();
    let members = discovery::list(&cfg, &token).await?;
    let rows = probe_all(members, token).await;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "{:<8} {:<24} {:<28} {:<8} {:<12} {:<5} {:<18} {:<8} {:<8} AGE",
        "ROLE", "ID", "URL", "HEALTH", "FREE/TOTAL", "SEQS", "MODEL", "BACKEND", "DEVICE"
    );
    let opt = |v: Option<u32>| v.map_or("-".into(), |v| v.to_string());
    for r in &rows {
        println!(
            "{:<8} {:<24} {:<28} {:<8} {:<12} {:<5} {:<18} {:<8} {:<8} {}s",
            r.role,
            r.id,
            r.url,
            match (r.sealed, r.healthy) {
                (false, _) => "UNSEALED",
                (_, true) => "serving",
                _ => "down",
            },
            format!("{}/{}", opt(r.free_blocks), opt(r.total_blocks)),
            opt(r.sequences),
            r.model,
            r.backend,
            r.device,
            r.age_s
        );
    }
    eprintln!("{} member(s) in cluster {:?}", rows.len(), a.cluster);
    Ok(0)
}

/// Probes every member at once (a cluster of dead members must not take n x 2 s),
/// keeping their order.
async fn probe_all(members: Vec<Entry>, token: String) -> Vec<Row> {
    let mut set = tokio::task::JoinSet::new();
    for (i, e) in members.into_iter().enumerate() {
        let token = token.clone();
        set.spawn(async move { (i, row(&e, &token).await) });
    }
    let mut rows: Vec<(usize, Row)> = set.join_all().await;
    rows.sort_by_key(|(i, _)| *i);
    rows.into_iter().map(|(_, r)| r).collect()
}

async fn row(e: &Entry, token: &str) -> Row {
    let m = &e.member;
    let service = match m.role {
        Role::Prefill => "pdserve.v1.Prefill",
        Role::Decode | Role::Router => "pdserve.v1.Generation",
    };
    let healthy = e.sealed && crate::up::serving(&m.url, service).await;
    let load = match (m.role, healthy) {
        (Role::Router, _) | (_, false) => None,
        _ => load(&m.url, token).await,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Row {
        role: m.role.name(),
        id: m.id.clone(),
        url: m.url.clone(),
        healthy,
        sealed: e.sealed,
        free_blocks: load.map(|l| l.free_blocks),
        total_blocks: load.map(|l| l.total_blocks).or(Some(m.kv_blocks as u32).filter(|&n| n > 0)),
        sequences: load.map(|l| l.sequences),
        model: match m.model() {
            0 => "-".into(),
            f => format!("{f:#x}"),
        },
        backend: m.backend.clone(),
        device: m.device.clone(),
        age_s: now.saturating_sub(m.started_unix),
    }
}

/// A worker's load: the first message of its KV-event stream.
async fn load(url: &str, token: &str) -> Option<pb::KvLoad> {
    let ep = tonic::transport::Endpoint::from_shared(url.to_string())
        .ok()?
        .connect_timeout(PROBE);
    let ch = tokio::time::timeout(PROBE, ep.connect()).await.ok()?.ok()?;
    let mut c = pb::kv_events_client::KvEventsClient::with_interceptor(ch, daemon::auth::Attach(daemon::auth::BearerToken::new(token)));
    let req = pb::SubscribeKvEventsRequest { heartbeat_ms: 1000 };
    let mut s = tokio::time::timeout(PROBE, c.subscribe_kv_events(req))
        .await
        .ok()?
        .ok()?
        .into_inner();
    tokio::time::timeout(PROBE, s.message()).await.ok()?.ok()??.load
}
