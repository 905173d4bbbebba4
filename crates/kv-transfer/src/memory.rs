//! Memory that the data plane can register: page-aligned host buffers it owns, GPU
//! buffers (feature `cuda`), or memory owned by someone else (the engine's KV pools),
//! kept alive by an owner handle for as long as it is registered.
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Where a region lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemKind {
    /// Host memory (DRAM).
    Dram,
    /// GPU memory on CUDA device `device`.
    Vram { device: u32 },
}

impl std::fmt::Display for MemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemKind::Dram => write!(f, "dram"),
            MemKind::Vram { device } => write!(f, "vram:{device}"),
        }
    }
}

const PAGE: usize = 4096;

/// A zeroed, page-aligned host allocation. Remote peers write into it, so it behaves
/// like shared memory: reads and writes go through copies, never through references
/// that the compiler could assume unaliased.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is a plain allocation; all access is through raw copies whose
// synchronisation is the data plane's protocol (a region is read only after the
// notification of the write that filled it).
unsafe impl Send for HostBuffer {}
// SAFETY: as above.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Allocates `len` zeroed bytes (at least one page is reserved).
    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (rounded up to a page).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        HostBuffer { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(1).next_multiple_of(PAGE), PAGE).expect("buffer too large")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "range {offset}+{len} outside buffer of {}",
            self.len
        );
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: bounds checked above; the source is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len()) }
    }

    /// Copies `out.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len());
        // SAFETY: bounds checked above; the destination is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), out.len()) }
    }

    pub fn to_vec(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.read_at(offset, &mut v);
        v
    }

    pub fn fill(&self, byte: u8) {
        // SAFETY: the whole allocation is ours.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), byte, self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// A region handed to [`crate::Agent::register`]: an address range, its kind, and
/// whatever keeps it alive.
#[derive(Clone)]
pub struct Memory {
    pub(crate) addr: usize,
    pub(crate) len: usize,
    pub(crate) kind: MemKind,
    _owner: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Memory({:#x}+{} {})", self.addr, self.len, self.kind)
    }
}

impl Memory {
    /// A host buffer the data plane can register.
    pub fn host(buf: Arc<HostBuffer>) -> Self {
        Memory {
            addr: buf.as_ptr() as usize,
            len: buf.len(),
            kind: MemKind::Dram,
            _owner: buf,
        }
    }

    /// Memory owned elsewhere (e.g. the engine's KV pools, on the host or the GPU).
    ///
    /// # Safety
    /// `addr..addr+len` must be a valid allocation of `kind` for as long as `owner`
    /// lives, and must not be freed while any clone of the returned value exists.
    pub unsafe fn from_raw(addr: usize, len: usize, kind: MemKind, owner: Arc<dyn Any + Send + Sync>) -> Self {
        Memory {
            addr,
            len,
            kind,
            _owner: owner,
        }
    }

    pub fn addr(&self) -> usize {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn kind(&self) -> MemKind {
        self.kind
    }

    /// Raw mutable access for the TCP backend, which receives bytes from a socket
    /// straight into registered host memory.
    ///
    /// # Safety
    /// `offset+len` is within the region, the region is host memory, and nothing else
    /// writes this range concurrently (the protocol gives each write's target blocks
    /// to that write alone).
    // The region is memory shared with the network, not Rust-owned data: exclusive
    // access is the protocol's promise, stated in the safety contract.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn host_slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        debug_assert!(self.kind == MemKind::Dram && offset + len <= self.len);
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut((self.addr + offset) as *mut u8, len) }
    }

    /// Raw shared access for the TCP backend's sender side.
    ///
    /// # Safety
    /// As for [`Memory::host_slice_mut`], for reading.
    pub(crate) unsafe fn host_slice(&self, offset: usize, len: usize) -> &[u8] {
        debug_assert!(self.kind == MemKind::Dram && offset + len <= self.len);
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts((self.addr + offset) as *const u8, len) }
    }
}
