#pragma once
// CUDA dispatch, the twin of backend/cpu/dispatch.hpp: the plan (which permuted row each (token, slot) gets), the
// gather into expert-contiguous order, the deterministic combine and the backward of both.
//
// The plan is two stable radix sorts on the low bits of the expert id (CUB DeviceRadixSort with end_bit =
// ⌈log2(E+1)⌉: one 8-bit digit pass for E < 256), no float atomics anywhere:
//   dropless:  sort (e, slot) by e in slot order         → permuted row j holds the j-th slot; offsets by scan
//   capacity:  sort (e, slot) by e in priority order     → rank of each slot inside its expert (all first choices
//              (k-major, tokens in order), as DeepSpeed    before any second choice); keep = rank < capacity;
//              and GShard drop                           then sort (keep ? e : E, slot) by key in slot order: kept
//                                                          rows land expert-contiguous, dropped slots sort last
// Both give exactly the CPU's plan (kept rows of an expert in (token, slot) order). The offsets stay on the
// device for the kernels; by default they are also copied to plan.host_offsets — the one host sync of a forward —
// because cuBLAS needs host-side sizes (host_offsets = false — Options::plan_host_offsets — skips it; see
// grouped_gemm.cuh).
#include <algorithm>
#include <cstdint>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/core/routing.hpp"

namespace cumo::gpu {

namespace kernels {

// keys[i] = expert of the slot at input position i (E for an invalid id), vals[i] = that slot. In priority order
// input position i = k·T + t (all first choices first); otherwise i = slot = t·K + k.
template <int = 0>
__global__ void plan_keys(const std::int32_t* __restrict__ idx, std::int64_t T, int K, int E, bool priority_order,
                          std::uint32_t* __restrict__ keys, std::int32_t* __restrict__ vals, int* __restrict__ bad) {
  const std::int64_t n = T * K;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t s = priority_order ? (i % T) * K + i / T : i;
    const int e = idx[s];
    const bool ok = e >= 0 && e < E;
    if (!ok) *bad = 1;
    keys[i] = ok ? std::uint32_t(e) : std::uint32_t(E);
    vals[i] = std::int32_t(s);
  }
}

// start[e], end[e] = the range of key e in sorted keys (both zero-initialised, so absent experts get 0, 0).
template <int = 0>
__global__ void plan_bounds(const std::uint32_t* __restrict__ sk, std::int64_t n, int E, int* __restrict__ start,
                            int* __restrict__ end) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::uint32_t e = sk[i];
    if (e >= std::uint32_t(E)) continue;
    if (i == 0 || sk[i - 1] != e) start[e] = int(i);
    if (i == n - 1 || sk[i + 1] != e) end[e] = int(i + 1);
  }
}

// demand[e] = slots that chose e; counts[e] = rows kept (≤ capacity); offsets[0] = 0.
template <int = 0>
__global__ void plan_counts(const int* __restrict__ start, const int* __restrict__ end, int E, std::int64_t capacity,
                            std::int32_t* __restrict__ demand, std::int32_t* __restrict__ counts,
                            std::int32_t* __restrict__ offsets) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
    const int d = end[e] - start[e];
    demand[e] = d;
    counts[e] = capacity < 0 || d <= capacity ? d : int(capacity);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) offsets[0] = 0;
}

// From the priority-ordered sort: keys2[slot] = e when the slot's rank inside its expert is below the capacity,
// else E (dropped); vals2[slot] = slot — the input of the second, slot-ordered sort.
template <int = 0>
__global__ void plan_keep(const std::uint32_t* __restrict__ sk, const std::int32_t* __restrict__ sv,
                          const int* __restrict__ start, std::int64_t n, int E, std::int64_t capacity,
                          std::uint32_t* __restrict__ keys2, std::int32_t* __restrict__ vals2) {
  for (std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += std::int64_t(gridDim.x) * blockDim.x) {
    const std::uint32_t e = sk[j];
    const std::int32_t s = sv[j];
    const bool keep = e < std::uint32_t(E) && j - start[e] < capacity;
    keys2[s] = keep ? e : std::uint32_t(E);
    vals2[s] = s;
  }
}

// Sorted position j of a kept slot is its permuted row; dropped slots (key E) sorted last get row −1.
template <int = 0>
__global__ void plan_place(const std::uint32_t* __restrict__ sk, const std::int32_t* __restrict__ sv, std::int64_t n,
                           int E, std::int32_t* __restrict__ row_of_slot, std::int32_t* __restrict__ slot_of_row) {
  for (std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int32_t s = sv[j];
    const bool kept = sk[j] < std::uint32_t(E);
    row_of_slot[s] = kept ? std::int32_t(j) : -1;
    slot_of_row[j] = kept ? s : -1;
  }
}

// xs[r] = x[token of slot_of_row[r]] for r < offsets[E]; rows are copied as words of type W.
template <class W>
__global__ void gather_rows(const W* __restrict__ x, std::int64_t row_words, const std::int32_t* __restrict__ slot,
                            const std::int32_t* __restrict__ offsets, int E, int K, W* __restrict__ xs) {
  const std::int64_t rows = offsets[E];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const W* src = x + std::int64_t(slot[r] / K) * row_words;
    W* dst = xs + r * row_words;
    for (std::int64_t i = threadIdx.x; i < row_words; i += blockDim.x) dst[i] = src[i];
  }
}

// y[t] = Σ_k w[t,k] · out[row_of_slot[t,k]] in slot order; dropped slots add nothing.
template <class T>
__global__ void combine(const T* __restrict__ out, const float* __restrict__ w, const std::int32_t* __restrict__ row,
                        std::int64_t tokens, int K, std::int64_t H, T* __restrict__ y) {
  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) {
        const std::int32_t r = row[t * K + k];
        if (r >= 0) acc += w[t * K + k] * to_f32(out[std::int64_t(r) * H + h]);
      }
      y[t * H + h] = from_f32<T>(acc);
    }
}

// combine for 16-bit storage, eight columns per thread through one 16-byte load per (slot, thread): the same
// per-element arithmetic in the same slot order as `combine` (so the same values), an eighth of the load and
// store instructions. Needs H % 8 == 0 and 16-byte aligned out / y.
template <class T>
__global__ void combine_vec8(const T* __restrict__ out, const float* __restrict__ w, const std::int32_t* __restrict__ row,
                             std::int64_t tokens, int K, std::int64_t H, T* __restrict__ y) {
  static_assert(sizeof(T) == 2, "combine_vec8 packs eight 16-bit values per 16-byte word");
  const std::int64_t H8 = H / 8;
  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (std::int64_t c = threadIdx.x; c < H8; c += blockDim.x) {
      float acc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = 0.f;
      for (int k = 0; k < K; ++k) {
        const std::int32_t r = row[t * K + k];
        if (r < 0) continue;
        const float wk = w[t * K + k];
        const uint4 v = reinterpret_cast<const uint4*>(out + std::int64_t(r) * H)[c];
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += wk * to_f32(e[j]);
      }
      uint4 o;
      T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int j = 0; j < 8; ++j) oe[j] = from_f32<T>(acc[j]);
      reinterpret_cast<uint4*>(y + t * H)[c] = o;
    }
}

// dout[r] = w[t,k] · dy[t];  dw[t,k] = <dy[t], out[r]> (0 for a dropped slot). One block per token; the dot
// product is a fixed-order block reduction.
template <class T>
__global__ void combine_backward(const T* __restrict__ dy, const T* __restrict__ out, const float* __restrict__ w,
                                 const std::int32_t* __restrict__ row, std::int64_t tokens, int K, std::int64_t H,
                                 T* __restrict__ dout, float* __restrict__ dw) {
  __shared__ float scratch[32];
  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (int k = 0; k < K; ++k) {
      const std::int32_t r = row[t * K + k];  // the same for the whole block
      if (r < 0) {
        if (threadIdx.x == 0) dw[t * K + k] = 0.f;
        continue;
      }
      const float wk = w[t * K + k];
      float dot = 0.f;
      for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        const float g = to_f32(dy[t * H + h]);
        dout[std::int64_t(r) * H + h] = from_f32<T>(wk * g);
        dot += g * to_f32(out[std::int64_t(r) * H + h]);
      }
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) dw[t * K + k] = dot;
    }
}

// dx[t] += Σ_k dxs[row_of_slot[t,k]], in slot order.
template <class T>
__global__ void scatter_add_rows(const T* __restrict__ dxs, const std::int32_t* __restrict__ row,
                                 std::int64_t tokens, int K, std::int64_t H, T* __restrict__ dx) {
  for (std::int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = to_f32(dx[t * H + h]);
      for (int k = 0; k < K; ++k) {
        const std::int32_t r = row[t * K + k];
        if (r >= 0) acc += to_f32(dxs[std::int64_t(r) * H + h]);
      }
      dx[t * H + h] = from_f32<T>(acc);
    }
}

}  // namespace kernels

namespace detail {
// Smallest b ≥ 1 with 2^b ≥ n: the radix sort looks at bits [0, b) only.
inline int bits_for(std::int64_t n) {
  int b = 1;
  while ((std::int64_t(1) << b) < n) ++b;
  return b;
}
inline unsigned rows_grid(std::int64_t rows) {
  return unsigned(rows < 1 ? 1 : (rows > (std::int64_t(1) << 20) ? (std::int64_t(1) << 20) : rows));
}
inline void check_plan(const char* where, const DispatchPlan& plan) {
  expect_contiguous(where, "plan.offsets", plan.offsets);
  expect_contiguous(where, "plan.row_of_slot", plan.row_of_slot);
  expect_contiguous(where, "plan.slot_of_row", plan.slot_of_row);
}
}  // namespace detail

// Fills plan.{demand, counts, offsets, row_of_slot, slot_of_row} from idx (T, K) and, with host_offsets,
// plan.host_offsets (one host sync, which also checks the expert ids). Temporaries come from `ws` (or the pool).
inline void make_plan(const Tensor& idx, DispatchPlan& plan, bool host_offsets = true, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::make_plan";
  expect_contiguous(where, "idx", idx);
  check_dtype(where, "idx", idx, DType::i32);
  detail::check_plan(where, plan);
  const std::int64_t T = plan.tokens;
  const int K = plan.top_k, E = plan.experts;
  check_shape(where, "idx", idx, {T, K});
  const std::int64_t n = T * K;
  CUMO_CHECK(n < INT_MAX, where, ": ", T, " tokens x ", K, " slots exceed the int32 row indices");
  const cudaStream_t st = stream();
  const int end_bit = detail::bits_for(std::int64_t(E) + 1);  // keys are 0 … E (E = dropped or invalid)
  const bool capped = plan.capacity >= 0;

  Tensor keys = device_empty(ws, {2, n}, DType::i32);    // in, out
  Tensor vals = device_empty(ws, {2, n}, DType::i32);    // in, out
  Tensor bounds = device_zeros(ws, {2, E}, DType::i32);  // start, end
  Tensor bad = device_zeros(ws, {1}, DType::i32);
  auto* k_in = reinterpret_cast<std::uint32_t*>(ptr<std::int32_t>(keys));
  auto* k_out = k_in + n;
  std::int32_t* v_in = ptr<std::int32_t>(vals);
  std::int32_t* v_out = v_in + n;
  int* start = ptr<std::int32_t>(bounds);
  int* end = start + E;

  std::size_t sort_bytes = 0, scan_bytes = 0;
  CUMO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, k_in, k_out, v_in, v_out, int(n), 0, end_bit,
                                                  st));
  CUMO_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, ptr<std::int32_t>(plan.counts),
                                                ptr<std::int32_t>(plan.offsets) + 1, E, st));
  const std::size_t temp_bytes = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
  Tensor temp = device_empty(ws, {std::int64_t(temp_bytes / 4 + 1)}, DType::i32);

  const unsigned grid = grid_for(n, 256);
  kernels::plan_keys<><<<grid, 256, 0, st>>>(ptr<std::int32_t>(idx), T, K, E, capped, k_in, v_in,
                                             ptr<std::int32_t>(bad));
  CUMO_CUDA_LAUNCH_CHECK("plan_keys");
  CUMO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw(), sort_bytes, k_in, k_out, v_in, v_out, int(n), 0, end_bit,
                                                  st));
  kernels::plan_bounds<><<<grid, 256, 0, st>>>(k_out, n, E, start, end);
  CUMO_CUDA_LAUNCH_CHECK("plan_bounds");
  kernels::plan_counts<><<<grid_for(E, 256), 256, 0, st>>>(start, end, E, plan.capacity, ptr<std::int32_t>(plan.demand),
                                                           ptr<std::int32_t>(plan.counts), ptr<std::int32_t>(plan.offsets));
  CUMO_CUDA_LAUNCH_CHECK("plan_counts");
  CUMO_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp.raw(), scan_bytes, ptr<std::int32_t>(plan.counts),
                                                ptr<std::int32_t>(plan.offsets) + 1, E, st));
  if (capped) {
    // Second sort: kept slots by expert in slot order, dropped ones (key E) last. Reuses the "in" buffers.
    kernels::plan_keep<><<<grid, 256, 0, st>>>(k_out, v_out, start, n, E, plan.capacity, k_in, v_in);
    CUMO_CUDA_LAUNCH_CHECK("plan_keep");
    CUMO_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw(), sort_bytes, k_in, k_out, v_in, v_out, int(n), 0,
                                                    end_bit, st));
  }
  kernels::plan_place<><<<grid, 256, 0, st>>>(k_out, v_out, n, E, ptr<std::int32_t>(plan.row_of_slot),
                                              ptr<std::int32_t>(plan.slot_of_row));
  CUMO_CUDA_LAUNCH_CHECK("plan_place");

  plan.host_offsets.clear();
  if (host_offsets) {
    std::vector<std::int32_t> off(std::size_t(E) + 1);
    int bad_ids = 0;
    context().read_back(off.data(), plan.offsets.raw(), off.size() * sizeof(std::int32_t));
    context().read_back(&bad_ids, bad.raw(), sizeof(int));
    CUMO_CHECK(!bad_ids, where, ": idx holds expert ids outside [0, ", E, ")");
    plan.host_offsets.assign(off.begin(), off.end());
  }
}

// xs (rows, H) = x[token of slot_of_row[r]]; rows past offsets[E] are left alone.
inline void gather_rows(const Tensor& x, const DispatchPlan& plan, Tensor& xs) {
  constexpr const char* where = "gpu::gather_rows";
  expect_contiguous(where, "x", x);
  expect_contiguous(where, "xs", xs);
  detail::check_plan(where, plan);
  CUMO_CHECK(x.dtype() == xs.dtype(), where, ": x has dtype ", name_of(x.dtype()), " but xs has ", name_of(xs.dtype()));
  CUMO_CHECK(x.size(1) == xs.size(1), where, ": x has shape ", x.shape(), " but xs has shape ", xs.shape());
  const std::int64_t row_bytes = x.size(1) * std::int64_t(size_of(x.dtype()));
  const auto addr = reinterpret_cast<std::uintptr_t>(x.raw()) | reinterpret_cast<std::uintptr_t>(xs.raw());
  const unsigned grid = detail::rows_grid(xs.size(0));
  const int threads = 128;
  const std::int32_t* slot = ptr<std::int32_t>(plan.slot_of_row);
  const std::int32_t* off = ptr<std::int32_t>(plan.offsets);
  // The widest word that divides the row and both base addresses.
  if (row_bytes % 16 == 0 && addr % 16 == 0)
    kernels::gather_rows<uint4><<<grid, threads, 0, stream()>>>(static_cast<const uint4*>(x.raw()), row_bytes / 16,
                                                                 slot, off, plan.experts, plan.top_k,
                                                                 static_cast<uint4*>(xs.raw()));
  else if (row_bytes % 4 == 0 && addr % 4 == 0)
    kernels::gather_rows<std::uint32_t><<<grid, threads, 0, stream()>>>(
        static_cast<const std::uint32_t*>(x.raw()), row_bytes / 4, slot, off, plan.experts, plan.top_k,
        static_cast<std::uint32_t*>(xs.raw()));
  else
    kernels::gather_rows<std::uint16_t><<<grid, threads, 0, stream()>>>(
        static_cast<const std::uint16_t*>(x.raw()), row_bytes / 2, slot, off, plan.experts, plan.top_k,
        static_cast<std::uint16_t*>(xs.raw()));
  CUMO_CUDA_LAUNCH_CHECK("gather_rows");
}

// y (T, H) = Σ_k w[t,k] · out[row_of_slot[t,k]]. out and y share a dtype (f32, bf16, f16); w is f32.
inline void combine(const Tensor& out, const Tensor& w, const DispatchPlan& plan, Tensor& y) {
  constexpr const char* where = "gpu::combine";
  expect_contiguous(where, "out", out);
  expect_contiguous(where, "w", w);
  expect_contiguous(where, "y", y);
  detail::check_plan(where, plan);
  CUMO_CHECK(out.dtype() == y.dtype(), where, ": out has dtype ", name_of(out.dtype()), " but y has ",
             name_of(y.dtype()));
  const std::int64_t T = plan.tokens, H = y.size(1);
  const auto addr = reinterpret_cast<std::uintptr_t>(out.raw()) | reinterpret_cast<std::uintptr_t>(y.raw());
  const bool vec8 = size_of(y.dtype()) == 2 && H % 8 == 0 && addr % 16 == 0;
  dispatch_float(y.dtype(), where, [&](auto tag) {
    using T_ = decltype(tag);
    if constexpr (sizeof(T_) == 2) {
      if (vec8) {
        const int threads = int(std::min<std::int64_t>(256, std::max<std::int64_t>(32, (H / 8 + 31) / 32 * 32)));
        kernels::combine_vec8<T_><<<detail::rows_grid(T), threads, 0, stream()>>>(
            ptr<T_>(out), ptr<float>(w), ptr<std::int32_t>(plan.row_of_slot), T, plan.top_k, H, ptr<T_>(y));
        return;
      }
    }
    kernels::combine<T_><<<detail::rows_grid(T), 256, 0, stream()>>>(
        ptr<T_>(out), ptr<float>(w), ptr<std::int32_t>(plan.row_of_slot), T, plan.top_k, H, ptr<T_>(y));
  });
  CUMO_CUDA_LAUNCH_CHECK("combine");
}

inline void combine_backward(const Tensor& dy, const Tensor& out, const Tensor& w, const DispatchPlan& plan,
                             Tensor& dout, Tensor& dw) {
  constexpr const char* where = "gpu::combine_backward";
  expect_contiguous(where, "dy", dy);
  expect_contiguous(where, "out", out);
  expect_contiguous(where, "w", w);
  expect_contiguous(where, "dout", dout);
  expect_contiguous(where, "dw", dw);
  detail::check_plan(where, plan);
  CUMO_CHECK(dy.dtype() == out.dtype() && dy.dtype() == dout.dtype(), where, ": dy, out and dout must share a dtype (",
             name_of(dy.dtype()), ", ", name_of(out.dtype()), ", ", name_of(dout.dtype()), ")");
  const std::int64_t T = plan.tokens, H = dy.size(1);
  dispatch_float(dy.dtype(), where, [&](auto tag) {
    using T_ = decltype(tag);
    kernels::combine_backward<T_><<<detail::rows_grid(T), 256, 0, stream()>>>(
        ptr<T_>(dy), ptr<T_>(out), ptr<float>(w), ptr<std::int32_t>(plan.row_of_slot), T, plan.top_k, H,
        ptr<T_>(dout), ptr<float>(dw));
  });
  CUMO_CUDA_LAUNCH_CHECK("combine_backward");
}

inline void scatter_add_rows(const Tensor& dxs, const DispatchPlan& plan, Tensor& dx) {
  constexpr const char* where = "gpu::scatter_add_rows";
  expect_contiguous(where, "dxs", dxs);
  expect_contiguous(where, "dx", dx);
  detail::check_plan(where, plan);
  CUMO_CHECK(dxs.dtype() == dx.dtype(), where, ": dxs has dtype ", name_of(dxs.dtype()), " but dx has ",
             name_of(dx.dtype()));
  const std::int64_t T = plan.tokens, H = dx.size(1);
  dispatch_float(dx.dtype(), where, [&](auto tag) {
    using T_ = decltype(tag);
    kernels::scatter_add_rows<T_><<<detail::rows_grid(T), 256, 0, stream()>>>(
        ptr<T_>(dxs), ptr<std::int32_t>(plan.row_of_slot), T, plan.top_k, H, ptr<T_>(dx));
  });
  CUMO_CUDA_LAUNCH_CHECK("scatter_add_rows");
}

}  // namespace cumo::gpu
