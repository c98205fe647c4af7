#pragma once
// CPU activations, forward and backward: of the experts (over the first `rows` rows of a (rows_capacity, width)
// buffer; the gated product from one fused [gate | up] buffer, `glu_*`) and of the dense gated FFN (gate and up
// in two buffers, `gated_*`).
#include <cstdint>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// a = Act(h)
template <class Act>
void activation_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
  const std::int64_t n = rows * h.size(1);
  const float* src = h.data<float>();
  float* dst = a.data<float>();
  parallel_for(n, [&](std::int64_t i) { dst[i] = Act::f(src[i]); }, 20);
}
// dh = da ⊙ Act'(h)
template <class Act>
void activation_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
  const std::int64_t n = rows * h.size(1);
  const float* hp = h.data<float>();
  const float* g = da.data<float>();
  float* d = dh.data<float>();
  parallel_for(n, [&](std::int64_t i) { d[i] = g[i] * Act::df(hp[i]); }, 30);
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
    for (std::int64_t j = 0; j < F; ++j) ap[r * F + j] = Act::f(g[j]) * u[j];
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
    for (std::int64_t j = 0; j < F; ++j) {
      const float gj = g[r * F + j];
      dg[j] = gj * up[j] * Act::df(gate[j]);
      du[j] = gj * Act::f(gate[j]);
    }
  }, 30 * F);
}

// a = Act(gate) ⊙ up (same shapes)
template <class Act>
void gated_forward(const Tensor& gate, const Tensor& up, Tensor& a) {
  const float *pg = gate.data<float>(), *pu = up.data<float>();
  float* pa = a.data<float>();
  parallel_for(a.numel(), [&](std::int64_t i) { pa[i] = Act::f(pg[i]) * pu[i]; }, 30);
}
// dgate = da ⊙ up ⊙ Act'(gate), dup = da ⊙ Act(gate)
template <class Act>
void gated_backward(const Tensor& gate, const Tensor& up, const Tensor& da, Tensor& dgate, Tensor& dup) {
  const float *pg = gate.data<float>(), *pu = up.data<float>(), *pa = da.data<float>();
  float *pdg = dgate.data<float>(), *pdu = dup.data<float>();
  parallel_for(da.numel(), [&](std::int64_t i) {
    pdg[i] = pa[i] * pu[i] * Act::df(pg[i]);
    pdu[i] = pa[i] * Act::f(pg[i]);
  }, 40);
}

}  // namespace cumo::cpu
