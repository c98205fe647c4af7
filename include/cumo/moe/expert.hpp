#pragma once
// Expert<MLP<Act>> and Expert<GatedMLP<Act>>: the E experts of a block, their weights stacked along a leading
// expert dimension in Hugging Face's fused layout, run as grouped GEMMs over expert-contiguous rows.
//   MLP:      out = fc2(Act(fc1(x)))                 fc1 (E, F, H) + bias (E, F), fc2 (E, O, F) + bias (E, O)
//   GatedMLP: out = down(Act(gate(x)) ⊙ up(x))       gate_up_proj (E, 2F, H) [gate rows, then up], down_proj (E, O, F)
// O, the output width, is H unless given (the LLaVA connector maps vision width to text width).
#include <cmath>
#include <cstdint>

#include "cumo/core/parameter.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/activation.hpp"
#include "cumo/core/routing.hpp"

namespace cumo {

template <Activation Act>
struct MLP {
  using activation = Act;
};
template <Activation Act>
struct GatedMLP {
  using activation = Act;
};

// Weights of one dense MLP (F, H)/(F)/(H, F)/(H), the kind CLIP and the LLaVA connector use.
struct DenseMLPWeights {
  Tensor fc1_weight, fc1_bias, fc2_weight, fc2_bias;
};
// Weights of one dense SwiGLU FFN (Mistral naming).
struct DenseGatedWeights {
  Tensor gate_proj, up_proj, down_proj;  // (F, H), (F, H), (H, F)
};

namespace detail {
// PyTorch nn.Linear default init: weight and bias ~ U(±1/√fan_in).
inline void linear_init(Tensor& dst, std::int64_t fan_in, Rng& rng) {
  Tensor w = Tensor::empty(dst.shape());
  const float bound = 1.f / std::sqrt(float(fan_in));
  rng.fill_uniform(w, -bound, bound);
  copy_converted(dst, w);
}
inline void copy_into_expert(Tensor& stacked, int e, const Tensor& src, const char* name) {
  Tensor dst = stacked.select(0, e);
  CUMO_CHECK(dst.shape() == src.shape(), "upcycle_from_dense: dense ", name, " has shape ", src.shape(),
             " but an expert's ", name, " has shape ", dst.shape());
  copy_converted(dst, src);
}
}  // namespace detail

template <class Kind>
class Expert {
  static_assert(sizeof(Kind) == 0, "Expert<Kind>: Kind must be MLP<Act> or GatedMLP<Act>, e.g. Expert<MLP<QuickGELU>>");
};

template <Activation Act>
class Expert<MLP<Act>> {
 public:
  using activation = Act;
  static constexpr bool gated = false;

  struct Saved {
    Tensor h;  // (rows, F) pre-activation
    Tensor a;  // (rows, F) Act(h)
  };

  // out = 0 means out = hidden; the LLaVA connector's experts map vision width to text width.
  Expert(int experts, std::int64_t hidden, std::int64_t ffn, Device device = Device::cpu, std::int64_t out = 0)
      : fc1_weight("experts.fc1.weight", Tensor::zeros({experts, ffn, hidden}, parameter_storage().weights, device)),
        fc1_bias("experts.fc1.bias", Tensor::zeros({experts, ffn}, DType::f32, device)),
        fc2_weight("experts.fc2.weight", Tensor::zeros({experts, out ? out : hidden, ffn}, parameter_storage().weights, device)),
        fc2_bias("experts.fc2.bias", Tensor::zeros({experts, out ? out : hidden}, DType::f32, device)),
        experts_(experts),
        hidden_(hidden),
        ffn_(ffn),
        out_(out ? out : hidden) {}

  Parameter fc1_weight, fc1_bias, fc2_weight, fc2_bias;

  int experts() const { return experts_; }
  std::int64_t hidden() const { return hidden_; }
  std::int64_t ffn() const { return ffn_; }
  std::int64_t out_features() const { return out_; }
  ParameterList parameters() { return {&fc1_weight, &fc1_bias, &fc2_weight, &fc2_bias}; }

  void reset_parameters(Rng& rng) {
    detail::linear_init(fc1_weight.value, hidden_, rng);
    detail::linear_init(fc1_bias.value, hidden_, rng);
    detail::linear_init(fc2_weight.value, ffn_, rng);
    detail::linear_init(fc2_bias.value, ffn_, rng);
  }
  // Every expert an exact copy of the dense MLP (upcycling).
  void copy_from_dense(const DenseMLPWeights& d) {
    for (int e = 0; e < experts_; ++e) {
      detail::copy_into_expert(fc1_weight.value, e, d.fc1_weight, "fc1.weight");
      detail::copy_into_expert(fc1_bias.value, e, d.fc1_bias, "fc1.bias");
      detail::copy_into_expert(fc2_weight.value, e, d.fc2_weight, "fc2.weight");
      detail::copy_into_expert(fc2_bias.value, e, d.fc2_bias, "fc2.bias");
    }
  }

  // xs (rows, H) in expert-contiguous order → out (rows, out_features)
  template <class Backend>
  void forward(const Backend& be, const Tensor& xs, const DispatchPlan& plan, Saved& saved, Tensor& out) const {
    const std::int64_t cap = xs.size(0), rows = plan.rows();
    saved.h = be.empty({cap, ffn_});
    saved.a = be.empty({cap, ffn_});
    be.grouped_linear(xs, fc1_weight.value, &fc1_bias.value, plan, saved.h);  // (rows, F)
    be.template activation_forward<Act>(saved.h, rows, saved.a);               // (rows, F)
    be.grouped_linear(saved.a, fc2_weight.value, &fc2_bias.value, plan, out);  // (rows, out)
  }

  // dout (rows, out) → dxs (rows, H); weight and bias gradients accumulate.
  template <class Backend>
  void backward(const Backend& be, const Tensor& xs, const Tensor& dout, const DispatchPlan& plan, const Saved& saved,
                Tensor& dxs) {
    require_trainable("Expert::backward", fc1_weight);
    require_trainable("Expert::backward", fc2_weight);
    const std::int64_t cap = xs.size(0), rows = plan.rows();
    Tensor da = be.empty({cap, ffn_});
    be.grouped_linear_dweight(dout, saved.a, plan, fc2_weight.grad, &fc2_bias.grad);  // (E, H, F)
    be.grouped_linear_dinput(dout, fc2_weight.value, plan, da);                       // (rows, F)
    be.template activation_backward<Act>(saved.h, da, rows, da);                      // dh, in place
    be.grouped_linear_dweight(da, xs, plan, fc1_weight.grad, &fc1_bias.grad);         // (E, F, H)
    be.grouped_linear_dinput(da, fc1_weight.value, plan, dxs);                        // (rows, H)
  }

 private:
  int experts_;
  std::int64_t hidden_, ffn_, out_;
};

template <Activation Act>
class Expert<GatedMLP<Act>> {
 public:
  using activation = Act;
  static constexpr bool gated = true;

  struct Saved {
    Tensor h;  // (rows, 2F) [gate | up] pre-activation
    Tensor a;  // (rows, F)  Act(gate) ⊙ up
  };

  Expert(int experts, std::int64_t hidden, std::int64_t ffn, Device device = Device::cpu, std::int64_t out = 0)
      : gate_up_proj("experts.gate_up_proj", Tensor::zeros({experts, 2 * ffn, hidden}, parameter_storage().weights, device)),
        down_proj("experts.down_proj", Tensor::zeros({experts, out ? out : hidden, ffn}, parameter_storage().weights, device)),
        experts_(experts),
        hidden_(hidden),
        ffn_(ffn),
        out_(out ? out : hidden) {}

  Parameter gate_up_proj, down_proj;

  int experts() const { return experts_; }
  std::int64_t hidden() const { return hidden_; }
  std::int64_t ffn() const { return ffn_; }
  std::int64_t out_features() const { return out_; }
  ParameterList parameters() { return {&gate_up_proj, &down_proj}; }

  void reset_parameters(Rng& rng) {
    detail::linear_init(gate_up_proj.value, hidden_, rng);
    detail::linear_init(down_proj.value, ffn_, rng);
  }
  void copy_from_dense(const DenseGatedWeights& d) {
    for (int e = 0; e < experts_; ++e) {
      Tensor gu = gate_up_proj.value.select(0, e);
      Tensor gate = gu.slice(0, 0, ffn_), up = gu.slice(0, ffn_, 2 * ffn_);
      CUMO_CHECK(d.gate_proj.shape() == gate.shape() && d.up_proj.shape() == up.shape(),
                 "upcycle_from_dense: dense gate/up_proj have shapes ", d.gate_proj.shape(), " / ",
                 d.up_proj.shape(), " but an expert's are ", gate.shape());
      copy_converted(gate, d.gate_proj);
      copy_converted(up, d.up_proj);
      detail::copy_into_expert(down_proj.value, e, d.down_proj, "down_proj");
    }
  }

  template <class Backend>
  void forward(const Backend& be, const Tensor& xs, const DispatchPlan& plan, Saved& saved, Tensor& out) const {
    const std::int64_t cap = xs.size(0), rows = plan.rows();
    saved.h = be.empty({cap, 2 * ffn_});
    saved.a = be.empty({cap, ffn_});
    be.grouped_linear(xs, gate_up_proj.value, nullptr, plan, saved.h);  // (rows, 2F)
    be.template glu_forward<Act>(saved.h, rows, saved.a);               // (rows, F)
    be.grouped_linear(saved.a, down_proj.value, nullptr, plan, out);    // (rows, H)
  }

  template <class Backend>
  void backward(const Backend& be, const Tensor& xs, const Tensor& dout, const DispatchPlan& plan, const Saved& saved,
                Tensor& dxs) {
    require_trainable("Expert::backward", gate_up_proj);
    require_trainable("Expert::backward", down_proj);
    const std::int64_t cap = xs.size(0), rows = plan.rows();
    Tensor da = be.empty({cap, ffn_});
    Tensor dh = be.empty({cap, 2 * ffn_});
    be.grouped_linear_dweight(dout, saved.a, plan, down_proj.grad, nullptr);  // (E, H, F)
    be.grouped_linear_dinput(dout, down_proj.value, plan, da);                // (rows, F)
    be.template glu_backward<Act>(saved.h, da, rows, dh);                     // (rows, 2F)
    be.grouped_linear_dweight(dh, xs, plan, gate_up_proj.grad, nullptr);     // (E, 2F, H)
    be.grouped_linear_dinput(dh, gate_up_proj.value, plan, dxs);              // (rows, H)
  }

 private:
  int experts_;
  std::int64_t hidden_, ffn_, out_;
};

template <class T>
struct is_expert : std::false_type {};
template <class K>
struct is_expert<Expert<MLP<K>>> : std::true_type {};
template <class K>
struct is_expert<Expert<GatedMLP<K>>> : std::true_type {};

}  // namespace cumo
