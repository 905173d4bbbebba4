//! The engine's fused CUDA kernels (`kernels/fused.cu`, compiled to PTX by build.rs
//! with the `cuda` feature) and their launches on candle tensors. See the .cu file for
//! what each kernel replaces; `model.rs` decides when they are used.
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Shape, Storage, Tensor};

use crate::error::{EngineError, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "pdserve_fused";
/// Head dims the attention kernel is built for.
pub(crate) const HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Warps per attention block (the kernel's MAX_WARPS): query heads per KV head must fit.
const MAX_WARPS: usize = crate::model::MAX_ATTENTION_WARPS;
const THREADS: u32 = 256;

fn invalid(what: &str) -> EngineError {
    EngineError::Invalid(format!("fused kernel: {what}"))
}

/// A contiguous tensor's elements on its CUDA device.
fn view<'a, T: CudaDType>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = s else {
        return Err(invalid("tensor is not on a CUDA device"));
    };
    let (a, b) = l.contiguous_offsets().ok_or_else(|| invalid("tensor is not contiguous"))?;
    Ok(c.as_cuda_slice::<T>()?.slice(a..b))
}

fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => Err(invalid("tensor is not on a CUDA device")),
    }
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(s, dev);
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

fn grid(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn suffix(d: DType) -> Result<&'static str> {
    match d {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        d => Err(invalid(&format!("dtype {d:?}"))),
    }
}

/// Runs `f` with the element type of `dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::BF16 => $f::<half::bf16>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            d => Err(invalid(&format!("dtype {d:?}"))),
        }
    };
}

/// Dimensions of the attention heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

/// The inputs of [`rope_kv`]: the fused projection `qkv` `[n, (q + 2 kv) * dim]`, each
/// row's position and pool slot, the RoPE tables (f32), one layer's pools, and whether
/// to round as the model's dtype would (precision `model`) or once, from f32.
#[derive(Clone, Copy)]
pub(crate) struct RopeKv<'a> {
    pub qkv: &'a Tensor,
    pub pos: &'a Tensor,
    pub slots: &'a Tensor,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub k_pool: &'a Tensor,
    pub v_pool: &'a Tensor,
    pub heads: Heads,
    pub in_dtype: bool,
}

/// RoPE on q and k, k and v written into the pools at the slots; returns q `[n, q, dim]`.
pub(crate) fn rope_kv(a: RopeKv<'_>) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(a: RopeKv<'_>) -> Result<Tensor> {
        let RopeKv {
            qkv,
            pos,
            slots,
            cos,
            sin,
            k_pool,
            v_pool,
            heads: h,
            in_dtype,
        } = a;
        let n = qkv.dim(0)?;
        if qkv.dims() != [n, (h.q + 2 * h.kv) * h.dim] || pos.dims() != [n] || slots.dims() != [n] {
            return Err(invalid("rope_kv: shapes"));
        }
        let dev = device(qkv)?;
        let (s0, l0) = qkv.storage_and_layout();
        let (s1, l1) = pos.storage_and_layout();
        let (s2, l2) = slots.storage_and_layout();
        let (s3, l3) = cos.storage_and_layout();
        let (s4, l4) = sin.storage_and_layout();
        let (s5, l5) = k_pool.storage_and_layout();
        let (s6, l6) = v_pool.storage_and_layout();
        let (x, p, s) = (view::<T>(&s0, l0)?, view::<u32>(&s1, l1)?, view::<u32>(&s2, l2)?);
        let (c, sn) = (view::<f32>(&s3, l3)?, view::<f32>(&s4, l4)?);
        let (kp, vp) = (view::<T>(&s5, l5)?, view::<T>(&s6, l6)?);
        let func = dev.get_or_load_custom_func(&format!("rope_kv_{}", suffix(qkv.dtype())?), MODULE, PTX)?;
        // SAFETY: the kernel writes every element of `out` before it is read.
        let out = unsafe { dev.alloc::<T>(n * h.q * h.dim)? };
        let mut b = func.builder();
        b.arg(&x).arg(&p).arg(&s).arg(&c).arg(&sn).arg(&out).arg(&kp).arg(&vp);
        let dims = [n as u32, h.q as u32, h.kv as u32, h.dim as u32, in_dtype as u32];
        for d in &dims {
            b.arg(d);
        }
        // SAFETY: arguments match the kernel's signature; the model checked the slots
        // against the pools (KvPools::slots) and the positions against the RoPE table.
        unsafe { b.launch(grid(n * (h.q + 2 * h.kv) * h.dim / 2)) }.w()?;
        Ok(wrap(out, dev, (n, h.q, h.dim)))
    }
    by_dtype!(a.qkv.dtype(), go(a))
}

/// `silu(gate) * up` from the fused projection `[n, 2 i]`; `[n, i]`.
pub(crate) fn silu_mul(gu: &Tensor) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(gu: &Tensor) -> Result<Tensor> {
        let (n, two_i) = gu.dims2()?;
        let i = two_i / 2;
        let dev = device(gu)?;
        let (s0, l0) = gu.storage_and_layout();
        let x = view::<T>(&s0, l0)?;
        let func = dev.get_or_load_custom_func(&format!("silu_mul_{}", suffix(gu.dtype())?), MODULE, PTX)?;
        // SAFETY: the kernel writes every element of `out`.
        let out = unsafe { dev.alloc::<T>(n * i)? };
        let mut b = func.builder();
        let dims = [n as u32, i as u32];
        b.arg(&x).arg(&out).arg(&dims[0]).arg(&dims[1]);
        // SAFETY: arguments match the kernel's signature.
        unsafe { b.launch(grid(n * i)) }.w()?;
        Ok(wrap(out, dev, (n, i)))
    }
    by_dtype!(gu.dtype(), go(gu))
}

/// The residual add and the RMSNorm after it in one kernel: `x + d` (in `x`'s dtype,
/// f32 or the model's) and `rms_norm(x + d) * w` in `w`'s dtype. Without `d`, no add:
/// the norm of `x`, which is returned as it is.
pub(crate) fn add_rms_norm(x: &Tensor, d: Option<&Tensor>, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    fn go<T: CudaDType + DeviceRepr>(x: &Tensor, d: Option<&Tensor>, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        fn with_residual<T: CudaDType + DeviceRepr, R: CudaDType + DeviceRepr>(
            x: &Tensor,
            d: Option<&Tensor>,
            w: &Tensor,
            eps: f32,
        ) -> Result<(Tensor, Tensor)> {
            let (n, h) = x.dims2()?;
            if w.dims() != [h] || d.is_some_and(|d| d.dims() != [n, h] || d.dtype() != w.dtype()) {
                return Err(invalid("add_rms_norm: shapes"));
            }
            if n == 0 {
                return Ok((x.clone(), x.to_dtype(w.dtype())?));
            }
            let dev = device(x)?;
            let res = if x.dtype() == w.dtype() {
                suffix(w.dtype())?.to_string()
            } else {
                format!("{}_f32", suffix(w.dtype())?)
            };
            let func = dev.get_or_load_custom_func(&format!("add_rms_norm_{res}"), MODULE, PTX)?;
            let (s0, l0) = x.storage_and_layout();
            let (s2, l2) = w.storage_and_layout();
            let (xv, wv) = (view::<R>(&s0, l0)?, view::<T>(&s2, l2)?);
            let ds = d.map(|d| d.storage_and_layout());
            let dv = match (&ds, d) {
                (Some((s1, l1)), Some(_)) => Some(view::<T>(s1, l1)?),
                _ => None,
            };
            // SAFETY: the kernel writes every element of `out`, and of `x_out` when there is
            // a `d` (x_out is not used otherwise).
            let (x_out, out) = unsafe { (dev.alloc::<R>(if d.is_some() { n * h } else { 1 })?, dev.alloc::<T>(n * h)?) };
            let mut b = func.builder();
            let null: u64 = 0;
            b.arg(&xv);
            match &dv {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            let h_arg = h as u32;
            b.arg(&wv).arg(&x_out).arg(&out).arg(&h_arg).arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel's signature (a null `d` skips the add);
            // one block per row, the shapes checked above.
            unsafe { b.launch(cfg) }.w()?;
            let x_new = if d.is_some() { wrap(x_out, dev.clone(), (n, h)) } else { x.clone() };
            Ok((x_new, wrap(out, dev, (n, h))))
        }
        match x.dtype() {
            DType::F32 => with_residual::<T, f32>(x, d, w, eps),
            dt if dt == w.dtype() => with_residual::<T, T>(x, d, w, eps),
            dt => Err(invalid(&format!("add_rms_norm: residual {dt:?} with weights {:?}", w.dtype()))),
        }
    }
    if !x.is_contiguous() || d.is_some_and(|d| !d.is_contiguous()) {
        return Err(invalid("add_rms_norm: tensors must be contiguous"));
    }
    by_dtype!(w.dtype(), go(x, d, w, eps))
}

/// `x @ w^T` with `x` `[n, k]` and `w` `[m, k]` in the model's dtype, accumulated and
/// returned in f32 `[n, m]`: the logits, not rounded to bf16 (whose steps of 1/8 at a
/// logit of 20 tie tokens that f32 tells apart).
pub(crate) fn linear_f32(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let (m, _) = w.dims2()?;
    match x.dtype() {
        DType::F32 => Ok(x.matmul(&w.t()?)?),
        _ if n == 0 || m == 0 => Ok(Tensor::zeros((n, m), DType::F32, x.device())?),
        _ => {
            let dev = device(x)?;
            // SAFETY: cuBLAS writes every element of the [n, m] output (beta = 0).
            let out = wrap(unsafe { dev.alloc::<f32>(n * m)? }, dev, (n, m));
            linear_f32_into(x, w, &out)?;
            Ok(out)
        }
    }
}

/// [`linear_f32`] into the first rows of `out` (f32 `[rows >= n, m]`, contiguous): a
/// CUDA graph's static logits.
pub(crate) fn linear_f32_into(x: &Tensor, w: &Tensor, out: &Tensor) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (n, k) = x.dims2()?;
    let (m, k2) = w.dims2()?;
    let (rows, m2) = out.dims2()?;
    if k != k2 || x.dtype() != w.dtype() || m2 != m || rows < n || out.dtype() != DType::F32 || !out.is_contiguous() {
        return Err(invalid("linear_f32: shapes"));
    }
    let ty = match x.dtype() {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        d => return Err(invalid(&format!("linear_f32: dtype {d:?}"))),
    };
    if n == 0 || m == 0 {
        return Ok(());
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let dev = device(&x)?;
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (s0, l0) = x.storage_and_layout();
    let (s1, l1) = w.storage_and_layout();
    let (s2, l2) = out.storage_and_layout();
    let ov = view::<f32>(&s2, l2)?;
    let (op, _go) = ov.device_ptr(&stream);
    macro_rules! ptrs {
        ($t:ty) => {{
            let (xv, wv) = (view::<$t>(&s0, l0)?, view::<$t>(&s1, l1)?);
            let (xp, _gx) = xv.device_ptr(&stream);
            let (wp, _gw) = wv.device_ptr(&stream);
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Row-major out [n, m] is column-major out^T [m, n] = w [m, k] . x^T [k, n].
            // SAFETY: the pointers cover the contiguous [n, k], [m, k] and at least [n, m]
            // buffers on candle's stream, which the cuBLAS handle is bound to; alpha and
            // beta are f32 as CUBLAS_COMPUTE_32F requires. `out` is written through a
            // shared view: it is a buffer of our own (fresh, or a graph's static logits)
            // that nothing reads while this product runs.
            unsafe {
                gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    m as i32,
                    n as i32,
                    k as i32,
                    (&alpha) as *const f32 as *const _,
                    wp as *const _,
                    ty,
                    k as i32,
                    xp as *const _,
                    ty,
                    k as i32,
                    (&beta) as *const f32 as *const _,
                    op as *mut _,
                    sys::cudaDataType_t::CUDA_R_32F,
                    m as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .map_err(|e| invalid(&format!("linear_f32: cuBLAS {e:?}")))?;
        }};
    }
    match x.dtype() {
        DType::BF16 => ptrs!(half::bf16),
        _ => ptrs!(half::f16),
    }
    Ok(())
}

/// What the attention kernel needs to find each query's keys.
pub(crate) struct PagedContext<'a> {
    /// `[sequences, max_blocks]` block tables (u32).
    pub tables: &'a Tensor,
    /// `[n]`: each query's row in `tables`.
    pub seq: &'a Tensor,
    /// `[n]`: each query's context length (it attends keys `0..ctx`).
    pub ctx: &'a Tensor,
    /// `[tiles + 1]`: each attention block's first query row (and the row count last):
    /// consecutive queries of one sequence, at most `queries_per_block` of them.
    pub tiles: &'a Tensor,
    pub block_size: usize,
    /// Most queries per block.
    pub queries_per_block: usize,
    /// Blocks sharing each query's keys (flash-decoding); 1: no split.
    pub key_splits: usize,
}

/// Binds the device views the attention kernels read (q, the pools, and the paged
/// context's tables, rows, contexts and tiles) to the given names, their storage
/// guards held to the end of the enclosing block.
macro_rules! paged_views {
    ($t:ty, $q:expr, $k:expr, $v:expr, $c:expr => $qv:ident, $kp:ident, $vp:ident, $tb:ident, $sq:ident, $cx:ident, $tl:ident) => {
        let (s0, l0) = $q.storage_and_layout();
        let (s1, l1) = $k.storage_and_layout();
        let (s2, l2) = $v.storage_and_layout();
        let (s3, l3) = $c.tables.storage_and_layout();
        let (s4, l4) = $c.seq.storage_and_layout();
        let (s5, l5) = $c.ctx.storage_and_layout();
        let (s6, l6) = $c.tiles.storage_and_layout();
        let ($qv, $kp, $vp) = (view::<$t>(&s0, l0)?, view::<$t>(&s1, l1)?, view::<$t>(&s2, l2)?);
        let ($tb, $sq, $cx) = (view::<u32>(&s3, l3)?, view::<u32>(&s4, l4)?, view::<u32>(&s5, l5)?);
        let $tl = view::<u32>(&s6, l6)?;
    };
}

/// Attention of q `[n, heads.q, dim]` over the paged pools; `[n, heads.q, dim]`.
pub(crate) fn paged_attention(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, c: &PagedContext<'_>, h: Heads) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, c: &PagedContext<'_>, h: Heads) -> Result<Tensor> {
        let n = q.dim(0)?;
        let groups = h.q / h.kv;
        let qt = c.queries_per_block.max(1);
        if !HEAD_DIMS.contains(&h.dim) || groups * qt > MAX_WARPS || q.dims() != [n, h.q, h.dim] {
            return Err(invalid("paged_attention: shapes"));
        }
        let (_, max_blocks) = c.tables.dims2()?;
        let dev = device(q)?;
        paged_views!(T, q, k_pool, v_pool, c => qv, kp, vp, tb, sq, cx, tl);
        let tiles = c.tiles.dim(0)?.saturating_sub(1);
        if tiles == 0 {
            return Err(invalid("paged_attention: no tiles"));
        }
        let name = format!("paged_attention_{}_{}", suffix(q.dtype())?, h.dim);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let splits = c.key_splits.max(1);
        let rows = n * h.q;
        // SAFETY: the kernels write every element of `out`, and of the partial states
        // when the keys are split (every (query, head, split) once); unused otherwise.
        let (out, part_ml, part_acc) = unsafe {
            let parts = if splits > 1 { rows * splits } else { 1 };
            (
                dev.alloc::<T>(rows * h.dim)?,
                dev.alloc::<f32>(parts * 2)?,
                dev.alloc::<f32>(parts * h.dim)?,
            )
        };
        let mut b = func.builder();
        b.arg(&qv).arg(&kp).arg(&vp).arg(&tb).arg(&sq).arg(&cx).arg(&tl).arg(&out);
        let dims = [n as u32, h.q as u32, h.kv as u32, c.block_size as u32, max_blocks as u32];
        for d in &dims {
            b.arg(d);
        }
        let scale = 1.0f32 / (h.dim as f32).sqrt();
        let splits_arg = splits as u32;
        b.arg(&scale).arg(&splits_arg).arg(&part_ml).arg(&part_acc);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, h.kv as u32, splits as u32),
            block_dim: ((qt * groups * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel's signature; every block table entry and
        // context length was checked against the pools by the model (KvPools::slots),
        // and the model builds the tiles increasing, each at most `qt` rows (`Rows`).
        unsafe { b.launch(cfg) }.w()?;
        if splits > 1 {
            let name = format!("attention_combine_{}_{}", suffix(q.dtype())?, h.dim);
            let combine = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut b = combine.builder();
            let rows_arg = rows as u32;
            b.arg(&part_ml).arg(&part_acc).arg(&out).arg(&rows_arg).arg(&splits_arg);
            let warps_per_block = THREADS as usize / 32;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(warps_per_block) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel's signature; one warp per row.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, dev, (n, h.q, h.dim)))
    }
    by_dtype!(q.dtype(), go(q, k_pool, v_pool, c, h))
}

/// Head dims the tensor-core prefill kernel is built for (bf16 and f16).
pub(crate) const FLASH_HEAD_DIMS: [usize; 2] = [64, 128];
/// Queries per block of the tensor-core prefill kernel (its FA_ROWS).
pub(crate) const FLASH_ROWS: usize = 64;

/// Prefill attention of q `[n, heads.q, dim]` over the paged pools on tensor cores
/// (bf16/f16, head dim 64 or 128): the tiles of `c` hold at most [`FLASH_ROWS`] rows
/// of one sequence each; `[n, heads.q, dim]`.
pub(crate) fn flash_prefill(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, c: &PagedContext<'_>, h: Heads) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(q: &Tensor, k_pool: &Tensor, v_pool: &Tensor, c: &PagedContext<'_>, h: Heads) -> Result<Tensor> {
        let n = q.dim(0)?;
        if !FLASH_HEAD_DIMS.contains(&h.dim) || c.queries_per_block > FLASH_ROWS || q.dims() != [n, h.q, h.dim] || !h.q.is_multiple_of(h.kv)
        {
            return Err(invalid("flash_prefill: shapes"));
        }
        let (_, max_blocks) = c.tables.dims2()?;
        let tiles = c.tiles.dim(0)?.saturating_sub(1);
        if tiles == 0 {
            return Err(invalid("flash_prefill: no tiles"));
        }
        let dev = device(q)?;
        paged_views!(T, q, k_pool, v_pool, c => qv, kp, vp, tb, sq, cx, tl);
        let name = format!("flash_prefill_{}_{}", suffix(q.dtype())?, h.dim);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // SAFETY: the kernel writes every row of `out` its tiles cover, and the tiles
        // cover rows 0..n (the model builds them so).
        let out = unsafe { dev.alloc::<T>(n * h.q * h.dim)? };
        let mut b = func.builder();
        b.arg(&qv).arg(&kp).arg(&vp).arg(&tb).arg(&sq).arg(&cx).arg(&tl).arg(&out);
        let dims = [n as u32, h.q as u32, h.kv as u32, c.block_size as u32, max_blocks as u32];
        for d in &dims {
            b.arg(d);
        }
        // Scores in log2 units: the kernel takes exp2.
        let scale_log2 = std::f32::consts::LOG2_E / (h.dim as f32).sqrt();
        b.arg(&scale_log2);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, h.q as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel's signature; the block tables and contexts
        // were checked against the pools by the model (KvPools::slots), the tiles are
        // increasing with at most FLASH_ROWS rows of one sequence each (`Rows`), and the
        // pools' rows are 16-byte aligned (head dims of 64 or 128 in 2-byte types).
        unsafe { b.launch(cfg) }.w()?;
        Ok(wrap(out, dev, (n, h.q, h.dim)))
    }
    match q.dtype() {
        DType::BF16 => go::<half::bf16>(q, k_pool, v_pool, c, h),
        DType::F16 => go::<half::f16>(q, k_pool, v_pool, c, h),
        d => Err(invalid(&format!("flash_prefill: dtype {d:?}"))),
    }
}

/// Whether the tensor-core prefill kernel serves a model of these heads and dtype on
/// this device (its mma needs compute capability 8.0, in the GPU and in the PTX, which
/// is built for `CUDA_COMPUTE_CAP`).
pub(crate) fn flash_supported(device: &candle_core::Device, dtype: DType, h: Heads) -> bool {
    let Ok(dev) = device.as_cuda_device() else {
        return false;
    };
    let built: u32 = env!("PDSERVE_PTX_COMPUTE_CAP").parse().unwrap_or(0);
    let major = match dev.cuda_stream().context().compute_capability() {
        Ok(c) => c.0,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the GPU's compute capability; prefill attention without tensor cores");
            0
        }
    };
    built >= 80
        && major >= 8
        && matches!(dtype, DType::BF16 | DType::F16)
        && FLASH_HEAD_DIMS.contains(&h.dim)
        && h.kv > 0
        && h.q.is_multiple_of(h.kv)
}

/// Whether the fused path serves a model of these heads on this device.
pub(crate) fn supported(device: &candle_core::Device, h: Heads) -> bool {
    device.is_cuda() && h.kv > 0 && h.q.is_multiple_of(h.kv) && HEAD_DIMS.contains(&h.dim) && h.q / h.kv <= MAX_WARPS
}

/// The index of each row's largest value in `logits` `[rows, cols]` (f32), ties to the
/// lowest index as [`crate::model::argmax`] (NaN never picked); only `rows` integers
/// come to the host.
pub(crate) fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let (rows, cols) = logits.dims2()?;
    if logits.dtype() != DType::F32 {
        return Err(invalid("argmax_rows: logits must be f32"));
    }
    if rows == 0 {
        return Ok(vec![]);
    }
    let dev = device(logits)?;
    let (s0, l0) = logits.storage_and_layout();
    let x = view::<f32>(&s0, l0)?;
    let func = dev.get_or_load_custom_func("argmax_rows", MODULE, PTX)?;
    // Each row's best key, merged by atomicMax from 0.
    let out = dev.alloc_zeros::<u64>(rows)?;
    let mut b = func.builder();
    let cols_arg = cols as u32;
    b.arg(&x).arg(&out).arg(&cols_arg);
    // About 2,048 entries a block: a 128k vocabulary takes 63 blocks a row.
    let shares = cols.div_ceil(2048).clamp(1, 128) as u32;
    let cfg = LaunchConfig {
        grid_dim: (shares, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match the kernel's signature; grid y covers the rows, x the
    // shares of each row's columns.
    unsafe { b.launch(cfg) }.w()?;
    let keys = dev.clone_dtoh(&out)?;
    // The key's low half is 0xffffffff - index; 0: a row of only NaN, index 0.
    Ok(keys.iter().map(|&k| if k == 0 { 0 } else { u32::MAX - k as u32 }).collect())
}
