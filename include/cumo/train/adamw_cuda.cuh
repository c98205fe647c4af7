#pragma once
// train::CudaAdamW — train::AdamW for parameters on the GPU: the same groups, options and per-parameter state
// ({step, exp_avg, exp_avg_sq}, fp32, on the device), one fused gpu::adamw_step launch per step (optim.cuh: bitwise
// AdamW::update's arithmetic), and global-norm clipping on the device. Nothing is read back to the host except by
// clip_grad_norm(), which returns the norm as a device tensor: read it when you log.
//
//   train::CudaAdamW opt(groups, options);        // parameters already on the GPU (models::CuMo<backend::Cuda>)
//   model.forward(...); model.backward();
//   const Tensor norm = opt.clip_grad_norm(1.0);  // (2,) f32 on the device: {norm, coefficient}
//   opt.step(schedule(step));  opt.zero_grad();
#include <string_view>
#include <unordered_map>
#include <vector>

#include "cumo/backend/cuda/optim.cuh"
#include "cumo/train/optimizer.hpp"

namespace cumo::train {

class CudaAdamW {
 public:
  using State = AdamW::State;

  CudaAdamW(std::vector<ParamGroup> groups, AdamWOptions options = {})
      : groups_(std::move(groups)), options_(options) {
    constexpr const char* where = "CudaAdamW";
    for (const ParamGroup& g : groups_)
      for (const Parameter* p : g.params) {
        CUMO_CHECK(p, where, ": group '", g.name, "' holds a null parameter");
        check_dtype(where, p->name, p->value, DType::f32);
        check_device(where, p->name, p->value, Device::cuda);
        CUMO_CHECK(p->value.is_contiguous(), where, ": parameter '", p->name, "' is not contiguous");
      }
  }
  explicit CudaAdamW(ParameterList params, AdamWOptions options = {})
      : CudaAdamW(std::vector<ParamGroup>{ParamGroup{"all", std::move(params)}}, options) {}

  const AdamWOptions& options() const { return options_; }
  std::vector<ParamGroup>& groups() { return groups_; }
  void set_frozen(std::string_view group_name, bool frozen) {
    for (ParamGroup& g : groups_)
      if (g.name == group_name) {
        g.frozen = frozen;
        return;
      }
    fail("CudaAdamW::set_frozen: no group named '", group_name, "'");
  }

  // As AdamW::trainable_parameters(): in a non-frozen group and trainable.
  ParameterList trainable_parameters() const {
    ParameterList out;
    for (const ParamGroup& g : groups_)
      if (!g.frozen)
        for (Parameter* p : g.params)
          if (p->trainable) out.push_back(p);
    return out;
  }
  void zero_grad() {
    for (const ParamGroup& g : groups_)
      for (Parameter* p : g.params) p->grad.zero_();
  }

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
    std::vector<gpu::AdamWSlot> slots;
    for (const ParamGroup& g : groups_) {
      if (g.frozen) continue;
      const double wd = g.weight_decay ? *g.weight_decay : options_.weight_decay;
      for (Parameter* p : g.params) {
        if (!p->trainable) continue;
        State& s = state_[p];
        if (!s.exp_avg.defined()) {
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
  std::int64_t steps() const { return steps_; }

  // The state of `p` (moments on the device), or nullptr when it has none.
  const State* state(const Parameter& p) const {
    auto it = state_.find(&p);
    return it == state_.end() ? nullptr : &it->second;
  }

 private:
  std::vector<ParamGroup> groups_;
  AdamWOptions options_;
  std::unordered_map<const Parameter*, State> state_;
  std::int64_t steps_ = 0;
};

}  // namespace cumo::train
