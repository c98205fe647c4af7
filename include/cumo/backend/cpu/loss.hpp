#pragma once
// The CPU cross-entropy over logits with an ignore index — the one every loss of the project calls (the causal-LM
// loss of the decoders, train::causal_lm_loss, the distillation losses' CE term), and the reference of the GPU's
// (backend/cuda/layers.cuh). As PyTorch's F.cross_entropy(logits.float(), labels, ignore_index=-100) with
// reduction "mean" (or Σ / normalizer, HF's num_items_in_batch):
//   loss = Σ_{i: label_i ≠ ignore} (lse_i − x_i[label_i]) / (targets or normalizer)
//   dlogits_i = (softmax(x_i) − onehot(label_i)) · grad_scale / (targets or normalizer), 0 on ignored rows
// Each row is reduced in double: lse = max + log Σ exp(x − max) with the max subtracted first, so huge logits
// neither overflow nor lose the small terms. Rows are independent and their losses are added in row order, so the
// value and the gradient are bitwise the same for any thread count.
//
// One deliberate difference: a batch with no target at all gives loss 0 and a zero gradient here, where PyTorch's
// mean gives 0/0 = NaN (which would stop training; such batches happen when a long prompt truncates the answer).
#include <cmath>
#include <cstdint>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/backend/ops.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

using backend::CrossEntropyOptions;
using backend::CrossEntropyResult;

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

}  // namespace cumo::cpu
