//! The decode-server's configuration (`decode-server.toml`, `PDSERVE_` overrides).

use daemon::config::Validate;
use engine::EngineConfig;
use kv_transfer::TransferConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeConfig {
    /// gRPC address to serve on (client API and health).
    pub listen: String,
    /// OpenAI-compatible HTTP address for a one-node setup, host:port (empty: off).
    pub http_listen: String,
    /// The model name the HTTP API serves (empty: the model directory's name).
    pub served_model_name: String,
    /// Prometheus `/metrics` address, host:port (empty: no metrics endpoint).
    pub metrics_listen: String,
    /// TLS and mutual TLS on the gRPC port and to peers (see configs/README.md).
    pub tls: daemon::tls::TlsConfig,
    /// Bearer token the client API requires (empty: none).
    pub auth_token: String,
    /// The cluster's shared secret: required on DecodeAdmin, sent to prefill-servers.
    pub internal_token: String,
    /// Serve the internal API without credentials on a non-loopback address.
    pub allow_insecure_internal: bool,
    pub engine: EngineConfig,
    pub transfer: TransferConfig,
    /// Prefill-servers, as `http://host:port`. Empty: prefill locally.
    pub prefill_servers: Vec<String>,
    /// Prompts shorter than this many tokens are prefilled here (no transfer); 0: never.
    pub local_prefill_below: usize,
    /// The longest prompt prefilled here when the caller asks (the router's `local`
    /// hint, its conditional disaggregation): a client holding the client token cannot
    /// push longer prompts onto the decode GPU.
    pub max_local_prefill_tokens: usize,
    /// Most sequences decoded in one step.
    pub max_batch: usize,
    /// `on_demand`: a request takes KV blocks for its prompt at admission and more as it
    /// grows; when the pool runs out, the newest sequences are preempted (blocks taken
    /// back, KV recomputed when they resume), as vLLM does. `reserve`: blocks for the
    /// prompt and all of `max_tokens` at admission (no preemption, fewer sequences).
    pub kv_allocation: String,
    /// Most positions of a preempted sequence's KV recomputed between two decode steps.
    pub resume_chunk_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: u32,
    /// Longest prompt, in tokens (0: the model's maximum).
    pub max_prompt_tokens: usize,
    /// How long a request may wait for KV blocks before RESOURCE_EXHAUSTED.
    pub queue_deadline_ms: u64,
    /// Most requests waiting in line for KV blocks; past it, RESOURCE_EXHAUSTED at once.
    pub max_waiting: usize,
    /// Deadline of a prefill call, KV transfer included.
    pub prefill_deadline_ms: u64,
    /// How often unreachable prefill-servers are retried.
    pub handshake_interval_ms: u64,
    /// On SIGTERM, how long in-flight requests may take before they are cancelled.
    pub drain_deadline_ms: u64,
    /// Service discovery on etcd (off unless `etcd` is set): registers this
    /// decode-server and follows the prefill-servers registered (see configs/README.md).
    pub discovery: discovery::DiscoveryConfig,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            listen: "127.0.0.1:50051".into(),
            http_listen: String::new(),
            served_model_name: String::new(),
            metrics_listen: String::new(),
            tls: Default::default(),
            auth_token: String::new(),
            internal_token: String::new(),
            allow_insecure_internal: false,
            engine: EngineConfig::default(),
            transfer: TransferConfig::default(),
            prefill_servers: vec!["http://127.0.0.1:50061".into()],
            local_prefill_below: 0,
            max_local_prefill_tokens: 1024,
            max_batch: 32,
            kv_allocation: "on_demand".into(),
            resume_chunk_tokens: 512,
            max_tokens_limit: 4096,
            max_prompt_tokens: 0,
            queue_deadline_ms: 30_000,
            max_waiting: 256,
            prefill_deadline_ms: 60_000,
            handshake_interval_ms: 1_000,
            drain_deadline_ms: 30_000,
            discovery: Default::default(),
        }
    }
}

impl DecodeConfig {
    /// Whether blocks for all of `max_tokens` are reserved at admission.
    pub fn reserves(&self) -> bool {
        self.kv_allocation == "reserve"
    }

    /// Positions a request's blocks must cover at admission: the prompt and its first
    /// token, or with `reserve` its whole output too.
    pub fn admit_tokens(&self, prompt_len: usize, max_tokens: u32) -> usize {
        if self.reserves() {
            prompt_len + max_tokens as usize
        } else {
            prompt_len + 1
        }
    }

    /// The prefill-servers listed in the config: with discovery on, the built-in default
    /// (one on this host) is not one of them (the members come from etcd).
    pub fn static_prefill_servers(&self) -> &[String] {
        if self.discovery.enabled() && self.prefill_servers == DecodeConfig::default().prefill_servers {
            return &[];
        }
        &self.prefill_servers
    }
}

impl Validate for DecodeConfig {
    fn validate(&self) -> Result<(), String> {
        daemon::config::check_listen(&self.tls, &self.listen, &self.http_listen)?;
        self.discovery
            .check_daemon(&self.listen, self.tls.cert.is_some(), &self.internal_token)?;
        for p in &self.prefill_servers {
            if !(p.starts_with("http://") || p.starts_with("https://")) {
                return Err(format!("prefill_servers: {p:?} must be a URL like http://host:port"));
            }
        }
        if !matches!(self.kv_allocation.as_str(), "on_demand" | "reserve") {
            return Err(format!("kv_allocation {:?} is not on_demand or reserve", self.kv_allocation));
        }
        if self.max_batch == 0 || self.max_tokens_limit == 0 || self.max_waiting == 0 || self.resume_chunk_tokens == 0 {
            return Err("max_batch, max_tokens_limit, max_waiting and resume_chunk_tokens must be at least 1".into());
        }
        if self.queue_deadline_ms == 0 || self.prefill_deadline_ms == 0 {
            return Err("queue_deadline_ms and prefill_deadline_ms must be positive".into());
        }
        daemon::auth::check_exposure(&self.listen, &self.internal_token, &self.tls, self.allow_insecure_internal)
    }
}
