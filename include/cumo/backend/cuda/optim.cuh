#pragma once
// The optimizer step and gradient clipping on the GPU, twins of backend/cpu/optim.hpp (the arithmetic
// train::AdamW<B> and train::clip_gradients run), which is their reference in tests/cuda/test_backend_ops.cu.
//
//   adamw_step        one fused launch per ≤ kMaxTensorsPerLaunch parameters: decoupled weight decay, lerp of the
//                     first moment, the second moment, bias corrections, p += (−step_size·m) / (√v / √bc2 + eps),
//                     optionally writing bf16(p) — fp32 master weights → bf16 compute weights — in the same pass.
//                     The per-parameter scalars are computed on the host exactly as AdamW::update computes them
//                     (double, rounded to float where they meet a tensor), and every fp32 operation is an explicit
//                     __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn in AdamW::update's order, so nvcc contracts
//                     nothing: the update is bitwise the CPU's (whose build has no -march, hence no FMA either).
//   grad_norm         ‖(g_1, …, g_n)‖₂ in two passes: one block per 65536-element chunk of each gradient (the CPU's
//                     kNormChunk) sums g² in double, then one block adds the chunk partials in order; fp32 result.
//   clip_grad_norm    grad_norm, PyTorch's coefficient min(max_norm / (total + 1e-6), 1) evaluated as
//                     reciprocal-then-multiply in fp32 (as train::clip_coefficient), and g *= coef — all on the
//                     device, no host sync. A non-finite norm leaves the gradients untouched (the CPU throws there;
//                     the caller reads the norm back and stops).
// Parameters, gradients and moments are f32, contiguous, on the GPU. The per-launch tensor tables go up through
// the context's pinned staging ring (no sync). Determinism: no atomics at all.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/backend/ops.hpp"

namespace cumo::gpu {

using backend::AdamWHyper;
using backend::AdamWSlot;

namespace kernels {

constexpr int kOptThreads = 256;
constexpr std::int64_t kOptChunk = 8192;          // elements per block of the AdamW and scale kernels
constexpr std::int64_t kNormChunk = 1 << 16;      // train::detail::kNormChunk
constexpr int kNormFinishThreads = 1024;

struct AdamWEntry {
  float* p;
  const float* g;
  float* m;
  float* v;
  __nv_bfloat16* pb;  // null: no bf16 copy
  std::int64_t n;
  std::int64_t chunk_begin;  // first block of this tensor in the launch
  float decay, w1, one_minus_w1, beta2, w2, bc2_sqrt, eps, neg_step;
  int decay_on, lerp_small;
};

struct ChunkEntry {  // a gradient in the norm / scale launches
  float* g;
  std::int64_t n;
  std::int64_t chunk_begin;
};

// The entry whose chunk range holds `block` (entries sorted by chunk_begin, the first one at 0).
template <class E>
__device__ __forceinline__ int find_entry(const E* __restrict__ table, int count, std::int64_t block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].chunk_begin <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <int = 0>
__global__ void __launch_bounds__(kOptThreads) adamw(const AdamWEntry* __restrict__ table, int count) {
  const AdamWEntry& e = table[find_entry(table, count, blockIdx.x)];
  const std::int64_t b = (std::int64_t(blockIdx.x) - e.chunk_begin) * kOptChunk;
  const std::int64_t end = b + kOptChunk < e.n ? b + kOptChunk : e.n;
  for (std::int64_t i = b + threadIdx.x; i < end; i += blockDim.x) {
    float pi = e.p[i];
    const float gi = e.g[i];
    if (e.decay_on) pi = __fmul_rn(pi, e.decay);
    float mi = e.m[i];
    // ATen's lerp picks the formula by |weight| so both ends are exact (AdamW::update does the same).
    mi = e.lerp_small ? __fadd_rn(mi, __fmul_rn(e.w1, __fsub_rn(gi, mi)))
                      : __fsub_rn(gi, __fmul_rn(__fsub_rn(gi, mi), e.one_minus_w1));
    float vi = __fmul_rn(e.v[i], e.beta2);
    vi = __fadd_rn(vi, __fmul_rn(__fmul_rn(e.w2, gi), gi));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), e.bc2_sqrt), e.eps);
    pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(e.neg_step, mi), denom));
    e.m[i] = mi;
    e.v[i] = vi;
    e.p[i] = pi;
    if (e.pb) e.pb[i] = __float2bfloat16_rn(pi);
  }
}

// partial[offset + block] = Σ g² (double) over one kNormChunk chunk of one gradient.
template <int = 0>
__global__ void __launch_bounds__(kOptThreads)
    norm_partials(const ChunkEntry* __restrict__ table, int count, std::int64_t offset, double* __restrict__ partial) {
  __shared__ double scratch[kWarp];
  const ChunkEntry& e = table[find_entry(table, count, blockIdx.x)];
  const std::int64_t b = (std::int64_t(blockIdx.x) - e.chunk_begin) * kNormChunk;
  const std::int64_t end = b + kNormChunk < e.n ? b + kNormChunk : e.n;
  double s = 0;
  for (std::int64_t i = b + threadIdx.x; i < end; i += blockDim.x) {
    const double g = e.g[i];
    s += g * g;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[offset + blockIdx.x] = s;
}

// One block: out[0] = float(√Σ partials), out[1] = min((1 / (out[0] + 1e-6f)) · max_norm, 1) (when max_norm > 0).
// Each thread adds a contiguous range in order, then the fixed block tree.
template <int = 0>
__global__ void norm_finish(const double* __restrict__ partial, std::int64_t n, float max_norm,
                            float* __restrict__ out) {
  __shared__ double scratch[kWarp];
  const std::int64_t per = (n + blockDim.x - 1) / blockDim.x;
  const std::int64_t b = threadIdx.x * per, e = b + per < n ? b + per : n;
  double s = 0;
  for (std::int64_t i = b; i < e; ++i) s += partial[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    const float total = float(sqrt(s));
    out[0] = total;
    if (max_norm > 0.f) {  // a non-finite norm applies no coefficient (1), as the CPU reports it
      const float coef = __fmul_rn(__fdiv_rn(1.f, __fadd_rn(total, float(1e-6))), max_norm);
      out[1] = isfinite(total) && coef < 1.f ? coef : 1.f;
    }
  }
}

// g *= coef, unless the norm is not finite or coef == 1 (a no-op, skipped as on the CPU).
template <int = 0>
__global__ void __launch_bounds__(kOptThreads)
    scale_grads(const ChunkEntry* __restrict__ table, int count, const float* __restrict__ norm_coef) {
  const float total = norm_coef[0], coef = norm_coef[1];
  if (!isfinite(total) || coef == 1.f) return;
  const ChunkEntry& e = table[find_entry(table, count, blockIdx.x)];
  const std::int64_t b = (std::int64_t(blockIdx.x) - e.chunk_begin) * kOptChunk;
  const std::int64_t end = b + kOptChunk < e.n ? b + kOptChunk : e.n;
  for (std::int64_t i = b + threadIdx.x; i < end; i += blockDim.x) e.g[i] = __fmul_rn(e.g[i], coef);
}

}  // namespace kernels

namespace detail {

// Tables must fit one staging slot.
constexpr std::size_t kMaxAdamWPerLaunch = Context::kStagingSlotBytes / sizeof(kernels::AdamWEntry);
constexpr std::size_t kMaxChunkEntriesPerLaunch = Context::kStagingSlotBytes / sizeof(kernels::ChunkEntry);

inline void expect_f32_like(const char* where, const std::string& name, const Tensor& t, const Tensor& ref) {
  CUMO_CHECK(t.defined(), where, ": ", name, " is undefined");
  check_device(where, name, t, Device::cuda);
  check_dtype(where, name, t, DType::f32);
  CUMO_CHECK(t.is_contiguous(), where, ": ", name, " (shape ", t.shape(), ") must be contiguous");
  CUMO_CHECK(t.numel() == ref.numel(), where, ": ", name, " has shape ", t.shape(), " but the parameter has shape ",
             ref.shape());
}

// Chunk tables over `grads` in launches of at most kMaxChunkEntriesPerLaunch tensors; f(table, count, blocks,
// global chunk offset) per launch. Empty tensors are left out.
template <class F>
void for_each_chunk_launch(const char* where, const std::vector<Tensor>& grads, std::int64_t chunk, F&& f) {
  std::vector<kernels::ChunkEntry> table;
  std::int64_t blocks = 0, offset = 0;
  auto flush = [&] {
    if (table.empty()) return;
    const auto* dev = static_cast<const kernels::ChunkEntry*>(
        context().stage_to_device(table.data(), table.size() * sizeof(kernels::ChunkEntry)));
    f(dev, int(table.size()), blocks, offset);
    offset += blocks;
    table.clear();
    blocks = 0;
  };
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    CUMO_CHECK(g.defined(), where, ": gradient ", i, " is undefined");
    check_device(where, "gradient", g, Device::cuda);
    check_dtype(where, "gradient", g, DType::f32);
    CUMO_CHECK(g.is_contiguous(), where, ": gradient ", i, " (shape ", g.shape(), ") must be contiguous");
    if (g.numel() == 0) continue;
    const std::int64_t c = (g.numel() + chunk - 1) / chunk;
    CUMO_CHECK(blocks + c <= INT_MAX, where, ": gradient ", i, " is too large for one launch");
    table.push_back({static_cast<float*>(g.raw()), g.numel(), blocks});
    blocks += c;
    if (table.size() == kMaxChunkEntriesPerLaunch) flush();
  }
  flush();
}

// Σ g² partials for every chunk, in tensor order then chunk order, as a device f64 tensor (≥ 1 element).
inline Tensor norm_partials(const char* where, const std::vector<Tensor>& grads, Workspace* ws) {
  std::int64_t total = 0;
  for (const Tensor& g : grads)
    if (g.defined()) total += (g.numel() + kernels::kNormChunk - 1) / kernels::kNormChunk;
  Tensor partial = device_zeros(ws, {total > 0 ? total : 1}, DType::f64);
  for_each_chunk_launch(where, grads, kernels::kNormChunk,
                        [&](const kernels::ChunkEntry* table, int count, std::int64_t blocks, std::int64_t offset) {
                          kernels::norm_partials<><<<unsigned(blocks), kernels::kOptThreads, 0, stream()>>>(
                              table, count, offset, ptr<double>(partial));
                          CUMO_CUDA_LAUNCH_CHECK("norm_partials");
                        });
  return partial;
}

}  // namespace detail

// One AdamW step over every slot (each with its own step count, lr and weight decay), as train::AdamW::step does
// for the trainable parameters of its non-frozen groups. The caller keeps the moments (zero-initialised at a
// parameter's first step) and increments each slot's step before the call.
inline void adamw_step(const std::vector<AdamWSlot>& slots, const AdamWHyper& hyper) {
  constexpr const char* where = "gpu::adamw_step";
  CUMO_CHECK(hyper.beta1 >= 0 && hyper.beta1 < 1 && hyper.beta2 >= 0 && hyper.beta2 < 1 && hyper.eps >= 0, where,
             ": beta1 = ", hyper.beta1, ", beta2 = ", hyper.beta2, " must be in [0, 1) and eps = ", hyper.eps,
             " >= 0");
  std::vector<kernels::AdamWEntry> table;
  std::int64_t blocks = 0;
  auto flush = [&] {
    if (table.empty()) return;
    const auto* dev = static_cast<const kernels::AdamWEntry*>(
        context().stage_to_device(table.data(), table.size() * sizeof(kernels::AdamWEntry)));
    kernels::adamw<><<<unsigned(blocks), kernels::kOptThreads, 0, stream()>>>(dev, int(table.size()));
    CUMO_CUDA_LAUNCH_CHECK("adamw");
    table.clear();
    blocks = 0;
  };
  for (std::size_t i = 0; i < slots.size(); ++i) {
    const AdamWSlot& s = slots[i];
    const std::string name = "slot " + std::to_string(i);
    CUMO_CHECK(s.param.defined(), where, ": ", name, " has no parameter");
    detail::expect_f32_like(where, name + ".param", s.param, s.param);
    detail::expect_f32_like(where, name + ".grad", s.grad, s.param);
    detail::expect_f32_like(where, name + ".exp_avg", s.exp_avg, s.param);
    detail::expect_f32_like(where, name + ".exp_avg_sq", s.exp_avg_sq, s.param);
    if (s.param_bf16.defined()) {
      check_device(where, name + ".param_bf16", s.param_bf16, Device::cuda);
      check_dtype(where, name + ".param_bf16", s.param_bf16, DType::bf16);
      CUMO_CHECK(s.param_bf16.is_contiguous() && s.param_bf16.numel() == s.param.numel(), where, ": ", name,
                 ".param_bf16 has shape ", s.param_bf16.shape(), " but the parameter has shape ", s.param.shape());
    }
    CUMO_CHECK(s.step >= 1, where, ": ", name, " has step ", s.step, " (the count including this update, >= 1)");
    CUMO_CHECK(std::isfinite(s.lr) && s.lr >= 0 && s.weight_decay >= 0, where, ": ", name, " has lr ", s.lr,
               " and weight_decay ", s.weight_decay, " (both must be >= 0)");
    const std::int64_t n = s.param.numel();
    if (n == 0) continue;
    const backend::AdamWScalars k = backend::adamw_scalars(s, hyper);  // the CPU update's scalars, bit for bit
    kernels::AdamWEntry e{};
    e.p = ptr<float>(s.param);
    e.g = ptr<float>(s.grad);
    e.m = ptr<float>(s.exp_avg);
    e.v = ptr<float>(s.exp_avg_sq);
    e.pb = s.param_bf16.defined() ? ptr<__nv_bfloat16>(s.param_bf16) : nullptr;
    e.n = n;
    e.chunk_begin = blocks;
    e.decay_on = k.decay;
    e.decay = k.decay_f;
    e.w1 = k.w1;
    e.beta2 = k.beta2_f;
    e.w2 = k.w2;
    e.bc2_sqrt = k.bc2_sqrt_f;
    e.eps = k.eps_f;
    e.neg_step = k.neg_step_f;
    e.lerp_small = k.lerp_small;
    e.one_minus_w1 = k.one_minus_w1;
    const std::int64_t c = (n + kernels::kOptChunk - 1) / kernels::kOptChunk;
    CUMO_CHECK(blocks + c <= INT_MAX, where, ": ", name, " is too large for one launch");
    table.push_back(e);
    blocks += c;
    if (table.size() == detail::kMaxAdamWPerLaunch) flush();
  }
  flush();
}

// The global 2-norm of `grads` (f32 on the GPU), as a device (1,) f32 tensor (no host sync).
inline Tensor grad_norm(const std::vector<Tensor>& grads, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::grad_norm";
  const Tensor partial = detail::norm_partials(where, grads, ws);
  Tensor out = device_zeros(ws, {2});
  kernels::norm_finish<><<<1, kernels::kNormFinishThreads, 0, stream()>>>(ptr<double>(partial), partial.numel(), 0.f,
                                                                          ptr<float>(out));
  CUMO_CUDA_LAUNCH_CHECK("norm_finish");
  return out.slice(0, 0, 1);
}

// Scales `grads` so that their global norm is at most max_norm. Returns a device (2,) f32 tensor {total norm
// before clipping, the coefficient applied}; nothing is scaled when the norm is NaN/Inf (read it back — the one
// host sync — and stop training, as train::clip_gradients does by throwing).
inline Tensor clip_grad_norm(const std::vector<Tensor>& grads, double max_norm, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::clip_grad_norm";
  CUMO_CHECK(max_norm > 0 && std::isfinite(max_norm), where, ": max_norm must be finite and > 0, got ", max_norm);
  const Tensor partial = detail::norm_partials(where, grads, ws);
  Tensor out = device_zeros(ws, {2});
  kernels::norm_finish<><<<1, kernels::kNormFinishThreads, 0, stream()>>>(ptr<double>(partial), partial.numel(),
                                                                          float(max_norm), ptr<float>(out));
  CUMO_CUDA_LAUNCH_CHECK("norm_finish");
  detail::for_each_chunk_launch(where, grads, kernels::kOptChunk,
                                [&](const kernels::ChunkEntry* table, int count, std::int64_t blocks, std::int64_t) {
                                  kernels::scale_grads<><<<unsigned(blocks), kernels::kOptThreads, 0, stream()>>>(
                                      table, count, ptr<float>(out));
                                  CUMO_CUDA_LAUNCH_CHECK("scale_grads");
                                });
  return out;
}

}  // namespace cumo::gpu
