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
            let stream = c.device.cuda_stream();
            let base = match t.dtype() {
                candle_core::DType::F32 => c.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
                candle_core::DType::BF16 => c.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
                candle_core::DType::F16 => c.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
                d => return Err(EngineError::Invalid(format!("unsupported KV dtype {d:?}"))),
            };
            let ordinal = stream.context().ordinal() as u32;
            Ok((base + offset, Some(ordinal)))
        }
        #[allow(unreachable_patterns)]
        _ => Err(EngineError::Invalid("KV pools must live on the CPU or a CUDA GPU".into())),
    }
}

/// Zeroed KV pool memory on a CUDA device, from `cuMemAlloc` rather than the
/// stream-ordered pool cudarc uses by default: legacy CUDA IPC (UCX's cuda_ipc, so
/// NIXL and our ucx backend) can map only such allocations. From pool memory UCX falls
/// back to staging through the host, 40x slower (measured on the H100).
#[cfg(feature = "cuda")]
pub(crate) fn ipc_zeros(shape: (usize, usize, usize), dtype: candle_core::DType, device: &candle_core::Device) -> Result<Tensor> {
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::cuda_backend::cudarc::driver::result;
    use candle_core::op::BackpropOp;
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(Tensor::zeros(shape, dtype, device)?);
    };
    let n = shape.0 * shape.1 * shape.2;
    let bytes = n * dtype.size_in_bytes();
    let stream = dev.cuda_stream();
    let cuda = |op: &str, e: &dyn std::fmt::Display| EngineError::Invalid(format!("KV pool {op}: {e}"));
    stream.context().bind_to_thread().map_err(|e| cuda("context", &e))?;
    // SAFETY: the device's context is current; the allocation is handed to cudarc below,
    // which owns it from then on.
    let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| cuda("cuMemAlloc", &e))?;
    // SAFETY: `ptr` is a fresh allocation of `bytes` bytes.
    unsafe { result::memset_d8_sync(ptr, 0, bytes) }.map_err(|e| cuda("cuMemsetD8", &e))?;
    // SAFETY: `ptr` holds `n` zeroed elements of the tensor's dtype.
    let storage = unsafe {
        match dtype {
            candle_core::DType::BF16 => CudaStorage::wrap_cuda_slice(stream.upgrade_device_ptr::<half::bf16>(ptr, n), dev.clone()),
            candle_core::DType::F16 => CudaStorage::wrap_cuda_slice(stream.upgrade_device_ptr::<half::f16>(ptr, n), dev.clone()),
            candle_core::DType::F32 => CudaStorage::wrap_cuda_slice(stream.upgrade_device_ptr::<f32>(ptr, n), dev.clone()),
            d => return Err(EngineError::Invalid(format!("unsupported KV dtype {d:?}"))),
        }
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}
