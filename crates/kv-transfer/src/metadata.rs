//! What one agent tells a peer about itself: exported as opaque bytes, carried by
//! the daemons' gRPC handshake, and checked hard on the way in (garbage, truncation,
//! another backend or version are refused with a reason).
use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TransferError};
use crate::{BackendKind, MemKind};

const MAGIC: [u8; 8] = *b"PDSKVMD\x01";
/// Bumped whenever the wire form changes, of the metadata or of what the backends
/// send (v2: TCP AUTH frames, the sender's name in UCX notifications).
pub const METADATA_VERSION: u32 = 2;
/// Metadata larger than this is refused before decoding (a KV pool set is a few KiB).
const MAX_METADATA: u64 = 16 << 20;

/// One registered region as the peer sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegionInfo {
    pub id: u32,
    pub addr: u64,
    pub len: u64,
    pub kind: MemKind,
    /// Backend-specific key material (UCX: the packed rkey).
    pub key: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub magic: [u8; 8],
    pub version: u32,
    pub backend: BackendKind,
    pub agent: String,
    pub regions: Vec<RegionInfo>,
    /// Backend-specific connection material (UCX worker address, NIXL agent
    /// metadata, TCP listen address).
    pub conn: Vec<u8>,
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_METADATA).reject_trailing_bytes()
}

impl Metadata {
    pub fn new(backend: BackendKind, agent: String, regions: Vec<RegionInfo>, conn: Vec<u8>) -> Self {
        Metadata {
            magic: MAGIC,
            version: METADATA_VERSION,
            backend,
            agent,
            regions,
            conn,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        codec().serialize(self).expect("metadata serialises")
    }

    /// Decodes and validates a peer's metadata for a local agent of backend `ours`.
    pub fn decode(bytes: &[u8], ours: BackendKind) -> Result<Self> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(TransferError::BadMetadata(
                "not pdserve data-plane metadata (magic mismatch)".into(),
            ));
        }
        let md: Metadata = codec()
            .deserialize(bytes)
            .map_err(|e| TransferError::BadMetadata(format!("undecodable ({e})")))?;
        if md.version != METADATA_VERSION {
            return Err(TransferError::Incompatible(format!(
                "peer {} speaks data-plane metadata v{}, we speak v{METADATA_VERSION}",
                md.agent, md.version
            )));
        }
        if md.backend != ours {
            return Err(TransferError::Incompatible(format!(
                "peer {} uses the {} backend, this agent uses {ours}",
                md.agent, md.backend
            )));
        }
        for r in &md.regions {
            if r.len == 0 || r.addr.checked_add(r.len).is_none() {
                return Err(TransferError::BadMetadata(format!("region {} has an impossible range", r.id)));
            }
        }
        Ok(md)
    }
}
