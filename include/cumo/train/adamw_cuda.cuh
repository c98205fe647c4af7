#pragma once
// train::CudaAdamW — train::AdamW for parameters on the GPU: the same groups, options, per-parameter state
// ({step, exp_avg, exp_avg_sq}, fp32, on the device) and checkpoint format (detail::AdamWGroups), one fused
// gpu::adamw_step launch per step (optim.cuh: bitwise AdamW::update's arithmetic), global-norm clipping on the
// device. Nothing is read back to the host except by
// clip_grad_norm(), which returns the norm as a device tensor: read it when you log.
//
//   train::CudaAdamW opt(groups, options);        // parameters already on the GPU (models::CuMo<backend::Cuda>)
//   model.forward(...); model.backward();
//   const Tensor norm = opt.clip_grad_norm(1.0);  // (2,) f32 on the device: {norm, coefficient}
//   opt.step(schedule(step));  opt.zero_grad();
#include <cmath>
#include <utility>
#include <vector>

#include "cumo/backend/cuda.cuh"
#include "cumo/backend/cuda/elementwise.cuh"
#include "cumo/backend/cuda/optim.cuh"
#include "cumo/train/optimizer.hpp"

namespace cumo::train {

class CudaAdamW : public detail::AdamWGroups {
 public:
  CudaAdamW(std::vector<ParamGroup> groups, AdamWOptions options = {})
      : AdamWGroups(std::move(groups), options, "CudaAdamW", Device::cuda) {}
  explicit CudaAdamW(ParameterList params, AdamWOptions options = {})
      : CudaAdamW(one_group(std::move(params)), options) {}

  // Scales the trainable gradients to a global norm ≤ max_norm on the device; returns {norm, coefficient} (2,) f32
  // on the device (no host sync). A non-finite norm leaves the gradients alone: read the norm back and stop.
  Tensor clip_grad_norm(double max_norm) {
    std::vector<Tensor> grads;
    for (Parameter* p : trainable_parameters()) grads.push_back(p->grad);
    return gpu::clip_grad_norm(grads, max_norm);
  }

  // One update at `lr`; each group uses lr × its lr_scale and its weight decay (AdamW::step's rules). A parameter's
  // moments start at zero on its first update.
  void step(double lr) {
    CUMO_CHECK(std::isfinite(lr) && lr >= 0, "CudaAdamW::step: lr must be finite and >= 0, got ", lr);
    // Every gradient is checked before any state changes, so a bad one leaves the step counts as they were.
    for (const Parameter* p : trainable_parameters()) {
      CUMO_CHECK(p->grad.defined() && p->grad.shape() == p->value.shape(), "CudaAdamW::step: parameter '", p->name,
                 "' has shape ", p->value.shape(), " but its gradient has shape ", p->grad.shape());
      check_dtype("CudaAdamW::step", p->name + ".grad", p->grad, DType::f32);
      check_device("CudaAdamW::step", p->name + ".grad", p->grad, Device::cuda);
      CUMO_CHECK(p->grad.is_contiguous(), "CudaAdamW::step: the gradient of '", p->name, "' is not contiguous");
    }
    std::vector<gpu::AdamWSlot> slots;
    for (const ParamGroup& g : groups_) {
      if (g.frozen) continue;
      const double wd = g.weight_decay ? *g.weight_decay : options_.weight_decay;
      for (Parameter* p : g.params) {
        if (!p->trainable) continue;
        State& s = state_[p];
        if (!s.exp_avg.defined()) {  // lazy, as PyTorch: state appears at a parameter's first step
          s.exp_avg = Tensor::zeros(p->value.shape(), DType::f32, Device::cuda);
          s.exp_avg_sq = Tensor::zeros(p->value.shape(), DType::f32, Device::cuda);
        }
        ++s.step;
        gpu::AdamWSlot sl;
        sl.param = p->value;
        sl.grad = p->grad;
        sl.exp_avg = s.exp_avg;
        sl.exp_avg_sq = s.exp_avg_sq;
        sl.step = s.step;
        sl.lr = lr * g.lr_scale;
        sl.weight_decay = wd;
        slots.push_back(sl);
      }
    }
    gpu::adamw_step(slots, {options_.beta1, options_.beta2, options_.eps});
    ++steps_;
  }
  void step() { step(options_.lr); }
};

// run_stage's clipping on the GPU: one host read of {norm, coefficient} per step (the logged norm). A non-finite
// norm leaves the gradients unscaled; training then stops naming the first parameter whose gradient is not finite,
// as train::clip_grad_norm does on the CPU.
inline float clip_gradients(CudaAdamW& opt, double max_norm, std::int64_t step) {
  const Tensor r = opt.clip_grad_norm(max_norm).to(Device::cpu);
  const float norm = r.data<float>()[0];
  if (!std::isfinite(norm)) {
    for (Parameter* p : opt.trainable_parameters())
      if (!gpu::all_finite(p->grad))
        fail("clip_grad_norm: the gradient of '", p->name, "' holds NaN or Inf at step ", step,
             " (training stopped)");
    fail("clip_grad_norm: the gradient norm is ", norm, " at step ", step, " (training stopped)");
  }
  return norm;
}

// The optimizer run_stage uses for a model on backend::Cuda.
template <>
struct OptimizerFor<backend::Cuda> {
  using type = CudaAdamW;
};

}  // namespace cumo::train
