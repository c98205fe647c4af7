#pragma once
// Cosine learning-rate schedule with linear warmup, as Hugging Face's get_cosine_schedule_with_warmup
// (transformers/optimization.py) drives torch.optim.lr_scheduler.LambdaLR — the schedule of LLaVA and CuMo
// (`--lr_scheduler_type cosine --warmup_ratio 0.03`).
//
//   factor(s) = s / max(1, W)                                          s < W
//             = max(0, 0.5 * (1 + cos(pi * cycles * 2 * progress)))   otherwise,
//   progress  = (s - W) / max(1, N - W),      lr(s) = base_lr * factor(s)
//
// where s is the number of optimizer steps already taken: LambdaLR sets lr = base * factor(0) at construction and
// the HF Trainer calls scheduler.step() after each optimizer.step(), so optimizer step k (0-based) runs at lr(k).
// In particular the very first update runs at lr = 0 whenever W > 0 (as in HF). With a warmup ratio, HF's
// TrainingArguments.get_warmup_steps gives W = ceil(N * ratio) (N = 1000, ratio 0.03 → W = 30).
// Like HF, nothing clamps s to N: past the end the cosine (cycles = 0.5) rises again; don't train past N.
#include <cmath>
#include <cstdint>

#include "cumo/core/error.hpp"

namespace cumo::train {

class CosineWithWarmup {
 public:
  CosineWithWarmup(double base_lr, std::int64_t total_steps, std::int64_t warmup_steps, double num_cycles = 0.5)
      : base_lr_(base_lr), total_(total_steps), warmup_(warmup_steps), cycles_(num_cycles) {
    CUMO_CHECK(base_lr >= 0 && std::isfinite(base_lr), "CosineWithWarmup: base_lr must be finite and >= 0, got ",
               base_lr);
    CUMO_CHECK(total_steps >= 1, "CosineWithWarmup: total_steps must be >= 1, got ", total_steps);
    CUMO_CHECK(warmup_steps >= 0 && warmup_steps <= total_steps, "CosineWithWarmup: warmup_steps = ", warmup_steps,
               " must be in [0, total_steps = ", total_steps, "]");
  }

  // W = ceil(N · ratio), HF TrainingArguments.get_warmup_steps when warmup_steps is not given.
  static CosineWithWarmup with_warmup_ratio(double base_lr, std::int64_t total_steps, double warmup_ratio,
                                            double num_cycles = 0.5) {
    CUMO_CHECK(warmup_ratio >= 0 && warmup_ratio <= 1, "CosineWithWarmup: warmup_ratio must be in [0, 1], got ",
               warmup_ratio);
    return CosineWithWarmup(base_lr, total_steps, warmup_steps_for(total_steps, warmup_ratio), num_cycles);
  }
  static std::int64_t warmup_steps_for(std::int64_t total_steps, double warmup_ratio) {
    return std::int64_t(std::ceil(double(total_steps) * warmup_ratio));
  }

  // HF's lr_lambda, term for term (same operation order, so the same doubles).
  double factor(std::int64_t step) const {
    CUMO_CHECK(step >= 0, "CosineWithWarmup::factor: step must be >= 0, got ", step);
    if (step < warmup_) return double(step) / double(warmup_ > 1 ? warmup_ : 1);
    const std::int64_t span = total_ - warmup_;
    const double progress = double(step - warmup_) / double(span > 1 ? span : 1);
    const double f = 0.5 * (1.0 + std::cos(kPi * cycles_ * 2.0 * progress));
    return f > 0.0 ? f : 0.0;
  }
  // The lr of the update that follows `step` updates already taken (LambdaLR: base_lr * lambda(last_epoch)).
  double lr(std::int64_t step) const { return base_lr_ * factor(step); }
  double operator()(std::int64_t step) const { return lr(step); }

  double base_lr() const { return base_lr_; }
  std::int64_t total_steps() const { return total_; }
  std::int64_t warmup_steps() const { return warmup_; }
  double num_cycles() const { return cycles_; }

 private:
  static constexpr double kPi = 3.141592653589793;  // Python's math.pi
  double base_lr_;
  std::int64_t total_, warmup_;
  double cycles_;
};

}  // namespace cumo::train
