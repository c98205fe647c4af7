#pragma once
// CUDA router math, the twin of backend/cpu/router.hpp: one fused kernel for softmax → top-k → renormalise, and
// the backward down to the logits. One warp per token: E (8 … 128 in practice) is spread over the lanes, and the
// reductions are shuffles in a fixed order, so results do not change from run to run.
#include <cstdint>

#include "cumo/backend/cuda/common.cuh"

namespace cumo::gpu {

namespace kernels {

// (p, e) is better than (q, f) in the selection order: larger probability first, lower index on ties — the CPU's
// order (it scans e upward and keeps the first strict maximum).
__device__ __forceinline__ bool topk_better(float p, int e, float q, int f) { return p > q || (p == q && e < f); }

// probs (T, E) = softmax(logits); idx, w (T, K) = the K best, best first; w renormalised when `renormalize`.
// Round k picks the best element that comes after round k−1's pick in the selection order, so no list of taken
// experts is needed.
template <int = 0>
__global__ void softmax_topk(const float* __restrict__ z, float* __restrict__ p, std::int32_t* __restrict__ idx,
                             float* __restrict__ w, std::int64_t T, int E, int K, bool renormalize) {
  const std::int64_t t = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T) return;  // whole warps leave together
  const float* zt = z + t * E;
  float* pt = p + t * E;

  float mx = -INFINITY;
  for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, zt[e]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int e = lane; e < E; e += kWarp) {
    const float v = expf(zt[e] - mx);
    pt[e] = v;
    sum += v;
  }
  sum = warp_sum(sum);
  const float inv = 1.f / sum;
  for (int e = lane; e < E; e += kWarp) pt[e] *= inv;  // each lane rereads only what it wrote

  float prev_p = INFINITY, wsum = 0.f;
  int prev_e = -1;
  for (int k = 0; k < K; ++k) {
    float bp = -1.f;  // probabilities are ≥ 0, so any candidate beats this
    int be = INT_MAX;
    for (int e = lane; e < E; e += kWarp) {
      const float v = pt[e];
      const bool after_prev = topk_better(prev_p, prev_e, v, e);
      if (after_prev && topk_better(v, e, bp, be)) {
        bp = v;
        be = e;
      }
    }
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float op = __shfl_xor_sync(0xffffffffu, bp, o);
      const int oe = __shfl_xor_sync(0xffffffffu, be, o);
      if (topk_better(op, oe, bp, be)) {
        bp = op;
        be = oe;
      }
    }
    if (lane == 0) {
      idx[t * K + k] = be;
      w[t * K + k] = bp;
      wsum += bp;  // in k order, as the CPU sums
    }
    prev_p = bp;
    prev_e = be;
  }
  if (renormalize && lane == 0)
    for (int k = 0; k < K; ++k) w[t * K + k] /= wsum;
}

// dprobs (T, E) += the gradient of the top-k weights through the selection and the renormalisation. One thread
// per token; a token's K indices are distinct, so its writes never collide.
template <int = 0>
__global__ void topk_weights_backward(const float* __restrict__ p, const std::int32_t* __restrict__ idx,
                                      const float* __restrict__ w, const float* __restrict__ g,
                                      float* __restrict__ dp, std::int64_t T, int E, int K, bool renormalize) {
  for (std::int64_t t = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < T;
       t += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int32_t* it = idx + t * K;
    const float* gt = g + t * K;
    float* dpt = dp + t * E;
    if (!renormalize) {
      for (int k = 0; k < K; ++k) dpt[it[k]] += gt[k];
      continue;
    }
    float psum = 0.f, gw = 0.f;
    for (int k = 0; k < K; ++k) {
      psum += p[t * E + it[k]];
      gw += gt[k] * w[t * K + k];
    }
    for (int k = 0; k < K; ++k) dpt[it[k]] += (gt[k] - gw) / psum;
  }
}

// dlogits (T, E) += p ⊙ (dp − Σ_e p_e dp_e). One warp per token.
template <int = 0>
__global__ void softmax_backward(const float* __restrict__ p, const float* __restrict__ dp, float* __restrict__ dz,
                                 std::int64_t T, int E) {
  const std::int64_t t = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T) return;
  float dot = 0.f;
  for (int e = lane; e < E; e += kWarp) dot += p[t * E + e] * dp[t * E + e];
  dot = warp_sum(dot);
  for (int e = lane; e < E; e += kWarp) dz[t * E + e] += p[t * E + e] * (dp[t * E + e] - dot);
}

}  // namespace kernels

constexpr int kRouterThreads = 256;  // 8 tokens per block when one warp serves one token

inline unsigned warp_per_row_grid(std::int64_t rows) {
  const std::int64_t per_block = kRouterThreads / kWarp;
  const std::int64_t b = (rows + per_block - 1) / per_block;
  CUMO_CHECK(b <= INT_MAX, "cuda router: ", rows, " tokens exceed one launch");
  return unsigned(b < 1 ? 1 : b);
}

inline void softmax_topk(const Tensor& logits, Tensor& probs, Tensor& idx, Tensor& w, bool renormalize) {
  constexpr const char* where = "gpu::softmax_topk";
  expect_contiguous(where, "logits", logits);
  expect_contiguous(where, "probs", probs);
  expect_contiguous(where, "idx", idx);
  expect_contiguous(where, "w", w);
  const std::int64_t T = logits.size(0);
  const int E = int(logits.size(1)), K = int(idx.size(1));
  CUMO_CHECK(K >= 1 && K <= E, where, ": top-k = ", K, " must be between 1 and the number of experts (", E, ")");
  if (T == 0) return;
  kernels::softmax_topk<><<<warp_per_row_grid(T), kRouterThreads, 0, stream()>>>(
      ptr<float>(logits), ptr<float>(probs), ptr<std::int32_t>(idx), ptr<float>(w), T, E, K, renormalize);
  CUMO_CUDA_LAUNCH_CHECK("softmax_topk");
}

inline void topk_weights_backward(const Tensor& probs, const Tensor& idx, const Tensor& w, const Tensor& dw,
                                  bool renormalize, Tensor& dprobs) {
  constexpr const char* where = "gpu::topk_weights_backward";
  expect_contiguous(where, "probs", probs);
  expect_contiguous(where, "dprobs", dprobs);
  expect_contiguous(where, "dw", dw);
  const std::int64_t T = probs.size(0);
  const int E = int(probs.size(1)), K = int(idx.size(1));
  if (T == 0) return;
  kernels::topk_weights_backward<><<<grid_for(T, 256), 256, 0, stream()>>>(
      ptr<float>(probs), ptr<std::int32_t>(idx), ptr<float>(w), ptr<float>(dw), ptr<float>(dprobs), T, E, K,
      renormalize);
  CUMO_CUDA_LAUNCH_CHECK("topk_weights_backward");
}

inline void softmax_backward(const Tensor& probs, const Tensor& dprobs, Tensor& dlogits) {
  constexpr const char* where = "gpu::softmax_backward";
  expect_contiguous(where, "probs", probs);
  expect_contiguous(where, "dprobs", dprobs);
  expect_contiguous(where, "dlogits", dlogits);
  const std::int64_t T = probs.size(0);
  const int E = int(probs.size(1));
  if (T == 0) return;
  kernels::softmax_backward<><<<warp_per_row_grid(T), kRouterThreads, 0, stream()>>>(
      ptr<float>(probs), ptr<float>(dprobs), ptr<float>(dlogits), T, E);
  CUMO_CUDA_LAUNCH_CHECK("softmax_backward");
}

}  // namespace cumo::gpu
