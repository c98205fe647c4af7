#pragma once
// Cross-entropy over logits with an ignore index, as Hugging Face's ForCausalLMLoss computes it
// (transformers/loss/loss_utils.py):
//
//   labels = pad(labels, (0, 1), value=-100)[..., 1:]          the target of position t is the token at t + 1
//   loss   = F.cross_entropy(logits.view(-1, V).float(), labels.view(-1), ignore_index=-100,
//                            reduction = "mean" | "sum" / num_items_in_batch)
//
// so the loss is the mean of -log softmax(logits_i)[label_i] over the positions whose label is not -100 (or, when
// the trainer passes num_items_in_batch for gradient accumulation, their sum divided by that count).
// Each row is reduced in double: lse = max + log Σ exp(x - max) with the max subtracted first, so huge logits
// neither overflow nor lose the small terms. Rows are independent and their losses are added in row order, so
// the value and the gradient are bitwise the same for any thread count.
//
// One deliberate difference: a batch with no target at all gives loss 0 and a zero gradient here, where PyTorch's
// mean gives 0/0 = NaN (which would stop training; such batches happen when a long prompt truncates the answer).
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::train {

inline constexpr std::int64_t kIgnoreIndex = -100;  // PyTorch's and HF's default ignore_index

struct CrossEntropyOptions {
  std::int64_t ignore_index = kIgnoreIndex;
  // > 0: loss = Σ / normalizer (HF's num_items_in_batch: the step's target count across micro-batches);
  // 0: loss = Σ / (targets in this call), PyTorch's reduction="mean".
  double normalizer = 0;
  // d objective / d loss: the gradient written to dlogits is scaled by this (e.g. 1 / accumulation steps).
  double grad_scale = 1;
};

struct CrossEntropyResult {
  double loss = 0;          // the reduced loss (mean, or sum / normalizer)
  double sum = 0;           // Σ over targets of -log p(label)
  std::int64_t targets = 0; // positions whose label is not ignore_index
};

namespace detail {

inline std::int64_t label_at(const Tensor& labels, std::int64_t i) {
  return labels.dtype() == DType::i64 ? labels.data<std::int64_t>()[i] : std::int64_t(labels.data<std::int32_t>()[i]);
}

inline void check_labels(const char* where, const Tensor& labels) {
  CUMO_CHECK(labels.defined(), where, ": labels is undefined");
  CUMO_CHECK(labels.dtype() == DType::i64 || labels.dtype() == DType::i32, where, ": labels has dtype ",
             name_of(labels.dtype()), " but expected i64 or i32");
  check_device(where, "labels", labels, Device::cpu);
}

template <class T>
CrossEntropyResult cross_entropy_rows(const T* x, std::int64_t N, std::int64_t V, const Tensor& labels,
                                      T* dx, const CrossEntropyOptions& opt, const char* where) {
  // Validate every label before touching the output.
  std::int64_t count = 0;
  for (std::int64_t i = 0; i < N; ++i) {
    const std::int64_t y = label_at(labels, i);
    if (y == opt.ignore_index) continue;
    CUMO_CHECK(y >= 0 && y < V, where, ": label ", y, " at position ", i, " is outside the vocabulary [0, ", V,
               ") and is not the ignore index ", opt.ignore_index);
    ++count;
  }
  CrossEntropyResult r;
  r.targets = count;
  const double denom = opt.normalizer > 0 ? opt.normalizer : double(count);
  const double gscale = denom > 0 ? opt.grad_scale / denom : 0.0;
  std::vector<double> row_loss(std::size_t(N), 0.0);
  cpu::parallel_for(N, [&](std::int64_t i) {
    const T* xi = x + i * V;
    T* di = dx ? dx + i * V : nullptr;
    const std::int64_t y = label_at(labels, i);
    if (y == opt.ignore_index) {
      if (di)
        for (std::int64_t j = 0; j < V; ++j) di[j] = T(0);
      return;
    }
    double mx = -INFINITY;
    for (std::int64_t j = 0; j < V; ++j) mx = double(xi[j]) > mx ? double(xi[j]) : mx;
    double s = 0;
    for (std::int64_t j = 0; j < V; ++j) s += std::exp(double(xi[j]) - mx);
    const double log_s = std::log(s);
    row_loss[std::size_t(i)] = mx + log_s - double(xi[y]);
    if (di) {
      // d(-log p_y)/dx_j = p_j - [j == y]
      for (std::int64_t j = 0; j < V; ++j) di[j] = T((std::exp(double(xi[j]) - mx - log_s) - (j == y)) * gscale);
    }
  }, 8 * V);
  for (double l : row_loss) r.sum += l;
  r.loss = denom > 0 ? r.sum / denom : 0.0;
  return r;
}

}  // namespace detail

// logits (N, V) f32 or f64, labels (N,) i64 or i32 (ignore_index = skip). Returns the loss; when `dlogits` is
// non-null it receives d(grad_scale · loss)/d logits (N, V) in the logits' dtype (allocated when undefined).
inline CrossEntropyResult cross_entropy(const Tensor& logits, const Tensor& labels, Tensor* dlogits = nullptr,
                                        const CrossEntropyOptions& options = {}) {
  constexpr const char* where = "cross_entropy";
  CUMO_CHECK(logits.defined() && logits.dim() == 2, where, ": logits has shape ", logits.shape(),
             " but expected (tokens, vocab)");
  CUMO_CHECK(logits.dtype() == DType::f32 || logits.dtype() == DType::f64, where, ": logits has dtype ",
             name_of(logits.dtype()), " but expected f32 or f64");
  check_device(where, "logits", logits, Device::cpu);
  detail::check_labels(where, labels);
  const std::int64_t N = logits.size(0), V = logits.size(1);
  CUMO_CHECK(labels.dim() == 1 && labels.size(0) == N, where, ": labels has shape ", labels.shape(),
             " but logits has shape ", logits.shape(), " (expected labels (", N, ",))");
  CUMO_CHECK(V >= 1, where, ": logits has shape ", logits.shape(), " — an empty vocabulary");
  CUMO_CHECK(options.normalizer >= 0, where, ": normalizer must be >= 0, got ", options.normalizer);
  const Tensor x = logits.contiguous();
  const Tensor y = labels.contiguous();
  if (dlogits) {
    if (!dlogits->defined()) *dlogits = Tensor::empty(logits.shape(), logits.dtype());
    check_same_shape(where, "dlogits", *dlogits, "logits", logits);
    check_dtype(where, "dlogits", *dlogits, logits.dtype());
    check_device(where, "dlogits", *dlogits, Device::cpu);
    CUMO_CHECK(dlogits->is_contiguous(), where, ": dlogits must be contiguous");
  }
  if (logits.dtype() == DType::f32)
    return detail::cross_entropy_rows(x.data<float>(), N, V, y, dlogits ? dlogits->data<float>() : nullptr, options,
                                      where);
  return detail::cross_entropy_rows(x.data<double>(), N, V, y, dlogits ? dlogits->data<double>() : nullptr, options,
                                    where);
}

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
