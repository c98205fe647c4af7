#pragma once
// Gradient accumulation: one optimizer step from M micro-batches. Backward passes add into Parameter::grad, so
// accumulating is running forward/backward M times between zero_grad() and step(); what needs care is the
// scale each micro-batch's loss gets, and there are two conventions in the code CuMo descends from:
//
//  per_micro_batch  each micro-batch's CE is the mean over its own targets; the step's loss is the mean of those
//                   M means (the HF Trainer before transformers 4.46 divides every micro-batch loss by M; LLaVA
//                   and CuMo were trained this way). Micro-batches with few targets weigh as much as full ones.
//  per_token        the step's loss is Σ over every target of the step / their count (HF ≥ 4.46 passes
//                   num_items_in_batch to the loss), so M micro-batches give the same loss and gradient as one
//                   batch holding all of them (up to fp32 summation order).
//
// Auxiliary losses (router balance / z) are per-forward means in both conventions, so they get 1/M.
#include <cstdint>
#include <utility>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/train/loss.hpp"

namespace cumo::train {

enum class LossAveraging { per_micro_batch, per_token };

class Accumulation {
 public:
  // `targets[i]`: the valid (non-ignored, after the causal shift) targets of micro-batch i — count_targets().
  Accumulation(LossAveraging mode, std::vector<std::int64_t> targets) : mode_(mode), targets_(std::move(targets)) {
    CUMO_CHECK(!targets_.empty(), "Accumulation: need at least one micro-batch");
    for (std::size_t i = 0; i < targets_.size(); ++i) {
      CUMO_CHECK(targets_[i] >= 0, "Accumulation: micro-batch ", i, " has ", targets_[i], " targets");
      total_ += targets_[i];
    }
  }
  // Counts the targets of each micro-batch's labels (B, T) with the causal shift.
  static Accumulation from_labels(LossAveraging mode, const std::vector<Tensor>& labels,
                                  std::int64_t ignore_index = kIgnoreIndex) {
    std::vector<std::int64_t> t;
    for (const Tensor& l : labels) t.push_back(count_targets(l, true, ignore_index));
    return Accumulation(mode, std::move(t));
  }

  int micro_batches() const { return int(targets_.size()); }
  std::int64_t total_targets() const { return total_; }
  LossAveraging mode() const { return mode_; }

  // The options for micro-batch i's cross_entropy / causal_lm_loss, on top of `base` (its ignore_index and any
  // extra grad_scale are kept).
  CrossEntropyOptions ce_options(int i, CrossEntropyOptions base = {}) const {
    check_index(i);
    if (mode_ == LossAveraging::per_token) {
      // Σ_i sum_i / total: HF's num_items_in_batch. An all-ignored step keeps normalizer 0 → loss 0.
      base.normalizer = double(total_);
    } else {
      base.normalizer = 0;
      base.grad_scale /= double(micro_batches());
    }
    return base;
  }
  // Coefficient for a per-forward mean (aux losses) of one micro-batch.
  double aux_scale() const { return 1.0 / double(micro_batches()); }

  // The step's loss from the micro-batches' results, as the HF Trainer logs it.
  double step_loss(const std::vector<CrossEntropyResult>& results) const {
    CUMO_CHECK(int(results.size()) == micro_batches(), "Accumulation::step_loss: got ", results.size(),
               " results for ", micro_batches(), " micro-batches");
    double s = 0;
    for (const CrossEntropyResult& r : results)
      s += mode_ == LossAveraging::per_token ? r.loss : r.loss / double(micro_batches());
    return s;
  }

 private:
  void check_index(int i) const {
    CUMO_CHECK(i >= 0 && i < micro_batches(), "Accumulation: micro-batch ", i, " out of range [0, ",
               micro_batches(), ")");
  }
  LossAveraging mode_;
  std::vector<std::int64_t> targets_;
  std::int64_t total_ = 0;
};

// grad *= factor for every trainable parameter.
inline void scale_grads(const ParameterList& params, float factor) {
  for (Parameter* p : params) {
    if (!p->trainable || !p->grad.defined()) continue;
    check_dtype("scale_grads", p->name + ".grad", p->grad, DType::f32);
    float* g = p->grad.data<float>();
    cpu::parallel_for(p->grad.numel(), [&](std::int64_t i) { g[i] *= factor; });
  }
}

// dst.grad += scale · src.grad, parameter by parameter (the two lists describe the same model, e.g. a replica
// whose backward ran on another micro-batch).
inline void add_grads(const ParameterList& dst, const ParameterList& src, float scale = 1.f) {
  CUMO_CHECK(dst.size() == src.size(), "add_grads: ", dst.size(), " destination parameters but ", src.size(),
             " sources");
  for (std::size_t k = 0; k < dst.size(); ++k) {
    Parameter& d = *dst[k];
    const Parameter& s = *src[k];
    check_same_shape("add_grads", d.name + ".grad", d.grad, s.name + ".grad", s.grad);
    check_dtype("add_grads", d.name + ".grad", d.grad, DType::f32);
    check_dtype("add_grads", s.name + ".grad", s.grad, DType::f32);
    const Tensor sc = s.grad.contiguous();
    float* g = d.grad.data<float>();
    const float* h = sc.data<float>();
    cpu::parallel_for(d.grad.numel(), [&](std::int64_t i) { g[i] += scale * h[i]; });
  }
}

}  // namespace cumo::train
