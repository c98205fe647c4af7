#pragma once
// The argument types of the backend operations that are more than tensors: attention's shape, the cross-entropy's
// options and result, one AdamW update, and what a backend can and cannot do. Every backend (backend::Cpu,
// backend::Cuda) takes exactly these, so the layers hand the same values to either; backend/contract.hpp lists
// the operations themselves.
#include <cmath>
#include <cstdint>
#include <string_view>

#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::backend {

// ---- attention -----------------------------------------------------------------------------------------------
// Queries of B sequences against their keys and values, token-major with the head inside the row:
//   q, out (B·q_len, heads·head_dim);  k, v: sequence b's kv_len keys start at row b·kv_stride.
// Query i sits at absolute position past + i, past = kv_len − q_len (training: kv_len = q_len, past = 0; a KV-cache
// decode step: q_len new tokens after past cached ones). causal masks key j > past + i; a padding key (key_valid 0)
// is masked for every query; a query with no key left gets probability 0 everywhere and output 0.
struct AttentionShape {
  std::int64_t batch = 0;      // B
  std::int64_t q_len = 0;      // Tq
  std::int64_t kv_len = 0;     // S (0 = q_len)
  std::int64_t kv_stride = 0;  // rows between two sequences' first keys (0 = kv_len: packed)
  std::int64_t heads = 0;
  std::int64_t kv_heads = 0;   // 0 = heads; head h reads kv head h / (heads / kv_heads)
  std::int64_t head_dim = 0;
  bool causal = false;

  std::int64_t S() const { return kv_len > 0 ? kv_len : q_len; }
  std::int64_t stride() const { return kv_stride > 0 ? kv_stride : S(); }
  std::int64_t G() const { return kv_heads > 0 ? kv_heads : heads; }
  std::int64_t past() const { return S() - q_len; }
};

// ---- cross-entropy -------------------------------------------------------------------------------------------
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
  double loss = 0;           // the reduced loss (mean, or sum / normalizer)
  double sum = 0;            // Σ over targets of -log p(label)
  std::int64_t targets = 0;  // positions whose label is not ignore_index
};

// ---- AdamW ---------------------------------------------------------------------------------------------------
// One parameter's update. `step` is the parameter's step count including this update (PyTorch's state['step']
// after its increment); lr and weight_decay are its group's (lr already × the group's lr_scale).
struct AdamWSlot {
  Tensor param, grad, exp_avg, exp_avg_sq;  // f32, same numel, on the backend's device
  Tensor param_bf16;                        // optional: receives bf16(param) after the update
  std::int64_t step = 1;
  double lr = 1e-3;
  double weight_decay = 0;
};

struct AdamWHyper {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

// One update's scalars, as PyTorch computes them: Python-float arithmetic (double), then one rounding to float
// where a scalar meets an fp32 tensor (train/optimizer.hpp gives the formula). Every backend's adamw_step uses
// these, so the updates agree bit for bit.
struct AdamWScalars {
  bool decay = false;       // weight decay != 0
  float decay_f = 1.f;      // 1 − lr·wd
  float w1 = 0.f;           // 1 − β1 (the lerp weight)
  float beta2_f = 0.f;      // β2
  float w2 = 0.f;           // 1 − β2
  float bc2_sqrt_f = 1.f;   // √(1 − β2^step)
  float eps_f = 0.f;
  float neg_step_f = 0.f;   // −lr / (1 − β1^step)
  bool lerp_small = true;   // |w1| < 0.5: ATen's lerp formula choice
  float one_minus_w1 = 1.f;
};
inline AdamWScalars adamw_scalars(const AdamWSlot& s, const AdamWHyper& h) {
  const double step = double(s.step);
  const double bias_correction1 = 1.0 - std::pow(h.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(h.beta2, step);
  const double step_size = s.lr / bias_correction1;
  const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);  // Python's `** 0.5` is C pow()
  AdamWScalars k;
  k.decay = s.weight_decay != 0.0;
  k.decay_f = float(1.0 - s.lr * s.weight_decay);
  k.w1 = float(1.0 - h.beta1);
  k.beta2_f = float(h.beta2);
  k.w2 = float(1.0 - h.beta2);
  k.bc2_sqrt_f = float(bias_correction2_sqrt);
  k.eps_f = float(h.eps);
  k.neg_step_f = float(-step_size);
  k.lerp_small = std::abs(k.w1) < 0.5f;
  k.one_minus_w1 = 1.f - k.w1;
  return k;
}

// ---- row blocks ----------------------------------------------------------------------------------------------
// copy_blocks / add_blocks move `height` blocks of `width` f32 elements: block r starts at src0 + r·spitch in src and
// dst0 + r·dpitch in dst (elements; the pitches are ignored when height is 1). Every backend checks the same.
inline void check_blocks(std::string_view where, const Tensor& src, std::int64_t src0, std::int64_t spitch,
                         const Tensor& dst, std::int64_t dst0, std::int64_t dpitch, std::int64_t width,
                         std::int64_t height) {
  CUMO_CHECK(src.is_contiguous() && dst.is_contiguous(), where, ": src (shape ", src.shape(), ") and dst (shape ",
             dst.shape(), ") must be contiguous");
  check_dtype(where, "src", src, DType::f32);
  check_dtype(where, "dst", dst, DType::f32);
  CUMO_CHECK(width >= 0 && height >= 0 && src0 >= 0 && dst0 >= 0, where, ": negative extent or offset");
  if (width == 0 || height == 0) return;
  CUMO_CHECK(height == 1 || (spitch >= width && dpitch >= width), where, ": pitches ", spitch, " / ", dpitch,
             " are narrower than the block width ", width);
  CUMO_CHECK(src0 + (height - 1) * spitch + width <= src.numel(), where, ": the blocks run past src (shape ",
             src.shape(), ")");
  CUMO_CHECK(dst0 + (height - 1) * dpitch + width <= dst.numel(), where, ": the blocks run past dst (shape ",
             dst.shape(), ")");
}

// ---- capabilities --------------------------------------------------------------------------------------------
// What a backend cannot do (yet) is declared here, once, as data of the backend (`B::capabilities`), and refused
// with one message that names the operation and the backend — never by a scattered static_assert in a layer.
struct Capabilities {
  std::int64_t max_head_dim = 0;  // attention head_dim limit of the fused kernels; 0 = none
  bool bf16_weights = false;      // parameters stored in bf16 (inference)
  bool f16_weights = false;       // parameters stored in f16 (inference)
};

// Throws "<where>: <what> is not supported by backend '<name>' (<detail>)" unless `ok`.
template <class B>
void require(bool ok, std::string_view where, std::string_view what, std::string_view detail = {}) {
  if (ok) return;
  if (detail.empty()) fail(where, ": ", what, " is not supported by backend '", B::name, "'");
  fail(where, ": ", what, " is not supported by backend '", B::name, "' (", detail, ")");
}

// Attention with this head dimension runs on backend B.
template <class B>
void require_head_dim(std::int64_t head_dim, std::string_view where) {
  constexpr std::int64_t limit = B::capabilities.max_head_dim;
  if (limit == 0 || head_dim <= limit) return;
  fail(where, ": attention with head_dim ", head_dim, " is not supported by backend '", B::name,
       "' (its fused kernels take head_dim <= ", limit, ")");
}

}  // namespace cumo::backend
