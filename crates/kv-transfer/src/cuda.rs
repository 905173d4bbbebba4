//! GPU memory for the data plane (feature `cuda`): device buffers that the backends
//! register as VRAM, pinned host buffers for the TCP backend's staging, and binding
//! a device's primary context to the threads that touch GPU pointers. cudarc loads
//! the CUDA driver at run time, so building needs no CUDA toolkit.
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, sys};

use crate::error::{Result, TransferError};
use crate::{BackendKind, MemKind, Memory};

fn cuda_err(op: &'static str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Backend {
        backend: BackendKind::Tcp,
        op,
        detail: format!("CUDA: {e}"),
    }
}

/// Makes `device`'s primary context current on this thread (idempotent, cheap).
pub fn bind_thread(device: u32) -> Result<()> {
    result::init().map_err(|e| cuda_err("cuInit", e))?;
    let dev = result::device::get(device as i32).map_err(|e| cuda_err("cuDeviceGet", e))?;
    // SAFETY: `dev` came from cuDeviceGet; retaining the primary context is
    // reference-counted and the context is never destroyed while the process runs.
    unsafe {
        let ctx = result::primary_ctx::retain(dev).map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        result::ctx::set_current(ctx).map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }
}

/// Number of CUDA devices (0 when there is no driver).
pub fn device_count() -> usize {
    if result::init().is_err() {
        return 0;
    }
    result::device::get_count().map(|n| n as usize).unwrap_or(0)
}

/// A device allocation.
pub struct CudaBuffer {
    ptr: sys::CUdeviceptr,
    len: usize,
    device: u32,
}

// SAFETY: a device pointer is a plain address valid in every thread that binds the
// device's context, which every method does first.
unsafe impl Send for CudaBuffer {}
// SAFETY: as above; copies are synchronous and do not alias Rust memory.
unsafe impl Sync for CudaBuffer {}

impl CudaBuffer {
    pub fn new(device: u32, len: usize) -> Result<Arc<CudaBuffer>> {
        bind_thread(device)?;
        // SAFETY: the device's context is current; the allocation is freed in Drop.
        let ptr = unsafe { result::malloc_sync(len.max(1)) }.map_err(|e| cuda_err("cuMemAlloc", e))?;
        Ok(Arc::new(CudaBuffer { ptr, len, device }))
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device(&self) -> u32 {
        self.device
    }
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// This buffer as a region the data plane can register.
    pub fn memory(self: &Arc<Self>) -> Memory {
        // SAFETY: the range is this allocation, kept alive by the Arc we hand over.
        unsafe { Memory::from_raw(self.ptr as usize, self.len, MemKind::Vram { device: self.device }, self.clone()) }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len),
            "range {offset}+{len} outside GPU buffer of {}",
            self.len
        );
    }

    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len());
        bind_thread(self.device)?;
        // SAFETY: bounds checked; a synchronous copy from a live host slice.
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, data) }.map_err(|e| cuda_err("cuMemcpyHtoD", e))
    }

    pub fn read_into(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len());
        bind_thread(self.device)?;
        // SAFETY: bounds checked; a synchronous copy into a live host slice.
        unsafe { result::memcpy_dtoh_sync(out, self.ptr + offset as u64) }.map_err(|e| cuda_err("cuMemcpyDtoH", e))
    }

    pub fn memset(&self, byte: u8) -> Result<()> {
        bind_thread(self.device)?;
        // SAFETY: the whole allocation, synchronously.
        unsafe { result::memset_d8_sync(self.ptr, byte, self.len) }.map_err(|e| cuda_err("cuMemsetD8", e))?;
        result::ctx::synchronize().map_err(|e| cuda_err("cuCtxSynchronize", e))
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if bind_thread(self.device).is_ok() {
            // SAFETY: allocated in `new`, freed once; registrations hold the Arc, so
            // none outlives this.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

impl crate::bench::ReadBack for CudaBuffer {
    fn read_at(&self, offset: u64, out: &mut [u8]) {
        self.read_into(offset as usize, out).expect("GPU read-back")
    }
    fn fill(&self, byte: u8) {
        self.memset(byte).expect("GPU memset")
    }
}

/// Page-locked host memory: the TCP backend stages GPU bytes through it. Its copies go
/// through a non-blocking stream of its own: a copy on the legacy default stream
/// would wait for (and, while the engine captures a decode step as a CUDA graph on
/// its thread's stream, break) every other blocking stream of the context.
pub(crate) struct Pinned {
    ptr: *mut c_void,
    len: usize,
    /// The device whose context the stream belongs to.
    device: u32,
    stream: sys::CUstream,
}

// SAFETY: plain host memory and a stream handle owned by this value; a stream may be
// used from any thread that binds its context (load and store do first).
unsafe impl Send for Pinned {}

impl Pinned {
    pub(crate) fn new(device: u32, len: usize) -> Result<Pinned> {
        bind_thread(device)?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(|e| cuda_err("cuStreamCreate", e))?;
        // SAFETY: a portable pinned allocation, freed in Drop.
        let ptr = match unsafe { result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: created above, used by nothing yet.
                let _ = unsafe { result::stream::destroy(stream) };
                return Err(cuda_err("cuMemHostAlloc", e));
            }
        };
        Ok(Pinned { ptr, len, device, stream })
    }

    pub(crate) fn device(&self) -> u32 {
        self.device
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes owned by self, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }

    /// Copies `len` bytes of device memory at `src` (on the buffer's device) into the
    /// start of the buffer.
    pub(crate) fn load(&mut self, src: u64, len: usize) -> Result<&[u8]> {
        bind_thread(self.device)?;
        let stream = self.stream;
        let dst = &mut self.as_mut_slice()[..len];
        // SAFETY: `src..src+len` lies in a registered GPU region (checked by the caller);
        // `dst` is pinned memory of ours, and the stream is synchronized before it is read.
        unsafe {
            result::memcpy_dtoh_async(dst, src, stream).map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))?;
            result::stream::synchronize(stream).map_err(|e| cuda_err("cuStreamSynchronize", e))?;
        }
        Ok(&self.as_mut_slice()[..len])
    }

    /// Copies the first `len` bytes of the buffer to device memory at `dst` (on the
    /// buffer's device).
    pub(crate) fn store(&mut self, dst: u64, len: usize) -> Result<()> {
        bind_thread(self.device)?;
        let stream = self.stream;
        let src = &self.as_mut_slice()[..len];
        // SAFETY: `dst..dst+len` lies in a registered GPU region (checked by the caller);
        // the copy has finished reading the pinned buffer when the stream synchronizes.
        unsafe {
            result::memcpy_htod_async(dst, src, stream).map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))?;
            result::stream::synchronize(stream).map_err(|e| cuda_err("cuStreamSynchronize", e))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // The stream belongs to the device's context: make it current on this thread.
        let _ = bind_thread(self.device);
        // SAFETY: allocated by cuMemHostAlloc in `new`, freed once, after its stream's
        // copies finished (each is synchronized); the stream is ours, destroyed once.
        unsafe {
            let _ = result::free_host(self.ptr);
            let _ = result::stream::destroy(self.stream);
        }
    }
}
