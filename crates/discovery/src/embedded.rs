//! An etcd of one member, started from the system's `etcd` binary (Debian's
//! `etcd-server`): for trying discovery on one machine (`pdserve up --discovery etcd`)
//! and for the tests. Production runs etcd itself (see deploy/README.md).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{DiscoveryConfig, DiscoveryError, Result};

/// A running etcd; killed when dropped.
pub struct EmbeddedEtcd {
    child: Child,
    pub url: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    bind: String,
}

impl EmbeddedEtcd {
    /// Starts etcd on `bind` (an address of this host) with its data under `dir`, and
    /// waits (up to 20 s) until it answers.
    pub async fn start(dir: &Path, bind: &str, client_port: u16, peer_port: u16) -> Result<EmbeddedEtcd> {
        std::fs::create_dir_all(dir).map_err(|e| DiscoveryError::Config(format!("{}: {e}", dir.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))
            .map_err(|e| DiscoveryError::Config(format!("etcd log: {e}")))?;
        let client = format!("http://{bind}:{client_port}");
        let peer = format!("http://{bind}:{peer_port}");
        let child = Command::new(std::env::var_os("PDSERVE_ETCD_BIN").unwrap_or_else(|| "etcd".into()))
            .args(["--name", "pdserve", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("pdserve={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| DiscoveryError::Config(format!("cannot start etcd (install Debian's etcd-server): {e}")))?;
        let etcd = EmbeddedEtcd {
            child,
            url: client,
            dir: dir.to_path_buf(),
            client_port,
            peer_port,
            bind: bind.to_string(),
        };
        etcd.wait_ready().await?;
        Ok(etcd)
    }

    async fn wait_ready(&self) -> Result<()> {
        let cfg = DiscoveryConfig {
            etcd: vec![self.url.clone()],
            ..Default::default()
        };
        let t = Instant::now();
        loop {
            if let Ok(mut c) = cfg.connect().await
                && crate::within(cfg.timeout(), c.status()).await.is_ok()
            {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(20) {
                return Err(DiscoveryError::Config(format!(
                    "etcd at {} did not answer within 20 s (see {})",
                    self.url,
                    self.dir.join("etcd.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its process id (a test pauses it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL), keeping its data: [`EmbeddedEtcd::restart`] brings it back
    /// with the same keys and leases.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let again = EmbeddedEtcd::start(&self.dir, &self.bind, self.client_port, self.peer_port).await?;
        *self = again;
        Ok(())
    }
}

impl Drop for EmbeddedEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
