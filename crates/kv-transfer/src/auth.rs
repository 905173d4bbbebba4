//! Data-plane keys. The target of writes issues one key per peer ([`KeyTable::issue`]);
//! the daemons carry it to the initiator in their (authenticated, possibly TLS) gRPC
//! handshake, and the initiator proves it holds the key on every TCP connection it opens
//! (HMAC over a fresh nonce, see `tcp.rs`). UCX and NIXL keep the table but do not use
//! it: their transports have no hook where a key could be checked.
//!
//! A key's wire form is opaque to the daemons:
//!
//! ```text
//! magic "PDK\x01" (4) | key id (8) | secret (32)
//! ```
//!
//! The id names the key in the AUTH frame; the secret never crosses the data plane.
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::watch;

use crate::error::{Result, TransferError};

pub(crate) const KEY_ID_LEN: usize = 8;
const SECRET_LEN: usize = 32;
const KEY_MAGIC: [u8; 4] = *b"PDK\x01";
const KEY_WIRE_LEN: usize = KEY_MAGIC.len() + KEY_ID_LEN + SECRET_LEN;
/// Keys one agent keeps. A decode-server issues one per prefill peer and handshake,
/// and revokes the old one on re-handshake, so this is far above what it holds; past
/// it the oldest key is evicted (its connections close) rather than the table growing.
const MAX_KEYS: usize = 4096;
/// The longest agent name a peer may claim (TCP AUTH frame, UCX notification header).
pub(crate) const MAX_NAME_LEN: usize = 256;

pub(crate) type KeyId = [u8; KEY_ID_LEN];

/// Fills `buf` from the system CSPRNG (getrandom).
fn fill_random(buf: &mut [u8]) {
    // getrandom fails only when the kernel has no entropy source at all, which no
    // supported platform lacks after boot; there is nothing safe to fall back to.
    SystemRandom::new().fill(buf).expect("the system CSPRNG is unavailable");
}

/// A notification tag for one write, drawn from the system CSPRNG: unpredictable, so a
/// peer cannot fire (or wait for) a tag it was not told, and never 0.
pub fn random_tag() -> u64 {
    loop {
        let mut b = [0u8; 8];
        fill_random(&mut b);
        let tag = u64::from_le_bytes(b);
        if tag != 0 {
            return tag;
        }
    }
}

/// A fresh random 32-byte nonce (the TCP target's AUTH challenge).
pub(crate) fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    fill_random(&mut n);
    n
}

/// A key as the initiator holds it, decoded from its wire form.
pub(crate) struct PeerKey {
    pub(crate) id: KeyId,
    pub(crate) hmac: hmac::Key,
}

impl PeerKey {
    /// Decodes a key's wire form; anything else is refused (the daemons carry it from
    /// a peer, so it is checked like metadata).
    pub(crate) fn decode(bytes: &[u8]) -> Result<PeerKey> {
        if bytes.len() != KEY_WIRE_LEN || bytes[..KEY_MAGIC.len()] != KEY_MAGIC {
            return Err(TransferError::BadMetadata(format!(
                "not a data-plane key ({} bytes; a key is {KEY_WIRE_LEN} bytes from Agent::issue_key)",
                bytes.len()
            )));
        }
        let (id, secret) = bytes[KEY_MAGIC.len()..].split_at(KEY_ID_LEN);
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(id);
        Ok(PeerKey {
            id: key_id,
            hmac: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }
}

/// The message an AUTH frame's MAC covers: nonce || key id || name. The first two have
/// fixed lengths, so the concatenation is unambiguous.
pub(crate) fn auth_message(nonce: &[u8; 32], id: &KeyId, name: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(nonce.len() + id.len() + name.len());
    m.extend_from_slice(nonce);
    m.extend_from_slice(id);
    m.extend_from_slice(name);
    m
}

/// What an authenticated connection keeps of its key.
pub(crate) struct Granted {
    pub(crate) hmac: hmac::Key,
    /// The only agent name this key may claim, if it was issued for one.
    pub(crate) bound_name: Option<String>,
    /// Sees the key's revocation (or eviction): its sender is dropped then.
    pub(crate) revoked: watch::Receiver<()>,
}

struct Entry {
    hmac: hmac::Key,
    bound_name: Option<String>,
    /// Dropped on revocation; every connection that authenticated with the key holds a
    /// receiver and closes when it sees the sender gone.
    revoked: watch::Sender<()>,
}

#[derive(Default)]
struct Keys {
    map: HashMap<KeyId, Entry>,
    /// Issue order, oldest first, for eviction.
    order: VecDeque<KeyId>,
    evicted: u64,
}

/// The keys this agent issued and has not revoked.
#[derive(Default)]
pub(crate) struct KeyTable {
    keys: Mutex<Keys>,
}

impl KeyTable {
    /// Creates a key (bound to `name` if given) and returns its wire form.
    pub(crate) fn issue(&self, name: Option<&str>) -> Vec<u8> {
        let mut secret = [0u8; SECRET_LEN];
        fill_random(&mut secret);
        let mut keys = self.keys.lock().unwrap();
        // A 64-bit random id collides with a live one with negligible probability;
        // drawing again keeps that from ever replacing a key.
        let id = loop {
            let mut id = [0u8; KEY_ID_LEN];
            fill_random(&mut id);
            if !keys.map.contains_key(&id) {
                break id;
            }
        };
        let (revoked, _) = watch::channel(());
        keys.map.insert(
            id,
            Entry {
                hmac: hmac::Key::new(hmac::HMAC_SHA256, &secret),
                bound_name: name.map(str::to_string),
                revoked,
            },
        );
        keys.order.push_back(id);
        while keys.map.len() > MAX_KEYS {
            let Some(old) = keys.order.pop_front() else { break };
            if keys.map.remove(&old).is_some() {
                keys.evicted += 1;
                tracing::warn!(
                    evicted_total = keys.evicted,
                    max_keys = MAX_KEYS,
                    "data-plane key table full: evicted the oldest key (its connections close)"
                );
            }
        }
        let mut wire = Vec::with_capacity(KEY_WIRE_LEN);
        wire.extend_from_slice(&KEY_MAGIC);
        wire.extend_from_slice(&id);
        wire.extend_from_slice(&secret);
        wire
    }

    /// Binds a live key to `name` (see [`crate::Agent::bind_key`]); false if the key is
    /// malformed or not here.
    pub(crate) fn bind(&self, key: &[u8], name: &str) -> bool {
        let Ok(k) = PeerKey::decode(key) else { return false };
        match self.keys.lock().unwrap().map.get_mut(&k.id) {
            Some(e) => {
                e.bound_name = Some(name.to_string());
                true
            }
            None => false,
        }
    }

    /// Forgets a key; connections that authenticated with it close. Returns whether
    /// the key was there. A malformed key names nothing and is ignored.
    pub(crate) fn revoke(&self, key: &[u8]) -> bool {
        let Ok(k) = PeerKey::decode(key) else {
            tracing::debug!(len = key.len(), "revoke_key: not a data-plane key, nothing revoked");
            return false;
        };
        let mut keys = self.keys.lock().unwrap();
        // Dropping the entry drops its watch sender: the connections see it.
        let found = keys.map.remove(&k.id).is_some();
        if found {
            keys.order.retain(|id| *id != k.id);
        }
        found
    }

    /// The key with this id, if it is live, and a receiver that sees its revocation
    /// (taken under the table's lock, so a revocation cannot slip in between).
    pub(crate) fn lookup(&self, id: &KeyId) -> Option<Granted> {
        let keys = self.keys.lock().unwrap();
        keys.map.get(id).map(|e| Granted {
            hmac: e.hmac.clone(),
            bound_name: e.bound_name.clone(),
            revoked: e.revoked.subscribe(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.lock().unwrap().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_revoke() {
        let t = KeyTable::default();
        let wire = t.issue(None);
        let k = PeerKey::decode(&wire).unwrap();
        let g = t.lookup(&k.id).expect("issued key is live");
        let nonce = nonce();
        let msg = auth_message(&nonce, &k.id, b"agent");
        let tag = hmac::sign(&k.hmac, &msg);
        hmac::verify(&g.hmac, &msg, tag.as_ref()).unwrap();
        assert!(g.revoked.has_changed().is_ok(), "not revoked yet");
        assert!(t.revoke(&wire));
        assert!(g.revoked.has_changed().is_err(), "revocation is seen");
        assert!(t.lookup(&k.id).is_none());
        assert!(!t.revoke(&wire));
        assert!(!t.revoke(b"garbage"));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let t = KeyTable::default();
        let wire = t.issue(Some("x"));
        assert!(PeerKey::decode(&wire[..wire.len() - 1]).is_err());
        let mut more = wire.clone();
        more.push(0);
        assert!(PeerKey::decode(&more).is_err());
        let mut magic = wire.clone();
        magic[0] ^= 1;
        assert!(PeerKey::decode(&magic).is_err());
        assert!(PeerKey::decode(&[]).is_err());
    }

    #[test]
    fn table_is_bounded_oldest_evicted() {
        let t = KeyTable::default();
        let first = t.issue(None);
        let first_id = PeerKey::decode(&first).unwrap().id;
        let g = t.lookup(&first_id).unwrap();
        let mut last = Vec::new();
        for _ in 0..MAX_KEYS {
            last = t.issue(None);
        }
        assert_eq!(t.len(), MAX_KEYS);
        assert!(t.lookup(&first_id).is_none(), "the oldest key was evicted");
        assert!(g.revoked.has_changed().is_err(), "its connections see it gone");
        assert!(t.lookup(&PeerKey::decode(&last).unwrap().id).is_some());
    }

    #[test]
    fn random_tags_are_nonzero_and_distinct() {
        let tags: std::collections::HashSet<u64> = (0..10_000).map(|_| random_tag()).collect();
        assert_eq!(tags.len(), 10_000);
        assert!(!tags.contains(&0));
    }
}
