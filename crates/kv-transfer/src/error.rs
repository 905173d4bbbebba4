//! The data plane's one error type. The daemons map it to a gRPC status once, at
//! their service edge.
use std::time::{Duration, Instant};

use crate::BackendKind;

pub type Result<T, E = TransferError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The backend's library could not be loaded or initialised (at start, never mid-request).
    #[error("{backend} backend unavailable: {detail}")]
    Unavailable { backend: BackendKind, detail: String },
    /// A call into the backend failed.
    #[error("{backend} {op} failed: {detail}")]
    Backend {
        backend: BackendKind,
        op: &'static str,
        detail: String,
    },
    /// A write or region description that cannot be honoured (bounds, zero length, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A local region id that is not (or no longer) registered.
    #[error("local region {0} is not registered")]
    UnknownLocalRegion(u32),
    /// A remote region id that the peer's metadata does not list.
    #[error("peer {peer} has no region {region}")]
    UnknownRemoteRegion { peer: String, region: u32 },
    /// A peer id that was never connected, or was disconnected.
    #[error("unknown peer {0}")]
    UnknownPeer(String),
    /// Metadata bytes that are not pdserve data-plane metadata.
    #[error("bad peer metadata: {0}")]
    BadMetadata(String),
    /// Metadata from a peer that cannot talk to us (other backend, other version).
    #[error("incompatible peer: {0}")]
    Incompatible(String),
    /// A wait ran past its deadline.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The peer went away (connection closed or reset, endpoint error).
    #[error("peer {peer} unreachable: {detail}")]
    PeerLost { peer: String, detail: String },
    /// The agent has shut down.
    #[error("data-plane agent is shut down")]
    Closed,
    /// A write that was (perhaps partly) posted and did not complete: it timed out,
    /// its peer failed, or its region was deregistered under it. Its endpoint was
    /// force-closed, so no new byte leaves; bytes already on the way may still land
    /// in the peer's memory (and be read from ours) until `may_land_until`. Neither
    /// side may reuse the write's blocks before then.
    #[error("{backend} write abandoned ({detail}); bytes may land until {:?} from now", may_land_until.saturating_duration_since(Instant::now()))]
    Abandoned {
        backend: BackendKind,
        detail: String,
        may_land_until: Instant,
    },
}

impl TransferError {
    /// A stable, low-cardinality label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            TransferError::Unavailable { .. } => "unavailable",
            TransferError::Backend { .. } => "backend",
            TransferError::Invalid(_) => "invalid",
            TransferError::UnknownLocalRegion(_) => "unknown_local_region",
            TransferError::UnknownRemoteRegion { .. } => "unknown_remote_region",
            TransferError::UnknownPeer(_) => "unknown_peer",
            TransferError::BadMetadata(_) => "bad_metadata",
            TransferError::Incompatible(_) => "incompatible",
            TransferError::Timeout { .. } => "timeout",
            TransferError::PeerLost { .. } => "peer_lost",
            TransferError::Closed => "closed",
            TransferError::Abandoned { .. } => "abandoned",
        }
    }

    /// Until when bytes of this failed write may still land: None when none can
    /// (the write was refused or never posted).
    pub fn may_land_until(&self) -> Option<Instant> {
        match self {
            TransferError::Abandoned { may_land_until, .. } => Some(*may_land_until),
            _ => None,
        }
    }

    /// An abandoned write of `backend`: whatever was on the way lands within
    /// [`LANDING_GRACE`] of now, the endpoint being force-closed.
    pub(crate) fn abandoned(backend: BackendKind, cause: &TransferError) -> TransferError {
        Self::abandoned_for(backend, cause, LANDING_GRACE)
    }

    /// An abandoned write whose bytes may land for `hold` more.
    pub(crate) fn abandoned_for(backend: BackendKind, cause: &TransferError, hold: Duration) -> TransferError {
        TransferError::Abandoned {
            backend,
            detail: cause.to_string(),
            may_land_until: Instant::now() + hold,
        }
    }
}

/// How long after its endpoint was force-closed an abandoned write's bytes may still
/// land. A force-closed RDMA endpoint (its queue pair destroyed) moves nothing more;
/// over TCP and shared memory the target still applies what its socket or ring holds,
/// and CUDA copies already queued finish: milliseconds on a live host. Two seconds
/// covers a loaded one.
pub const LANDING_GRACE: Duration = Duration::from_secs(2);
