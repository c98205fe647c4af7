#pragma once
// nn::LayerNorm<Backend> — y = (x − μ) / √(σ² + ε) · γ + β over the last dimension (biased variance, as PyTorch).
// Statistics are accumulated in double so long rows do not lose the mean in fp32 cancellation.
#include <cmath>
#include <cstdint>
#include <string>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <class Backend = backend::Cpu>
class LayerNorm {
 public:
  LayerNorm() = default;
  LayerNorm(const std::string& name, std::int64_t hidden, double eps = 1e-5)
      : weight(param(name + ".weight", {hidden}, Backend::device, 1.f)),
        bias(param(name + ".bias", {hidden}, Backend::device)),
        hidden_(hidden),
        eps_(eps) {}

  Parameter weight, bias;  // (H,), (H,)

  void collect(ParameterList& out) {
    out.push_back(&weight);
    out.push_back(&bias);
  }

  // x (N, H) → y (N, H); saves x̂ and 1/σ (the CPU) or x, μ and 1/σ (other backends).
  Tensor forward(const Tensor& x) {
    const Tensor xc = check_input("LayerNorm::forward", weight.name, x, hidden_, Backend::device);
    const std::int64_t N = xc.size(0), H = hidden_;
    if constexpr (on_cpu<Backend>) {
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
    } else {
      xhat_ = xc;  // the input itself (not a copy): the kernels recompute x̂ from it, so callers must not change x
                   // in place before backward() (none does: inputs are fresh outputs of the layer below)
      mean_ = Tensor::empty({N}, DType::f32, Backend::device);
      rstd_ = Tensor::empty({N}, DType::f32, Backend::device);
      Tensor y = matrix(N, H, Backend::device);
      Backend::layernorm_forward(xc, weight.value, bias.value, eps_, y, mean_, rstd_);
      return y;
    }
  }

  // dy (N, H) → dx = (1/σ)(ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)), ĝ = dy γ
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(xhat_.defined(), "LayerNorm::backward (", weight.name, "): no saved forward");
    const Tensor g = check_input("LayerNorm::backward", "dy", dy, hidden_, Backend::device);
    const std::int64_t N = g.size(0), H = hidden_;
    CUMO_CHECK(N == xhat_.size(0), "LayerNorm::backward: dy has shape ", g.shape(), " but x had ", xhat_.shape());
    if constexpr (on_cpu<Backend>) {
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
    } else {
      Tensor dx = matrix(N, H, Backend::device);
      Backend::layernorm_backward(g, xhat_, weight.value, mean_, rstd_, dx, weight.grad, bias.grad);
      return dx;
    }
  }

 private:
  std::int64_t hidden_ = 0;
  double eps_ = 1e-5;
  Tensor xhat_, rstd_;  // (N, H) x̂ (CPU) or x (other backends), (N,)
  Tensor mean_;         // (N,) other backends only
};

}  // namespace cumo::nn
