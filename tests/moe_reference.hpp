#pragma once
// A plain, loop-by-loop reference of the sparse block in double precision — the test-side twin of the fixtures'
// PyTorch loop: per token, softmax, top-k, renormalise, and the chosen experts' MLPs summed with their weights.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "cumo/moe.hpp"

namespace cumo::test {

// Standard-normal fp32 tensor.
inline Tensor randn(Shape s, Rng& rng, float scale = 1.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, 0.f, scale);
  return t;
}

template <class Act, class MoE>
Tensor reference_forward(MoE& moe, const Tensor& x, std::vector<int>* chosen = nullptr) {
  const std::int64_t T = x.size(0), H = x.size(1);
  const int E = moe.num_experts(), K = moe.top_k();
  const Tensor& wr = moe.router().weight.value;
  Tensor y = Tensor::zeros({T, H}, DType::f64);
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> z(E), p(E);
    for (int e = 0; e < E; ++e) {
      double s = 0;
      for (std::int64_t h = 0; h < H; ++h) s += double(x.at<float>(t, h)) * wr.at<float>(e, h);
      z[e] = s;
    }
    const double mx = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += (p[e] = std::exp(z[e] - mx));
    for (auto& v : p) v /= sum;
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double wsum = 0;
    for (int k = 0; k < K; ++k) wsum += p[order[k]];
    for (int k = 0; k < K; ++k) {
      const int e = order[k];
      if (chosen) chosen->push_back(e);
      const double w = moe.options().renormalize ? p[e] / wsum : p[e];
      const auto out = [&] {
        auto& ex = moe.experts();
        std::vector<double> o(H, 0.0);
        if constexpr (!std::remove_reference_t<decltype(ex)>::gated) {
          const std::int64_t F = ex.ffn();
          for (std::int64_t h = 0; h < H; ++h) o[h] = ex.fc2_bias.value.template at<float>(e, h);
          for (std::int64_t f = 0; f < F; ++f) {
            double a = ex.fc1_bias.value.template at<float>(e, f);
            for (std::int64_t h = 0; h < H; ++h) a += double(x.at<float>(t, h)) * ex.fc1_weight.value.template at<float>(e, f, h);
            a = Act::f(float(a));
            for (std::int64_t h = 0; h < H; ++h) o[h] += a * ex.fc2_weight.value.template at<float>(e, h, f);
          }
        } else {
          const std::int64_t F = ex.ffn();
          for (std::int64_t f = 0; f < F; ++f) {
            double g = 0, u = 0;
            for (std::int64_t h = 0; h < H; ++h) {
              g += double(x.at<float>(t, h)) * ex.gate_up_proj.value.template at<float>(e, f, h);
              u += double(x.at<float>(t, h)) * ex.gate_up_proj.value.template at<float>(e, F + f, h);
            }
            const double a = Act::f(float(g)) * u;
            for (std::int64_t h = 0; h < H; ++h) o[h] += a * ex.down_proj.value.template at<float>(e, h, f);
          }
        }
        return o;
      }();
      for (std::int64_t h = 0; h < H; ++h) y.at<double>(t, h) += w * out[h];
    }
  }
  return y;
}

// Smallest gap between the k-th and (k+1)-th router logit over all tokens: top-k choices are stable under
// perturbations much smaller than this.
template <class MoE>
double min_topk_gap(MoE& moe, const Tensor& x) {
  const std::int64_t T = x.size(0), H = x.size(1);
  const int E = moe.num_experts(), K = moe.top_k();
  if (K == E) return INFINITY;
  double gap = INFINITY;
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> z(E);
    for (int e = 0; e < E; ++e) {
      double s = 0;
      for (std::int64_t h = 0; h < H; ++h) s += double(x.at<float>(t, h)) * moe.router().weight.value.template at<float>(e, h);
      z[e] = s;
    }
    std::sort(z.begin(), z.end(), std::greater<>());
    gap = std::min(gap, z[K - 1] - z[K]);
  }
  return gap;
}

}  // namespace cumo::test
