//! Following the cluster's members: read them whole, then watch every change from the
//! revision read; on any failure keep the last view (marked stale) and read it whole
//! again once etcd answers.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{DiscoveryConfig, DiscoveryError, MAX_MEMBERS, Member, Result, Role, within};

/// Wait between a lost watch and the next try.
const RETRY: Duration = Duration::from_secs(1);
/// Keys read per page when the members are read whole (values one by one, each capped:
/// no single answer can outgrow the gRPC message limit).
const PAGE: i64 = 512;
/// Most keys under the prefix a read looks at.
const MAX_SCANNED: usize = 4 * MAX_MEMBERS;

/// Reads records into a view: what a record must be to count, and whom it was said of.
struct Reader {
    prefix: String,
    secret: String,
    /// Keys already warned about (cleared at each read whole; bounded).
    warned: std::collections::HashSet<String>,
    /// Admit unsealed records too, marked so (`pdserve cluster ls`).
    keep_unsealed: bool,
    /// Members missing from a read after an outage, kept until then (see `follow`): the
    /// deadline is set once, not extended by later outages.
    lingering: HashMap<String, Instant>,
}

/// A member as read, and when it registered (etcd's create revision: lower is older).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub member: Member,
    pub create_revision: i64,
    /// Sealed with the secret it was read with (a view holds only sealed ones).
    pub sealed: bool,
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
/// Only records sealed with `secret` (the cluster's internal token) count.
pub fn watch(cfg: DiscoveryConfig, secret: &str) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(View::default());
    let mut reader = Reader::new(&cfg, secret, false);
    // For the process's life: not tracked (a drain would wait for it in vain).
    tokio::spawn(async move {
        let mut failures = 0u64;
        loop {
            let err = follow(&cfg, &tx, &mut failures, &mut reader).await;
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

/// Every member of the cluster now, by role and oldest first, each marked sealed or not
/// by `secret` (for `pdserve cluster ls`).
pub async fn list(cfg: &DiscoveryConfig, secret: &str) -> Result<Vec<Entry>> {
    let mut client = cfg.connect().await?;
    let (members, _) = Reader::new(cfg, secret, true).read_all(cfg, &mut client).await?;
    let mut v: Vec<Entry> = members.into_values().collect();
    v.sort_by_key(|e| (e.member.role, e.create_revision));
    Ok(v)
}

impl Reader {
    fn new(cfg: &DiscoveryConfig, secret: &str, keep_unsealed: bool) -> Reader {
        Reader {
            prefix: cfg.prefix(),
            secret: secret.to_string(),
            warned: Default::default(),
            keep_unsealed,
            lingering: HashMap::new(),
        }
    }

    /// Warns once per key (a writer of the prefix must not flood the log).
    fn warn_once(&mut self, key: &str, why: &str) {
        if self.warned.len() < MAX_MEMBERS && self.warned.insert(key.to_string()) {
            warn!(key = %key.chars().take(200).collect::<String>(), "discovery: record ignored: {why}");
        }
    }

    /// The members under the prefix, and the revision they were read at: the keys page
    /// by page, then each value at that revision.
    async fn read_all(&mut self, cfg: &DiscoveryConfig, client: &mut etcd_client::Client) -> Result<(BTreeMap<String, Entry>, i64)> {
        self.warned.clear();
        let end = prefix_end(self.prefix.as_bytes());
        let (mut keys, mut from, mut rev, mut page) = (Vec::new(), self.prefix.clone().into_bytes(), 0, PAGE);
        // Longest key of a member: prefix, role, '/', an id of at most 128.
        let longest = self.prefix.len() + 8 + 1 + 128;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_keys_only().with_limit(page);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let r = match within(cfg.timeout(), client.get(from.clone(), Some(opts))).await {
                Ok(r) => r,
                // Maybe a page of huge keys past the message limit: smaller pages.
                Err(_) if page > 1 => {
                    page = (page / 8).max(1);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if rev == 0 {
                rev = r.header().map_or(0, |h| h.revision());
                if rev == 0 {
                    return Err(DiscoveryError::WatchEnded("etcd's answer carried no revision".into()));
                }
            }
            keys.extend(r.kvs().iter().map(|kv| kv.key()).filter(|k| k.len() <= longest).map(<[u8]>::to_vec));
            match (r.more(), r.kvs().last()) {
                (true, Some(last)) if keys.len() < MAX_SCANNED => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                (true, _) => {
                    warn!(
                        "discovery: more than {MAX_SCANNED} keys under {}; the rest are not read",
                        self.prefix
                    );
                    break;
                }
                _ => break,
            }
        }
        let mut members = BTreeMap::new();
        for k in keys {
            let r = within(cfg.timeout(), client.get(k, Some(GetOptions::new().with_revision(rev)))).await?;
            if let Some(kv) = r.kvs().first() {
                self.apply_put(&mut members, kv);
            }
        }
        Ok((members, rev))
    }

    /// Takes a put into the view: a record that does not parse, is not sealed, or is
    /// under no lease (it would outlive its daemon) removes what was under its key.
    fn apply_put(&mut self, members: &mut BTreeMap<String, Entry>, kv: &etcd_client::KeyValue) -> bool {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some(member) = Member::parse(&self.prefix, kv.key(), kv.value()) else {
            self.warn_once(&key, "not a pdserve member, or not under its own role and id");
            return members.remove(&key).is_some();
        };
        let sealed = kv.lease() != 0 && member.sealed_by(&self.secret, &key, kv.lease());
        if !sealed && !self.keep_unsealed {
            self.warn_once(
                &key,
                "not sealed with this cluster's internal_token (or under no lease); a forgery, or a daemon with another token",
            );
            return members.remove(&key).is_some();
        }
        if members.len() >= MAX_MEMBERS && !members.contains_key(&key) {
            self.warn_once(&key, "more members than the view holds");
            return false;
        }
        let e = Entry {
            member,
            create_revision: kv.create_revision(),
            sealed,
        };
        members.insert(key, e.clone()) != Some(e)
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Reads the members whole, then applies each change, until the watch fails.
async fn follow(cfg: &DiscoveryConfig, tx: &watch::Sender<View>, failures: &mut u64, reader: &mut Reader) -> DiscoveryError {
    let run = async {
        let mut client = cfg.connect().await?;
        let (members, rev) = reader.read_all(cfg, &mut client).await?;
        let prefix = cfg.prefix();
        let mut stream = within(
            cfg.timeout(),
            client.watch(
                prefix.as_bytes(),
                Some(WatchOptions::new().with_prefix().with_start_revision(rev + 1)),
            ),
        )
        .await?;
        // Back from an outage long enough for etcd to expire leases it could not hear
        // (a partition): members missing now are kept for a lease and a deadline more,
        // time for live ones to register again; those that do not are dropped then.
        let mut members = members;
        // Present again: no longer lingering.
        reader.lingering.retain(|k, _| !members.contains_key(k));
        if *failures > 0 {
            metrics::counter!(crate::METRIC_RESYNCS).increment(1);
            let (now, until) = (
                Instant::now(),
                Instant::now() + Duration::from_secs(cfg.lease_ttl_s) + cfg.timeout(),
            );
            for (k, e) in tx.borrow().members.iter() {
                if !members.contains_key(k) && members.len() < MAX_MEMBERS {
                    // A deadline set by an earlier outage stands (a flapping etcd must
                    // not keep the dead forever); one already past drops the member.
                    let due = *reader.lingering.entry(k.clone()).or_insert(until);
                    if due > now {
                        members.insert(k.clone(), e.clone());
                    } else {
                        reader.lingering.remove(k);
                    }
                }
            }
            info!(
                members = members.len(),
                missing = reader.lingering.len(),
                "discovery: etcd answers again; membership read anew"
            );
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
            let next_drop = reader.lingering.values().min().copied();
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = sleep_until_opt(next_drop) => {
                    let now = Instant::now();
                    let due: Vec<String> = reader.lingering.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
                    tx.send_if_modified(|v| {
                        for k in &due {
                            reader.lingering.remove(k);
                            v.members.remove(k);
                            info!(key = %k, "discovery: a member missing since etcd's return did not register again; dropped");
                        }
                        v.publish_metrics();
                        !due.is_empty()
                    });
                    continue;
                }
            };
            let Some(resp) = msg else {
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
                    reader.lingering.remove(String::from_utf8_lossy(kv.key()).as_ref());
                    changed |= match ev.event_type() {
                        EventType::Put => reader.apply_put(&mut v.members, kv),
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

/// Sleeps until `t`, or forever without one.
async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
