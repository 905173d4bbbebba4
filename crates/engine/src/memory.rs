//! Where a tensor's bytes live, for registering the KV pools with the data plane.
use candle_core::{Storage, Tensor};

use crate::error::{EngineError, Result};

/// The address of a contiguous tensor's first element, and its CUDA device if any.
pub(crate) fn tensor_address(t: &Tensor) -> Result<(u64, Option<u32>)> {
    if !t.is_contiguous() {
        return Err(EngineError::Invalid("KV pool tensor is not contiguous".into()));
    }
    let (storage, layout) = t.storage_and_layout();
    let offset = (layout.start_offset() * t.dtype().size_in_bytes()) as u64;
    match &*storage {
        Storage::Cpu(cpu) => {
            use candle_core::CpuStorage as C;
            let base = match cpu {
                C::F32(v) => v.as_ptr() as u64,
                C::BF16(v) => v.as_ptr() as u64,
                C::F16(v) => v.as_ptr() as u64,
                _ => return Err(EngineError::Invalid(format!("unsupported KV dtype {:?}", t.dtype()))),
            };
            Ok((base + offset, None))
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(c) => {
            use candle_core::cuda_backend::cudarc::driver::DevicePtr;
            let stream = c.device().cuda_stream();
            let base = match t.dtype() {
                candle_core::DType::F32 => c.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
                candle_core::DType::BF16 => c.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
                candle_core::DType::F16 => c.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
                d => return Err(EngineError::Invalid(format!("unsupported KV dtype {d:?}"))),
            };
            let ordinal = match t.device() {
                candle_core::Device::Cuda(d) => d.cuda_stream().context().ordinal() as u32,
                _ => 0,
            };
            Ok((base + offset, Some(ordinal)))
        }
        #[allow(unreachable_patterns)]
        _ => Err(EngineError::Invalid("KV pools must live on the CPU or a CUDA GPU".into())),
    }
}
