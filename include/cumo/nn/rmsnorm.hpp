#pragma once
// nn::RMSNorm<Backend> — y = γ · x / √(mean(x²) + ε) (Mistral / Qwen2 / Mixtral; HF computes it in fp32, as here).
#include <cstdint>
#include <string>
#include <utility>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <backend::Backend Backend = backend::Cpu>
class RMSNorm {
 public:
  RMSNorm() = default;
  RMSNorm(const std::string& name, std::int64_t hidden, double eps = 1e-6, Backend backend = {})
      : weight(param(name + ".weight", {hidden}, Backend::device, 1.f)),
        hidden_(hidden),
        eps_(eps),
        be_(std::move(backend)) {}

  Parameter weight;  // (H,)

  void collect(ParameterList& out) { out.push_back(&weight); }

  // x (N, H) → y (N, H), saving nothing (inference).
  Tensor apply(const Tensor& x) const {
    Tensor stats;
    return run(check_input("RMSNorm::forward", weight.name, x, hidden_, Backend::device), stats);
  }
  // x (N, H) → y (N, H); saves x and 1/rms.
  Tensor forward(const Tensor& x) {
    x_ = check_input("RMSNorm::forward", weight.name, x, hidden_, Backend::device);
    return run(x_, stats_);
  }

  // dx = r (dy γ) − x r³ mean(dy γ x);  dγ += Σ_rows dy x r
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(x_.defined(), "RMSNorm::backward (", weight.name, "): no saved forward");
    const Tensor g = check_input("RMSNorm::backward", "dy", dy, hidden_, Backend::device);
    CUMO_CHECK(g.size(0) == x_.size(0), "RMSNorm::backward: dy has shape ", g.shape(), " but x had ", x_.shape());
    Tensor dx = be_.empty({g.size(0), hidden_});
    be_.rmsnorm_backward(g, x_, weight.value, stats_, dx, weight.grad);  // (N, H)
    return dx;
  }

 private:
  Tensor run(const Tensor& x, Tensor& stats) const {
    Tensor y = be_.empty({x.size(0), hidden_});
    be_.rmsnorm_forward(x, weight.value, eps_, y, stats);  // (N, H)
    return y;
  }

  std::int64_t hidden_ = 0;
  double eps_ = 1e-6;
  [[no_unique_address]] Backend be_;
  Tensor x_, stats_;  // (N, H), the backend's 1/rms
};

}  // namespace cumo::nn
