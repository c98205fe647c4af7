#pragma once
// CPU activations, forward and backward: of the experts (over the first `rows` rows of a (rows_capacity, width)
// buffer; the gated product from one fused [gate | up] buffer, `glu_*`) and of the dense gated FFN (gate and up
// in two buffers, `gated_*`).
//
// The loops run over chunks of kActChunk elements through VectorActivation<Act>: for the sigmoid- and erf-based
// activations that is Eigen's packet exp / erf (exp within 1.2e-7 relative of the exact value, erf within 3.3e-7,
// measured over [-20, 20]), where the scalar Act::f / Act::df call libm once per element and keep the loop scalar;
// the activations were ~20 % of a CPU training step that way. Other activations (ReLU, a user's own) take the scalar
// forms. Elementwise either way, so results do not depend on the thread count.
#include <algorithm>
#include <cstdint>

#include <Eigen/Core>
#include <unsupported/Eigen/SpecialFunctions>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/activation.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

inline constexpr std::int64_t kActChunk = 512;

// f(x) and/or f'(x) of n ≤ kActChunk elements; either output may be null. The generic form: the scalar functions.
template <class Act>
struct VectorActivation {
  static void eval(const float* x, std::int64_t n, float* f, float* df) {
    for (std::int64_t i = 0; i < n; ++i) {
      if (f) f[i] = Act::f(x[i]);
      if (df) df[i] = Act::df(x[i]);
    }
  }
};

namespace detail {
using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

// x · σ(a·x) (QuickGELU a = 1.702, SiLU a = 1) and its derivative σ + a·x·σ·(1 − σ).
template <int kMilli>
struct SigmoidGate {
  static void eval(const float* xp, std::int64_t n, float* f, float* df) {
    constexpr float a = float(kMilli) / 1000.f;
    const ConstArrayMap x(xp, n);
    alignas(64) float sb[kActChunk];
    ArrayMap s(sb, n);
    s = (1.f + (-a * x).exp()).inverse();  // σ(a·x)
    if (f) ArrayMap(f, n) = x * s;
    if (df) ArrayMap(df, n) = s + a * x * s * (1.f - s);
  }
};
}  // namespace detail

template <>
struct VectorActivation<QuickGELU> : detail::SigmoidGate<1702> {};

template <>
struct VectorActivation<SiLU> : detail::SigmoidGate<1000> {};

template <>
struct VectorActivation<GELU> {
  static void eval(const float* xp, std::int64_t n, float* f, float* df) {
    const detail::ConstArrayMap x(xp, n);
    alignas(64) float cb[kActChunk];
    detail::ArrayMap cdf(cb, n);
    cdf = 0.5f * (1.f + (x * 0.70710678118654752f).erf());  // Φ(x)
    if (f) detail::ArrayMap(f, n) = x * cdf;
    if (df) detail::ArrayMap(df, n) = cdf + x * (0.39894228040143268f * (-0.5f * x * x).exp());
  }
};

template <>
struct VectorActivation<GELUTanh> {
  static void eval(const float* xp, std::int64_t n, float* f, float* df) {
    const detail::ConstArrayMap x(xp, n);
    alignas(64) float tb[kActChunk];
    detail::ArrayMap t(tb, n);
    t = (0.79788456080286536f * (x + 0.044715f * x * x * x)).tanh();
    if (f) detail::ArrayMap(f, n) = 0.5f * x * (1.f + t);
    if (df)
      detail::ArrayMap(df, n) =
          0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * (0.79788456080286536f * (1.f + 3.f * 0.044715f * x * x));
  }
};

// Calls body(offset, length) for the chunks of [0, n), in parallel.
template <class F>
void for_chunks(std::int64_t n, F&& body, std::int64_t cost_per_element) {
  const std::int64_t chunks = (n + kActChunk - 1) / kActChunk;
  parallel_for(chunks, [&](std::int64_t c) {
    const std::int64_t o = c * kActChunk;
    body(o, std::min(kActChunk, n - o));
  }, kActChunk * cost_per_element);
}

// a = Act(h)
template <class Act>
void activation_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
  const float* src = h.data<float>();
  float* dst = a.data<float>();
  for_chunks(rows * h.size(1), [&](std::int64_t o, std::int64_t n) {
    VectorActivation<Act>::eval(src + o, n, dst + o, nullptr);
  }, 20);
}
// dh = da ⊙ Act'(h) (dh may be da)
template <class Act>
void activation_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
  const float* hp = h.data<float>();
  const float* g = da.data<float>();
  float* d = dh.data<float>();
  for_chunks(rows * h.size(1), [&](std::int64_t o, std::int64_t n) {
    alignas(64) float db[kActChunk];
    VectorActivation<Act>::eval(hp + o, n, nullptr, db);
    detail::ArrayMap(d + o, n) = detail::ConstArrayMap(g + o, n) * detail::ConstArrayMap(db, n);
  }, 30);
}

// h (rows, 2F) = [gate | up];  a (rows, F) = Act(gate) ⊙ up  (SwiGLU when Act = SiLU)
template <class Act>
void glu_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
  const std::int64_t F = a.size(1);
  const float* hp = h.data<float>();
  float* ap = a.data<float>();
  parallel_for(rows, [&](std::int64_t r) {
    const float* g = hp + r * 2 * F;
    const float* u = g + F;
    float* out = ap + r * F;
    for (std::int64_t o = 0; o < F; o += kActChunk) {
      const std::int64_t n = std::min(kActChunk, F - o);
      VectorActivation<Act>::eval(g + o, n, out + o, nullptr);
      detail::ArrayMap(out + o, n) *= detail::ConstArrayMap(u + o, n);
    }
  }, 30 * F);
}
// dh = [da ⊙ up ⊙ Act'(gate) | da ⊙ Act(gate)]
template <class Act>
void glu_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
  const std::int64_t F = da.size(1);
  const float* hp = h.data<float>();
  const float* g = da.data<float>();
  float* d = dh.data<float>();
  parallel_for(rows, [&](std::int64_t r) {
    const float* gate = hp + r * 2 * F;
    const float* up = gate + F;
    float* dg = d + r * 2 * F;
    float* du = dg + F;
    for (std::int64_t o = 0; o < F; o += kActChunk) {
      const std::int64_t n = std::min(kActChunk, F - o);
      alignas(64) float fb[kActChunk], db[kActChunk];
      VectorActivation<Act>::eval(gate + o, n, fb, db);
      const detail::ConstArrayMap gj(g + r * F + o, n);
      detail::ArrayMap(dg + o, n) = gj * detail::ConstArrayMap(up + o, n) * detail::ConstArrayMap(db, n);
      detail::ArrayMap(du + o, n) = gj * detail::ConstArrayMap(fb, n);
    }
  }, 30 * F);
}

// a = Act(gate) ⊙ up (same shapes)
template <class Act>
void gated_forward(const Tensor& gate, const Tensor& up, Tensor& a) {
  const float *pg = gate.data<float>(), *pu = up.data<float>();
  float* pa = a.data<float>();
  for_chunks(a.numel(), [&](std::int64_t o, std::int64_t n) {
    VectorActivation<Act>::eval(pg + o, n, pa + o, nullptr);
    detail::ArrayMap(pa + o, n) *= detail::ConstArrayMap(pu + o, n);
  }, 30);
}
// dgate = da ⊙ up ⊙ Act'(gate), dup = da ⊙ Act(gate)
template <class Act>
void gated_backward(const Tensor& gate, const Tensor& up, const Tensor& da, Tensor& dgate, Tensor& dup) {
  const float *pg = gate.data<float>(), *pu = up.data<float>(), *pa = da.data<float>();
  float *pdg = dgate.data<float>(), *pdu = dup.data<float>();
  for_chunks(da.numel(), [&](std::int64_t o, std::int64_t n) {
    alignas(64) float fb[kActChunk], db[kActChunk];
    VectorActivation<Act>::eval(pg + o, n, fb, db);
    const detail::ConstArrayMap g(pa + o, n);
    detail::ArrayMap(pdg + o, n) = g * detail::ConstArrayMap(pu + o, n) * detail::ConstArrayMap(db, n);
    detail::ArrayMap(pdu + o, n) = g * detail::ConstArrayMap(fb, n);
  }, 40);
}

}  // namespace cumo::cpu
