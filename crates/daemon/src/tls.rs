//! TLS on the gRPC ports (rustls through tonic) and mutual TLS between the daemons.
//! Off unless configured: `[tls]` in each daemon's config. Tokens: [`crate::auth`].
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// `[tls]`: PEM files. With `cert` and `key` the daemon serves TLS; with `client_ca` it
/// also requires clients (the other daemons) to present a certificate signed by it.
/// `ca` verifies the `https://` peers this daemon calls, and `cert`/`key` are then its
/// client certificate too.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// Name to verify in the peers' certificates when it differs from the URL's host.
    pub domain: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key}: cannot read {path}: {err}")]
    Read {
        key: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("tls: `cert` and `key` go together; give both or neither")]
    HalfIdentity,
    #[error("tls.client_ca needs cert and key: mutual TLS is on top of TLS")]
    ClientCaWithoutIdentity,
    #[error("tls: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0:?} is not a URL: {1}")]
    Url(String, String),
}

fn pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Read {
        key,
        path: path.to_path_buf(),
        err,
    })
}

impl TlsConfig {
    fn identity(&self) -> Result<Option<Identity>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some(Identity::from_pem(pem("cert", c)?, pem("key", k)?))),
            (None, None) => Ok(None),
            _ => Err(TlsError::HalfIdentity),
        }
    }

    /// Checks that the files exist and pair up (at config load, before serving).
    pub fn validate(&self) -> Result<(), TlsError> {
        self.identity()?;
        if self.client_ca.is_some() && self.cert.is_none() {
            return Err(TlsError::ClientCaWithoutIdentity);
        }
        for (key, p) in [("client_ca", &self.client_ca), ("ca", &self.ca)] {
            if let Some(p) = p {
                pem(key, p)?;
            }
        }
        Ok(())
    }

    /// The server builder, with TLS when configured.
    pub fn server(&self) -> Result<Server, TlsError> {
        // Pings find a peer behind a dead link (partition, pulled cable, a host gone
        // without a reset) in seconds, not TCP's minutes: its calls end, and with them
        // their waits and blocks.
        let builder = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
        let Some(id) = self.identity()? else {
            return Ok(builder);
        };
        let mut tls = ServerTlsConfig::new().identity(id);
        if let Some(ca) = &self.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(pem("client_ca", ca)?));
        }
        Ok(builder.tls_config(tls)?)
    }

    /// An endpoint for `url`; `https://` URLs get TLS with our CA and client certificate.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| TlsError::Url(url.into(), e.to_string()))?
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if !url.starts_with("https://") {
            return Ok(ep);
        }
        Ok(ep.tls_config(client_tls(self.ca.as_deref(), self.identity()?, self.domain.as_deref())?)?)
    }
}

/// How often every gRPC connection between daemons (and to clients) is pinged, and how
/// long an unanswered ping may take before the connection counts as dead.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Client TLS: trust `ca`, present `identity` if any.
pub fn client_tls(ca: Option<&Path>, identity: Option<Identity>, domain: Option<&str>) -> Result<ClientTlsConfig, TlsError> {
    let mut tls = ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(pem("ca", ca)?)),
        // No roots are built in: an https peer needs `ca`.
        None => tls.with_enabled_roots(),
    };
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    if let Some(d) = domain {
        tls = tls.domain_name(d);
    }
    Ok(tls)
}
