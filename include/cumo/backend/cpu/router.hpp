#pragma once
// CPU router math: softmax → top-k → renormalise, and its backward down to the logits.
#include <cmath>
#include <cstdint>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// probs (T, E) = softmax(logits); idx/w (T, K) = the K largest probabilities, best first (ties: lower index),
// w renormalised to sum 1 when `renormalize`.
inline void softmax_topk(const Tensor& logits, Tensor& probs, Tensor& idx, Tensor& w, bool renormalize) {
  const std::int64_t T = logits.size(0);
  const int E = int(logits.size(1)), K = int(idx.size(1));
  const float* z = logits.data<float>();
  float* p = probs.data<float>();
  std::int32_t* ix = idx.data<std::int32_t>();
  float* wt = w.data<float>();
  parallel_for(T, [&](std::int64_t t) {
    const float* zt = z + t * E;
    float* pt = p + t * E;
    float mx = zt[0];
    for (int e = 1; e < E; ++e) mx = zt[e] > mx ? zt[e] : mx;
    float sum = 0.f;
    for (int e = 0; e < E; ++e) sum += (pt[e] = std::exp(zt[e] - mx));
    const float inv = 1.f / sum;
    for (int e = 0; e < E; ++e) pt[e] *= inv;
    // Selection by repeated maximum: K is small (≤ 8 in practice), so this beats a heap or a sort.
    std::int32_t* it = ix + t * K;
    float* wtt = wt + t * K;
    float wsum = 0.f;
    for (int k = 0; k < K; ++k) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int j = 0; j < k; ++j) taken |= it[j] == e;
        if (!taken && (best < 0 || pt[e] > pt[best])) best = e;
      }
      it[k] = best;
      wsum += (wtt[k] = pt[best]);
    }
    if (renormalize)
      for (int k = 0; k < K; ++k) wtt[k] /= wsum;
  }, std::int64_t(E) * (K + 2));
}

// Adds to dprobs (T, E) the gradient that flows from d topk_w (T, K) through the selection (and the
// renormalisation w_j = p_j / Σ_i p_i, whose derivative is (g_j − Σ_i g_i w_i) / Σ_i p_i).
inline void topk_weights_backward(const Tensor& probs, const Tensor& idx, const Tensor& w, const Tensor& dw,
                                  bool renormalize, Tensor& dprobs) {
  const std::int64_t T = probs.size(0);
  const int E = int(probs.size(1)), K = int(idx.size(1));
  const float* p = probs.data<float>();
  const std::int32_t* ix = idx.data<std::int32_t>();
  const float* wt = w.data<float>();
  const float* g = dw.data<float>();
  float* dp = dprobs.data<float>();
  parallel_for(T, [&](std::int64_t t) {
    const std::int32_t* it = ix + t * K;
    const float* gt = g + t * K;
    float* dpt = dp + t * E;
    if (!renormalize) {
      for (int k = 0; k < K; ++k) dpt[it[k]] += gt[k];
      return;
    }
    float psum = 0.f, gw = 0.f;
    for (int k = 0; k < K; ++k) {
      psum += p[t * E + it[k]];
      gw += gt[k] * wt[t * K + k];
    }
    for (int k = 0; k < K; ++k) dpt[it[k]] += (gt[k] - gw) / psum;
  }, 4 * K);
}

// dlogits (T, E) += p ⊙ (dp − Σ_e p_e dp_e): the softmax Jacobian applied to dprobs.
inline void softmax_backward(const Tensor& probs, const Tensor& dprobs, Tensor& dlogits) {
  const std::int64_t T = probs.size(0);
  const int E = int(probs.size(1));
  const float* p = probs.data<float>();
  const float* dp = dprobs.data<float>();
  float* dz = dlogits.data<float>();
  parallel_for(T, [&](std::int64_t t) {
    float dot = 0.f;
    for (int e = 0; e < E; ++e) dot += p[t * E + e] * dp[t * E + e];
    for (int e = 0; e < E; ++e) dz[t * E + e] += p[t * E + e] * (dp[t * E + e] - dot);
  }, 4 * E);
}

}  // namespace cumo::cpu
