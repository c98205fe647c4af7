#pragma once
// CPU optimizer pieces: one AdamW update per parameter with torch.optim.AdamW's exact arithmetic (train/optimizer.hpp
// explains the formula and its evaluation order), and the global gradient norm with PyTorch's clipping coefficient
// (train/clip.hpp). The references of backend/cuda/optim.cuh, which reproduces them bit for bit.
#include <cmath>
#include <cstdint>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/backend/ops.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

inline constexpr std::int64_t kNormChunk = 1 << 16;

// One AdamW update of every slot: p, m, v in place (f32, contiguous, same numel).
inline void adamw_step(const std::vector<backend::AdamWSlot>& slots, const backend::AdamWHyper& hyper) {
  for (const backend::AdamWSlot& sl : slots) {
    const backend::AdamWScalars k = backend::adamw_scalars(sl, hyper);
    const bool decay = k.decay, lerp_small = k.lerp_small;
    const float decay_f = k.decay_f, w1 = k.w1, beta2_f = k.beta2_f, w2 = k.w2, bc2_sqrt_f = k.bc2_sqrt_f;
    const float eps_f = k.eps_f, neg_step_f = k.neg_step_f, one_minus_w1 = k.one_minus_w1;

    float* pv = sl.param.data<float>();
    const float* gv = sl.grad.data<float>();
    float* m = sl.exp_avg.data<float>();
    float* v = sl.exp_avg_sq.data<float>();
    // Elementwise and independent: the result does not depend on the thread count.
    parallel_for(sl.param.numel(), [&](std::int64_t i) {
      float pi = pv[i];
      const float gi = gv[i];
      if (decay) pi = pi * decay_f;
      // ATen's lerp picks the formula by |weight| so that both ends are exact.
      m[i] = lerp_small ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * one_minus_w1;
      float vi = v[i] * beta2_f;
      vi = vi + w2 * gi * gi;
      v[i] = vi;
      const float denom = std::sqrt(vi) / bc2_sqrt_f + eps_f;
      pv[i] = pi + neg_step_f * m[i] / denom;
    }, 1 << 14);
    if (sl.param_bf16.defined()) {  // the bf16 compute copy of the fp32 master
      Tensor out = sl.param_bf16;
      out.copy_from(sl.param.to(DType::bf16));
    }
  }
}

// Σ g² in double, chunked so the result is independent of the thread count.
inline double sum_of_squares(const float* g, std::int64_t n) {
  const std::int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
  std::vector<double> partial(std::size_t(chunks), 0.0);
  parallel_for(chunks, [&](std::int64_t c) {
    const std::int64_t b = c * kNormChunk, e = b + kNormChunk < n ? b + kNormChunk : n;
    double s = 0;
    for (std::int64_t i = b; i < e; ++i) s += double(g[i]) * double(g[i]);
    partial[std::size_t(c)] = s;
  }, kNormChunk);
  double s = 0;
  for (double x : partial) s += x;
  return s;
}

// ‖(g_1, …, g_n)‖₂ as a (1,) f32 tensor.
inline Tensor grad_norm(const std::vector<Tensor>& grads) {
  double ss = 0;
  for (const Tensor& g : grads) ss += sum_of_squares(g.data<float>(), g.numel());
  Tensor out = Tensor::empty({1});
  out.data<float>()[0] = float(std::sqrt(ss));
  return out;
}

// PyTorch's coefficient: min(max_norm / (total + 1e-6), 1), computed as reciprocal-then-multiply in fp32.
inline float clip_coefficient(float total_norm, double max_norm) {
  const float coef = (1.f / (total_norm + float(1e-6))) * float(max_norm);
  return coef < 1.f ? coef : 1.f;
}

// Scales `grads` so that their global norm is at most max_norm; returns {norm before clipping, coefficient} (2,)
// f32. A non-finite norm leaves the gradients alone (the caller stops and names the culprit).
inline Tensor clip_grad_norm(const std::vector<Tensor>& grads, double max_norm) {
  const float total = grad_norm(grads).data<float>()[0];
  Tensor out = Tensor::empty({2});
  out.data<float>()[0] = total;
  out.data<float>()[1] = 1.f;
  if (!std::isfinite(total)) return out;
  const float coef = clip_coefficient(total, max_norm);
  out.data<float>()[1] = coef;
  if (coef == 1.f) return out;  // g * 1.0f == g bit for bit: skip the pass
  for (const Tensor& g : grads) {
    float* p = g.data<float>();
    parallel_for(g.numel(), [&](std::int64_t i) { p[i] *= coef; });
  }
  return out;
}

}  // namespace cumo::cpu
