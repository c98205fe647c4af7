#pragma once
// Router<TopK<K>>: a bias-free Linear to E logits, softmax in fp32 over all experts, the top k, and (by default)
// their renormalisation to sum 1 — Mixtral and CuMo semantics; renormalize = false gives Qwen-MoE / DeepSeek-V2's
// raw top-k probabilities. Optional multiplicative jitter on the router input while training (Switch
// Transformer: x ⊙ U(1−ε, 1+ε), router only — the experts see the clean x).
#include <cmath>
#include <cstdint>

#include "cumo/core/parameter.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/moe/topk.hpp"
#include "cumo/core/routing.hpp"

namespace cumo {

struct RouterOptions {
  bool renormalize = true;
  float jitter = 0.f;  // ε of the multiplicative noise; 0 = off
};

template <class TopKPolicy>
class Router {
  static_assert(is_topk<TopKPolicy>::value, "Router<P>: P must be TopK<K> or TopKDynamic");

 public:
  using topk_type = TopKPolicy;

  Router(std::int64_t hidden, int experts, TopKPolicy topk = {}, RouterOptions options = {},
         Device device = Device::cpu)
      : weight("gate.weight", Tensor::zeros({experts, hidden}, DType::f32, device)),
        hidden_(hidden),
        experts_(experts),
        topk_(topk),
        options_(options) {
    CUMO_CHECK(experts >= 1, "Router: need at least one expert, got ", experts);
    CUMO_CHECK(hidden >= 1, "Router: hidden must be positive, got ", hidden);
    CUMO_CHECK(topk.k() >= 1 && topk.k() <= experts, "Router: top-k = ", topk.k(),
               " must be between 1 and the number of experts (", experts, ")");
  }

  Parameter weight;  // (E, H) — "gate.weight" as HF names the router of Mixtral and CuMo

  int k() const { return topk_.k(); }
  int experts() const { return experts_; }
  std::int64_t hidden() const { return hidden_; }
  const RouterOptions& options() const { return options_; }

  // PyTorch's nn.Linear default: U(±1/√fan_in) — CuMo's fresh router at upcycling.
  void reset_parameters(Rng& rng) {
    Tensor w = Tensor::empty(weight.value.shape());
    const float bound = 1.f / std::sqrt(float(hidden_));
    rng.fill_uniform(w, -bound, bound);
    weight.value.copy_from(w.to(weight.value.device()));
  }

  // logits (T, E) → probs, top-k indices and weights; `rng` is only used for jitter while training.
  template <class Backend>
  void forward(const Backend& be, const Tensor& x, bool training, Rng* rng, RouterOutput& out) const {
    const std::int64_t T = x.size(0);
    const int E = experts_, K = k();
    out.x = x;
    out.noise = Tensor();
    if (training && options_.jitter > 0.f) {
      CUMO_CHECK(rng, "Router::forward: jitter needs an Rng");
      Tensor noise = be.empty(x.shape());
      be.fill_uniform(noise, *rng, 1.f - options_.jitter, 1.f + options_.jitter);
      Tensor xj = be.empty(x.shape());
      be.multiply(x, noise, xj);
      out.x = xj;
      out.noise = noise;
    }
    out.logits = be.empty({T, E});
    out.probs = be.empty({T, E});
    out.topk_idx = be.empty({T, K}, DType::i32);
    out.topk_w = be.empty({T, K});
    be.linear(out.x, weight.value, nullptr, out.logits);                                   // (T, E)
    be.softmax_topk(out.logits, out.probs, out.topk_idx, out.topk_w, options_.renormalize);  // (T, K)
  }

  // Given d logits (T, E): weight.grad += dlogits^T x_r, and dx (T, H) += (dlogits W) ⊙ noise.
  template <class Backend>
  void backward(const Backend& be, const RouterOutput& saved, const Tensor& dlogits, Tensor& dx) {
    be.linear_dweight(dlogits, saved.x, weight.grad);  // (E, H)
    if (!saved.noise.defined()) {
      be.linear_dinput(dlogits, weight.value, dx, /*accumulate=*/true);  // (T, H)
      return;
    }
    Tensor dxr = be.empty(dx.shape());
    be.linear_dinput(dlogits, weight.value, dxr, /*accumulate=*/false);  // (T, H)
    be.multiply(dxr, saved.noise, dxr);
    be.add(dx, dxr, dx);
  }

  ParameterList parameters() { return {&weight}; }

 private:
  std::int64_t hidden_;
  int experts_;
  TopKPolicy topk_;
  RouterOptions options_;
};

template <class T>
struct is_router : std::false_type {};
template <class P>
struct is_router<Router<P>> : std::true_type {};

}  // namespace cumo
