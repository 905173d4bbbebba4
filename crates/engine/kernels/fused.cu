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
template <typename T, typename R>
__device__ void add_rms_norm(const R *__restrict__ x, const T *__restrict__ d, const T *__restrict__ w,
                             R *__restrict__ x_out, T *__restrict__ out, uint32_t h, float eps) {
  __shared__ float partial[32];
  const uint64_t row = (uint64_t)blockIdx.x * h;
  float ss = 0.0f;
  for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
    float v = to_f(x[row + i]);
    if (d != nullptr) {
      const R r = from_f<R>(v + to_f(d[row + i]));
      x_out[row + i] = r;
      v = to_f(r);
    }
    ss += v * v;
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
  // Each thread reads back only the elements it wrote above.
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
    for (uint32_t e = threadIdx.x; e < WARP * D; e += blockDim.x) {
      const uint32_t j = e / D, i = e % D, kp = k0 + j;
      float kx = 0.0f, vx = 0.0f;
      if (kp < tile_ctx) {
        const uint64_t s = (uint64_t)table[kp / block_size] * block_size + kp % block_size;
        const uint64_t off = (s * KV + kvh) * D + i;
        kx = to_f(k_pool[off]);
        vx = to_f(v_pool[off]);
      }
      ks[j][i] = kx;
      vs[j][i] = vx;
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
    for (int e = 0; e < E; ++e) out[((uint64_t)qi * H + h) * D + lane + WARP * e] = from_f<T>(acc[e] / l);
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
  for (int e = 0; e < E; ++e) out[(uint64_t)row * D + lane + WARP * e] = from_f<T>(acc[e] / sum);
}

// The warp's best (value, index): larger value wins, equal values the lower index.
__device__ __forceinline__ void warp_argmax(float &v, uint32_t &idx) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o /= 2) {
    const float ov = __shfl_xor_sync(FULL_MASK, v, o);
    const uint32_t oi = __shfl_xor_sync(FULL_MASK, idx, o);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// Greedy picks on the device: the index of each row's largest value, ties to the
// lowest index (as the host's argmax), NaN never picked. logits: [rows, cols] f32.
#define ARGMAX_THREADS 1024
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    argmax_rows(const float *__restrict__ logits, uint32_t *__restrict__ out, uint32_t cols) {
  __shared__ float best_v[ARGMAX_THREADS / WARP];
  __shared__ uint32_t best_i[ARGMAX_THREADS / WARP];
  const float *row = logits + (uint64_t)blockIdx.x * cols;
  float v = -INFINITY;
  uint32_t idx = 0xffffffffu;
  for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float x = row[i];
    if (x > v || (idx == 0xffffffffu && x == v)) {  // ascending i: the first of equals stays
      v = x;
      idx = i;
    }
  }
  warp_argmax(v, idx);
  const uint32_t warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
  if (lane == 0) {
    best_v[warp] = v;
    best_i[warp] = idx;
  }
  __syncthreads();
  if (warp == 0) {
    const uint32_t warps = blockDim.x / WARP;
    v = lane < warps ? best_v[lane] : -INFINITY;
    idx = lane < warps ? best_i[lane] : 0xffffffffu;
    warp_argmax(v, idx);
    // A row of only NaN or -inf: index 0, as the host's argmax.
    if (lane == 0) out[blockIdx.x] = idx == 0xffffffffu ? 0 : idx;
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
