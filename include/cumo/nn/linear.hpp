#pragma once
// nn::Linear<Backend> — y = x W^T (+ b), PyTorch's layout (W is (out, in)). The forward saves x for the backward, which
// accumulates dW = dy^T x, db = Σ_rows dy and returns dx = dy W.
#include <cstdint>
#include <string>
#include <utility>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <backend::Backend Backend = backend::Cpu>
class Linear {
 public:
  using backend_type = Backend;

  Linear() = default;
  // `name` is the HF module path, e.g. "model.layers.0.self_attn.q_proj" (parameters are name.weight / name.bias).
  Linear(const std::string& name, std::int64_t in, std::int64_t out, bool bias, Backend backend = {})
      : weight(param(name + ".weight", {out, in}, Backend::device, 0.f, weight_dtype<Backend>("nn::Linear"))),
        in_(in),
        out_(out),
        has_bias_(bias),
        be_(std::move(backend)) {
    if (bias) this->bias = param(name + ".bias", {out}, Backend::device);
  }

  Parameter weight;  // (out, in)
  Parameter bias;    // (out,) — undefined when the layer has none

  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  bool has_bias() const { return has_bias_; }
  const Backend& backend() const { return be_; }

  void collect(ParameterList& out) {
    out.push_back(&weight);
    if (has_bias_) out.push_back(&bias);
  }

  // x (N, in) → y (N, out), without saving anything (inference, generation). x in bf16/f16 is widened to fp32 on
  // the backend's device (Backend::convert) and y returned in x's dtype, in forward and backward alike.
  Tensor apply(const Tensor& x) const {
    if (is_half(x, Backend::device)) return be_.convert(apply(be_.convert(x, DType::f32)), x.dtype());
    const Tensor xc = check_input("Linear::forward", weight.name, x, in_, Backend::device);
    Tensor y = be_.empty({xc.size(0), out_});
    be_.linear(xc, weight.value, has_bias_ ? &bias.value : nullptr, y);  // (N, out)
    return y;
  }
  Tensor forward(const Tensor& x) {
    if (is_half(x, Backend::device)) return be_.convert(forward(be_.convert(x, DType::f32)), x.dtype());
    x_ = check_input("Linear::forward", weight.name, x, in_, Backend::device);
    Tensor y = be_.empty({x_.size(0), out_});
    be_.linear(x_, weight.value, has_bias_ ? &bias.value : nullptr, y);  // (N, out)
    return y;
  }
  // Drops what forward() saved (inference through the training path: nothing will call backward()).
  void release_activations() { x_ = Tensor(); }
  // dy (N, out) → dx (N, in); weight/bias grads accumulate.
  Tensor backward(const Tensor& dy) {
    if (is_half(dy, Backend::device)) return be_.convert(backward(be_.convert(dy, DType::f32)), dy.dtype());
    CUMO_CHECK(x_.defined(), "Linear::backward (", weight.name, "): no saved forward");
    require_trainable("Linear::backward", weight);
    const Tensor g = check_input("Linear::backward", "dy", dy, out_, Backend::device);
    CUMO_CHECK(g.size(0) == x_.size(0), "Linear::backward (", weight.name, "): dy has shape ", g.shape(),
               " but the forward saw x with shape ", x_.shape());
    Tensor dx = be_.empty({g.size(0), in_});
    be_.linear_backward(g, x_, weight.value, weight.grad, has_bias_ ? &bias.grad : nullptr, dx);  // (N, in)
    return dx;
  }

 private:
  std::int64_t in_ = 0, out_ = 0;
  bool has_bias_ = false;
  [[no_unique_address]] Backend be_;
  Tensor x_;  // (N, in) saved input
};

}  // namespace cumo::nn
