#pragma once
// CUDA scaled dot-product attention, forward and backward — the twin of backend/cpu/attention.hpp, which is the
// reference in tests/cuda/test_backend_ops.cu:
//   scores = (q·kᵀ)·scale, scale = float(1/√D); masked scores (causal: key j > past + i; padding key) are −∞;
//   P = softmax(scores) per row; a row with no key left gives P = 0 and output 0; out = P·v.
// Grouped-query heads: head h reads kv head h / (heads / kv_heads).
//
// Layout: the layer's own, token-major, so the projections' outputs are used without a transpose:
//   q, out (B·Tq, heads·D), k, v (B·S, kv_heads·D), i.e. logically (B, heads, T, D) with the head inside the row.
// S ≥ Tq; query i sits at absolute position past + i with past = S − Tq (training: S = Tq, past = 0).
//
// The kernels are the plain FlashAttention-2 scheme in SIMT fp32 (correctness first; no tensor cores yet):
//   forward   one block per (query tile of kQTile rows, b·heads + h); each warp owns kQTile/kWarps query rows,
//             lane j scores key j of a kKTile = 32 key tile (K in shared memory padded to D+1 columns: no bank
//             conflicts), online softmax (running max m, sum l, rescaled accumulator), out = acc / l, and the
//             row's logsumexp m + log l saved for the backward (−∞ for a row with no key).
//   backward  Δ_i = dout_i · out_i (one warp per row); then
//             dq:     one block per (query tile, b·heads + h): P = exp(s − lse) recomputed, dS = P ⊙ (dP − Δ),
//                     dq = scale · dS·k — each block owns its dq rows;
//             dk, dv: one block per (key tile of kKTile2 rows, b·kv_heads + g): loops over the group's heads and the
//                     query tiles, dv = Σ Pᵀ dout, dk = scale · Σ dSᵀ q — each block owns its dk/dv rows, so the
//                     heads of a group are summed in head order without atomics: deterministic.
// Storage f32 or bf16 (q, k, v, out, grads share the dtype); arithmetic and lse f32. head_dim ≤ 256.
#include <cstdint>
#include <type_traits>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/backend/ops.hpp"

namespace cumo::gpu {

// backend/ops.hpp's: the kernels take packed keys (kv_stride 0 or kv_len); backend::Cuda packs a strided KV cache.
using backend::AttentionShape;

namespace kernels {

constexpr int kAttnWarps = 8;                 // 256 threads
constexpr int kQTile = 16;                    // query rows per block (forward, dq): 2 per warp
constexpr int kKTile = 32;                    // key columns per tile: one per lane
constexpr int kKTile2 = 16;                   // key rows per block (dk, dv): 2 per warp
constexpr int kQRowsPerWarp = kQTile / kAttnWarps;
constexpr int kKRowsPerWarp = kKTile2 / kAttnWarps;

struct AttnParams {
  std::int64_t B, Tq, S, past;
  int H, G, D;
  bool causal;
  float scale;
};

// Whether query i (0-based in its sequence) may attend to key j of sequence b.
__device__ __forceinline__ bool attn_allowed(const AttnParams& p, const std::int32_t* key_valid, std::int64_t b,
                                             std::int64_t i, std::int64_t j) {
  if (j >= p.S) return false;
  if (p.causal && j > p.past + i) return false;
  return !key_valid || key_valid[b * p.S + j] != 0;
}

// The last key any query of [q0, q0 + rows) may see, plus one (the key tiles to visit).
__device__ __forceinline__ std::int64_t attn_key_end(const AttnParams& p, std::int64_t q0, int rows) {
  if (!p.causal) return p.S;
  const std::int64_t last_q = q0 + rows - 1 < p.Tq - 1 ? q0 + rows - 1 : p.Tq - 1;
  const std::int64_t e = p.past + last_q + 1;
  return e < p.S ? e : p.S;
}

// rows [r0, r0 + rows) of a (·, ld) matrix, columns [col0, col0 + D), into shared memory with row pitch `pitch`;
// rows at or past `limit` are zero.
template <class T>
__device__ __forceinline__ void attn_load_tile(float* dst, int pitch, const T* __restrict__ src, std::int64_t ld,
                                               std::int64_t col0, std::int64_t r0, int rows, std::int64_t limit,
                                               int D) {
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = e / D, c = e % D;
    dst[r * pitch + c] = r0 + r < limit ? to_f32(src[(r0 + r) * ld + col0 + c]) : 0.f;
  }
}

// grid (⌈Tq / kQTile⌉, B·H). Dynamic shared memory: Q (kQTile × D), K (kKTile × (D+1)), V (kKTile × D).
template <class T, int DC>
__global__ void __launch_bounds__(kAttnWarps * kWarp)
    attention_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const std::int32_t* __restrict__ key_valid, AttnParams p, T* __restrict__ out,
                      float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int D = p.D;
  float* Qs = smem;
  float* Ks = Qs + kQTile * D;
  float* Vs = Ks + kKTile * (D + 1);
  const std::int64_t bh = blockIdx.y, b = bh / p.H;
  const int h = int(bh % p.H), g = h / (p.H / p.G);
  const std::int64_t q0 = std::int64_t(blockIdx.x) * kQTile;
  const std::int64_t ldq = std::int64_t(p.H) * D, ldk = std::int64_t(p.G) * D;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  attn_load_tile(Qs, D, q + b * p.Tq * ldq, ldq, std::int64_t(h) * D, q0, kQTile, p.Tq, D);
  float m[kQRowsPerWarp], l[kQRowsPerWarp], acc[kQRowsPerWarp][DC];
  #pragma unroll
  for (int rr = 0; rr < kQRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
    #pragma unroll
    for (int c = 0; c < DC; ++c) acc[rr][c] = 0.f;
  }
  const std::int64_t kend = attn_key_end(p, q0, kQTile);
  for (std::int64_t k0 = 0; k0 < kend; k0 += kKTile) {
    __syncthreads();  // the previous tile is consumed
    attn_load_tile(Ks, D + 1, k + b * p.S * ldk, ldk, std::int64_t(g) * D, k0, kKTile, p.S, D);
    attn_load_tile(Vs, D, v + b * p.S * ldk, ldk, std::int64_t(g) * D, k0, kKTile, p.S, D);
    __syncthreads();
    const std::int64_t j = k0 + lane;
    #pragma unroll
    for (int rr = 0; rr < kQRowsPerWarp; ++rr) {
      const int il = warp * kQRowsPerWarp + rr;
      const std::int64_t i = q0 + il;
      if (i >= p.Tq) continue;  // uniform over the warp
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot += Qs[il * D + d] * Ks[lane * (D + 1) + d];
      const bool ok = attn_allowed(p, key_valid, b, i, j);
      const float s = ok ? dot * p.scale : -INFINITY;
      const float mnew = fmaxf(m[rr], warp_max(s));
      if (mnew == -INFINITY) continue;  // nothing visible yet in this row (uniform: warp_max is)
      const float pj = ok ? expf(s - mnew) : 0.f;
      const float corr = expf(m[rr] - mnew);  // 0 on the first visible tile (m = −∞)
      l[rr] = l[rr] * corr + warp_sum(pj);
      m[rr] = mnew;
      #pragma unroll
      for (int c = 0; c < DC; ++c) acc[rr][c] *= corr;
      for (int jj = 0; jj < kKTile; ++jj) {
        const float pjj = __shfl_sync(0xffffffffu, pj, jj);
        #pragma unroll
        for (int c = 0; c < DC; ++c) {
          const int d = lane + c * kWarp;
          if (d < D) acc[rr][c] += pjj * Vs[jj * D + d];
        }
      }
    }
  }
  #pragma unroll
  for (int rr = 0; rr < kQRowsPerWarp; ++rr) {
    const std::int64_t i = q0 + warp * kQRowsPerWarp + rr;
    if (i >= p.Tq) continue;
    const bool any = l[rr] > 0.f;
    const float inv = any ? 1.f / l[rr] : 0.f;
    #pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) out[(b * p.Tq + i) * ldq + std::int64_t(h) * D + d] = from_f32<T>(acc[rr][c] * inv);
    }
    if (lane == 0) lse[bh * p.Tq + i] = any ? m[rr] + logf(l[rr]) : -INFINITY;
  }
}

// Δ[b, h, i] = Σ_d dout · out, one warp per row.
template <class T>
__global__ void attention_delta(const T* __restrict__ out, const T* __restrict__ dout, AttnParams p,
                                float* __restrict__ delta) {
  const std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;  // (b·H + h)·Tq + i
  const int lane = threadIdx.x % kWarp;
  if (row >= p.B * p.H * p.Tq) return;
  const std::int64_t i = row % p.Tq, bh = row / p.Tq, b = bh / p.H;
  const int h = int(bh % p.H);
  const std::int64_t base = (b * p.Tq + i) * std::int64_t(p.H) * p.D + std::int64_t(h) * p.D;
  float s = 0.f;
  for (int d = lane; d < p.D; d += kWarp) s += to_f32(dout[base + d]) * to_f32(out[base + d]);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// grid (⌈Tq / kQTile⌉, B·H). Shared: Q, dO (kQTile × D), K, V (kKTile × (D+1)).
template <class T, int DC>
__global__ void __launch_bounds__(kAttnWarps * kWarp)
    attention_backward_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const std::int32_t* __restrict__ key_valid, const T* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p,
                          T* __restrict__ dq) {
  extern __shared__ float smem[];
  const int D = p.D;
  float* Qs = smem;
  float* dOs = Qs + kQTile * D;
  float* Ks = dOs + kQTile * D;
  float* Vs = Ks + kKTile * (D + 1);
  const std::int64_t bh = blockIdx.y, b = bh / p.H;
  const int h = int(bh % p.H), g = h / (p.H / p.G);
  const std::int64_t q0 = std::int64_t(blockIdx.x) * kQTile;
  const std::int64_t ldq = std::int64_t(p.H) * D, ldk = std::int64_t(p.G) * D;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  attn_load_tile(Qs, D, q + b * p.Tq * ldq, ldq, std::int64_t(h) * D, q0, kQTile, p.Tq, D);
  attn_load_tile(dOs, D, dout + b * p.Tq * ldq, ldq, std::int64_t(h) * D, q0, kQTile, p.Tq, D);
  float L[kQRowsPerWarp], Dl[kQRowsPerWarp], acc[kQRowsPerWarp][DC];
  #pragma unroll
  for (int rr = 0; rr < kQRowsPerWarp; ++rr) {
    const std::int64_t i = q0 + warp * kQRowsPerWarp + rr;
    L[rr] = i < p.Tq ? lse[bh * p.Tq + i] : -INFINITY;
    Dl[rr] = i < p.Tq ? delta[bh * p.Tq + i] : 0.f;
    #pragma unroll
    for (int c = 0; c < DC; ++c) acc[rr][c] = 0.f;
  }
  const std::int64_t kend = attn_key_end(p, q0, kQTile);
  for (std::int64_t k0 = 0; k0 < kend; k0 += kKTile) {
    __syncthreads();
    attn_load_tile(Ks, D + 1, k + b * p.S * ldk, ldk, std::int64_t(g) * D, k0, kKTile, p.S, D);
    attn_load_tile(Vs, D + 1, v + b * p.S * ldk, ldk, std::int64_t(g) * D, k0, kKTile, p.S, D);
    __syncthreads();
    const std::int64_t j = k0 + lane;
    #pragma unroll
    for (int rr = 0; rr < kQRowsPerWarp; ++rr) {
      const int il = warp * kQRowsPerWarp + rr;
      const std::int64_t i = q0 + il;
      if (i >= p.Tq || L[rr] == -INFINITY) continue;  // uniform; a row with no key has zero gradients
      float dot = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) {
        dot += Qs[il * D + d] * Ks[lane * (D + 1) + d];
        dp += dOs[il * D + d] * Vs[lane * (D + 1) + d];
      }
      const bool ok = attn_allowed(p, key_valid, b, i, j);
      const float P = ok ? expf(dot * p.scale - L[rr]) : 0.f;
      const float dS = P * (dp - Dl[rr]);
      for (int jj = 0; jj < kKTile; ++jj) {
        const float s = __shfl_sync(0xffffffffu, dS, jj);
        #pragma unroll
        for (int c = 0; c < DC; ++c) {
          const int d = lane + c * kWarp;
          if (d < D) acc[rr][c] += s * Ks[jj * (D + 1) + d];
        }
      }
    }
  }
  #pragma unroll
  for (int rr = 0; rr < kQRowsPerWarp; ++rr) {
    const std::int64_t i = q0 + warp * kQRowsPerWarp + rr;
    if (i >= p.Tq) continue;
    #pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) dq[(b * p.Tq + i) * ldq + std::int64_t(h) * D + d] = from_f32<T>(p.scale * acc[rr][c]);
    }
  }
}

// grid (⌈S / kKTile2⌉, B·G). Shared: Q, dO (kKTile × (D+1)) for a tile of 32 queries, K, V (kKTile2 × D), and
// the 32 queries' lse and Δ. Warp w owns keys k0 + w·kKRowsPerWarp + kk; lane = query within the tile.
template <class T, int DC>
__global__ void __launch_bounds__(kAttnWarps * kWarp)
    attention_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const std::int32_t* __restrict__ key_valid, const T* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ delta, AttnParams p,
                            T* __restrict__ dk, T* __restrict__ dv) {
  extern __shared__ float smem[];
  const int D = p.D;
  float* Qs = smem;
  float* dOs = Qs + kKTile * (D + 1);
  float* Ks = dOs + kKTile * (D + 1);
  float* Vs = Ks + kKTile2 * D;
  float* Ls = Vs + kKTile2 * D;
  float* Ds = Ls + kKTile;
  const std::int64_t bg = blockIdx.y, b = bg / p.G;
  const int g = int(bg % p.G), per = p.H / p.G;
  const std::int64_t k0 = std::int64_t(blockIdx.x) * kKTile2;
  const std::int64_t ldq = std::int64_t(p.H) * D, ldk = std::int64_t(p.G) * D;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;

  attn_load_tile(Ks, D, k + b * p.S * ldk, ldk, std::int64_t(g) * D, k0, kKTile2, p.S, D);
  attn_load_tile(Vs, D, v + b * p.S * ldk, ldk, std::int64_t(g) * D, k0, kKTile2, p.S, D);
  float dk_acc[kKRowsPerWarp][DC], dv_acc[kKRowsPerWarp][DC];
  #pragma unroll
  for (int kk = 0; kk < kKRowsPerWarp; ++kk)
    #pragma unroll
    for (int c = 0; c < DC; ++c) dk_acc[kk][c] = dv_acc[kk][c] = 0.f;
  // Causal: queries before k0 − past see none of these keys.
  std::int64_t qstart = p.causal ? k0 - p.past : 0;
  qstart = qstart < 0 ? 0 : (qstart / kKTile) * kKTile;
  for (int h = g * per; h < (g + 1) * per; ++h) {
    const std::int64_t bh = b * p.H + h;
    for (std::int64_t q0 = qstart; q0 < p.Tq; q0 += kKTile) {
      __syncthreads();  // the previous query tile is consumed (and K, V are loaded on the first pass)
      attn_load_tile(Qs, D + 1, q + b * p.Tq * ldq, ldq, std::int64_t(h) * D, q0, kKTile, p.Tq, D);
      attn_load_tile(dOs, D + 1, dout + b * p.Tq * ldq, ldq, std::int64_t(h) * D, q0, kKTile, p.Tq, D);
      if (threadIdx.x < kKTile) {
        const std::int64_t i = q0 + threadIdx.x;
        Ls[threadIdx.x] = i < p.Tq ? lse[bh * p.Tq + i] : -INFINITY;
        Ds[threadIdx.x] = i < p.Tq ? delta[bh * p.Tq + i] : 0.f;
      }
      __syncthreads();
      const std::int64_t i = q0 + lane;
      const float Li = Ls[lane], Di = Ds[lane];
      #pragma unroll
      for (int kk = 0; kk < kKRowsPerWarp; ++kk) {
        const int jl = warp * kKRowsPerWarp + kk;
        const std::int64_t j = k0 + jl;
        if (j >= p.S) continue;  // uniform over the warp
        float dot = 0.f, dp = 0.f;
        for (int d = 0; d < D; ++d) {
          dot += Qs[lane * (D + 1) + d] * Ks[jl * D + d];
          dp += dOs[lane * (D + 1) + d] * Vs[jl * D + d];
        }
        const bool ok = i < p.Tq && Li != -INFINITY && attn_allowed(p, key_valid, b, i, j);
        const float P = ok ? expf(dot * p.scale - Li) : 0.f;
        const float dS = P * (dp - Di);
        for (int ii = 0; ii < kKTile; ++ii) {
          const float Pi = __shfl_sync(0xffffffffu, P, ii), dSi = __shfl_sync(0xffffffffu, dS, ii);
          #pragma unroll
          for (int c = 0; c < DC; ++c) {
            const int d = lane + c * kWarp;
            if (d < D) {
              dv_acc[kk][c] += Pi * dOs[ii * (D + 1) + d];
              dk_acc[kk][c] += dSi * Qs[ii * (D + 1) + d];
            }
          }
        }
      }
    }
  }
  #pragma unroll
  for (int kk = 0; kk < kKRowsPerWarp; ++kk) {
    const std::int64_t j = k0 + warp * kKRowsPerWarp + kk;
    if (j >= p.S) continue;
    #pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) {
        dk[(b * p.S + j) * ldk + std::int64_t(g) * D + d] = from_f32<T>(p.scale * dk_acc[kk][c]);
        dv[(b * p.S + j) * ldk + std::int64_t(g) * D + d] = from_f32<T>(dv_acc[kk][c]);
      }
    }
  }
}

}  // namespace kernels

namespace detail {

inline kernels::AttnParams attention_params(const char* where, AttentionShape s) {
  if (s.kv_len == 0) s.kv_len = s.q_len;
  if (s.kv_heads == 0) s.kv_heads = s.heads;
  CUMO_CHECK(s.batch >= 0 && s.q_len >= 0 && s.heads > 0 && s.head_dim > 0, where, ": bad shape (batch ", s.batch,
             ", q_len ", s.q_len, ", heads ", s.heads, ", head_dim ", s.head_dim, ")");
  CUMO_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, where, ": ", s.heads, " heads do not split into groups of ",
             s.kv_heads, " kv heads");
  CUMO_CHECK(s.kv_len >= s.q_len, where, ": kv_len ", s.kv_len, " < q_len ", s.q_len,
             " (queries are the last q_len positions of the keys)");
  CUMO_CHECK(s.kv_stride == 0 || s.kv_stride == s.kv_len, where, ": the kernels take packed keys (kv_stride ",
             s.kv_stride, " != kv_len ", s.kv_len, ")");
  CUMO_CHECK(s.head_dim <= 8 * kWarp, where, ": head_dim ", s.head_dim, " > ", 8 * kWarp, " is not supported");
  CUMO_CHECK(s.batch * s.heads <= 65535 && s.batch * s.kv_heads <= 65535, where, ": batch·heads = ",
             s.batch * s.heads, " exceeds one launch (65535)");
  kernels::AttnParams p{};
  p.B = s.batch;
  p.Tq = s.q_len;
  p.S = s.kv_len;
  p.past = s.kv_len - s.q_len;
  p.H = int(s.heads);
  p.G = int(s.kv_heads);
  p.D = int(s.head_dim);
  p.causal = s.causal;
  p.scale = float(1.0 / std::sqrt(double(s.head_dim)));  // nn::Attention's scale
  return p;
}

inline void check_attention_tensors(const char* where, const kernels::AttnParams& p, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor* key_valid) {
  expect_contiguous(where, "q", q);
  expect_contiguous(where, "k", k);
  expect_contiguous(where, "v", v);
  check_shape(where, "q", q, {p.B * p.Tq, std::int64_t(p.H) * p.D});
  check_shape(where, "k", k, {p.B * p.S, std::int64_t(p.G) * p.D});
  check_shape(where, "v", v, {p.B * p.S, std::int64_t(p.G) * p.D});
  CUMO_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(), where, ": q, k and v must share a dtype (q ",
             name_of(q.dtype()), ", k ", name_of(k.dtype()), ", v ", name_of(v.dtype()), ")");
  if (key_valid && key_valid->defined()) {
    expect_contiguous(where, "key_valid", *key_valid);
    check_dtype(where, "key_valid", *key_valid, DType::i32);
    CUMO_CHECK(key_valid->numel() == p.B * p.S, where, ": key_valid has shape ", key_valid->shape(), " but expected (",
               p.B * p.S, ",) = batch · kv_len");
  }
}

// f32 or bf16 storage (f16 would be one more case; left out to keep nvcc's time down until someone needs it).
template <class F>
void dispatch_attention_dtype(DType t, const char* where, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
    default: fail(where, ": dtype ", name_of(t), " is not supported (f32, bf16)");
  }
}

// Calls f(std::integral_constant<int, DC>) with DC = ⌈D / 32⌉ rounded up to 2, 4 or 8 (registers per lane).
template <class F>
void dispatch_head_chunks(int D, F&& f) {
  if (D <= 2 * kWarp)
    f(std::integral_constant<int, 2>{});
  else if (D <= 4 * kWarp)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, 8>{});
}

// Launches `kernel` with `bytes` of dynamic shared memory, opting in above the 48 KiB default.
template <class Kernel, class... Args>
void launch_with_smem(Kernel kernel, dim3 grid, std::size_t bytes, const char* what, Args... args) {
  if (bytes > 48 * 1024)
    CUMO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  kernel<<<grid, kernels::kAttnWarps * kWarp, bytes, stream()>>>(args...);
  after_launch(what, __FILE__, __LINE__);
}

}  // namespace detail

// q (B·Tq, heads·D), k, v (B·S, kv_heads·D); key_valid (B·S,) i32 or null (0 = a padding key no query attends to).
// out (B·Tq, heads·D) same dtype; lse (B, heads, Tq) f32 — the row logsumexp the backward needs (−∞: no key).
inline void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                              const AttentionShape& shape, Tensor& out, Tensor& lse) {
  constexpr const char* where = "gpu::attention_forward";
  const kernels::AttnParams p = detail::attention_params(where, shape);
  detail::check_attention_tensors(where, p, q, k, v, key_valid);
  expect_same_layout(where, "out", out, "q", q);
  expect_contiguous(where, "lse", lse);
  check_dtype(where, "lse", lse, DType::f32);
  CUMO_CHECK(lse.numel() == p.B * p.H * p.Tq, where, ": lse has shape ", lse.shape(), " but expected (", p.B, ", ",
             p.H, ", ", p.Tq, ")");
  if (p.B * p.Tq == 0) return;
  const std::int32_t* kv = key_valid && key_valid->defined() ? ptr<std::int32_t>(*key_valid) : nullptr;
  const dim3 grid(unsigned((p.Tq + kernels::kQTile - 1) / kernels::kQTile), unsigned(p.B * p.H));
  const std::size_t smem = sizeof(float) * std::size_t(kernels::kQTile * p.D + kernels::kKTile * (p.D + 1) +
                                                       kernels::kKTile * p.D);
  detail::dispatch_attention_dtype(q.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    detail::dispatch_head_chunks(p.D, [&](auto dc) {
      detail::launch_with_smem(kernels::attention_forward<T, decltype(dc)::value>, grid, smem, "attention_forward",
                               ptr<T>(q), ptr<T>(k), ptr<T>(v), kv, p, ptr<T>(out), ptr<float>(lse));
    });
  });
}

// The backward of attention_forward: dout (B·Tq, heads·D) with the forward's q, k, v, key_valid, out and lse →
// dq (B·Tq, heads·D), dk, dv (B·S, kv_heads·D), all overwritten.
inline void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                               const Tensor& out, const Tensor& lse, const Tensor& dout, const AttentionShape& shape,
                               Tensor& dq, Tensor& dk, Tensor& dv, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::attention_backward";
  const kernels::AttnParams p = detail::attention_params(where, shape);
  detail::check_attention_tensors(where, p, q, k, v, key_valid);
  expect_same_layout(where, "out", out, "q", q);
  expect_same_layout(where, "dout", dout, "q", q);
  expect_same_layout(where, "dq", dq, "q", q);
  expect_same_layout(where, "dk", dk, "k", k);
  expect_same_layout(where, "dv", dv, "v", v);
  expect_contiguous(where, "lse", lse);
  check_dtype(where, "lse", lse, DType::f32);
  CUMO_CHECK(lse.numel() == p.B * p.H * p.Tq, where, ": lse has shape ", lse.shape(), " but expected (", p.B, ", ",
             p.H, ", ", p.Tq, ")");
  if (p.B * p.S == 0) return;
  const std::int32_t* kv = key_valid && key_valid->defined() ? ptr<std::int32_t>(*key_valid) : nullptr;
  Tensor delta = device_empty(ws, {p.B * p.H * (p.Tq > 0 ? p.Tq : 1)});  // (B, H, Tq)
  const std::size_t smem_dq = sizeof(float) * std::size_t(2 * kernels::kQTile * p.D + 2 * kernels::kKTile * (p.D + 1));
  const std::size_t smem_dkdv =
      sizeof(float) * std::size_t(2 * kernels::kKTile * (p.D + 1) + 2 * kernels::kKTile2 * p.D + 2 * kernels::kKTile);
  detail::dispatch_attention_dtype(q.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    const std::int64_t rows = p.B * p.H * p.Tq;
    if (rows > 0) {
      const std::int64_t per_block = 256 / kWarp;
      kernels::attention_delta<T><<<unsigned((rows + per_block - 1) / per_block), 256, 0, stream()>>>(
          ptr<T>(out), ptr<T>(dout), p, ptr<float>(delta));
      CUMO_CUDA_LAUNCH_CHECK("attention_delta");
    }
    detail::dispatch_head_chunks(p.D, [&](auto dc) {
      constexpr int DC = decltype(dc)::value;
      if (p.Tq > 0)
        detail::launch_with_smem(kernels::attention_backward_dq<T, DC>,
                                 dim3(unsigned((p.Tq + kernels::kQTile - 1) / kernels::kQTile), unsigned(p.B * p.H)),
                                 smem_dq, "attention_backward_dq", ptr<T>(q), ptr<T>(k), ptr<T>(v), kv, ptr<T>(dout),
                                 ptr<float>(lse), ptr<float>(delta), p, ptr<T>(dq));
      detail::launch_with_smem(kernels::attention_backward_dkdv<T, DC>,
                               dim3(unsigned((p.S + kernels::kKTile2 - 1) / kernels::kKTile2), unsigned(p.B * p.G)),
                               smem_dkdv, "attention_backward_dkdv", ptr<T>(q), ptr<T>(k), ptr<T>(v), kv,
                               ptr<T>(dout), ptr<float>(lse), ptr<float>(delta), p, ptr<T>(dk), ptr<T>(dv));
    });
  });
}

}  // namespace cumo::gpu
