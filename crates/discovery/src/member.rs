//! What a daemon says about itself in etcd (a JSON value under its key).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Prefill,
    Decode,
    Router,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Router => "router",
        }
    }

    fn from_name(s: &str) -> Option<Role> {
        [Role::Prefill, Role::Decode, Role::Router].into_iter().find(|r| r.name() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub role: Role,
    /// gRPC URL (the one both the router and the decode-servers name it by).
    pub url: String,
    /// OpenAI HTTP API and Prometheus addresses, host:port (empty: none).
    #[serde(default)]
    pub http: String,
    #[serde(default)]
    pub metrics: String,
    /// The KV cache's layout, model fingerprint included (None: a router).
    #[serde(default)]
    pub layout: Option<engine::KvLayout>,
    /// Data-plane backend (nixl, ucx, tcp) and device (cpu, cuda:N).
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub device: String,
    /// Capacity: KV blocks in the pool, most sequences decoded at once.
    #[serde(default)]
    pub kv_blocks: u64,
    #[serde(default)]
    pub max_batch: u64,
    #[serde(default)]
    pub version: String,
    /// When the daemon started, seconds since the Unix epoch.
    #[serde(default)]
    pub started_unix: u64,
    /// HMAC-SHA256 of the record (this field empty) under the cluster's internal token,
    /// hex: whoever can write to etcd but lacks the token cannot add a member that
    /// routers and decode-servers would send requests, tokens or KV to.
    #[serde(default)]
    pub seal: String,
    /// Random per process (set by [`crate::Registration::spawn`]): tells a daemon its own
    /// earlier record from another daemon's under the same key.
    #[serde(default)]
    pub instance: String,
}

impl Member {
    /// The key it lives under.
    pub fn key(&self, prefix: &str) -> String {
        format!("{prefix}{}/{}", self.role.name(), self.id)
    }

    /// Reads a record found under `key`: None for anything malformed, or whose key does
    /// not name its role and id (a record cannot pose as another role).
    pub fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Option<Member> {
        if value.len() > crate::MAX_RECORD_BYTES {
            return None;
        }
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
        let (role, id) = rest.split_once('/')?;
        let m: Member = serde_json::from_slice(value).ok()?;
        (Role::from_name(role) == Some(m.role) && m.id == id && (m.url.starts_with("http://") || m.url.starts_with("https://")))
            .then_some(m)
    }

    /// What the seal covers: the key (so the cluster, role and id), the lease the record
    /// is put under (a copy under another lease, or under none, is not sealed), and the
    /// record itself.
    fn sealed_bytes(&self, key: &str, lease: i64) -> Vec<u8> {
        let mut m = self.clone();
        m.seal.clear();
        let mut b = format!("{key}\n{lease}\n").into_bytes();
        b.extend(serde_json::to_vec(&m).expect("a member serializes"));
        b
    }

    fn mac(secret: &str) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes())
    }

    /// Seals the record for `key` under `lease` with `secret` (the cluster's internal
    /// token; empty: none).
    pub fn seal(&mut self, secret: &str, key: &str, lease: i64) {
        self.seal.clear();
        if !secret.is_empty() {
            let tag = ring::hmac::sign(&Self::mac(secret), &self.sealed_bytes(key, lease));
            self.seal = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        }
    }

    /// Whether the record found at `key` under `lease` was sealed there with `secret`
    /// (any record, when there is no secret).
    pub fn sealed_by(&self, secret: &str, key: &str, lease: i64) -> bool {
        if secret.is_empty() {
            return true;
        }
        if self.seal.len() != 64 || !self.seal.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return false;
        }
        let Some(tag) = (0..64)
            .step_by(2)
            .map(|i| self.seal.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
        else {
            return false;
        };
        ring::hmac::verify(&Self::mac(secret), &self.sealed_bytes(key, lease), &tag).is_ok()
    }

    /// The model fingerprint (0: none, a router).
    pub fn model(&self) -> u64 {
        self.layout.as_ref().map_or(0, |l| l.model_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_must_sit_under_its_own_role_and_id() {
        let m = Member {
            id: "a".into(),
            role: Role::Prefill,
            url: "http://127.0.0.1:1".into(),
            http: String::new(),
            metrics: String::new(),
            layout: None,
            backend: "tcp".into(),
            device: "cpu".into(),
            kv_blocks: 1,
            max_batch: 1,
            version: "0".into(),
            started_unix: 0,
            seal: String::new(),
            instance: String::new(),
        };
        let v = serde_json::to_vec(&m).unwrap();
        let p = "/pdserve/c/";
        assert_eq!(Member::parse(p, m.key(p).as_bytes(), &v), Some(m.clone()));
        assert_eq!(Member::parse(p, b"/pdserve/c/decode/a", &v), None, "posing as a decode-server");
        assert_eq!(Member::parse(p, b"/pdserve/c/prefill/b", &v), None, "another id");
        assert_eq!(Member::parse(p, b"/pdserve/other/prefill/a", &v), None, "another cluster");
        assert_eq!(Member::parse(p, m.key(p).as_bytes(), b"{"), None);
        let bad = Member {
            url: "file:///etc/passwd".into(),
            ..m
        };
        assert_eq!(Member::parse(p, bad.key(p).as_bytes(), &serde_json::to_vec(&bad).unwrap()), None);
    }

    #[test]
    fn only_the_token_holder_seals_a_member() {
        let k = "/p/decode/d";
        let mut m = Member::parse("/p/", k.as_bytes(), br#"{"id":"d","role":"decode","url":"http://10.0.0.1:1"}"#).unwrap();
        assert!(m.sealed_by("", k, 7), "no token: anything goes");
        assert!(!m.sealed_by("secret", k, 7));
        m.seal("secret", k, 7);
        assert!(m.sealed_by("secret", k, 7));
        assert!(!m.sealed_by("other", k, 7));
        assert!(!m.sealed_by("secret", k, 8), "replayed under another lease");
        assert!(!m.sealed_by("secret", "/q/decode/d", 7), "copied to another cluster");
        let mut moved = m.clone();
        moved.url = "http://10.6.6.6:1".into();
        assert!(!moved.sealed_by("secret", k, 7), "a sealed record cannot be pointed elsewhere");
        moved.seal = "zz".repeat(32);
        assert!(!moved.sealed_by("secret", k, 7));
        moved.seal = "\u{e9}".repeat(32);
        assert!(!moved.sealed_by("secret", k, 7), "not hex, not a panic");
    }
}
