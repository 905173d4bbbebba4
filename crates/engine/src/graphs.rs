//! Decode steps as CUDA graphs. A decode step of a small model is some 150 kernel
//! launches whose GPU work takes a fraction of the time the host spends issuing them
//! (candle allocates, checks layouts and builds launch arguments per op); replayed as
//! one captured graph the step costs one launch. As vLLM and SGLang do, a step is
//! captured per batch-size bucket (a batch of 5 runs the graph of 8, the padding rows
//! writing no K/V and attending nothing) and per block-table width (rounded up to a
//! power of two); the step's integers (tokens, positions, slots, block tables) are
//! uploaded into the graph's static buffer before each launch, and its logits land in
//! a static buffer per bucket.
//!
//! A shape's first step runs eagerly on the static buffers (which loads every kernel
//! and sizes cuBLAS' workspace) and is then captured; later steps of the shape replay
//! it. If a capture fails, graphs are switched off for the model and every step runs
//! eagerly, as without them.
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::{CudaGraph, DevicePtr, result, sys};
use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{EngineError, Result};

/// Batch sizes a step is captured for; a batch runs the graph of the next size up.
const BUCKETS: [usize; 14] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256];
/// Captured graphs kept at most (least recently used ones go first).
const MAX_GRAPHS: usize = 64;
/// Largest block table (batch bucket x width) a captured step uploads.
const MAX_TABLE_ENTRIES: usize = 1 << 20;

fn invalid(what: &str) -> EngineError {
    EngineError::Invalid(format!("CUDA graphs: {what}"))
}

fn stream(device: &Device) -> Result<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>> {
    match device {
        Device::Cuda(d) => Ok(d.cuda_stream()),
        _ => Err(invalid("not a CUDA device")),
    }
}

/// The shape a decode batch runs as: its bucket and block-table width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    pub batch: usize,
    pub width: usize,
}

impl Shape {
    /// The captured shape for `batch` sequences of at most `blocks` blocks each, or
    /// None where the batch is larger than `max_batch` or the tables too large.
    pub fn of(batch: usize, blocks: usize, max_batch: usize) -> Option<Shape> {
        let b = *BUCKETS.iter().find(|&&b| b >= batch && b <= max_batch)?;
        let width = blocks.max(1).next_power_of_two();
        (b * width <= MAX_TABLE_ENTRIES).then_some(Shape { batch: b, width })
    }
}

/// An instantiated graph of a decode step.
pub(crate) struct Graph(CudaGraph);

// SAFETY: a CUDA graph and its executable are driver handles, usable from any thread
// of the process once the context is bound (cudarc binds it before each launch); the
// graphs live behind the model's mutex, so one thread at a time launches or drops them.
unsafe impl Send for Graph {}

/// One captured shape: the buffer its integers are uploaded to, and its graph (None
/// until captured).
pub(crate) struct Captured {
    pub meta: Tensor,
    pub graph: Option<Graph>,
    last_used: u64,
}

/// The graphs of one model, and the static logits of each bucket, behind the lock a
/// decode step (and a prefill pass: they share cuBLAS's workspace) holds.
pub(crate) struct DecodeGraphs {
    pub max_batch: usize,
    /// Off after a failed capture.
    pub enabled: bool,
    logits: HashMap<usize, Tensor>,
    graphs: HashMap<Shape, Captured>,
    clock: u64,
}

impl DecodeGraphs {
    pub fn new(max_batch: usize) -> DecodeGraphs {
        DecodeGraphs {
            max_batch,
            enabled: max_batch > 0,
            logits: HashMap::new(),
            graphs: HashMap::new(),
            clock: 0,
        }
    }

    /// The shape's static buffers (allocated on first use: `meta_len` integers, and
    /// f32 logits `[bucket, vocab]` shared by the bucket's shapes).
    pub fn entry(&mut self, shape: Shape, meta_len: usize, vocab: usize, device: &Device) -> Result<(&mut Captured, Tensor)> {
        self.clock += 1;
        if !self.graphs.contains_key(&shape) && self.graphs.len() >= MAX_GRAPHS {
            let oldest = self.graphs.iter().min_by_key(|(_, c)| c.last_used).map(|(s, _)| *s);
            if let Some(s) = oldest {
                self.graphs.remove(&s);
            }
        }
        let logits = match self.logits.get(&shape.batch) {
            Some(l) => l.clone(),
            None => {
                let l = Tensor::zeros((shape.batch, vocab), DType::F32, device)?;
                self.logits.insert(shape.batch, l.clone());
                l
            }
        };
        let c = match self.graphs.entry(shape) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Captured {
                meta: Tensor::zeros(meta_len, DType::U32, device)?,
                graph: None,
                last_used: 0,
            }),
        };
        if c.meta.dims() != [meta_len] {
            return Err(invalid("a shape's integers changed size"));
        }
        c.last_used = self.clock;
        Ok((c, logits))
    }
}

/// Copies `data` into the CUDA tensor `dst` (u32, contiguous, as long), in stream order.
pub(crate) fn upload(dst: &Tensor, data: &[u32]) -> Result<()> {
    if dst.dtype() != DType::U32 || dst.dims() != [data.len()] || !dst.is_contiguous() {
        return Err(invalid("upload: shapes"));
    }
    let s = stream(dst.device())?;
    let (storage, layout) = dst.storage_and_layout();
    let Storage::Cuda(c) = &*storage else {
        return Err(invalid("upload: not on a CUDA device"));
    };
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| invalid("upload: not contiguous"))?;
    let view = c.as_cuda_slice::<u32>()?.slice(a..b);
    let (ptr, _guard) = view.device_ptr(&s);
    // SAFETY: `ptr` covers `data.len()` u32 on the stream's device (checked above); a
    // copy from pageable memory is staged before the call returns, so `data` may go
    // after it. The buffer is the graphs' own: no tensor candle hands out aliases it.
    unsafe { result::memcpy_htod_async(ptr, data, s.cu_stream()) }.map_err(|e| invalid(&format!("upload: {e}")))
}

/// Captures what `f` puts on this thread's stream as a graph. The capture ends however
/// `f` leaves (an error, a panic), so the stream never stays in capture mode.
pub(crate) fn capture(device: &Device, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
    struct Capturing<'a>(&'a Device, bool);
    impl Drop for Capturing<'_> {
        fn drop(&mut self) {
            if self.1
                && let Ok(s) = stream(self.0)
            {
                let _ = s.end_capture(sys::CUgraphInstantiate_flags(0));
            }
        }
    }
    stream(device)?
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| invalid(&format!("begin capture: {e}")))?;
    let mut guard = Capturing(device, true);
    let r = f();
    let s = stream(device)?;
    guard.1 = false;
    let graph = s
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|e| invalid(&format!("end capture: {e}")));
    r?;
    graph?.map(Graph).ok_or_else(|| invalid("the capture recorded nothing"))
}

/// Drops the errors cudarc kept from a failed capture (frees of captured memory made
/// after the capture broke), which it would otherwise hand to the next call.
pub(crate) fn clear_errors(device: &Device) {
    if let Ok(s) = stream(device) {
        let _ = s.context().check_err();
    }
}

/// Launches a captured step.
pub(crate) fn launch(graph: &Graph) -> Result<()> {
    graph.0.launch().map_err(|e| invalid(&format!("launch: {e}")))
}

/// cudarc's event tracking creates two CUDA events with every allocation, for ordering
/// work between streams it created; the engine's device creates none (candle puts each
/// thread's work on that thread's default stream, which cudarc does not track), so
/// the events are never used and only cost host time on every op.
pub(crate) fn single_stream(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: called right after the device is created; the engine makes no cudarc
        // stream of its own on it, so tracking would never order anything (cudarc only
        // records and waits on the events once a context has several streams).
        unsafe { d.disable_event_tracking() };
    }
}
