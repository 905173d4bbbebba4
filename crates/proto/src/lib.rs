//! pdserve's control plane, `pdserve.v1`: the client API (`Generation`) and the
//! daemons' internal service (`Prefill`), generated from `proto/`.
#![allow(clippy::all)]

pub mod codec;

pub mod v1 {
    tonic::include_proto!("pdserve.v1");
}

/// The encoded file descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pdserve_descriptor");
