//! Following the cluster's members: read them whole, then watch every change from the
//! revision read; on any failure keep the last view (marked stale) and read it whole
//! again once etcd answers.
use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{DiscoveryConfig, DiscoveryError, MAX_MEMBERS, Member, Result, Role, within};

/// Wait between a lost watch and the next try.
const RETRY: Duration = Duration::from_secs(1);

/// A member as read, and when it registered (etcd's create revision: lower is older).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub member: Member,
    pub create_revision: i64,
}

/// The members a daemon knows of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// By key.
    pub members: BTreeMap<String, Entry>,
    /// etcd is unreachable: this is the last membership seen.
    pub stale: bool,
    /// Read from etcd at least once.
    pub synced: bool,
}

impl View {
    /// The members of `role`, oldest registration first.
    pub fn of(&self, role: Role) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.members.values().filter(|e| e.member.role == role).collect();
        v.sort_by_key(|e| e.create_revision);
        v
    }

    fn publish_metrics(&self) {
        metrics::gauge!(crate::METRIC_STALE).set(if self.stale { 1.0 } else { 0.0 });
        for role in [Role::Prefill, Role::Decode, Role::Router] {
            metrics::gauge!(crate::METRIC_MEMBERS, "role" => role.name()).set(self.of(role).len() as f64);
        }
    }
}

/// Follows the cluster's members for the process's life; the receiver always holds the
/// latest view (empty and not `synced` until etcd first answers).
pub fn watch(cfg: DiscoveryConfig) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::default());
    // For the process's life: not tracked (a drain would wait for it in vain).
    tokio::spawn(async move {
        let mut failures = 0u64;
        loop {
            let err = follow(&cfg, &tx, &mut failures).await;
            if tx.is_closed() {
                return;
            }
            tx.send_if_modified(|v| {
                let was = v.stale;
                v.stale = true;
                v.publish_metrics();
                !was
            });
            failures += 1;
            if failures == 1 || failures.is_multiple_of(30) {
                warn!(error = %err, "discovery: etcd unreachable; serving with the last membership seen");
            }
            tokio::time::sleep(RETRY).await;
        }
    });
    rx
}

/// Every member of the cluster now, oldest first (for `pdserve cluster ls`).
pub async fn list(cfg: &DiscoveryConfig) -> Result<Vec<Entry>> {
    let mut client = cfg.connect().await?;
    let (members, _) = read_all(cfg, &mut client).await?;
    let mut v: Vec<Entry> = members.into_values().collect();
    v.sort_by_key(|e| (e.member.role, e.create_revision));
    Ok(v)
}

/// The members under the prefix, and the revision they were read at.
async fn read_all(cfg: &DiscoveryConfig, client: &mut etcd_client::Client) -> Result<(BTreeMap<String, Entry>, i64)> {
    let prefix = cfg.prefix();
    let resp = within(cfg.timeout(), client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix()))).await?;
    let mut members = BTreeMap::new();
    for kv in resp.kvs() {
        apply_put(&prefix, &mut members, kv);
    }
    let rev = resp.header().map_or(0, |h| h.revision());
    Ok((members, rev))
}

/// Takes a put into the view: a record that does not parse removes what was under its
/// key (it no longer says anything usable).
fn apply_put(prefix: &str, members: &mut BTreeMap<String, Entry>, kv: &etcd_client::KeyValue) -> bool {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    match Member::parse(prefix, kv.key(), kv.value()) {
        Some(member) if members.len() < MAX_MEMBERS || members.contains_key(&key) => {
            let e = Entry {
                member,
                create_revision: kv.create_revision(),
            };
            members.insert(key, e.clone()) != Some(e)
        }
        Some(_) => {
            warn!(key = %key, "discovery: more than {MAX_MEMBERS} members; ignoring this one");
            false
        }
        None => {
            warn!(key = %key, "discovery: a record that is not a pdserve member (or not under its own role and id); ignored");
            members.remove(&key).is_some()
        }
    }
}

/// Reads the members whole, then applies each change, until the watch fails.
async fn follow(cfg: &DiscoveryConfig, tx: &watch::Sender<View>, failures: &mut u64) -> DiscoveryError {
    let run = async {
        let mut client = cfg.connect().await?;
        let (members, rev) = read_all(cfg, &mut client).await?;
        let prefix = cfg.prefix();
        let mut stream = within(
            cfg.timeout(),
            client.watch(prefix.as_bytes(), Some(WatchOptions::new().with_prefix().with_start_revision(rev + 1))),
        )
        .await?;
        if *failures > 0 {
            metrics::counter!(crate::METRIC_RESYNCS).increment(1);
            info!(members = members.len(), "discovery: etcd answers again; membership read anew");
        }
        *failures = 0;
        tx.send_if_modified(|v| {
            let new = View {
                members,
                stale: false,
                synced: true,
            };
            new.publish_metrics();
            std::mem::replace(v, new) != *v
        });
        loop {
            // No deadline: a watch is silent while nothing changes; a dead or hung etcd
            // shows as a failed HTTP/2 ping (see `DiscoveryConfig::connect`).
            let Some(resp) = stream.message().await? else {
                return Err(DiscoveryError::WatchEnded("etcd closed it".into()));
            };
            if resp.canceled() {
                return Err(DiscoveryError::WatchEnded(format!(
                    "cancelled by etcd (compacted at {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            tx.send_if_modified(|v| {
                let mut changed = false;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    changed |= match ev.event_type() {
                        EventType::Put => apply_put(&prefix, &mut v.members, kv),
                        EventType::Delete => v.members.remove(String::from_utf8_lossy(kv.key()).as_ref()).is_some(),
                    };
                }
                if changed {
                    v.publish_metrics();
                }
                changed
            });
            if tx.is_closed() {
                return Err(DiscoveryError::WatchEnded("nobody follows the view".into()));
            }
        }
    };
    match run.await {
        Ok(()) => DiscoveryError::WatchEnded("ended".into()),
        Err(e) => e,
    }
}
