#pragma once
// CPU auxiliary losses of a router: balance (top-1 and all-k counts) and z-loss, each reduced per segment
// (image) and then averaged over segments — CuMo's reduction — with exact gradients.
//   L_b = mean_s E Σ_e f_e^s P_e^s      P_e^s = mean_{t∈s} p_te,  f_e^s = count_e^s / n_s
//   L_z = mean_s mean_{t∈s} (logsumexp_e z_te)^2
// f is a count, so only P carries gradient: ∂L_b/∂p_te = E f_e^s / (n_s S).
#include <cmath>
#include <cstdint>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/core/routing.hpp"

namespace cumo::cpu {

namespace detail {
// counts (S, E): how often e is chosen in segment s — first choices only, or all k slots.
inline std::vector<double> segment_counts(const Tensor& idx, std::int64_t segments, int experts, bool all_k) {
  const std::int64_t T = idx.size(0), n = T / segments;
  const int K = int(idx.size(1));
  const std::int32_t* ix = idx.data<std::int32_t>();
  std::vector<double> c(std::size_t(segments * experts), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (int k = 0; k < (all_k ? K : 1); ++k) c[std::size_t((t / n) * experts + ix[t * K + k])] += 1.0;
  return c;
}
inline float logsumexp_row(const float* z, int E) {
  float mx = z[0];
  for (int e = 1; e < E; ++e) mx = z[e] > mx ? z[e] : mx;
  double s = 0;
  for (int e = 0; e < E; ++e) s += std::exp(double(z[e] - mx));
  return mx + float(std::log(s));
}
}  // namespace detail

inline void aux_losses(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                       AuxLosses& out) {
  const std::int64_t T = logits.size(0), n = T / segments;
  const int E = int(logits.size(1));
  const float* p = probs.data<float>();
  const float* z = logits.data<float>();
  const auto c1 = detail::segment_counts(idx, segments, E, false);
  const auto ck = detail::segment_counts(idx, segments, E, true);
  double b1 = 0, bk = 0, zl = 0;
  for (std::int64_t s = 0; s < segments; ++s) {
    std::vector<double> P(std::size_t(E), 0.0);
    for (std::int64_t t = s * n; t < (s + 1) * n; ++t) {
      for (int e = 0; e < E; ++e) P[std::size_t(e)] += p[t * E + e];
      const double l = detail::logsumexp_row(z + t * E, E);
      zl += l * l;
    }
    for (int e = 0; e < E; ++e) {
      b1 += E * (c1[std::size_t(s * E + e)] / double(n)) * (P[std::size_t(e)] / double(n));
      bk += E * (ck[std::size_t(s * E + e)] / double(n)) * (P[std::size_t(e)] / double(n));
    }
  }
  out.balance_top1.data<float>()[0] = float(b1 / double(segments));
  out.balance_allk.data<float>()[0] = float(bk / double(segments));
  out.z.data<float>()[0] = float(zl / double(T));
}

// dprobs += coef_balance ∂L_b/∂p (for the chosen counting); dlogits += coef_z ∂L_z/∂z.
inline void aux_losses_backward(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                                BalanceCounts counting, AuxLossWeights coef, Tensor& dprobs, Tensor& dlogits) {
  const std::int64_t T = logits.size(0), n = T / segments;
  const int E = int(logits.size(1));
  const float* p = probs.data<float>();
  const float* z = logits.data<float>();
  float* dp = dprobs.data<float>();
  float* dz = dlogits.data<float>();
  if (coef.balance != 0.f) {
    const auto c = detail::segment_counts(idx, segments, E, counting == BalanceCounts::all_k);
    const double scale = double(coef.balance) * E / (double(n) * double(n) * double(segments));
    parallel_for(T, [&](std::int64_t t) {
      const std::int64_t s = t / n;
      for (int e = 0; e < E; ++e) dp[t * E + e] += float(scale * c[std::size_t(s * E + e)]);
    }, 2 * E);
  }
  if (coef.z != 0.f) {
    const double scale = 2.0 * double(coef.z) / double(T);
    parallel_for(T, [&](std::int64_t t) {
      const float l = detail::logsumexp_row(z + t * E, E);
      for (int e = 0; e < E; ++e) dz[t * E + e] += float(scale * l * p[t * E + e]);
    }, 30 * E);
  }
}

}  // namespace cumo::cpu
