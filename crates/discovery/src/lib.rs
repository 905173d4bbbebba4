//! Service discovery on etcd (as Dynamo does): each daemon puts itself under
//! `/pdserve/<cluster>/<role>/<id>` with a lease it keeps alive ([`Registration`]); it
//! deletes the key when it drains, and the lease removes it when it dies. Routers and
//! decode-servers follow the members ([`watch`]): a snapshot, then every change. If etcd
//! is unreachable they keep the last membership they saw (marked stale) and resynchronise
//! when it returns. We use etcd's membership; we do not write our own.
mod config;
mod embedded;
mod member;
mod register;
mod watch;

pub use config::DiscoveryConfig;
pub use embedded::EmbeddedEtcd;
pub use member::{Member, Role};
pub use register::Registration;
pub use watch::{Entry, View, list, watch};

use std::time::Duration;

/// Most members a view holds (more are ignored, with a log line): a bound on what a
/// misbehaving writer of the prefix can make every watcher hold.
pub const MAX_MEMBERS: usize = 4096;
/// Largest member record read (ours are ~1 KiB).
pub const MAX_RECORD_BYTES: usize = 64 << 10;

/// Gauge: 1 while this daemon's view of the members is stale (etcd unreachable).
pub const METRIC_STALE: &str = "pdserve_discovery_stale";
/// Gauge: members in this daemon's view, by role.
pub const METRIC_MEMBERS: &str = "pdserve_discovery_members";
/// Counter: times the view was read whole again after a lost watch.
pub const METRIC_RESYNCS: &str = "pdserve_discovery_resyncs_total";
/// Gauge: 1 while this daemon's own key is in etcd.
pub const METRIC_REGISTERED: &str = "pdserve_discovery_registered";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd no longer holds the lease (it expired)")]
    LeaseLost,
    #[error("the watch ended: {0}")]
    WatchEnded(String),
    #[error("our key: {0}")]
    Key(String),
    #[error("discovery config: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, DiscoveryError>;

/// Runs `f` against a deadline.
async fn within<T>(d: Duration, f: impl Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DiscoveryError::Timeout(d)),
    }
}
