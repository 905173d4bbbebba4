// pdserve's fused CUDA kernels for the engine's forward pass on the GPU.
//
// candle runs a decoder layer as some 35 small kernels, and its attention gathers each
// sequence's context out of the paged pools, pads the batch to the longest sequence
// and materialises the score matrix in f32. These kernels replace that with three:
//   rope_kv          RoPE on q and k straight out of the fused QKV projection, and k/v
//                    written into their pool slots (no scatter index, no transposes);
//   paged_attention  attention that reads K/V through the block tables, online softmax
//                    in f32, any mix of context lengths (decode batches, causal prefill);
//   silu_mul         SwiGLU's silu(gate) * up out of the fused gate/up projection.
// RoPE either rounds as candle and PyTorch do in bf16/f16 (`x * cos - rotate(x) * sin`
// with the tables, each product and the sum in the dtype: precision `model`), or
// computes in f32 from f32 tables and rounds once (precision `f32`).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// x rounded to T and back, as an operation computed in T would leave it.
template <typename T> __device__ __forceinline__ float rnd(float x) { return to_f(from_f<T>(x)); }

// A row whose K/V is not kept: the padding rows of a decode batch run as a CUDA graph
// captured for a larger batch.
#define NO_SLOT 0xffffffffu

// qkv: [n, (H + 2 KV) * D], the fused projection's output (bias added).
// pos, slot: [n], each token's position and pool slot. cos, sin: [max_pos, D / 2] f32.
// Writes q rotated into q_out [n, H, D], k rotated and v into the pools [slots, KV, D].
// in_dtype: round as the dtype's ops would (see the top of the file).
template <typename T>
__device__ void rope_kv(const T *__restrict__ qkv, const uint32_t *__restrict__ pos,
                        const uint32_t *__restrict__ slot, const float *__restrict__ cos,
                        const float *__restrict__ sin, T *__restrict__ q_out, T *__restrict__ k_pool,
                        T *__restrict__ v_pool, uint32_t n, uint32_t H, uint32_t KV, uint32_t D,
                        uint32_t in_dtype) {
  const uint32_t half = D / 2, heads = H + 2 * KV;
  const uint64_t total = (uint64_t)n * heads * half;
  for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (uint64_t)gridDim.x * blockDim.x) {
    const uint32_t i = idx % half;
    const uint32_t h = (idx / half) % heads;
    const uint32_t t = idx / half / heads;
    const T *src = qkv + ((uint64_t)t * heads + h) * D;
    if (h >= H && slot[t] == NO_SLOT) continue;  // a padding row of a captured batch
    if (h >= H + KV) {
      T *dst = v_pool + ((uint64_t)slot[t] * KV + (h - H - KV)) * D;
      dst[i] = src[i];
      dst[i + half] = src[i + half];
      continue;
    }
    float c = cos[(uint64_t)pos[t] * half + i], s = sin[(uint64_t)pos[t] * half + i];
    const float x1 = to_f(src[i]), x2 = to_f(src[i + half]);
    T *dst = h < H ? q_out + ((uint64_t)t * H + h) * D : k_pool + ((uint64_t)slot[t] * KV + (h - H)) * D;
    if (in_dtype) {
      c = rnd<T>(c);
      s = rnd<T>(s);
      dst[i] = from_f<T>(rnd<T>(x1 * c) - rnd<T>(x2 * s));
      dst[i + half] = from_f<T>(rnd<T>(x2 * c) + rnd<T>(x1 * s));
    } else {
      dst[i] = from_f<T>(x1 * c - x2 * s);
      dst[i + half] = from_f<T>(x2 * c + x1 * s);
    }
  }
}

// gu: [n, 2 I] (gate then up); out: [n, I].
template <typename T>
__device__ void silu_mul(const T *__restrict__ gu, T *__restrict__ out, uint32_t n, uint32_t I) {
  const uint64_t total = (uint64_t)n * I;
  for (uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t t = idx / I, i = idx % I;
    const float g = to_f(gu[t * 2 * I + i]), u = to_f(gu[t * 2 * I + I + i]);
    out[idx] = from_f<T>(rnd<T>(g / (1.0f + expf(-g))) * u);
  }
}

// The residual add and the RMSNorm that follows it, one block per row: x_out = x + d
// (in R, the residual stream's type: f32 keeps the stream's sums exact where the
// model's dtype would round them at every layer), out = norm(x_out) * w in T, rounded
// once. d null: no add, x_out unused (the first layer's input).
// x, x_out: [n, h] R; d, out: [n, h] T; w: [h] T. blockDim.x is a multiple of 32.
#define NORM_PER_THREAD 32  // registers per thread: rows up to 32 x blockDim values
template <typename T, typename R>
__device__ void add_rms_norm(const R *__restrict__ x, const T *__restrict__ d, const T *__restrict__ w,
                             R *__restrict__ x_out, T *__restrict__ out, uint32_t h, float eps) {
  __shared__ float partial[32];
  const uint64_t row = (uint64_t)blockIdx.x * h;
  // Each thread keeps its values (and weights) in registers: the row is read once,
  // every load issued before the first is waited on. Rows longer than the registers
  // hold read the stream back (each thread only what it wrote).
  const bool fits = h <= NORM_PER_THREAD * blockDim.x;
  float v[NORM_PER_THREAD], wv[NORM_PER_THREAD];
  float ss = 0.0f;
  if (fits) {
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; ++k) {
      const uint32_t i = threadIdx.x + k * blockDim.x;
      if (i < h) {
        v[k] = to_f(x[row + i]) + (d != nullptr ? to_f(d[row + i]) : 0.0f);
        wv[k] = to_f(w[i]);
      }
    }
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; ++k) {
      const uint32_t i = threadIdx.x + k * blockDim.x;
      if (i < h) {
        if (d != nullptr) {
          const R r = from_f<R>(v[k]);
          x_out[row + i] = r;
          v[k] = to_f(r);
        }
        ss += v[k] * v[k];
      }
    }
  } else {
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
      float a = to_f(x[row + i]);
      if (d != nullptr) {
        const R r = from_f<R>(a + to_f(d[row + i]));
        x_out[row + i] = r;
        a = to_f(r);
      }
      ss += a * a;
    }
  }
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) ss += __shfl_xor_sync(FULL_MASK, ss, o);
  const uint32_t warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, warps = blockDim.x / WARP;
  if (lane == 0) partial[warp] = ss;
  __syncthreads();
  ss = lane < warps ? partial[lane] : 0.0f;
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) ss += __shfl_xor_sync(FULL_MASK, ss, o);
  const float scale = rsqrtf(ss / (float)h + eps);
  if (fits) {
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; ++k) {
      const uint32_t i = threadIdx.x + k * blockDim.x;
      if (i < h) out[row + i] = from_f<T>(v[k] * scale * wv[k]);
    }
    return;
  }
  const R *src = d != nullptr ? x_out : x;
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x)
    out[row + i] = from_f<T>(to_f(src[row + i]) * scale * to_f(w[i]));
}

// Attention over paged K/V. Block (tile, kv head): the consecutive queries
// tiles[x]..tiles[x + 1] of one sequence (at most blockDim / 32 / groups of them), one
// warp per (query, q head of this kv head's group); the warps share each 32-key tile
// of K and V in shared memory. Query i attends keys 0..ctx[i] of sequence seq[i].
// q, out: [n, H, D]; pools: [slots, KV, D]; tables: [sequences, max_blocks];
// tiles: [grid x + 1], increasing, cut at the sequences' boundaries (varlen batches).
// Split keys (grid z = `splits` > 1, flash-decoding): each block takes a share of the
// key tiles and leaves its partial softmax state (max, sum, unnormalised output) in
// part_ml [n, H, splits, 2] and part_acc [n, H, splits, D] for attention_combine; a
// decode batch of few sequences then still fills the GPU at long contexts.
#define MAX_WARPS 16
template <typename T, int D>
__device__ void paged_attention(const T *__restrict__ q, const T *__restrict__ k_pool,
                                const T *__restrict__ v_pool, const uint32_t *__restrict__ tables,
                                const uint32_t *__restrict__ seq, const uint32_t *__restrict__ ctx,
                                const uint32_t *__restrict__ tiles, T *__restrict__ out, uint32_t n,
                                uint32_t H, uint32_t KV, uint32_t block_size, uint32_t max_blocks,
                                float scale, uint32_t splits, float *__restrict__ part_ml,
                                float *__restrict__ part_acc) {
  constexpr int E = D / WARP;  // output dims per lane
  __shared__ float ks[WARP][D + 1];  // +1: lane j reads row j, so rows start on different banks
  __shared__ float vs[WARP][D];
  __shared__ float qs[MAX_WARPS][D];
  const uint32_t groups = H / KV;
  const uint32_t warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  // This block's queries: rows tiles[x]..tiles[x + 1], all of one sequence (a varlen
  // batch is cut into tiles at its sequences' boundaries).
  const uint32_t kvh = blockIdx.y, q0 = tiles[blockIdx.x], q_end = min(tiles[blockIdx.x + 1], n);
  const uint32_t qi = q0 + warp / groups, h = kvh * groups + warp % groups;
  const bool active = qi < q_end;
  const uint32_t my_ctx = active ? ctx[qi] : 0;
  uint32_t tile_ctx = 0;
  for (uint32_t j = q0; j < q_end; ++j) tile_ctx = max(tile_ctx, ctx[j]);
  const uint32_t *table = tables + (uint64_t)seq[q0] * max_blocks;
  if (active)
    for (int i = lane; i < D; i += WARP) qs[warp][i] = to_f(q[((uint64_t)qi * H + h) * D + i]) * scale;

  float m = -INFINITY, l = 0.0f, acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.0f;

  const uint32_t chunks = (tile_ctx + WARP - 1) / WARP, per = (chunks + splits - 1) / splits;
  const uint32_t c_end = min(chunks, (blockIdx.z + 1) * per);
  for (uint32_t c = blockIdx.z * per; c < c_end; ++c) {
    const uint32_t k0 = c * WARP;
    __syncthreads();  // the previous tile is consumed (and qs written, the first time)
    // 16-byte loads: a key's D values are contiguous in the pool (and 16-byte aligned,
    // D being a multiple of 32), so each thread moves VEC of them at once.
    constexpr int VEC = 16 / sizeof(T), PER_KEY = D / VEC;
    for (uint32_t e = threadIdx.x; e < WARP * PER_KEY; e += blockDim.x) {
      const uint32_t j = e / PER_KEY, i = (e % PER_KEY) * VEC, kp = k0 + j;
      uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);  // zero bits: 0.0 in every T
      if (kp < tile_ctx) {
        const uint64_t s = (uint64_t)table[kp / block_size] * block_size + kp % block_size;
        const uint64_t off = (s * KV + kvh) * D + i;
        kr = *reinterpret_cast<const uint4 *>(k_pool + off);
        vr = *reinterpret_cast<const uint4 *>(v_pool + off);
      }
      const T *kx = reinterpret_cast<const T *>(&kr), *vx = reinterpret_cast<const T *>(&vr);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        ks[j][i + v] = to_f(kx[v]);
        vs[j][i + v] = to_f(vx[v]);
      }
    }
    __syncthreads();
    if (!active || k0 >= my_ctx) continue;  // uniform per warp
    const bool valid = k0 + lane < my_ctx;
    float s = -INFINITY;
    if (valid) {
      s = 0.0f;
#pragma unroll 16
      for (int i = 0; i < D; ++i) s += qs[warp][i] * ks[lane][i];
    }
    float cmax = s;
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) cmax = fmaxf(cmax, __shfl_xor_sync(FULL_MASK, cmax, o));
    const float mnew = fmaxf(m, cmax);
    const float p = valid ? expf(s - mnew) : 0.0f;
    const float corr = expf(m - mnew);  // 0 on the first tile (m = -inf)
    float psum = p;
#pragma unroll
    for (int o = WARP / 2; o > 0; o /= 2) psum += __shfl_xor_sync(FULL_MASK, psum, o);
    l = l * corr + psum;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= corr;
#pragma unroll 8
    for (int j = 0; j < WARP; ++j) {
      const float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += pj * vs[j][lane + WARP * e];
    }
    m = mnew;
  }
  if (!active) return;
  if (splits == 1) {
#pragma unroll
    for (int e = 0; e < E; ++e)  // l = 0: no key at all (a padding row), zeros
      out[((uint64_t)qi * H + h) * D + lane + WARP * e] = from_f<T>(l > 0.0f ? acc[e] / l : 0.0f);
    return;
  }
  const uint64_t pi = ((uint64_t)qi * H + h) * splits + blockIdx.z;
  if (lane == 0) {
    part_ml[2 * pi] = m;  // -inf with l = 0: no key of this query in this share
    part_ml[2 * pi + 1] = l;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) part_acc[pi * D + lane + WARP * e] = acc[e];
}

// Merges the `splits` partial states of each (query, head) row: one warp per row.
template <typename T, int D>
__device__ void attention_combine(const float *__restrict__ part_ml, const float *__restrict__ part_acc,
                                  T *__restrict__ out, uint32_t rows, uint32_t splits) {
  constexpr int E = D / WARP;
  const uint32_t row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
  if (row >= rows) return;
  const uint64_t base = (uint64_t)row * splits;
  float mx = -INFINITY;
  for (uint32_t s = 0; s < splits; ++s) mx = fmaxf(mx, part_ml[2 * (base + s)]);
  float sum = 0.0f, acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.0f;
  for (uint32_t s = 0; s < splits; ++s) {
    const float m = part_ml[2 * (base + s)];
    if (m == -INFINITY) continue;
    const float w = expf(m - mx);
    sum += w * part_ml[2 * (base + s) + 1];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] += w * part_acc[(base + s) * D + lane + WARP * e];
  }
#pragma unroll
  for (int e = 0; e < E; ++e) out[(uint64_t)row * D + lane + WARP * e] = from_f<T>(sum > 0.0f ? acc[e] / sum : 0.0f);
}

// Prefill attention on tensor cores, FlashAttention-2's scheme: a block takes 64
// consecutive queries of one sequence (tiles[x]..tiles[x + 1]) for one q head, four
// warps of 16 rows; K/V come through the block table in tiles of 64 keys (16-byte
// loads; V stored transposed so both products read their operands as 32-bit pairs);
// S = Q K^T and O += P V are mma.sync m16n8k16 with f32 accumulators kept in
// registers, the online softmax runs on the accumulators (each thread holds two rows,
// four threads share a row), P goes to the second product as bf16/f16 straight from
// registers, as FlashAttention does. Causal per row: query i attends keys 0..ctx[i]
// (a cached prefix included); tiles past the block's longest context are skipped.
// q, out: [n, H, D]; pools: [slots, KV, D]; grid (tiles, H), 128 threads.
#define FA_ROWS 64
#define FA_KEYS 64
#define FA_PAD 8  // elements padding each shared row: conflict-free fragment reads

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// d += a (16x16, row-major) * b (16x8, column-major), f32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float *d, const uint32_t *a, uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no bf16/f16 mma before sm_80: the host never launches this kernel there
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <> __device__ __forceinline__ void mma16816<__half>(float *d, const uint32_t *a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // no bf16/f16 mma before sm_80: the host never launches this kernel there
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <typename T, int D>
__device__ void flash_prefill(const T *__restrict__ q, const T *__restrict__ k_pool, const T *__restrict__ v_pool,
                              const uint32_t *__restrict__ tables, const uint32_t *__restrict__ seq,
                              const uint32_t *__restrict__ ctx, const uint32_t *__restrict__ tiles, T *__restrict__ out,
                              uint32_t n, uint32_t H, uint32_t KV, uint32_t block_size, uint32_t max_blocks,
                              float scale_log2) {
  constexpr int VEC = 8, PER_ROW = D / VEC, DT = D / 8, KT = D / 16;
  __shared__ __align__(16) T ks[FA_KEYS][D + FA_PAD];  // K tile; Q's staging first
  __shared__ __align__(16) T vt[D][FA_KEYS + FA_PAD];  // V tile, transposed
  const uint32_t h = blockIdx.y, kvh = h / (H / KV);
  const uint32_t q0 = tiles[blockIdx.x], q_end = min(tiles[blockIdx.x + 1], n);
  const uint32_t warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
  const uint32_t *table = tables + (uint64_t)seq[q0] * max_blocks;

  // Q rows of this tile, staged through ks into A fragments (kept for every key tile).
  for (uint32_t e = threadIdx.x; e < FA_ROWS * PER_ROW; e += blockDim.x) {
    const uint32_t r = e / PER_ROW, i = (e % PER_ROW) * VEC;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (q0 + r < q_end) v = *reinterpret_cast<const uint4 *>(q + ((uint64_t)(q0 + r) * H + h) * D + i);
    *reinterpret_cast<uint4 *>(&ks[r][i]) = v;
  }
  __syncthreads();
  const uint32_t r0 = warp * 16 + g;  // this thread's rows: r0 and r0 + 8
  uint32_t qa[KT][4];
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    qa[kk][0] = *reinterpret_cast<const uint32_t *>(&ks[r0][kk * 16 + 2 * t]);
    qa[kk][1] = *reinterpret_cast<const uint32_t *>(&ks[r0 + 8][kk * 16 + 2 * t]);
    qa[kk][2] = *reinterpret_cast<const uint32_t *>(&ks[r0][kk * 16 + 2 * t + 8]);
    qa[kk][3] = *reinterpret_cast<const uint32_t *>(&ks[r0 + 8][kk * 16 + 2 * t + 8]);
  }
  const uint32_t ctx0 = q0 + r0 < q_end ? ctx[q0 + r0] : 0, ctx1 = q0 + r0 + 8 < q_end ? ctx[q0 + r0 + 8] : 0;
  uint32_t tile_ctx = 0;
  for (uint32_t j = q0; j < q_end; ++j) tile_ctx = max(tile_ctx, ctx[j]);

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

  for (uint32_t k0 = 0; k0 < tile_ctx; k0 += FA_KEYS) {
    __syncthreads();  // the previous tile (or Q's staging) is consumed
    for (uint32_t e = threadIdx.x; e < FA_KEYS * PER_ROW; e += blockDim.x) {
      const uint32_t j = e / PER_ROW, i = (e % PER_ROW) * VEC, kp = k0 + j;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (kp < tile_ctx) {
        const uint64_t sl = (uint64_t)table[kp / block_size] * block_size + kp % block_size;
        const uint64_t off = (sl * KV + kvh) * D + i;
        kv = *reinterpret_cast<const uint4 *>(k_pool + off);
        vv = *reinterpret_cast<const uint4 *>(v_pool + off);
      }
      *reinterpret_cast<uint4 *>(&ks[j][i]) = kv;
      const T *vp = reinterpret_cast<const T *>(&vv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) vt[i + v][j] = vp[v];
    }
    __syncthreads();
    // None of the warp's rows sees these keys (mma.sync needs the whole warp: uniform).
    if (!__any_sync(FULL_MASK, k0 < max(ctx0, ctx1))) continue;

    float s[FA_KEYS / 8][4];
#pragma unroll
    for (int nt = 0; nt < FA_KEYS / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t *>(&ks[nt * 8 + g][kk * 16 + 2 * t]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t *>(&ks[nt * 8 + g][kk * 16 + 2 * t + 8]);
        mma16816<T>(s[nt], qa[kk], b0, b1);
      }
    }
    // Scale (to log2 units) and mask: key kp is seen by a row when kp < its ctx.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < FA_KEYS / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t kp = k0 + nt * 8 + 2 * t + (c & 1);
        const bool seen = kp < (c < 2 ? ctx0 : ctx1);
        s[nt][c] = seen ? s[nt][c] * scale_log2 : -INFINITY;
      }
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, off));
    }
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    // A row with no key seen yet keeps -inf: exponents taken from 0 give p = 0, corr = 0.
    const float u0 = n0 == -INFINITY ? 0.0f : n0, u1 = n1 == -INFINITY ? 0.0f : n1;
    const float c0 = exp2f(m0 - u0), c1 = exp2f(m1 - u1);
    m0 = n0;
    m1 = n1;
    l0 *= c0;
    l1 *= c1;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= c0;
      o[d][1] *= c0;
      o[d][2] *= c1;
      o[d][3] *= c1;
    }
#pragma unroll
    for (int nt = 0; nt < FA_KEYS / 8; ++nt) {
      s[nt][0] = exp2f(s[nt][0] - u0);
      s[nt][1] = exp2f(s[nt][1] - u0);
      s[nt][2] = exp2f(s[nt][2] - u1);
      s[nt][3] = exp2f(s[nt][3] - u1);
      l0 += s[nt][0] + s[nt][1];
      l1 += s[nt][2] + s[nt][3];
    }
    // O += P V, P's A fragments straight from S's accumulators (16 keys = 2 n-tiles).
#pragma unroll
    for (int kk = 0; kk < FA_KEYS / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t *>(&vt[d * 8 + g][kk * 16 + 2 * t]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t *>(&vt[d * 8 + g][kk * 16 + 2 * t + 8]);
        mma16816<T>(o[d], pa, b0, b1);
      }
    }
  }
  // Each row's sum is spread over the four threads sharing it.
#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    l0 += __shfl_xor_sync(FULL_MASK, l0, off);
    l1 += __shfl_xor_sync(FULL_MASK, l1, off);
  }
  const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
  for (int d = 0; d < DT; ++d) {
    const uint32_t col = d * 8 + 2 * t;
    if (q0 + r0 < q_end)
      *reinterpret_cast<uint32_t *>(out + ((uint64_t)(q0 + r0) * H + h) * D + col) = pack2<T>(o[d][0] * i0, o[d][1] * i0);
    if (q0 + r0 + 8 < q_end)
      *reinterpret_cast<uint32_t *>(out + ((uint64_t)(q0 + r0 + 8) * H + h) * D + col) = pack2<T>(o[d][2] * i1, o[d][3] * i1);
  }
}

#define FLASH(TYPE, SUFFIX, DIM)                                                                          \
  extern "C" __global__ void __launch_bounds__(128) flash_prefill_##SUFFIX##_##DIM(                       \
      const TYPE *q, const TYPE *k_pool, const TYPE *v_pool, const uint32_t *tables, const uint32_t *seq,  \
      const uint32_t *ctx, const uint32_t *tiles, TYPE *out, uint32_t n, uint32_t H, uint32_t KV,         \
      uint32_t block_size, uint32_t max_blocks, float scale_log2) {                                       \
    flash_prefill<TYPE, DIM>(q, k_pool, v_pool, tables, seq, ctx, tiles, out, n, H, KV, block_size,       \
                             max_blocks, scale_log2);                                                     \
  }
FLASH(__nv_bfloat16, bf16, 64)
FLASH(__nv_bfloat16, bf16, 128)
FLASH(__half, f16, 64)
FLASH(__half, f16, 128)

// Greedy picks on the device: each row's largest value and, of equals, the lowest
// index (as the host's argmax); NaN never picked. Many blocks share a row (one block
// reading a 128k-entry row alone is bound by one SM's memory latency): each finds the
// best of its share and merges it into out[row] with one 64-bit atomicMax on a key
// ordered as (value, -index). out must start at 0; a row of only NaN keeps key 0 and
// reads as index 0, as does a row of only -inf (every key equal, the lowest index).
// logits: [rows, cols] f32; grid (shares, rows).
__device__ __forceinline__ unsigned long long argmax_key(float x, uint32_t i) {
  if (isnan(x)) return 0ull;
  const uint32_t b = __float_as_uint(x);
  const uint32_t ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ((unsigned long long)ordered << 32) | (0xffffffffu - i);
}

#define ARGMAX_THREADS 256
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_rows(const float *__restrict__ logits, unsigned long long *__restrict__ out, uint32_t cols) {
  __shared__ unsigned long long best[ARGMAX_THREADS / WARP];
  const float *row = logits + (uint64_t)blockIdx.y * cols;
  const uint32_t per = (cols + gridDim.x - 1) / gridDim.x;
  const uint32_t from = blockIdx.x * per, to = min(cols, from + per);
  unsigned long long k = 0ull;
  for (uint32_t i = from + threadIdx.x; i < to; i += blockDim.x) {
    const unsigned long long c = argmax_key(row[i], i);
    k = c > k ? c : k;
  }
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) {
    const unsigned long long c = __shfl_xor_sync(FULL_MASK, k, o);
    k = c > k ? c : k;
  }
  const uint32_t warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  if (lane == 0) best[warp] = k;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (uint32_t w = 1; w < blockDim.x / WARP; ++w) k = best[w] > k ? best[w] : k;
    atomicMax(out + blockIdx.y, k);
  }
}

#define ELEMENTWISE(TYPE, SUFFIX)                                                                      \
  extern "C" __global__ void rope_kv_##SUFFIX(const TYPE *qkv, const uint32_t *pos, const uint32_t *slot, \
                                              const float *cos, const float *sin, TYPE *q_out, TYPE *k_pool, \
                                              TYPE *v_pool, uint32_t n, uint32_t H, uint32_t KV, uint32_t D,   \
                                              uint32_t in_dtype) {                                             \
    rope_kv<TYPE>(qkv, pos, slot, cos, sin, q_out, k_pool, v_pool, n, H, KV, D, in_dtype);             \
  }                                                                                                    \
  extern "C" __global__ void silu_mul_##SUFFIX(const TYPE *gu, TYPE *out, uint32_t n, uint32_t I) {    \
    silu_mul<TYPE>(gu, out, n, I);                                                                     \
  }

#define ADD_RMS_NORM(TYPE, RES, SUFFIX)                                                               \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const RES *x, const TYPE *d, const TYPE *w, RES *x_out, \
                                                   TYPE *out, uint32_t h, float eps) {                    \
    add_rms_norm<TYPE, RES>(x, d, w, x_out, out, h, eps);                                               \
  }

#define ATTENTION(TYPE, SUFFIX, DIM)                                                                     \
  extern "C" __global__ void __launch_bounds__(MAX_WARPS * WARP) paged_attention_##SUFFIX##_##DIM(       \
      const TYPE *q, const TYPE *k_pool, const TYPE *v_pool, const uint32_t *tables, const uint32_t *seq, \
      const uint32_t *ctx, const uint32_t *tiles, TYPE *out, uint32_t n, uint32_t H, uint32_t KV,        \
      uint32_t block_size, uint32_t max_blocks, float scale, uint32_t splits, float *part_ml,             \
      float *part_acc) {                                                                                 \
    paged_attention<TYPE, DIM>(q, k_pool, v_pool, tables, seq, ctx, tiles, out, n, H, KV, block_size,    \
                               max_blocks, scale, splits, part_ml, part_acc);                            \
  }                                                                                                      \
  extern "C" __global__ void attention_combine_##SUFFIX##_##DIM(const float *part_ml, const float *part_acc, \
                                                               TYPE *out, uint32_t rows, uint32_t splits) { \
    attention_combine<TYPE, DIM>(part_ml, part_acc, out, rows, splits);                                  \
  }

#define ALL(TYPE, SUFFIX)                 \
  ELEMENTWISE(TYPE, SUFFIX)               \
  ADD_RMS_NORM(TYPE, TYPE, SUFFIX)        \
  ADD_RMS_NORM(TYPE, float, SUFFIX##_f32) \
  ATTENTION(TYPE, SUFFIX, 32)  \
  ATTENTION(TYPE, SUFFIX, 64)  \
  ATTENTION(TYPE, SUFFIX, 128)

ALL(float, f32)
ALL(__nv_bfloat16, bf16)
ALL(__half, f16)
