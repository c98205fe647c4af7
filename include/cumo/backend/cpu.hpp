#pragma once
// backend::Cpu — the CPU policy for SparseMoE and the model layers: fp32 on Eigen (or a BLAS), OpenMP over
// tokens, rows or experts. Every operation here has a CUDA twin in backend/cuda.cuh with the same signature, and
// the two are tested against each other.
#include <cmath>
#include <cstdint>

#include "cumo/backend/cpu/dispatch.hpp"
#include "cumo/backend/cpu/elementwise.hpp"
#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/backend/cpu/grouped_gemm.hpp"
#include "cumo/backend/cpu/losses.hpp"
#include "cumo/backend/cpu/router.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/moe/types.hpp"

namespace cumo::backend {

struct Cpu {
  static constexpr Device device = Device::cpu;
  static constexpr const char* name = "cpu";

  // ---- dense pieces (router) --------------------------------------------------------------------------------
  // y (M, N) = x (M, K) · w (N, K)^T
  static void linear(const Tensor& x, const Tensor& w, Tensor& y) { cpu::linear(x, w, nullptr, y); }
  // dx (M, K) (+)= dy (M, N) · w (N, K)
  static void linear_dinput(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) {
    cpu::gemm(cpu::Op::N, cpu::Op::N, dy.size(0), w.size(1), w.size(0), 1.f, dy.data<float>(), dy.strides()[0],
              w.data<float>(), w.strides()[0], accumulate ? 1.f : 0.f, dx.data<float>(), dx.strides()[0]);
  }
  // dw (N, K) += dy (M, N)^T · x (M, K)
  static void linear_dweight(const Tensor& dy, const Tensor& x, Tensor& dw) {
    cpu::gemm(cpu::Op::T, cpu::Op::N, dw.size(0), dw.size(1), dy.size(0), 1.f, dy.data<float>(), dy.strides()[0],
              x.data<float>(), x.strides()[0], 1.f, dw.data<float>(), dw.strides()[0]);
  }
  // out = a ⊙ b (same shapes, contiguous)
  static void multiply(const Tensor& a, const Tensor& b, Tensor& out) {
    const float* pa = a.data<float>();
    const float* pb = b.data<float>();
    float* po = out.data<float>();
    cpu::parallel_for(a.numel(), [&](std::int64_t i) { po[i] = pa[i] * pb[i]; });
  }
  // out = a + b
  static void add(const Tensor& a, const Tensor& b, Tensor& out) {
    const float* pa = a.data<float>();
    const float* pb = b.data<float>();
    float* po = out.data<float>();
    cpu::parallel_for(a.numel(), [&](std::int64_t i) { po[i] = pa[i] + pb[i]; });
  }
  static void fill_uniform(Tensor& t, Rng& rng, float lo, float hi) { rng.fill_uniform(t, lo, hi); }
  // Whether every element is finite (NaN/Inf inputs are rejected at the door).
  static bool all_finite(const Tensor& t) {
    const Tensor c = t.contiguous();
    const float* p = c.data<float>();
    bool ok = true;
    for (std::int64_t i = 0; i < c.numel(); ++i) ok &= std::isfinite(p[i]);
    return ok;
  }
  static float item(const Tensor& t) { return t.data<float>()[0]; }

  // ---- router -----------------------------------------------------------------------------------------------
  static void softmax_topk(const Tensor& logits, Tensor& probs, Tensor& idx, Tensor& w, bool renormalize) {
    cpu::softmax_topk(logits, probs, idx, w, renormalize);
  }
  static void topk_weights_backward(const Tensor& probs, const Tensor& idx, const Tensor& w, const Tensor& dw,
                                    bool renormalize, Tensor& dprobs) {
    cpu::topk_weights_backward(probs, idx, w, dw, renormalize, dprobs);
  }
  static void softmax_backward(const Tensor& probs, const Tensor& dprobs, Tensor& dlogits) {
    cpu::softmax_backward(probs, dprobs, dlogits);
  }
  static void aux_losses(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                         AuxLosses& out) {
    cpu::aux_losses(logits, probs, idx, segments, out);
  }
  static void aux_losses_backward(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                                  BalanceCounts counting, AuxLossWeights coef, Tensor& dprobs, Tensor& dlogits) {
    cpu::aux_losses_backward(logits, probs, idx, segments, counting, coef, dprobs, dlogits);
  }

  // ---- dispatch ---------------------------------------------------------------------------------------------
  static void make_plan(const Tensor& idx, DispatchPlan& plan) { cpu::make_plan(idx, plan); }
  static void gather_rows(const Tensor& x, const DispatchPlan& plan, Tensor& xs) { cpu::gather_rows(x, plan, xs); }
  static void combine(const Tensor& out, const Tensor& w, const DispatchPlan& plan, Tensor& y) {
    cpu::combine(out, w, plan, y);
  }
  static void combine_backward(const Tensor& dy, const Tensor& out, const Tensor& w, const DispatchPlan& plan,
                               Tensor& dout, Tensor& dw) {
    cpu::combine_backward(dy, out, w, plan, dout, dw);
  }
  static void scatter_add_rows(const Tensor& dxs, const DispatchPlan& plan, Tensor& dx) {
    cpu::scatter_add_rows(dxs, plan, dx);
  }

  // ---- experts ----------------------------------------------------------------------------------------------
  static void grouped_linear(const Tensor& a, const Tensor& w, const Tensor* bias, const DispatchPlan& plan,
                             Tensor& c) {
    cpu::grouped_linear(a, w, bias, plan.host_offsets, c);
  }
  static void grouped_linear_dinput(const Tensor& dc, const Tensor& w, const DispatchPlan& plan, Tensor& da) {
    cpu::grouped_linear_dinput(dc, w, plan.host_offsets, da);
  }
  static void grouped_linear_dweight(const Tensor& dc, const Tensor& a, const DispatchPlan& plan, Tensor& dw,
                                     Tensor* dbias) {
    cpu::grouped_linear_dweight(dc, a, plan.host_offsets, dw, dbias);
  }
  template <class Act>
  static void activation_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
    cpu::activation_forward<Act>(h, rows, a);
  }
  template <class Act>
  static void activation_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
    cpu::activation_backward<Act>(h, da, rows, dh);
  }
  template <class Act>
  static void glu_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
    cpu::glu_forward<Act>(h, rows, a);
  }
  template <class Act>
  static void glu_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
    cpu::glu_backward<Act>(h, da, rows, dh);
  }
};

}  // namespace cumo::backend
