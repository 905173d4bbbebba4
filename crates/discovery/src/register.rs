//! A daemon's own key: put under a lease (only where the key is free or already ours),
//! sealed for that lease, kept alive and read back, put again under a new lease if etcd
//! lost it (unreachable past the TTL, or deleted), revoked when the daemon drains.
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{DiscoveryConfig, DiscoveryError, Member, within};

/// Wait between a failed registration and the next try.
const RETRY: Duration = Duration::from_secs(1);

/// A daemon's registration, kept by a background task until [`Registration::deregister`].
pub struct Registration {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The client and lease of the key as last put (None: not in etcd now).
    current: Arc<Mutex<Option<(Client, i64)>>>,
    key: String,
    cfg: DiscoveryConfig,
}

impl Registration {
    /// Registers `member` in the background (now, and again whenever it is lost), its
    /// record sealed with `secret` (the cluster's internal token), retrying while etcd is
    /// unreachable: a daemon serves whether or not etcd answers.
    pub fn spawn(cfg: DiscoveryConfig, member: Member, secret: &str) -> Registration {
        let key = member.key(&cfg.prefix());
        let (stop, current) = (CancellationToken::new(), Arc::new(Mutex::new(None)));
        let keeper = Keeper {
            cfg: cfg.clone(),
            key: key.clone(),
            member,
            secret: secret.to_string(),
            current: current.clone(),
        };
        let task = tokio::spawn(keeper.run(stop.clone()));
        Registration {
            stop,
            task: Some(task),
            current,
            key,
            cfg,
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
    /// deadline, on a fresh connection if the kept one fails). Returns false when it
    /// could not: the lease then expires the key within its TTL.
    pub async fn deregister(mut self) -> bool {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner).take();
        metrics::gauge!(crate::METRIC_REGISTERED).set(0.0);
        let Some((mut client, lease)) = current else {
            return true;
        };
        let mut r = within(self.cfg.timeout(), client.lease_revoke(lease)).await.map(|_| ());
        if r.is_err()
            && let Ok(mut fresh) = self.cfg.connect().await
        {
            r = within(self.cfg.timeout(), fresh.lease_revoke(lease)).await.map(|_| ());
        }
        match r {
            Ok(()) => info!(key = %self.key, "deregistered from etcd"),
            Err(ref e) => warn!(key = %self.key, error = %e, "could not deregister; the lease will expire the key"),
        }
        r.is_ok()
    }
}

/// Dropped without [`Registration::deregister`]: no longer kept alive, so the lease
/// expires the key (as if the daemon had died).
impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Keeper {
    cfg: DiscoveryConfig,
    key: String,
    member: Member,
    secret: String,
    current: Arc<Mutex<Option<(Client, i64)>>>,
}

impl Keeper {
    fn set(&self, v: Option<(Client, i64)>) {
        metrics::gauge!(crate::METRIC_REGISTERED).set(if v.is_some() { 1.0 } else { 0.0 });
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = v;
    }

    async fn run(self, stop: CancellationToken) {
        let mut failures = 0u64;
        loop {
            let err = tokio::select! {
                _ = stop.cancelled() => return,
                e = self.once(&mut failures) => e,
            };
            // The old lease is not revoked: if etcd still holds it, the record under it
            // is replaced by the next put (it is ours), then the lease expires empty.
            self.set(None);
            failures += 1;
            // Once per outage, and then now and again: etcd down must not flood the log.
            if failures == 1 || failures.is_multiple_of(30) {
                warn!(key = %self.key, error = %err, "not registered in etcd; retrying");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Registers once and keeps the key until that fails; returns why.
    async fn once(&self, failures: &mut u64) -> DiscoveryError {
        let run = async {
            let mut client = self.cfg.connect().await?;
            let lease = within(self.cfg.timeout(), client.lease_grant(self.cfg.lease_ttl_s as i64, None))
                .await?
                .id();
            // Known before the put: a drain that comes now still revokes it.
            self.set(Some((client.clone(), lease)));
            self.put(&mut client, lease).await?;
            info!(key = %self.key, lease = format!("{lease:x}"), "registered in etcd");
            *failures = 0;
            Ok::<_, DiscoveryError>(self.keep_alive(&mut client, lease).await)
        };
        match run.await {
            Ok(e) | Err(e) => e,
        }
    }

    /// Puts the record under `lease` where the key is free, or holds a record of this
    /// same daemon (its earlier lease, lost): never over another daemon's.
    async fn put(&self, client: &mut Client, lease: i64) -> crate::Result<()> {
        let mut m = self.member.clone();
        m.seal(&self.secret, &self.key, lease);
        let value = serde_json::to_vec(&m).expect("a member serializes");
        let existing = within(self.cfg.timeout(), client.get(self.key.as_bytes(), None)).await?;
        let guard = match existing.kvs().first() {
            None => Compare::create_revision(self.key.as_bytes(), CompareOp::Equal, 0),
            Some(kv) => {
                let theirs: Option<Member> = serde_json::from_slice(kv.value()).ok();
                let ours = theirs.is_some_and(|t| t.url == self.member.url && t.started_unix == self.member.started_unix);
                if !ours {
                    return Err(DiscoveryError::Config(format!(
                        "{} is another daemon's (a duplicate discovery.id?)",
                        self.key
                    )));
                }
                Compare::mod_revision(self.key.as_bytes(), CompareOp::Equal, kv.mod_revision())
            }
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(self.key.as_bytes(), value, Some(PutOptions::new().with_lease(lease)))]);
        if !within(self.cfg.timeout(), client.txn(txn)).await?.succeeded() {
            return Err(DiscoveryError::Config(format!("{} changed under us; trying again", self.key)));
        }
        Ok(())
    }

    /// Refreshes `lease` every third of its TTL, and reads the key back, until a refresh
    /// fails, etcd says the lease is gone, or the key is no longer ours; returns why.
    async fn keep_alive(&self, client: &mut Client, lease: i64) -> DiscoveryError {
        let every = Duration::from_millis(self.cfg.lease_ttl_s * 1000 / 3);
        let (mut keeper, mut answers) = match within(self.cfg.timeout(), client.lease_keep_alive(lease)).await {
            Ok(k) => k,
            Err(e) => return e,
        };
        loop {
            if let Err(e) = within(self.cfg.timeout(), keeper.keep_alive()).await {
                return e;
            }
            match within(self.cfg.timeout(), answers.message()).await {
                Ok(Some(a)) if a.ttl() > 0 => {}
                Ok(_) => return DiscoveryError::LeaseLost,
                Err(e) => return e,
            }
            match within(self.cfg.timeout(), client.get(self.key.as_bytes(), None)).await {
                Ok(r) if r.kvs().first().is_some_and(|kv| kv.lease() == lease) => {}
                Ok(_) => return DiscoveryError::Config(format!("{} was deleted or replaced", self.key)),
                Err(e) => return e,
            }
            tokio::time::sleep(every).await;
        }
    }
}
