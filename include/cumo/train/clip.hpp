#pragma once
// Global-norm gradient clipping, as torch.nn.utils.clip_grad_norm_(params, max_norm) (norm_type 2), which the HF
// Trainer calls with max_grad_norm = 1.0 before every optimizer step:
//
//   total     = ‖ (‖g_1‖, ‖g_2‖, …) ‖₂            over parameters that have a gradient (trainable ones)
//   clip_coef = max_norm / (total + 1e-6)           evaluated as PyTorch does: float `max_norm / tensor` is
//                                                  Tensor.__rtruediv__ = reciprocal(total + 1e-6) * max_norm, fp32
//   g        *= min(clip_coef, 1.0)                 every gradient, always (a no-op when the coefficient is 1)
//   return total
//
// The squares are summed in double (PyTorch sums in fp32 per tensor): the same norm to fp32 rounding, and a
// gradient of 1e30 does not overflow. The sum is split into fixed chunks added in a fixed order, so the norm is
// bitwise the same for any thread count. A NaN/Inf norm stops training with a cumo::Error that names the first
// parameter holding a non-finite gradient (PyTorch's error_if_nonfinite=True, with a more useful message).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::train {

namespace detail {
inline constexpr std::int64_t kNormChunk = 1 << 16;

inline const float* host_grad(const Parameter& p, const char* where) {
  check_dtype(where, p.name + ".grad", p.grad, DType::f32);
  check_device(where, p.name + ".grad", p.grad, Device::cpu);
  CUMO_CHECK(p.grad.is_contiguous(), where, ": the gradient of '", p.name, "' is not contiguous");
  return p.grad.data<float>();
}

// Σ g² in double, chunked so the result is independent of the thread count.
inline double sum_of_squares(const float* g, std::int64_t n) {
  const std::int64_t chunks = (n + kNormChunk - 1) / kNormChunk;
  std::vector<double> partial(std::size_t(chunks), 0.0);
  cpu::parallel_for(chunks, [&](std::int64_t c) {
    const std::int64_t b = c * kNormChunk, e = b + kNormChunk < n ? b + kNormChunk : n;
    double s = 0;
    for (std::int64_t i = b; i < e; ++i) s += double(g[i]) * double(g[i]);
    partial[std::size_t(c)] = s;
  }, kNormChunk);
  double s = 0;
  for (double x : partial) s += x;
  return s;
}
}  // namespace detail

// The global 2-norm of the gradients of the trainable parameters in `params` (no clipping), in fp32 as PyTorch
// returns it. Non-trainable parameters (requires_grad=False in PyTorch: no .grad) are skipped.
inline float grad_norm(const ParameterList& params) {
  double ss = 0;
  for (const Parameter* p : params) {
    if (!p->trainable || !p->grad.defined()) continue;
    const float* g = detail::host_grad(*p, "grad_norm");
    ss += detail::sum_of_squares(g, p->grad.numel());
  }
  return float(std::sqrt(ss));
}

// PyTorch's coefficient: min(max_norm / (total + 1e-6), 1), computed as reciprocal-then-multiply in fp32.
inline float clip_coefficient(float total_norm, double max_norm) {
  const float coef = (1.f / (total_norm + float(1e-6))) * float(max_norm);
  return coef < 1.f ? coef : 1.f;
}

// Scales every trainable gradient so that the global norm is at most max_norm; returns the norm before clipping.
// `step` (optional) goes into the error message when a gradient is NaN/Inf.
inline float clip_grad_norm(const ParameterList& params, double max_norm, std::int64_t step = -1) {
  CUMO_CHECK(max_norm > 0 && std::isfinite(max_norm), "clip_grad_norm: max_norm must be finite and > 0, got ",
             max_norm);
  const float total = grad_norm(params);
  if (!std::isfinite(total)) {
    for (const Parameter* p : params) {
      if (!p->trainable || !p->grad.defined()) continue;
      const float* g = p->grad.data<float>();
      for (std::int64_t i = 0; i < p->grad.numel(); ++i)
        if (!std::isfinite(g[i]))
          fail("clip_grad_norm", step >= 0 ? " at step " + std::to_string(step) : std::string(),
               ": the gradient of '", p->name, "' (shape ", p->grad.shape(), ") holds ", g[i], " at element ", i,
               "; the total gradient norm is ", total, " — training stopped");
    }
    fail("clip_grad_norm", step >= 0 ? " at step " + std::to_string(step) : std::string(),
         ": the total gradient norm is ", total, " — training stopped");
  }
  const float coef = clip_coefficient(total, max_norm);
  if (coef == 1.f) return total;  // g * 1.0f == g bit for bit: skip the pass
  for (Parameter* p : params) {
    if (!p->trainable || !p->grad.defined()) continue;
    float* g = p->grad.data<float>();
    cpu::parallel_for(p->grad.numel(), [&](std::int64_t i) { g[i] *= coef; });
  }
  return total;
}

}  // namespace cumo::train
