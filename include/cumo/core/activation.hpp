#pragma once
// Expert activations: each a stateless type with f(x) and its derivative df(x), usable from CPU loops and CUDA
// kernels alike (CUMO_HD). The names match Hugging Face's ACT2FN keys so configs map one to one.
#include <cmath>

#include "cumo/core/macros.hpp"

namespace cumo {

// x · σ(1.702 x): CLIP's activation (OpenAI CLIP, HF "quick_gelu").
struct QuickGELU {
  static constexpr const char* name = "quick_gelu";
  CUMO_HD static float f(float x) { return x / (1.f + std::exp(-1.702f * x)); }
  CUMO_HD static float df(float x) {
    const float s = 1.f / (1.f + std::exp(-1.702f * x));
    return s + 1.702f * x * s * (1.f - s);
  }
};

// Exact GELU, x · Φ(x) (HF "gelu", PyTorch's default): the LLaVA connector's activation.
struct GELU {
  static constexpr const char* name = "gelu";
  CUMO_HD static float f(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }
  CUMO_HD static float df(float x) {
    const float cdf = 0.5f * (1.f + std::erf(x * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * std::exp(-0.5f * x * x);
    return cdf + x * pdf;
  }
};

// tanh approximation of GELU (HF "gelu_pytorch_tanh" / "gelu_new").
struct GELUTanh {
  static constexpr const char* name = "gelu_tanh";
  CUMO_HD static float f(float x) {
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + std::tanh(u));
  }
  CUMO_HD static float df(float x) {
    const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    const float t = std::tanh(u);
    const float du = 0.79788456080286536f * (1.f + 3.f * 0.044715f * x * x);
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du;
  }
};

// x · σ(x) (HF "silu"): SwiGLU's gate activation in Mistral / Mixtral / Qwen2.
struct SiLU {
  static constexpr const char* name = "silu";
  CUMO_HD static float f(float x) { return x / (1.f + std::exp(-x)); }
  CUMO_HD static float df(float x) {
    const float s = 1.f / (1.f + std::exp(-x));
    return s * (1.f + x * (1.f - s));
  }
};

struct ReLU {
  static constexpr const char* name = "relu";
  CUMO_HD static float f(float x) { return x > 0.f ? x : 0.f; }
  CUMO_HD static float df(float x) { return x > 0.f ? 1.f : 0.f; }
};

template <class A>
concept Activation = requires(float x) {
  { A::f(x) } -> std::convertible_to<float>;
  { A::df(x) } -> std::convertible_to<float>;
  A::name;
};

}  // namespace cumo
