#pragma once
// nn::Linear<Backend> — y = x W^T (+ b), PyTorch's layout (W is (out, in)). The forward saves x for the backward, which
// accumulates dW = dy^T x, db = Σ_rows dy and returns dx = dy W.
#include <cstdint>
#include <string>

#include "cumo/nn/ops.hpp"

namespace cumo::nn {

template <class Backend = backend::Cpu>
class Linear {
 public:
  using backend_type = Backend;

  Linear() = default;
  // `name` is the HF module path, e.g. "model.layers.0.self_attn.q_proj" (parameters are name.weight / name.bias).
  Linear(const std::string& name, std::int64_t in, std::int64_t out, bool bias)
      : weight(param(name + ".weight", {out, in}, Backend::device)), in_(in), out_(out), has_bias_(bias) {
    if (bias) this->bias = param(name + ".bias", {out}, Backend::device);
  }

  Parameter weight;  // (out, in)
  Parameter bias;    // (out,) — undefined when the layer has none

  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  bool has_bias() const { return has_bias_; }

  void collect(ParameterList& out) {
    out.push_back(&weight);
    if (has_bias_) out.push_back(&bias);
  }

  // x (N, in) → y (N, out), without saving anything (inference, generation).
  Tensor apply(const Tensor& x) const {
    const Tensor xc = check_input("Linear::forward", weight.name.c_str(), x, in_, Backend::device);
    Tensor y = matrix(xc.size(0), out_, Backend::device);
    if constexpr (on_cpu<Backend>)
      cpu::linear(xc, weight.value, has_bias_ ? &bias.value : nullptr, y);  // (N, out)
    else
      Backend::dense_linear(xc, weight.value, has_bias_ ? &bias.value : nullptr, y);  // (N, out)
    return y;
  }
  Tensor forward(const Tensor& x) {
    Tensor y = apply(x);
    x_ = on_cpu<Backend> ? x.contiguous() : x;
    return y;
  }
  // dy (N, out) → dx (N, in); weight/bias grads accumulate.
  Tensor backward(const Tensor& dy) {
    CUMO_CHECK(x_.defined(), "Linear::backward (", weight.name, "): no saved forward");
    const Tensor g = check_input("Linear::backward", "dy", dy, out_, Backend::device);
    CUMO_CHECK(g.size(0) == x_.size(0), "Linear::backward (", weight.name, "): dy has shape ", g.shape(),
               " but the forward saw x with shape ", x_.shape());
    const std::int64_t N = g.size(0);
    Tensor dx = matrix(N, in_, Backend::device);
    if constexpr (on_cpu<Backend>) {
      cpu::gemm(cpu::Op::T, cpu::Op::N, out_, in_, N, 1.f, g.data<float>(), out_, x_.data<float>(), in_, 1.f,
                weight.grad.data<float>(), in_);  // (out, in)
      if (has_bias_) {
        float* db = bias.grad.data<float>();
        const float* pg = g.data<float>();
        for (std::int64_t r = 0; r < N; ++r)
          for (std::int64_t j = 0; j < out_; ++j) db[j] += pg[r * out_ + j];
      }
      cpu::gemm(cpu::Op::N, cpu::Op::N, N, in_, out_, 1.f, g.data<float>(), out_, weight.value.data<float>(), in_,
                0.f, dx.data<float>(), in_);  // (N, in)
    } else {
      Backend::dense_linear_backward(g, x_, weight.value, weight.grad, has_bias_ ? &bias.grad : nullptr, dx);
    }
    return dx;
  }

 private:
  std::int64_t in_ = 0, out_ = 0;
  bool has_bias_ = false;
  Tensor x_;  // (N, in) saved input
};

}  // namespace cumo::nn
