#pragma once
// nn::LayerNorm<Backend> — y = (x − μ) / √(σ² + ε) · γ + β over the last dimension (biased variance, as PyTorch).
// The backend computes it (backend/cpu/norms.hpp: statistics in double); the layer keeps x and the backend's row
// statistics for the backward.
#include <cstdint>
#include <string>
#include <utility>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <backend::Backend Backend = backend::Cpu>
class LayerNorm {
 public:
  LayerNorm() = default;
  LayerNorm(const std::string& name, std::int64_t hidden, double eps = 1e-5, Backend backend = {})
      : weight(param(name + ".weight", {hidden}, Backend::device, 1.f)),
        bias(param(name + ".bias", {hidden}, Backend::device)),
        hidden_(hidden),
        eps_(eps),
        be_(std::move(backend)) {}

  Parameter weight, bias;  // (H,), (H,)

  void collect(ParameterList& out) {
    out.push_back(&weight);
    out.push_back(&bias);
  }

  // x (N, H) → y (N, H); saves x and the row statistics. Callers must not change x in place before backward()
  // (none does: inputs are fresh outputs of the layer below).
  Tensor forward(const Tensor& x) {
    x_ = check_input("LayerNorm::forward", weight.name, x, hidden_, Backend::device);
    Tensor y = be_.empty({x_.size(0), hidden_});
    be_.layernorm_forward(x_, weight.value, bias.value, eps_, y, stats_);  // (N, H)
    return y;
  }

  void release_activations() {  // drops what forward() saved
    x_ = Tensor();
    stats_ = Tensor();
  }

  // dy (N, H) → dx = (1/σ)(ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)), ĝ = dy γ; dγ, dβ accumulate
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(x_.defined(), "LayerNorm::backward (", weight.name, "): no saved forward");
    const Tensor g = check_input("LayerNorm::backward", "dy", dy, hidden_, Backend::device);
    CUMO_CHECK(g.size(0) == x_.size(0), "LayerNorm::backward: dy has shape ", g.shape(), " but x had ", x_.shape());
    Tensor dx = be_.empty({g.size(0), hidden_});
    be_.layernorm_backward(g, x_, weight.value, stats_, dx, weight.grad, bias.grad);  // (N, H)
    return dx;
  }

 private:
  std::int64_t hidden_ = 0;
  double eps_ = 1e-5;
  [[no_unique_address]] Backend be_;
  Tensor x_, stats_;  // (N, H) input; the backend's row statistics
};

}  // namespace cumo::nn
