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

#include "cumo/backend/cpu/optim.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::train {

using cpu::clip_coefficient;  // PyTorch's min(max_norm / (total + 1e-6), 1), reciprocal-then-multiply in fp32

namespace detail {
inline std::vector<Tensor> host_grads(const ParameterList& params, const char* where) {
  std::vector<Tensor> g;
  for (const Parameter* p : params) {
    if (!p->trainable || !p->grad.defined()) continue;
    check_dtype(where, p->name + ".grad", p->grad, DType::f32);
    check_device(where, p->name + ".grad", p->grad, Device::cpu);
    CUMO_CHECK(p->grad.is_contiguous(), where, ": the gradient of '", p->name, "' is not contiguous");
    g.push_back(p->grad);
  }
  return g;
}
// Training stops on a non-finite gradient norm, naming the first parameter (and element) that is not finite.
// host(t) gives a gradient on the host (the optimizer's backend reads it back only on this failure path).
template <class Host>
[[noreturn]] void fail_nonfinite(const ParameterList& params, float total, std::int64_t step, Host&& host) {
  const std::string at = step >= 0 ? " at step " + std::to_string(step) : std::string();
  for (const Parameter* p : params) {
    if (!p->trainable || !p->grad.defined()) continue;
    const Tensor g = host(p->grad);
    const float* v = g.template data<float>();
    for (std::int64_t i = 0; i < g.numel(); ++i)
      if (!std::isfinite(v[i]))
        fail("clip_grad_norm", at, ": the gradient of '", p->name, "' (shape ", p->grad.shape(), ") holds ", v[i],
             " at element ", i, "; the total gradient norm is ", total, " — training stopped");
  }
  fail("clip_grad_norm", at, ": the total gradient norm is ", total, " — training stopped");
}
}  // namespace detail

// The global 2-norm of the gradients of the trainable parameters in `params` (no clipping), in fp32 as PyTorch
// returns it. Non-trainable parameters (requires_grad=False in PyTorch: no .grad) are skipped.
inline float grad_norm(const ParameterList& params) {
  return cpu::grad_norm(detail::host_grads(params, "grad_norm")).data<float>()[0];
}

// Scales every trainable gradient so that the global norm is at most max_norm; returns the norm before clipping.
// `step` (optional) goes into the error message when a gradient is NaN/Inf.
inline float clip_grad_norm(const ParameterList& params, double max_norm, std::int64_t step = -1) {
  CUMO_CHECK(max_norm > 0 && std::isfinite(max_norm), "clip_grad_norm: max_norm must be finite and > 0, got ",
             max_norm);
  const Tensor r = cpu::clip_grad_norm(detail::host_grads(params, "clip_grad_norm"), max_norm);
  const float total = r.data<float>()[0];
  if (std::isfinite(total)) return total;
  detail::fail_nonfinite(params, total, step, [](const Tensor& g) { return g; });
}

}  // namespace cumo::train
