#pragma once
// nn::RMSNorm<Backend> — y = γ · x / √(mean(x²) + ε) (Mistral / Qwen2 / Mixtral; HF computes it in fp32, as here).
#include <cmath>
#include <cstdint>
#include <string>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <class Backend = backend::Cpu>
class RMSNorm {
 public:
  RMSNorm() = default;
  RMSNorm(const std::string& name, std::int64_t hidden, double eps = 1e-6)
      : weight(param(name + ".weight", {hidden}, Backend::device, 1.f)), hidden_(hidden), eps_(eps) {}

  Parameter weight;  // (H,)

  void collect(ParameterList& out) { out.push_back(&weight); }

  Tensor apply(const Tensor& x) const {
    Tensor r;
    return run(x, r);
  }
  // x (N, H) → y (N, H); saves x and 1/rms.
  Tensor forward(const Tensor& x) {
    x_ = check_input("RMSNorm::forward", weight.name, x, hidden_, Backend::device);
    return run(x_, rrms_);
  }

  // dx = r (dy γ) − x r³ mean(dy γ x);  dγ += Σ_rows dy x r
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(x_.defined(), "RMSNorm::backward (", weight.name, "): no saved forward");
    const Tensor g = check_input("RMSNorm::backward", "dy", dy, hidden_, Backend::device);
    const std::int64_t N = g.size(0), H = hidden_;
    CUMO_CHECK(N == x_.size(0), "RMSNorm::backward: dy has shape ", g.shape(), " but x had ", x_.shape());
    if constexpr (on_cpu<Backend>) {
      Tensor dx = matrix(N, H);
      const float* pg = g.data<float>();
      const float* px = x_.data<float>();
      const float* w = weight.value.data<float>();
      const float* rr = rrms_.data<float>();
      float* dw = weight.grad.data<float>();
      for (std::int64_t r = 0; r < N; ++r)
        for (std::int64_t j = 0; j < H; ++j) dw[j] += pg[r * H + j] * px[r * H + j] * rr[r];
      float* pdx = dx.data<float>();
      cpu::parallel_for(N, [&](std::int64_t r) {
        double m = 0;
        for (std::int64_t j = 0; j < H; ++j) m += double(pg[r * H + j]) * w[j] * px[r * H + j];
        m /= double(H);
        const double rs = rr[r];
        for (std::int64_t j = 0; j < H; ++j)
          pdx[r * H + j] = float(rs * double(pg[r * H + j]) * w[j] - double(px[r * H + j]) * rs * rs * rs * m);
      }, 8 * H);
      return dx;
    } else {
      Tensor dx = matrix(N, H, Backend::device);
      Backend::rmsnorm_backward(g, x_, weight.value, rrms_, dx, weight.grad);
      return dx;
    }
  }

 private:
  Tensor run(const Tensor& x, Tensor& rrms) const {
    const Tensor xc = check_input("RMSNorm::forward", weight.name, x, hidden_, Backend::device);
    const std::int64_t N = xc.size(0), H = hidden_;
    if constexpr (on_cpu<Backend>) {
      rrms = Tensor::empty({N});
      Tensor y = matrix(N, H);
      const float* px = xc.data<float>();
      const float* w = weight.value.data<float>();
      float* py = y.data<float>();
      float* rr = rrms.data<float>();
      cpu::parallel_for(N, [&](std::int64_t r) {
        double ss = 0;
        for (std::int64_t j = 0; j < H; ++j) ss += double(px[r * H + j]) * px[r * H + j];
        rr[r] = float(1.0 / std::sqrt(ss / double(H) + eps_));
        for (std::int64_t j = 0; j < H; ++j) py[r * H + j] = w[j] * (px[r * H + j] * rr[r]);
      }, 8 * H);
      return y;
    } else {
      rrms = Tensor::empty({N}, DType::f32, Backend::device);
      Tensor y = matrix(N, H, Backend::device);
      Backend::rmsnorm_forward(xc, weight.value, eps_, y, rrms);
      return y;
    }
  }

  std::int64_t hidden_ = 0;
  double eps_ = 1e-6;
  Tensor x_, rrms_;  // (N, H), (N,)
};

}  // namespace cumo::nn
