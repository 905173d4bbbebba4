//! A daemon's own key: put under a lease, kept alive, put again under a new lease if
//! etcd lost the old one (it was unreachable past the TTL), revoked when it drains.
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{DiscoveryConfig, Member, within};

/// Wait between a failed registration and the next try.
const RETRY: Duration = Duration::from_secs(1);

/// A daemon's registration, kept by a background task until [`Registration::deregister`].
pub struct Registration {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The client and lease of the key as last put (None: not in etcd now).
    current: Arc<Mutex<Option<(Client, i64)>>>,
    key: String,
    timeout: Duration,
}

impl Registration {
    /// Registers `member` in the background (now, and again whenever it is lost),
    /// retrying while etcd is unreachable: a daemon serves whether or not etcd answers.
    pub fn spawn(cfg: DiscoveryConfig, member: Member) -> Registration {
        let key = member.key(&cfg.prefix());
        let value = serde_json::to_vec(&member).expect("a member serializes");
        let (stop, current) = (CancellationToken::new(), Arc::new(Mutex::new(None)));
        let task = tokio::spawn(keep(cfg.clone(), key.clone(), value, stop.clone(), current.clone()));
        Registration {
            stop,
            task: Some(task),
            current,
            key,
            timeout: cfg.timeout(),
        }
    }

    /// The key it is registered under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the key is in etcd now (as far as the last keep-alive tells).
    pub fn registered(&self) -> bool {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// Stops keeping the key and revokes its lease, which deletes it (within the etcd
    /// deadline; if etcd does not answer, the lease expires it).
    pub async fn deregister(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner).take();
        metrics::gauge!(crate::METRIC_REGISTERED).set(0.0);
        if let Some((mut client, lease)) = current {
            match within(self.timeout, client.lease_revoke(lease)).await {
                Ok(_) => info!(key = %self.key, "deregistered from etcd"),
                Err(e) => warn!(key = %self.key, error = %e, "could not deregister; the lease will expire the key"),
            }
        }
    }
}

/// Dropped without [`Registration::deregister`]: no longer kept alive, so the lease
/// expires the key (as if the daemon had died).
impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn keep(cfg: DiscoveryConfig, key: String, value: Vec<u8>, stop: CancellationToken, current: Arc<Mutex<Option<(Client, i64)>>>) {
    let set = |v: Option<(Client, i64)>| {
        metrics::gauge!(crate::METRIC_REGISTERED).set(if v.is_some() { 1.0 } else { 0.0 });
        *current.lock().unwrap_or_else(PoisonError::into_inner) = v;
    };
    let mut failures = 0u64;
    loop {
        let once = async {
            let run = async {
            let mut client = cfg.connect().await?;
            let lease = within(cfg.timeout(), client.lease_grant(cfg.lease_ttl_s as i64, None)).await?.id();
            // Known before the put: a drain that comes now still revokes it.
            set(Some((client.clone(), lease)));
            within(
                cfg.timeout(),
                client.put(key.as_bytes(), value.clone(), Some(PutOptions::new().with_lease(lease))),
            )
            .await?;
            info!(key = %key, lease = format!("{lease:x}"), "registered in etcd");
            failures = 0;
            Ok::<_, crate::DiscoveryError>(keep_alive(&cfg, &mut client, lease).await)
            };
            match run.await {
                Ok(e) | Err(e) => e,
            }
        };
        let err = tokio::select! {
            _ = stop.cancelled() => return,
            r = once => r,
        };
        set(None);
        failures += 1;
        // Once per outage, and then now and again: etcd down must not flood the log.
        if failures == 1 || failures.is_multiple_of(30) {
            warn!(key = %key, error = %err, "not registered in etcd; retrying");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Refreshes `lease` every third of its TTL until a refresh fails or etcd says the lease
/// is gone; returns why.
async fn keep_alive(cfg: &DiscoveryConfig, client: &mut Client, lease: i64) -> crate::DiscoveryError {
    let every = Duration::from_millis(cfg.lease_ttl_s * 1000 / 3);
    let (mut keeper, mut answers) = match within(cfg.timeout(), client.lease_keep_alive(lease)).await {
        Ok(k) => k,
        Err(e) => return e,
    };
    loop {
        if let Err(e) = within(cfg.timeout(), keeper.keep_alive()).await {
            return e;
        }
        match within(cfg.timeout(), answers.message()).await {
            Ok(Some(a)) if a.ttl() > 0 => {}
            Ok(_) => return crate::DiscoveryError::LeaseLost,
            Err(e) => return e,
        }
        tokio::time::sleep(every).await;
    }
}
