#pragma once
// The causal-LM loss as Hugging Face's ForCausalLMLoss computes it (transformers/loss/loss_utils.py), on host
// tensors:
//
//   labels = pad(labels, (0, 1), value=-100)[..., 1:]          the target of position t is the token at t + 1
//   loss   = F.cross_entropy(logits.view(-1, V).float(), labels.view(-1), ignore_index=-100,
//                            reduction = "mean" | "sum" / num_items_in_batch)
//
// The cross-entropy itself is the project's one (backend/cpu/loss.hpp, re-exported here as train::cross_entropy);
// this header adds the label shift, the target count for gradient accumulation and the NaN stop.
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cumo/backend/cpu/loss.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::train {

using backend::kIgnoreIndex;
using backend::CrossEntropyOptions;
using backend::CrossEntropyResult;
using cpu::cross_entropy;  // logits (N, V) f32/f64 on the host, labels (N,) i64/i32: backend/cpu/loss.hpp

namespace detail {
using cpu::detail::check_labels;
using cpu::detail::label_at;
}  // namespace detail

// HF's causal shift: out[..., t] = labels[..., t + 1], out[..., T - 1] = ignore_index (pad then drop the first).
// labels (B, T) or (T,), i64 or i32; the result has the same shape and dtype.
inline Tensor shift_labels(const Tensor& labels, std::int64_t ignore_index = kIgnoreIndex) {
  detail::check_labels("shift_labels", labels);
  CUMO_CHECK(labels.dim() == 1 || labels.dim() == 2, "shift_labels: labels has shape ", labels.shape(),
             " but expected (batch, seq) or (seq,)");
  const Tensor y = labels.contiguous();
  const std::int64_t T = labels.size(-1), B = labels.numel() / (T ? T : 1);
  Tensor out = Tensor::empty(labels.shape(), labels.dtype());
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t v = t + 1 < T ? detail::label_at(y, b * T + t + 1) : ignore_index;
      if (out.dtype() == DType::i64)
        out.data<std::int64_t>()[b * T + t] = v;
      else
        out.data<std::int32_t>()[b * T + t] = std::int32_t(v);
    }
  return out;
}

// ForCausalLMLoss: logits (B, T, V) or (B·T, V) at every position, labels (B, T) unshifted (the input ids with
// prompt / padding positions set to -100). Shifts, flattens, and reduces as cross_entropy does; `dlogits` gets
// the logits' shape.
inline CrossEntropyResult causal_lm_loss(const Tensor& logits, const Tensor& labels, Tensor* dlogits = nullptr,
                                         const CrossEntropyOptions& options = {}) {
  constexpr const char* where = "causal_lm_loss";
  detail::check_labels(where, labels);
  CUMO_CHECK(labels.dim() == 2, where, ": labels has shape ", labels.shape(), " but expected (batch, seq)");
  const std::int64_t B = labels.size(0), T = labels.size(1);
  CUMO_CHECK((logits.dim() == 3 && logits.size(0) == B && logits.size(1) == T) ||
                 (logits.dim() == 2 && logits.size(0) == B * T),
             where, ": logits has shape ", logits.shape(), " but labels has shape ", labels.shape(),
             " (expected logits (", B, ", ", T, ", vocab) or (", B * T, ", vocab))");
  const std::int64_t V = logits.size(-1);
  const Tensor flat = logits.contiguous().view({B * T, V});
  const Tensor shifted = shift_labels(labels, options.ignore_index).view({B * T});
  if (!dlogits) return cross_entropy(flat, shifted, nullptr, options);
  if (!dlogits->defined()) *dlogits = Tensor::empty(logits.shape(), logits.dtype());
  check_same_shape(where, "dlogits", *dlogits, "logits", logits);
  CUMO_CHECK(dlogits->is_contiguous(), where, ": dlogits must be contiguous");
  Tensor dflat = dlogits->view({B * T, V});
  return cross_entropy(flat, shifted, &dflat, options);
}

// Valid targets in `labels` (after the causal shift when `causal`): HF's num_items_in_batch for one micro-batch.
inline std::int64_t count_targets(const Tensor& labels, bool causal = true, std::int64_t ignore_index = kIgnoreIndex) {
  detail::check_labels("count_targets", labels);
  const Tensor y = causal ? shift_labels(labels, ignore_index) : labels.contiguous();
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < y.numel(); ++i) n += detail::label_at(y, i) != ignore_index;
  return n;
}

// Stops training on a NaN/Inf loss with the step and the loss's name ("ce", "balance.vision.layer3", ...).
inline void check_finite_loss(double loss, std::int64_t step, std::string_view what = "loss") {
  CUMO_CHECK(std::isfinite(loss), "training stopped at step ", step, ": ", what, " is ", loss);
}

}  // namespace cumo::train
