//! The `[discovery]` section every daemon's config has.
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{DiscoveryError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// etcd endpoints, as `http://host:2379` (`https://` with `ca_file`). Empty: no
    /// discovery (the static peer lists only).
    pub etcd: Vec<String>,
    /// The cluster's name: daemons see only members of their own cluster.
    pub cluster: String,
    /// This daemon's id in the cluster (empty: from its advertised host and port).
    pub id: String,
    /// The gRPC URL peers reach this daemon at (empty: `http(s)://` + `listen`, which
    /// must then name a host, not 0.0.0.0).
    pub advertise_url: String,
    /// The lease's time to live: a daemon that dies is dropped this long after its
    /// last keep-alive.
    pub lease_ttl_s: u64,
    /// After deleting its key on SIGTERM, how long a daemon keeps taking requests, so
    /// every watcher has dropped it before it stops accepting.
    pub deregister_grace_ms: u64,
    /// Deadline of each call to etcd, and of connecting.
    pub timeout_ms: u64,
    /// The cluster's model, as `pdserve cluster ls` prints it (hex). Set: a daemon
    /// whose model differs refuses to start, and routers ignore members that differ.
    /// Empty: routers take the model of the longest-registered decode-server.
    pub model_fingerprint: String,
    /// Without an `internal_token`, follow records nobody sealed (anyone who can write
    /// to etcd then adds members). Off: a daemon with discovery and no token refuses to
    /// start.
    pub allow_unsealed: bool,
    /// etcd authentication (empty: none).
    pub username: String,
    pub password: String,
    /// TLS to etcd: the CA that signed its certificate, and our client certificate and
    /// key when etcd requires them (`--client-cert-auth`).
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            etcd: vec![],
            cluster: "default".into(),
            id: String::new(),
            advertise_url: String::new(),
            lease_ttl_s: 5,
            deregister_grace_ms: 1_000,
            timeout_ms: 1_500,
            model_fingerprint: String::new(),
            allow_unsealed: false,
            username: String::new(),
            password: String::new(),
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
        }
    }
}

impl DiscoveryConfig {
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The prefix every member of the cluster is under.
    pub fn prefix(&self) -> String {
        format!("/pdserve/{}/", self.cluster)
    }

    /// The pinned model fingerprint, if any.
    pub fn pinned_model(&self) -> Option<u64> {
        let s = self.model_fingerprint.trim_start_matches("0x");
        (!s.is_empty()).then(|| u64::from_str_radix(s, 16).ok()).flatten()
    }

    /// The URL peers reach a daemon serving on `listen` at (`tls`: https).
    pub fn advertised(&self, listen: &str, tls: bool) -> Result<String> {
        if !self.advertise_url.is_empty() {
            return Ok(self.advertise_url.clone());
        }
        let addr: std::net::SocketAddr = listen
            .parse()
            .map_err(|_| DiscoveryError::Config(format!("listen {listen:?} is not host:port")))?;
        if addr.ip().is_unspecified() {
            return Err(DiscoveryError::Config(format!(
                "listen {listen} names no host peers can reach: set discovery.advertise_url"
            )));
        }
        Ok(format!("{}://{addr}", if tls { "https" } else { "http" }))
    }

    /// This daemon's id: the configured one, or the advertised URL's host and port.
    pub fn member_id(&self, url: &str) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let hostport = url.split("://").nth(1).unwrap_or(url);
        hostport
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        for e in &self.etcd {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!("discovery.etcd: {e:?} must be a URL like http://host:2379"));
            }
        }
        let name_ok = |s: &str| !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok(&self.cluster) {
            return Err("discovery.cluster: 1-128 letters, digits, '-', '_' or '.'".into());
        }
        if !self.id.is_empty() && !name_ok(&self.id) {
            return Err("discovery.id: 1-128 letters, digits, '-', '_' or '.'".into());
        }
        if !(2..=300).contains(&self.lease_ttl_s) {
            return Err("discovery.lease_ttl_s must be within 2..=300".into());
        }
        // A keep-alive round (refresh, answer, read-back) must fit in a third of the lease.
        if self.timeout_ms == 0 || self.timeout_ms * 3 > self.lease_ttl_s * 1000 {
            return Err("discovery.timeout_ms must be positive and at most a third of lease_ttl_s".into());
        }
        let tls = !self.ca_file.as_os_str().is_empty();
        if self.etcd.iter().any(|e| e.starts_with("https://") != tls) {
            return Err("discovery.etcd: https:// endpoints need ca_file, and ca_file needs https:// endpoints".into());
        }
        let url = &self.advertise_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "discovery.advertise_url {:?} must be http:// or https://",
                self.advertise_url
            ));
        }
        if !self.model_fingerprint.is_empty() && self.pinned_model().is_none() {
            return Err(format!("discovery.model_fingerprint {:?} is not hex", self.model_fingerprint));
        }
        if self.cert_file.as_os_str().is_empty() != self.key_file.as_os_str().is_empty() {
            return Err("discovery.cert_file and key_file go together".into());
        }
        Ok(())
    }

    /// The checks a registering daemon adds: a URL peers can reach it at, and the
    /// token its record is sealed with (or the explicit opt-out).
    pub fn check_daemon(&self, listen: &str, tls: bool, internal_token: &str) -> std::result::Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        self.validate()?;
        let url = self.advertised(listen, tls).map_err(|e| e.to_string())?;
        let id = self.member_id(&url);
        if id.is_empty() || id.len() > 128 {
            return Err(format!(
                "discovery: the id {id:?} (from advertise_url) must be 1-128 characters: set discovery.id"
            ));
        }
        if internal_token.is_empty() && !self.allow_unsealed {
            return Err(
                "discovery needs internal_token: records are sealed with it, and a record without a seal could \
                        point this cluster at anyone's daemon (discovery.allow_unsealed = true accepts that, e.g. with mTLS)"
                    .into(),
            );
        }
        Ok(())
    }

    /// A connected etcd client (the endpoints are tried in turn).
    pub async fn connect(&self) -> Result<etcd_client::Client> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.timeout())
            .with_timeout(self.timeout())
            // A hung etcd (or a partition) shows as a failed ping: the watch fails over
            // instead of waiting forever. etcd closes connections that ping more often
            // than every 5 s (`--grpc-keepalive-min-time`), hence 6 s.
            .with_keep_alive(Duration::from_secs(6), self.timeout())
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster's quorum must not serve a silent watch.
            .with_require_leader(true);
        if !self.username.is_empty() {
            opts = opts.with_user(&self.username, &self.password).with_auto_token_refresh(true);
        }
        if !self.ca_file.as_os_str().is_empty() {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| DiscoveryError::Config(format!("{}: {e}", p.display())));
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca_file)?));
            if !self.cert_file.as_os_str().is_empty() {
                tls = tls.identity(etcd_client::Identity::from_pem(read(&self.cert_file)?, read(&self.key_file)?));
            }
            opts = opts.with_tls(tls);
        }
        crate::within(self.timeout(), etcd_client::Client::connect(&self.etcd, Some(opts))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_urls_come_from_listen() {
        let c = DiscoveryConfig {
            etcd: vec!["http://127.0.0.1:2379".into()],
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        let url = c.advertised("10.0.0.5:50061", false).unwrap();
        assert_eq!(url, "http://10.0.0.5:50061");
        assert_eq!(c.member_id(&url), "10.0.0.5_50061");
        assert!(
            c.advertised("0.0.0.0:50061", false)
                .unwrap_err()
                .to_string()
                .contains("advertise_url")
        );
        let bad = DiscoveryConfig {
            cluster: "a/b".into(),
            ..c.clone()
        };
        assert!(bad.validate().is_err(), "a cluster name may not escape its prefix");
        let pinned = DiscoveryConfig {
            model_fingerprint: "0xdeadbeef".into(),
            ..c
        };
        assert_eq!(pinned.pinned_model(), Some(0xdead_beef));
    }
}
