//! The one place where domain errors become gRPC statuses.
use engine::EngineError;
use kv_transfer::TransferError;
use tonic::{Code, Status};

/// Whether our side's transport made `s` (a reset connection, an HTTP/2 protocol
/// error, a keepalive that went unanswered), rather than the peer sending it: tonic
/// attaches the transport's error as the source; a status read from the peer's
/// trailers has none.
pub fn transport_made(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
}

/// A status our transport made, as the client should see it: the peer `who` is
/// unavailable (whatever code the transport chose: UNKNOWN, INTERNAL for an HTTP/2
/// protocol error, CANCELLED for a reset stream). Statuses the peer sent pass as they are.
pub fn lost_peer(s: Status, who: &str) -> Status {
    if transport_made(&s) {
        Status::unavailable(format!("connection to {who} lost: {}", s.message()))
    } else {
        s
    }
}

pub fn from_engine(e: &EngineError) -> Status {
    let code = match e {
        EngineError::Invalid(_) | EngineError::Tokenizer(_) => Code::InvalidArgument,
        EngineError::OutOfBlocks { .. } => Code::ResourceExhausted,
        EngineError::Model { .. } | EngineError::Compute(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

pub fn from_transfer(e: &TransferError) -> Status {
    let code = match e {
        TransferError::Invalid(_) | TransferError::BadMetadata(_) => Code::InvalidArgument,
        TransferError::Incompatible(_) => Code::FailedPrecondition,
        TransferError::UnknownLocalRegion(_) | TransferError::UnknownRemoteRegion { .. } | TransferError::UnknownPeer(_) => {
            Code::FailedPrecondition
        }
        TransferError::Timeout { .. } => Code::DeadlineExceeded,
        TransferError::PeerLost { .. } | TransferError::Closed | TransferError::Unavailable { .. } | TransferError::Abandoned { .. } => {
            Code::Unavailable
        }
        TransferError::Backend { .. } => Code::Internal,
    };
    Status::new(code, format!("KV transfer: {e}"))
}
