//! The one place where domain errors become gRPC statuses.
use engine::EngineError;
use kv_transfer::TransferError;
use tonic::{Code, Status};

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
        TransferError::PeerLost { .. } | TransferError::Closed | TransferError::Unavailable { .. } => Code::Unavailable,
        TransferError::Backend { .. } => Code::Internal,
    };
    Status::new(code, format!("KV transfer: {e}"))
}
