//! How the command line reaches a router or decode-server: plaintext or TLS (`https://`
//! URLs, with `--ca` and, for mutual TLS, `--cert`/`--key`), and the bearer token.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use proto::v1 as pb;
use tonic::transport::{Channel, Identity};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// CA bundle (PEM) that signed the server's certificate, for https:// URLs.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require mutual TLS.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Name to verify in the server's certificate, when it differs from the URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Bearer token for servers with `auth_token` set.
    #[arg(long, env = "PDSERVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientArgs {
    pub async fn connect(&self, url: &str) -> anyhow::Result<pb::generation_client::GenerationClient<Channel>> {
        let mut ep = tonic::transport::Endpoint::from_shared(url.to_string())
            .with_context(|| format!("{url:?} is not a URL"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let identity = match (&self.cert, &self.key) {
                (Some(c), Some(k)) => Some(Identity::from_pem(
                    std::fs::read(c).with_context(|| format!("--cert {}", c.display()))?,
                    std::fs::read(k).with_context(|| format!("--key {}", k.display()))?,
                )),
                _ => None,
            };
            ep = ep.tls_config(daemon::tls::client_tls(self.ca.as_deref(), identity, self.tls_domain.as_deref())?)?;
        }
        let ch = ep.connect().await.with_context(|| format!("connecting to {url}"))?;
        Ok(pb::generation_client::GenerationClient::new(ch).max_decoding_message_size(daemon::MAX_MESSAGE_BYTES))
    }

    /// `msg` as a request carrying the token, if any.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        daemon::auth::BearerToken::new(self.token.as_deref().unwrap_or("")).attach(&mut r);
        r
    }
}
