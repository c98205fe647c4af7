#pragma once
// CPU optimizer pieces: one AdamW update per parameter with torch.optim.AdamW's exact arithmetic (train/optimizer.hpp
// explains the formula and its evaluation order), and the global gradient norm with PyTorch's clipping coefficient
// (train/clip.hpp). The references of backend/cuda/optim.cuh, which reproduces them bit for bit.
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/backend/cpu/reduce.hpp"
#include "cumo/backend/ops.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

inline constexpr std::int64_t kNormChunk = 1 << 16;

namespace detail {
// One AdamW update of n elements of one slot. The square root goes through Eigen's packet sqrt (correctly rounded,
// like std::sqrt) because std::sqrt's errno path keeps GCC from vectorising the loop.
inline void adamw_chunk(const backend::AdamWScalars& k, float* p, const float* g, float* m, float* v,
                        std::int64_t n) {
  constexpr std::int64_t kLanes = 256;
  alignas(64) float denom[kLanes];
  for (std::int64_t o = 0; o < n; o += kLanes) {
    const std::int64_t c = n - o < kLanes ? n - o : kLanes;
    for (std::int64_t i = o; i < o + c; ++i) {
      const float gi = g[i];
      // ATen's lerp picks the formula by |weight| so that both ends are exact.
      m[i] = k.lerp_small ? m[i] + k.w1 * (gi - m[i]) : gi - (gi - m[i]) * k.one_minus_w1;
      v[i] = v[i] * k.beta2_f + k.w2 * gi * gi;
    }
    Eigen::Map<Eigen::ArrayXf> d(denom, c);
    d = Eigen::Map<const Eigen::ArrayXf>(v + o, c).sqrt() / k.bc2_sqrt_f + k.eps_f;
    for (std::int64_t i = o; i < o + c; ++i) {
      const float pi = k.decay ? p[i] * k.decay_f : p[i];
      p[i] = pi + k.neg_step_f * m[i] / denom[i - o];
    }
  }
}
}  // namespace detail

// One AdamW update of every slot: p, m, v in place (f32, contiguous, same numel). One parallel loop over chunks of
// every slot (a region per slot cost more than the update of the many small ones); elementwise, so the result does
// not depend on the thread count.
inline void adamw_step(const std::vector<backend::AdamWSlot>& slots, const backend::AdamWHyper& hyper) {
  std::vector<backend::AdamWScalars> scalars;
  scalars.reserve(slots.size());
  for (const backend::AdamWSlot& sl : slots) scalars.push_back(backend::adamw_scalars(sl, hyper));
  const std::vector<Piece> pieces =
      pieces_of(slots.size(), [&](std::size_t s) { return slots[s].param.numel(); }, std::int64_t(1) << 14);
  // dynamic: the pieces range from a 4-element bias to a full chunk
  parallel_for_dynamic(std::int64_t(pieces.size()), [&](std::int64_t i) {
    const Piece& pc = pieces[std::size_t(i)];
    const backend::AdamWSlot& sl = slots[pc.tensor];
    detail::adamw_chunk(scalars[pc.tensor], sl.param.data<float>() + pc.begin, sl.grad.data<float>() + pc.begin,
                        sl.exp_avg.data<float>() + pc.begin, sl.exp_avg_sq.data<float>() + pc.begin,
                        pc.end - pc.begin);
  }, 8 * numel_of(pieces));
  for (const backend::AdamWSlot& sl : slots)
    if (sl.param_bf16.defined()) {  // the bf16 compute copy of the fp32 master
      Tensor out = sl.param_bf16;
      out.copy_from(sl.param.to(DType::bf16));
    }
}

// Σ g² over every element of (g_1, …, g_n), in double: kNormChunk-element chunks of each gradient (all chunks of all
// gradients in one parallel loop), the chunk sums added in order per gradient, then over the gradients in order —
// the same sums for any thread count (backend/cuda/optim.cuh chunks alike).
inline double sum_of_squares(const std::vector<Tensor>& grads) {
  const std::vector<Piece> pieces =
      pieces_of(grads.size(), [&](std::size_t t) { return grads[t].numel(); }, kNormChunk);
  std::vector<double> partial(pieces.size(), 0.0);
  parallel_for_dynamic(std::int64_t(pieces.size()), [&](std::int64_t i) {
    const Piece& pc = pieces[std::size_t(i)];
    const float* g = grads[pc.tensor].data<float>() + pc.begin;
    partial[std::size_t(i)] = sum8(pc.end - pc.begin, [&](std::int64_t j) { return double(g[j]) * double(g[j]); });
  }, 2 * numel_of(pieces));
  double ss = 0, tensor_sum = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    tensor_sum += partial[i];
    if (i + 1 == pieces.size() || pieces[i + 1].tensor != pieces[i].tensor) {
      ss += tensor_sum;
      tensor_sum = 0;
    }
  }
  return ss;
}

// ‖(g_1, …, g_n)‖₂ as a (1,) f32 tensor (sum_of_squares' sum).
inline Tensor grad_norm(const std::vector<Tensor>& grads) {
  Tensor out = Tensor::empty({1});
  out.data<float>()[0] = float(std::sqrt(sum_of_squares(grads)));
  return out;
}

// PyTorch's coefficient: min(max_norm / (total + 1e-6), 1), computed as reciprocal-then-multiply in fp32.
inline float clip_coefficient(float total_norm, double max_norm) {
  const float coef = (1.f / (total_norm + float(1e-6))) * float(max_norm);
  return coef < 1.f ? coef : 1.f;
}

// g ← coef · g for every gradient (coef = 1 skips the pass: g * 1.0f == g bit for bit).
inline void scale_gradients(const std::vector<Tensor>& grads, float coef) {
  if (coef == 1.f) return;
  const std::vector<Piece> pieces =
      pieces_of(grads.size(), [&](std::size_t t) { return grads[t].numel(); }, kNormChunk);
  parallel_for_dynamic(std::int64_t(pieces.size()), [&](std::int64_t i) {
    const Piece& pc = pieces[std::size_t(i)];
    float* p = grads[pc.tensor].data<float>();
    for (std::int64_t j = pc.begin; j < pc.end; ++j) p[j] *= coef;
  }, numel_of(pieces));
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
  scale_gradients(grads, coef);
  return out;
}

}  // namespace cumo::cpu
