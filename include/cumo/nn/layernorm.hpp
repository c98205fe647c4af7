#pragma once
// nn::LayerNorm — y = (x − μ) / √(σ² + ε) · γ + β over the last dimension (biased variance, as PyTorch).
// Statistics are accumulated in double so long rows do not lose the mean in fp32 cancellation.
#include <cmath>
#include <cstdint>
#include <string>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

class LayerNorm {
 public:
  LayerNorm() = default;
  LayerNorm(const std::string& name, std::int64_t hidden, double eps = 1e-5)
      : weight(param(name + ".weight", {hidden})), bias(param(name + ".bias", {hidden})), hidden_(hidden), eps_(eps) {
    float* w = weight.value.data<float>();
    for (std::int64_t i = 0; i < hidden; ++i) w[i] = 1.f;
  }

  Parameter weight, bias;  // (H,), (H,)

  void collect(ParameterList& out) {
    out.push_back(&weight);
    out.push_back(&bias);
  }

  // x (N, H) → y (N, H); saves x̂ and 1/σ.
  Tensor forward(const Tensor& x) {
    const Tensor xc = check_input("LayerNorm::forward", weight.name, x, hidden_);
    const std::int64_t N = xc.size(0), H = hidden_;
    xhat_ = matrix(N, H);
    rstd_ = Tensor::empty({N});
    Tensor y = matrix(N, H);
    const float* px = xc.data<float>();
    const float* w = weight.value.data<float>();
    const float* b = bias.value.data<float>();
    float* xh = xhat_.data<float>();
    float* py = y.data<float>();
    cpu::parallel_for(N, [&](std::int64_t r) {
      double mean = 0, var = 0;
      for (std::int64_t j = 0; j < H; ++j) mean += px[r * H + j];
      mean /= double(H);
      for (std::int64_t j = 0; j < H; ++j) var += (px[r * H + j] - mean) * (px[r * H + j] - mean);
      const double rstd = 1.0 / std::sqrt(var / double(H) + eps_);
      rstd_.data<float>()[r] = float(rstd);
      for (std::int64_t j = 0; j < H; ++j) {
        xh[r * H + j] = float((px[r * H + j] - mean) * rstd);
        py[r * H + j] = xh[r * H + j] * w[j] + b[j];
      }
    }, 8 * H);
    return y;
  }

  // dy (N, H) → dx = (1/σ)(ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)), ĝ = dy γ
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(xhat_.defined(), "LayerNorm::backward (", weight.name, "): no saved forward");
    const Tensor g = check_input("LayerNorm::backward", "dy", dy, hidden_);
    const std::int64_t N = g.size(0), H = hidden_;
    CUMO_CHECK(N == xhat_.size(0), "LayerNorm::backward: dy has shape ", g.shape(), " but x had ", xhat_.shape());
    Tensor dx = matrix(N, H);
    const float* pg = g.data<float>();
    const float* xh = xhat_.data<float>();
    const float* w = weight.value.data<float>();
    float* dw = weight.grad.data<float>();
    float* db = bias.grad.data<float>();
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t j = 0; j < H; ++j) {
        dw[j] += pg[r * H + j] * xh[r * H + j];
        db[j] += pg[r * H + j];
      }
    float* pdx = dx.data<float>();
    cpu::parallel_for(N, [&](std::int64_t r) {
      double m1 = 0, m2 = 0;
      for (std::int64_t j = 0; j < H; ++j) {
        const double gh = double(pg[r * H + j]) * w[j];
        m1 += gh;
        m2 += gh * xh[r * H + j];
      }
      m1 /= double(H);
      m2 /= double(H);
      const double rstd = rstd_.data<float>()[r];
      for (std::int64_t j = 0; j < H; ++j)
        pdx[r * H + j] = float(rstd * (double(pg[r * H + j]) * w[j] - m1 - xh[r * H + j] * m2));
    }, 8 * H);
    return dx;
  }

 private:
  std::int64_t hidden_ = 0;
  double eps_ = 1e-5;
  Tensor xhat_, rstd_;  // (N, H), (N,)
};

}  // namespace cumo::nn
