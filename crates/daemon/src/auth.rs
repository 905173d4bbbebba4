//! Who may call what. The client API (`Generation`) takes the client token
//! (`auth_token`); the internal services (`Prefill`, `DecodeAdmin`) take the cluster's
//! internal token (`internal_token`, one secret shared by every daemon) or an mTLS
//! client certificate. Health and reflection stay open (load balancers and `grpcurl`).
//! Checks run in interceptors, before a request's body is decoded or any handler runs.
use std::net::SocketAddr;

use tonic::{Request, Status};

use crate::tls::TlsConfig;

/// A bearer token (`authorization: Bearer <token>`); empty lets all in.
#[derive(Clone)]
pub struct BearerToken(Option<String>);

impl BearerToken {
    pub fn new(token: &str) -> BearerToken {
        BearerToken((!token.is_empty()).then(|| format!("Bearer {token}")))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Adds our token to an outgoing request.
    pub fn attach<T>(&self, req: &mut Request<T>) {
        if let Some(v) = &self.0
            && let Ok(v) = v.parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
    }

    /// Whether an `authorization` value passes: this token exactly, or anything when
    /// none is set (the HTTP API's check too).
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        match (&self.0, authorization) {
            (None, _) => true,
            // Every byte compared, whatever the first difference: no timing hint.
            (Some(want), Some(got)) => got.len() == want.len() && got.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0,
            (Some(_), None) => false,
        }
    }

    /// Whether `req` carries exactly this token (false when none is set).
    fn matches<T>(&self, req: &Request<T>) -> bool {
        self.0.is_some() && self.accepts(req.metadata().get("authorization").and_then(|v| v.to_str().ok()))
    }
}

/// The client API's check.
impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.0.is_none() || self.matches(&req) {
            return Ok(req);
        }
        Err(match req.metadata().get("authorization") {
            Some(_) => Status::unauthenticated("wrong bearer token"),
            None => Status::unauthenticated("this API needs `authorization: Bearer <token>`"),
        })
    }
}

/// Puts a token on every call of a client (the internal token on the decode-server's
/// and the router's calls to prefill-servers).
#[derive(Clone)]
pub struct Attach(pub BearerToken);

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        self.0.attach(&mut req);
        Ok(req)
    }
}

/// A prefill-server client that carries the internal token.
pub type PrefillClient =
    proto::v1::prefill_client::PrefillClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Attach>>;

/// `channel` as a prefill-server client with `internal_token` on every call.
pub fn prefill_client(channel: tonic::transport::Channel, internal_token: &str) -> PrefillClient {
    proto::v1::prefill_client::PrefillClient::with_interceptor(channel, Attach(BearerToken::new(internal_token)))
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
}

/// The internal services' check: the internal token, or a client certificate that the
/// TLS layer verified against `tls.client_ca`. With neither configured, open (allowed
/// only on loopback or with `allow_insecure_internal`: see [`check_exposure`]).
#[derive(Clone)]
pub struct InternalAuth {
    token: BearerToken,
    mtls: bool,
}

impl InternalAuth {
    pub fn new(internal_token: &str, tls: &TlsConfig) -> InternalAuth {
        InternalAuth {
            token: BearerToken::new(internal_token),
            mtls: tls.client_ca.is_some(),
        }
    }

    fn open(&self) -> bool {
        !self.token.is_set() && !self.mtls
    }
}

impl tonic::service::Interceptor for InternalAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.open() || self.token.matches(&req) {
            return Ok(req);
        }
        if self.mtls && req.peer_certs().is_some_and(|c| !c.is_empty()) {
            return Ok(req);
        }
        Err(Status::unauthenticated(
            "this internal API needs the cluster's internal token (`authorization: Bearer <internal_token>`) or an mTLS client certificate",
        ))
    }
}

/// Refuses (at config load) a daemon whose internal services would be reachable from
/// other hosts with no credentials, unless the operator said so explicitly.
pub fn check_exposure(listen: &str, internal_token: &str, tls: &TlsConfig, allow_insecure: bool) -> Result<(), String> {
    let Ok(addr) = listen.parse::<SocketAddr>() else {
        return Ok(()); // the listen check reports it
    };
    if addr.ip().is_loopback() || !internal_token.is_empty() || tls.client_ca.is_some() || allow_insecure {
        return Ok(());
    }
    Err(format!(
        "listen = {listen:?} is reachable from other hosts, but the internal API (Prefill, DecodeAdmin) has no credentials: \
         set internal_token (PDSERVE_INTERNAL_TOKEN, the same secret in every daemon) or mutual TLS (tls.client_ca); \
         allow_insecure_internal = true runs it open anyway"
    ))
}

/// Logs the warning an explicitly open internal API deserves, at start-up.
pub fn warn_if_open(listen: &str, internal_token: &str, tls: &TlsConfig) {
    let exposed = listen.parse::<SocketAddr>().is_ok_and(|a| !a.ip().is_loopback());
    if exposed && internal_token.is_empty() && tls.client_ca.is_none() {
        tracing::warn!(%listen, "allow_insecure_internal: the internal API is open to anyone who reaches this port");
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    fn with(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_are_checked_exactly() {
        let mut client = BearerToken::new("c");
        assert!(client.call(with(Some("Bearer c"))).is_ok());
        for bad in [None, Some("Bearer"), Some("Bearer cc"), Some("bearer c"), Some("Bearer d")] {
            assert_eq!(client.call(with(bad)).unwrap_err().code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(BearerToken::new("").call(with(None)).is_ok());
        let mut internal = InternalAuth::new("i", &TlsConfig::default());
        assert!(internal.call(with(Some("Bearer i"))).is_ok());
        // The client token is no internal credential.
        assert_eq!(
            internal.call(with(Some("Bearer c"))).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(internal.call(with(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(InternalAuth::new("", &TlsConfig::default()).call(with(None)).is_ok());
    }

    #[test]
    fn exposure_needs_credentials_or_consent() {
        let tls = TlsConfig::default();
        assert!(check_exposure("127.0.0.1:1", "", &tls, false).is_ok());
        assert!(check_exposure("[::1]:1", "", &tls, false).is_ok());
        let e = check_exposure("0.0.0.0:1", "", &tls, false).unwrap_err();
        assert!(e.contains("internal_token") && e.contains("allow_insecure_internal"), "{e}");
        assert!(check_exposure("0.0.0.0:1", "t", &tls, false).is_ok());
        assert!(check_exposure("0.0.0.0:1", "", &tls, true).is_ok());
        let mtls = TlsConfig {
            client_ca: Some("/ca.pem".into()),
            ..Default::default()
        };
        assert!(check_exposure("10.0.0.1:1", "", &mtls, false).is_ok());
    }
}
