#pragma once
// nn::Embedding on the device, the twin of backend/cpu/embedding.hpp, its reference in tests/cuda/test_backend_ops.cu:
//   embedding_forward    y[r] = table[ids[r]]                     a row copy in the widest word that fits
//   embedding_backward   dtable[v] += Σ_{r: ids[r] = v, not skipped} dy[r], rows in increasing r
// The ids live on the host (the data loader's batch), as nn::Embedding takes them: they are checked there, naming
// the position of a bad one, and the backward's per-id row lists are built there (a stable sort by id); the tables
// reach the device through the context's pinned staging ring, without a host sync up to 16 Ki entries. Each
// distinct id is then one block that adds its rows in order into the fp32 gradient: no atomics, and bitwise the
// CPU's sums (the same fp32 additions in the same order).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"

namespace cumo::gpu {

namespace kernels {

// y[r] = table[ids[r]], rows copied as words of type W.
template <class W>
__global__ void embedding_gather(const W* __restrict__ table, std::int64_t row_words,
                                 const std::int32_t* __restrict__ ids, std::int64_t n, W* __restrict__ y) {
  for (std::int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const W* src = table + std::int64_t(ids[r]) * row_words;
    W* dst = y + r * row_words;
    for (std::int64_t i = threadIdx.x; i < row_words; i += blockDim.x) dst[i] = src[i];
  }
}

// y[r] = float(table[ids[r]]): a bf16 / f16 table (weights held for inference) read into f32 rows.
template <class S>
__global__ void embedding_gather_widen(const S* __restrict__ table, std::int64_t H, const std::int32_t* __restrict__ ids,
                                       std::int64_t n, float* __restrict__ y) {
  for (std::int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const S* src = table + std::int64_t(ids[r]) * H;
    float* dst = y + r * H;
    for (std::int64_t i = threadIdx.x; i < H; i += blockDim.x) dst[i] = to_f32(src[i]);
  }
}

// One block per distinct id u: dtable[uid[u]] += dy[rows[start[u]]] + … + dy[rows[start[u+1] − 1]], in that order.
template <class T>
__global__ void embedding_scatter(const T* __restrict__ dy, std::int64_t H, const std::int32_t* __restrict__ uid,
                                  const std::int32_t* __restrict__ start, const std::int32_t* __restrict__ rows,
                                  std::int64_t distinct, float* __restrict__ dtable) {
  for (std::int64_t u = blockIdx.x; u < distinct; u += gridDim.x) {
    float* out = dtable + std::int64_t(uid[u]) * H;
    const std::int32_t b = start[u], e = start[u + 1];
    for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = out[h];
      for (std::int32_t i = b; i < e; ++i) acc = __fadd_rn(acc, to_f32(dy[std::int64_t(rows[i]) * H + h]));
      out[h] = acc;
    }
  }
}

}  // namespace kernels

namespace detail {
// A host int32 table on the device for the next launch on this stream. Up to a staging slot (16 Ki entries) it
// goes through the context's pinned ring without a host sync; a larger one is copied into `owner` (synchronously).
inline const std::int32_t* int32_on_device(const std::vector<std::int32_t>& v, Tensor& owner, Workspace* ws) {
  const std::size_t bytes = v.size() * sizeof(std::int32_t);
  if (bytes <= Context::kStagingSlotBytes)
    return static_cast<const std::int32_t*>(context().stage_to_device(v.data(), bytes));
  owner = device_empty(ws, {std::int64_t(v.size())}, DType::i32);
  device_copy(owner.raw(), Device::cuda, v.data(), Device::cpu, bytes);
  return ptr<std::int32_t>(owner);
}
inline void check_ids(const char* where, const std::vector<std::int64_t>& ids, std::int64_t vocab) {
  CUMO_CHECK(std::int64_t(ids.size()) <= INT_MAX, where, ": ", ids.size(), " ids exceed one launch");
  for (std::size_t r = 0; r < ids.size(); ++r)
    CUMO_CHECK(ids[r] >= 0 && ids[r] < vocab, where, ": token id ", ids[r], " at position ", r,
               " is outside the vocabulary [0, ", vocab, ")");
}
}  // namespace detail

// table (V, H) f32 / bf16 / f16 on the GPU; ids (N) on the host; y (N, H) overwritten, the table's dtype, or f32
// for a bf16 / f16 table (weights held for inference: each element widened exactly, as the CPU's).
inline void embedding_forward(const Tensor& table, const std::vector<std::int64_t>& ids, Tensor& y,
                              Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::embedding_forward";
  const std::int64_t V = expect_matrix(where, "table", table), H = table.size(1), N = std::int64_t(ids.size());
  expect_matrix(where, "y", y);
  check_shape(where, "y", y, {N, H});
  const bool widen = y.dtype() == DType::f32 && (table.dtype() == DType::bf16 || table.dtype() == DType::f16);
  CUMO_CHECK(y.dtype() == table.dtype() || widen, where, ": y has dtype ", name_of(y.dtype()),
             " but the table has dtype ", name_of(table.dtype()), " (y takes the table's dtype, or f32)");
  detail::check_ids(where, ids, V);
  if (N == 0 || H == 0) return;
  Tensor owner;
  const std::int32_t* d_ids = detail::int32_on_device(std::vector<std::int32_t>(ids.begin(), ids.end()), owner, ws);
  if (widen) {
    dispatch_float(table.dtype(), where, [&](auto tag) {
      using S = decltype(tag);
      kernels::embedding_gather_widen<S><<<grid_for(N, 1), 128, 0, stream()>>>(ptr<S>(table), H, d_ids, N,
                                                                               ptr<float>(y));
    });
    CUMO_CUDA_LAUNCH_CHECK("embedding_gather_widen");
    return;
  }
  const std::int64_t row_bytes = H * std::int64_t(size_of(table.dtype()));
  const auto addr = reinterpret_cast<std::uintptr_t>(table.raw()) | reinterpret_cast<std::uintptr_t>(y.raw());
  const unsigned grid = grid_for(N, 1);
  if (row_bytes % 16 == 0 && addr % 16 == 0)
    kernels::embedding_gather<uint4><<<grid, 128, 0, stream()>>>(static_cast<const uint4*>(table.raw()),
                                                                  row_bytes / 16, d_ids, N,
                                                                  static_cast<uint4*>(y.raw()));
  else
    kernels::embedding_gather<std::uint16_t><<<grid, 128, 0, stream()>>>(
        static_cast<const std::uint16_t*>(table.raw()), row_bytes / 2, d_ids, N,
        static_cast<std::uint16_t*>(y.raw()));
  CUMO_CUDA_LAUNCH_CHECK("embedding_gather");
}

// dy (N, H) f32 / bf16 / f16 on the GPU; ids (N) on the host, as embedded; dtable (V, H) f32 accumulates.
// skip (N, optional): positions left out (image rows whose embedding was replaced, as nn::Embedding::backward).
inline void embedding_backward(const Tensor& dy, const std::vector<std::int64_t>& ids, Tensor& dtable,
                               const std::vector<bool>* skip = nullptr, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::embedding_backward";
  const std::int64_t N = expect_matrix(where, "dy", dy), H = dy.size(1);
  const std::int64_t V = expect_matrix(where, "dtable", dtable);
  check_dtype(where, "dtable", dtable, DType::f32);
  check_shape(where, "dtable", dtable, {V, H});
  CUMO_CHECK(std::int64_t(ids.size()) == N, where, ": dy has shape ", dy.shape(), " but ", ids.size(),
             " ids were embedded");
  CUMO_CHECK(!skip || skip->size() == ids.size(), where, ": skip has ", skip ? skip->size() : 0, " entries for ",
             ids.size(), " ids");
  detail::check_ids(where, ids, V);
  // rows grouped by id, each group in increasing row order (a stable sort)
  std::vector<std::int32_t> rows;
  rows.reserve(ids.size());
  for (std::size_t r = 0; r < ids.size(); ++r)
    if (!skip || !(*skip)[r]) rows.push_back(std::int32_t(r));
  std::stable_sort(rows.begin(), rows.end(), [&](std::int32_t a, std::int32_t b) { return ids[a] < ids[b]; });
  std::vector<std::int32_t> uid, start;
  for (std::size_t i = 0; i < rows.size(); ++i)
    if (i == 0 || ids[rows[i]] != ids[rows[i - 1]]) {
      uid.push_back(std::int32_t(ids[rows[i]]));
      start.push_back(std::int32_t(i));
    }
  start.push_back(std::int32_t(rows.size()));
  if (uid.empty() || H == 0) return;
  Tensor owners[3];  // three tables, within the staging ring's 8 slots
  const std::int32_t* d_uid = detail::int32_on_device(uid, owners[0], ws);
  const std::int32_t* d_start = detail::int32_on_device(start, owners[1], ws);
  const std::int32_t* d_rows = detail::int32_on_device(rows, owners[2], ws);
  const std::int64_t U = std::int64_t(uid.size());
  dispatch_float(dy.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::embedding_scatter<T><<<grid_for(U, 1), 256, 0, stream()>>>(
        ptr<T>(dy), H, d_uid, d_start, d_rows, U,
        ptr<float>(dtable));
  });
  CUMO_CUDA_LAUNCH_CHECK("embedding_scatter");
}

}  // namespace cumo::gpu
