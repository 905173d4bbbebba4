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

/// Leases this daemon granted and may still hold a key under (a drain revokes them
/// all), and the one its key is under now.
#[derive(Default)]
struct Leases {
    client: Option<Client>,
    held: Vec<i64>,
    live: Option<i64>,
}

/// Leases kept for revocation at most (older ones have expired long since).
const MAX_HELD: usize = 16;

/// A daemon's registration, kept by a background task until [`Registration::deregister`].
pub struct Registration {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    leases: Arc<Mutex<Leases>>,
    key: String,
    cfg: DiscoveryConfig,
}

impl Registration {
    /// Registers `member` in the background (now, and again whenever it is lost), its
    /// record sealed with `secret` (the cluster's internal token), retrying while etcd is
    /// unreachable: a daemon serves whether or not etcd answers.
    pub fn spawn(cfg: DiscoveryConfig, mut member: Member, secret: &str) -> Registration {
        let key = member.key(&cfg.prefix());
        // Tells this process's record from any other's under the same key.
        member.instance = format!("{:032x}", rand_u128());
        let (stop, leases) = (CancellationToken::new(), Arc::new(Mutex::new(Leases::default())));
        let keeper = Keeper {
            cfg: cfg.clone(),
            key: key.clone(),
            member,
            secret: secret.to_string(),
            leases: leases.clone(),
        };
        let task = tokio::spawn(keeper.run(stop.clone()));
        Registration {
            stop,
            task: Some(task),
            leases,
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
        self.leases.lock().unwrap_or_else(PoisonError::into_inner).live.is_some()
    }

    /// Stops keeping the key and revokes every lease it may be under, which deletes it
    /// (within the etcd deadline, on a fresh connection if the kept one fails). Returns
    /// false when some may remain: the lease then expires the key within its TTL.
    pub async fn deregister(mut self) -> bool {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let (client, held) = {
            let mut l = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            l.live = None;
            (l.client.take(), std::mem::take(&mut l.held))
        };
        metrics::gauge!(crate::METRIC_REGISTERED).set(0.0);
        if held.is_empty() {
            return true;
        }
        let mut client = match client {
            Some(c) => Some(c),
            None => self.cfg.connect().await.ok(),
        };
        let mut all = true;
        for lease in held {
            let mut ok = false;
            for fresh in [false, true] {
                if fresh {
                    client = self.cfg.connect().await.ok();
                }
                let Some(c) = client.as_mut() else { continue };
                match within(self.cfg.timeout(), c.lease_revoke(lease)).await {
                    Ok(_) => ok = true,
                    // Expired already: nothing under it.
                    Err(e) if e.to_string().contains("lease not found") => ok = true,
                    Err(_) => {}
                }
                if ok {
                    break;
                }
            }
            all &= ok;
        }
        match all {
            true => info!(key = %self.key, "deregistered from etcd"),
            false => warn!(key = %self.key, "could not deregister; the lease will expire the key"),
        }
        all
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
    leases: Arc<Mutex<Leases>>,
}

impl Keeper {
    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the key is registered under `live` now.
    fn set_live(&self, live: Option<i64>) {
        metrics::gauge!(crate::METRIC_REGISTERED).set(if live.is_some() { 1.0 } else { 0.0 });
        self.leases().live = live;
    }

    async fn run(self, stop: CancellationToken) {
        let mut failures = 0u64;
        loop {
            let err = tokio::select! {
                _ = stop.cancelled() => return,
                e = self.once(&mut failures) => e,
            };
            // The old lease is not revoked here (etcd may be unreachable): if etcd still
            // holds it, the next put replaces the record under it (it is ours), and a
            // drain revokes it with the others.
            self.set_live(None);
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
            {
                let mut l = self.leases();
                l.client = Some(client.clone());
                if l.held.len() >= MAX_HELD {
                    l.held.remove(0);
                }
                l.held.push(lease);
            }
            let value = match self.put(&mut client, lease).await {
                Ok(v) => v,
                Err(e) => {
                    // Nothing under it: revoked now (best effort), not left to expire.
                    let _ = within(self.cfg.timeout(), client.lease_revoke(lease)).await;
                    self.leases().held.retain(|&l| l != lease);
                    return Err(e);
                }
            };
            self.set_live(Some(lease));
            info!(key = %self.key, lease = format!("{lease:x}"), "registered in etcd");
            *failures = 0;
            Ok::<_, DiscoveryError>(self.keep_alive(&mut client, lease, &value).await)
        };
        match run.await {
            Ok(e) | Err(e) => e,
        }
    }

    /// Puts the record under `lease` where the key is free, holds a record of this same
    /// process (its earlier lease, lost), or holds nothing valid (unsealed, or under no
    /// lease): never over another live daemon's. Returns the value put.
    async fn put(&self, client: &mut Client, lease: i64) -> crate::Result<Vec<u8>> {
        let mut m = self.member.clone();
        m.seal(&self.secret, &self.key, lease);
        let value = serde_json::to_vec(&m).expect("a member serializes");
        let existing = within(self.cfg.timeout(), client.get(self.key.as_bytes(), None)).await?;
        let guard = match existing.kvs().first() {
            None => Compare::create_revision(self.key.as_bytes(), CompareOp::Equal, 0),
            Some(kv) => {
                let theirs = Member::parse(&self.cfg.prefix(), kv.key(), kv.value());
                let valid = kv.lease() != 0 && theirs.as_ref().is_some_and(|t| t.sealed_by(&self.secret, &self.key, kv.lease()));
                let ours = theirs.is_some_and(|t| t.instance == self.member.instance);
                if valid && !ours {
                    return Err(DiscoveryError::Key(format!(
                        "{} is another daemon's (a duplicate discovery.id?)",
                        self.key
                    )));
                }
                Compare::mod_revision(self.key.as_bytes(), CompareOp::Equal, kv.mod_revision())
            }
        };
        let txn = Txn::new().when([guard]).and_then([TxnOp::put(
            self.key.as_bytes(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
        if !within(self.cfg.timeout(), client.txn(txn)).await?.succeeded() {
            return Err(DiscoveryError::Key(format!("{} changed under us; trying again", self.key)));
        }
        Ok(value)
    }

    /// Refreshes `lease` every third of its TTL, and reads the key back, until a refresh
    /// fails, etcd says the lease is gone, or the key is no longer ours; returns why.
    async fn keep_alive(&self, client: &mut Client, lease: i64, value: &[u8]) -> DiscoveryError {
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
                Ok(r) if r.kvs().first().is_some_and(|kv| kv.lease() == lease && kv.value() == value) => {}
                Ok(_) => return DiscoveryError::Key(format!("{} was deleted or replaced", self.key)),
                Err(e) => return e,
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// 128 random bits from the system's generator (ring's, already in the tree).
fn rand_u128() -> u128 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).expect("the system's random generator");
    u128::from_le_bytes(b)
}
