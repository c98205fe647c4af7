#pragma once
// CUDA auxiliary losses of a router, the twin of backend/cpu/losses.hpp (same formulas, same per-segment
// reduction, exact gradients):
//   L_b = mean_s E Σ_e f_e^s P_e^s      P_e^s = mean_{t∈s} p_te,  f_e^s = count_e^s / n_s
//   L_z = mean_s mean_{t∈s} (logsumexp_e z_te)^2
// Determinism: counts are integers (integer atomics commute); every floating sum is a fixed tree — chunks of
// kChunk tokens inside a segment summed in token order, then the chunks in order — in double precision.
#include <cstdint>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/core/routing.hpp"

namespace cumo::gpu {

namespace kernels {

constexpr int kLossChunk = 64;     // tokens per partial sum
constexpr int kLossThreads = 256;  // 8 warps

// counts (2, S, E): [0] first choices, [1] all k slots, per segment. Must be zeroed first.
template <int = 0>
__global__ void segment_counts(const std::int32_t* __restrict__ idx, std::int64_t T, int K, std::int64_t n, int E,
                               std::int64_t S, int* __restrict__ counts) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < T * K;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / K;
    const int k = int(i % K), e = idx[i];
    if (e < 0 || e >= E) continue;  // cannot come from the router; never index out of bounds
    const std::int64_t s = t / n;
    atomicAdd(&counts[S * E + s * E + e], 1);
    if (k == 0) atomicAdd(&counts[s * E + e], 1);
  }
}

// logsumexp of one row by one warp, rounded as the CPU does (float max, double sum, float result).
__device__ __forceinline__ float warp_logsumexp(const float* zt, int E, int lane) {
  float mx = -INFINITY;
  for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, zt[e]);
  mx = warp_max(mx);
  double s = 0.0;
  for (int e = lane; e < E; e += kWarp) s += exp(double(zt[e] - mx));
  s = warp_sum(s);
  return mx + float(log(s));
}

// Block (c, s) sums chunk c of segment s: Ppart[s][c][e] = Σ_t p_te, Zpart[s][c] = Σ_t lse_t².
template <int = 0>
__global__ void loss_partials(const float* __restrict__ z, const float* __restrict__ p, std::int64_t n, int E,
                              int chunks, double* __restrict__ Ppart, double* __restrict__ Zpart) {
  __shared__ double zsq[kLossChunk];
  const int c = blockIdx.x;
  const std::int64_t s = blockIdx.y;
  const std::int64_t t0 = s * n + std::int64_t(c) * kLossChunk;
  const std::int64_t t1 = t0 + kLossChunk < (s + 1) * n ? t0 + kLossChunk : (s + 1) * n;
  const int len = int(t1 - t0);
  double* P = Ppart + (s * chunks + c) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double acc = 0.0;
    for (std::int64_t t = t0; t < t1; ++t) acc += p[t * E + e];
    P[e] = acc;
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int i = warp; i < len; i += warps) {
    const double l = warp_logsumexp(z + (t0 + i) * E, E, lane);
    if (lane == 0) zsq[i] = l * l;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double acc = 0.0;
    for (int i = 0; i < len; ++i) acc += zsq[i];
    Zpart[s * chunks + c] = acc;
  }
}

// One block: out = {balance_top1, balance_allk, z}. contrib (2, E) is scratch.
template <int = 0>
__global__ void loss_finish(const double* __restrict__ Ppart, const double* __restrict__ Zpart,
                            const int* __restrict__ counts, std::int64_t T, std::int64_t S, std::int64_t n, int E,
                            int chunks, double* __restrict__ contrib, float* __restrict__ b1_out,
                            float* __restrict__ bk_out, float* __restrict__ z_out) {
  const double nd = double(n);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double b1 = 0.0, bk = 0.0;
    for (std::int64_t s = 0; s < S; ++s) {
      double P = 0.0;
      for (int c = 0; c < chunks; ++c) P += Ppart[(s * chunks + c) * E + e];
      b1 += E * (counts[s * E + e] / nd) * (P / nd);
      bk += E * (counts[S * E + s * E + e] / nd) * (P / nd);
    }
    contrib[e] = b1;
    contrib[E + e] = bk;
  }
  __syncthreads();  // makes the block's global writes visible to thread 0
  if (threadIdx.x == 0) {
    double b1 = 0.0, bk = 0.0, zl = 0.0;
    for (int e = 0; e < E; ++e) {
      b1 += contrib[e];
      bk += contrib[E + e];
    }
    for (std::int64_t i = 0; i < S * chunks; ++i) zl += Zpart[i];
    *b1_out = float(b1 / double(S));
    *bk_out = float(bk / double(S));
    *z_out = float(zl / double(T));
  }
}

// dprobs[t, e] += scale · counts[s(t), e]
template <int = 0>
__global__ void balance_backward(const int* __restrict__ counts, std::int64_t T, std::int64_t n, int E, double scale,
                                 float* __restrict__ dp) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < T * E;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / E;
    const int e = int(i % E);
    dp[i] += float(scale * counts[(t / n) * E + e]);
  }
}

// dlogits[t, e] += scale · lse_t · p_te. One warp per token.
template <int = 0>
__global__ void z_backward(const float* __restrict__ z, const float* __restrict__ p, std::int64_t T, int E,
                           double scale, float* __restrict__ dz) {
  const std::int64_t t = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T) return;
  const float l = warp_logsumexp(z + t * E, E, lane);
  for (int e = lane; e < E; e += kWarp) dz[t * E + e] += float(scale * l * p[t * E + e]);
}

}  // namespace kernels

namespace detail {
inline void check_losses_args(const char* where, const Tensor& logits, const Tensor& probs, const Tensor& idx,
                              std::int64_t segments) {
  expect_contiguous(where, "logits", logits);
  expect_contiguous(where, "probs", probs);
  expect_contiguous(where, "idx", idx);
  const std::int64_t T = logits.size(0);
  CUMO_CHECK(segments >= 1 && T % segments == 0, where, ": ", T, " tokens do not split into ", segments,
             " equal segments");
}
// Integer counts (2, S, E) of first choices and of all slots, in a fresh device tensor.
inline Tensor segment_counts(const Tensor& idx, std::int64_t segments, int E, Workspace* ws) {
  const std::int64_t T = idx.size(0);
  const int K = int(idx.size(1));
  Tensor counts = device_zeros(ws, {2, segments, E}, DType::i32);
  kernels::segment_counts<><<<grid_for(T * K, 256), 256, 0, stream()>>>(
      ptr<std::int32_t>(idx), T, K, T / segments, E, segments, ptr<std::int32_t>(counts));
  CUMO_CUDA_LAUNCH_CHECK("segment_counts");
  return counts;
}
}  // namespace detail

inline void aux_losses(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                       AuxLosses& out, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::aux_losses";
  detail::check_losses_args(where, logits, probs, idx, segments);
  const std::int64_t T = logits.size(0), n = T / segments;
  const int E = int(logits.size(1));
  CUMO_CHECK(T > 0, where, ": zero tokens");
  const std::int64_t chunks = (n + kernels::kLossChunk - 1) / kernels::kLossChunk;
  CUMO_CHECK(chunks <= INT_MAX && segments <= 65535, where, ": ", segments, " segments of ", n,
             " tokens exceed one launch");
  Tensor counts = detail::segment_counts(idx, segments, E, ws);        // (2, S, E)
  Tensor Ppart = device_empty(ws, {segments * chunks * E}, DType::f64);  // (S, chunks, E)
  Tensor Zpart = device_empty(ws, {segments * chunks}, DType::f64);      // (S, chunks)
  Tensor contrib = device_empty(ws, {2 * E}, DType::f64);                // (2, E)
  kernels::loss_partials<><<<dim3(unsigned(chunks), unsigned(segments)), kernels::kLossThreads, 0, stream()>>>(
      ptr<float>(logits), ptr<float>(probs), n, E, int(chunks), ptr<double>(Ppart),
      ptr<double>(Zpart));
  CUMO_CUDA_LAUNCH_CHECK("loss_partials");
  kernels::loss_finish<><<<1, kernels::kLossThreads, 0, stream()>>>(
      ptr<double>(Ppart), ptr<double>(Zpart), ptr<std::int32_t>(counts), T,
      segments, n, E, int(chunks), ptr<double>(contrib), ptr<float>(out.balance_top1),
      ptr<float>(out.balance_allk), ptr<float>(out.z));
  CUMO_CUDA_LAUNCH_CHECK("loss_finish");
}

inline void aux_losses_backward(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                                BalanceCounts counting, AuxLossWeights coef, Tensor& dprobs, Tensor& dlogits,
                                Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::aux_losses_backward";
  detail::check_losses_args(where, logits, probs, idx, segments);
  const std::int64_t T = logits.size(0), n = T / segments;
  const int E = int(logits.size(1));
  if (T == 0) return;
  if (coef.balance != 0.f) {
    expect_contiguous(where, "dprobs", dprobs);
    Tensor counts = detail::segment_counts(idx, segments, E, ws);  // (2, S, E)
    const std::int32_t* c = ptr<std::int32_t>(counts) + (counting == BalanceCounts::all_k ? segments * E : 0);
    const double scale = double(coef.balance) * E / (double(n) * double(n) * double(segments));
    kernels::balance_backward<><<<grid_for(T * E, 256), 256, 0, stream()>>>(c, T, n, E, scale, ptr<float>(dprobs));
    CUMO_CUDA_LAUNCH_CHECK("balance_backward");
  }
  if (coef.z != 0.f) {
    expect_contiguous(where, "dlogits", dlogits);
    const double scale = 2.0 * double(coef.z) / double(T);
    const std::int64_t per_block = kernels::kLossThreads / kWarp;
    kernels::z_backward<><<<unsigned((T + per_block - 1) / per_block), kernels::kLossThreads, 0, stream()>>>(
        ptr<float>(logits), ptr<float>(probs), T, E, scale, ptr<float>(dlogits));
    CUMO_CUDA_LAUNCH_CHECK("z_backward");
  }
}

}  // namespace cumo::gpu
