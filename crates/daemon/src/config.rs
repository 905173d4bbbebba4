//! Loading a daemon's config: its defaults, then the TOML file, then `PDSERVE_`
//! environment variables (`PDSERVE_TRANSFER__BACKEND=ucx` sets `transfer.backend`),
//! then the daemon's own checks. Any problem names the key and the reason.
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// A daemon config's own checks, after loading.
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
}

/// The `PDSERVE_*` variables that name a top-level key of `T`: the other daemons'
/// keys and our non-config variables (`PDSERVE_CONFIG`, `PDSERVE_NIXL_LIB_DIR`, ...)
/// are left alone, so one environment can serve several daemons.
fn own_env<T: Serialize + Default>() -> config::Map<String, String> {
    let keys: Vec<String> = match config::Config::try_from(&T::default()).ok().and_then(|c| c.cache.into_table().ok()) {
        Some(t) => t.into_keys().collect(),
        None => return Default::default(),
    };
    std::env::vars()
        .filter(|(k, _)| {
            k.strip_prefix("PDSERVE_").is_some_and(|rest| {
                let first = rest.split("__").next().unwrap_or_default().to_ascii_lowercase();
                keys.contains(&first)
            })
        })
        .collect()
}

pub fn load_config<T>(path: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    let defaults = config::Config::try_from(&T::default()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let mut b = config::Config::builder().add_source(defaults);
    if let Some(p) = path {
        if !p.exists() {
            return Err(ConfigError::File {
                path: p.display().to_string(),
                reason: "not found".into(),
            });
        }
        b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
    }
    b = b.add_source(
        config::Environment::with_prefix("PDSERVE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("prefill_servers")
            .with_list_parse_key("decode_servers")
            .with_list_parse_key("discovery.etcd")
            .source(Some(own_env::<T>())),
    );
    let built = b.build().map_err(|e| match path {
        Some(p) => ConfigError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        },
        None => ConfigError::Invalid(e.to_string()),
    })?;
    let cfg: T = built.try_deserialize().map_err(|e| ConfigError::Invalid(e.to_string()))?;
    cfg.validate().map_err(ConfigError::Invalid)?;
    Ok(cfg)
}

/// The checks every daemon's front makes: its TLS settings, `listen` and (when set)
/// `http_listen` as host:port.
pub fn check_listen(tls: &crate::tls::TlsConfig, listen: &str, http_listen: &str) -> Result<(), String> {
    tls.validate().map_err(|e| e.to_string())?;
    for (key, addr) in [("listen", listen), ("http_listen", http_listen)] {
        if key == "listen" || !addr.is_empty() {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| format!("{key}: {addr:?} is not host:port ({e})"))?;
        }
    }
    Ok(())
}
