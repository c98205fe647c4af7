#pragma once
// Grouped GEMMs over expert-contiguous rows, the twin of backend/cpu/grouped_gemm.hpp: group e is rows
// [offsets[e], offsets[e+1]) of the activations and slice e of a stacked weight (E, N, K) in PyTorch's Linear
// layout.
//   forward  C[g] (n_g, N) = A[g] (n_g, K) · W[e]ᵀ [+ bias[e]]
//   dinput   dA[g] (n_g, K) = dC[g] (n_g, N) · W[e]
//   dweight  dW[e] (N, K) += dC[g]ᵀ · A[g];  dbias[e] (N) += Σ_rows dC[g]
//
// Three ways to run them (gpu::GroupedGemm, chosen per call by the caller's Options::grouped_gemm):
//   per_expert       one cublasGemmEx per non-empty expert. Needs the row counts on the host (plan.host_offsets,
//                    one sync per forward in make_plan). Tensor cores for bf16/f16, fp32 accumulation.
//   grouped_batched  one cublasGemmGroupedBatchedEx (CUDA ≥ 12.5) for all experts: the same host sizes, one launch
//                    instead of E, which matters for many small experts (E = 64 … 128). The device pointer tables
//                    go up through a pinned staging ring, without a sync. C must have A's dtype.
//   device_offsets   our own kernel that reads the offsets from device memory: no host sync at all, so a whole
//                    forward can be captured in a CUDA graph. It is a plain 64×64-tile SIMT kernel (fp32 FMA, no
//                    tensor cores) — the correctness baseline of the no-sync path, not a fast kernel yet.
// automatic = per_expert when the plan has host offsets, else device_offsets. Bias: for the cuBLAS paths the
// output rows are first filled with their expert's bias and the GEMMs accumulate (beta = 1); the device kernel
// adds it in its epilogue. Weight gradients never use atomics (split over experts and tiles, each output element
// summed by one thread in a fixed order), so every path is deterministic.
#include <cstdint>
#include <vector>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/elementwise.cuh"
#include "cumo/backend/cuda/gemm.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/core/routing.hpp"

namespace cumo::gpu {

namespace kernels {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kTileThreads = 256;  // 16×16 threads, 4×4 outputs each

// acc += A (Mv × Kd) · B (Kd × Nv) for this block's 64 × 64 tile, where A(i, k) = A[i·a_si + k·a_sk] and
// B(k, j) = B[k·b_sk + j·b_sj] (pointers already at the tile's corner; Mv, Nv = valid rows/cols, may exceed 64).
// Thread (ty, tx) owns rows ty + 16·i and columns tx + 16·j, i, j < 4.
template <class T>
__device__ void tile_mma(const T* __restrict__ A, std::int64_t a_si, std::int64_t a_sk, const T* __restrict__ B,
                         std::int64_t b_sk, std::int64_t b_sj, int Mv, int Nv, int Kd, float (&acc)[4][4]) {
  __shared__ float As[kTileK][kTileM + 4];
  __shared__ float Bs[kTileK][kTileN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int k0 = 0; k0 < Kd; k0 += kTileK) {
    for (int q = 0; q < (kTileM * kTileK) / kTileThreads; ++q) {
      const int id = tid + q * kTileThreads;  // 0 … 1023
      // Let consecutive threads walk the operand's unit-stride direction (coalesced loads).
      const int ai = a_si == 1 ? id % kTileM : id / kTileK, ak = a_si == 1 ? id / kTileM : id % kTileK;
      As[ak][ai] = ai < Mv && k0 + ak < Kd ? to_f32(A[ai * a_si + std::int64_t(k0 + ak) * a_sk]) : 0.f;
      const int bj = b_sj == 1 ? id % kTileN : id / kTileK, bk = b_sj == 1 ? id / kTileN : id % kTileK;
      Bs[bk][bj] = bj < Nv && k0 + bk < Kd ? to_f32(B[std::int64_t(k0 + bk) * b_sk + bj * b_sj]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

// The expert owning permuted row r: the largest e with offsets[e] ≤ r (empty experts share an offset with the
// next one and are skipped by "largest"). Requires r < offsets[E].
__device__ __forceinline__ int expert_of_row(const std::int32_t* __restrict__ off, int E, std::int64_t r) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (off[mid] <= r)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Row-grouped GEMM (forward and dinput): C rows [o_e, o_{e+1}) = A rows · B_e (+ bias_e). Blocks along y walk the
// concatenation of every expert's row tiles; blocks past the last tile leave at once. B_e(k, j) =
// w[e·w_es + k·w_sk + j·w_sj]; C has row stride ldc, A has row stride lda and unit column stride. The bias (BiasT:
// T, or fp32 beside 16-bit weights) is added in fp32 before C's rounding.
template <class T, class OutT, class BiasT = T>
__global__ void __launch_bounds__(kTileThreads)
    grouped_rows(const std::int32_t* __restrict__ off, int E, const T* __restrict__ a, std::int64_t lda,
                 const T* __restrict__ w, std::int64_t w_es, std::int64_t w_sk, std::int64_t w_sj,
                 const BiasT* __restrict__ bias, OutT* __restrict__ c, std::int64_t ldc, int Ncols, int Kd) {
  int tile = blockIdx.y, e = 0;
  std::int64_t row0 = 0;
  int nrows = 0;
  for (; e < E; ++e) {  // every thread finds the same expert: the loop is uniform
    const int o0 = off[e], o1 = off[e + 1];
    const int tiles = (o1 - o0 + kTileM - 1) / kTileM;
    if (tile < tiles) {
      row0 = o0 + std::int64_t(tile) * kTileM;
      nrows = min(kTileM, int(o1 - row0));
      break;
    }
    tile -= tiles;
  }
  if (e == E) return;
  const int j0 = blockIdx.x * kTileN;
  float acc[4][4] = {};
  tile_mma(a + row0 * lda, lda, 1, w + e * w_es + std::int64_t(j0) * w_sj, w_sk, w_sj, nrows, Ncols - j0, Kd, acc);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = ty + 16 * i, col = j0 + tx + 16 * j;
      if (r < nrows && col < Ncols) {
        float v = acc[i][j];
        if (bias) v += to_f32(bias[std::int64_t(e) * Ncols + col]);
        c[(row0 + r) * ldc + col] = from_f32<OutT>(v);
      }
    }
}

// dW[e] (N, K) += dC[g]ᵀ · A[g]: block (x, y, e) owns a 64 × 64 tile of dW[e] and reduces over the expert's rows.
template <class T, class OutT>
__global__ void __launch_bounds__(kTileThreads)
    grouped_dweight(const std::int32_t* __restrict__ off, const T* __restrict__ dc, const T* __restrict__ a, int N,
                    int K, OutT* __restrict__ dw) {
  const int e = blockIdx.z;
  const std::int64_t o0 = off[e];
  const int n = off[e + 1] - int(o0);
  if (n == 0) return;
  const int i0 = blockIdx.y * kTileM, j0 = blockIdx.x * kTileN;
  float acc[4][4] = {};
  // A(i, k) = dC[o0 + k][i0 + i],  B(k, j) = a[o0 + k][j0 + j]
  tile_mma(dc + o0 * N + i0, 1, N, a + o0 * K + j0, K, 1, N - i0, K - j0, n, acc);
  OutT* d = dw + std::int64_t(e) * N * K;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = i0 + ty + 16 * i, col = j0 + tx + 16 * j;
      if (r < N && col < K) {
        const std::int64_t at = std::int64_t(r) * K + col;
        d[at] = from_f32<OutT>(to_f32(d[at]) + acc[i][j]);
      }
    }
}

// c rows [0, offsets[E]) = their expert's bias (the cuBLAS paths then accumulate into it).
template <class B, class C>
__global__ void bias_rows(const std::int32_t* __restrict__ off, int E, const B* __restrict__ bias, std::int64_t N,
                          C* __restrict__ c, std::int64_t ldc) {
  const std::int64_t rows = off[E];
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * N;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / N, j = i % N;
    c[r * ldc + j] = from_f32<C>(to_f32(bias[std::int64_t(expert_of_row(off, E, r)) * N + j]));
  }
}

constexpr int kBiasChunks = 32;  // each expert's rows split in this many fixed pieces

// partial[e][c][j] = Σ dC[r][j] over piece c of expert e's rows (in row order).
template <class T>
__global__ void dbias_partial(const std::int32_t* __restrict__ off, const T* __restrict__ dc, std::int64_t N,
                              float* __restrict__ partial) {
  const int e = blockIdx.z, c = blockIdx.y;
  const std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  const std::int64_t o0 = off[e], n = off[e + 1] - o0;
  const std::int64_t r0 = o0 + n * c / kBiasChunks, r1 = o0 + n * (c + 1) / kBiasChunks;
  float acc = 0.f;
  for (std::int64_t r = r0; r < r1; ++r) acc += to_f32(dc[r * N + j]);
  partial[(std::int64_t(e) * kBiasChunks + c) * N + j] = acc;
}

// dbias[e][j] += Σ_c partial[e][c][j] (in piece order)
template <class OutT>
__global__ void dbias_finish(const float* __restrict__ partial, int E, std::int64_t N, OutT* __restrict__ dbias) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < E * N;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t e = i / N, j = i % N;
    float acc = 0.f;
    for (int c = 0; c < kBiasChunks; ++c) acc += partial[(e * kBiasChunks + c) * N + j];
    dbias[i] = from_f32<OutT>(to_f32(dbias[i]) + acc);
  }
}

}  // namespace kernels

namespace detail {

inline bool has_host_offsets(const DispatchPlan& plan) {
  return plan.host_offsets.size() == std::size_t(plan.experts) + 1;
}

inline GroupedGemm resolve(GroupedGemm want, const DispatchPlan& plan, DType in, DType out) {
  if (!has_host_offsets(plan)) return GroupedGemm::device_offsets;  // no sizes on the host: only our kernel can run
  if (want == GroupedGemm::automatic) return GroupedGemm::per_expert;
  if (want == GroupedGemm::grouped_batched && in != out) return GroupedGemm::per_expert;
  return want;
}

// Runs a list of independent row-major GEMMs: one cublasGemmEx each, or one cublasGemmGroupedBatchedEx.
inline void run_gemms(std::vector<GemmArgs> gs, DType in, DType out, bool batched, bool tf32) {
  for (GemmArgs& g : gs) g.tf32 = tf32;
  if (!batched || gs.size() <= 1) {
    for (const GemmArgs& g : gs) gemm(g, in, out);
    return;
  }
  const int G = int(gs.size());
  std::vector<cublasOperation_t> ta(gs.size()), tb(gs.size());
  std::vector<int> m(gs.size()), n(gs.size()), k(gs.size()), lda(gs.size()), ldb(gs.size()), ldc(gs.size()),
      group_size(gs.size(), 1);
  std::vector<float> alpha(gs.size()), beta(gs.size());
  std::vector<const void*> ptrs(3 * gs.size());  // [A' …][B' …][C' …] in cuBLAS's (column-major) naming
  for (int g = 0; g < G; ++g) {
    CUMO_CHECK(gs[g].m > 0 && gs[g].n > 0 && gs[g].k > 0, "gpu::grouped GEMM: empty problem in a batched call");
    const ColumnMajorGemm c = to_column_major(gs[g]);
    ta[g] = c.transa;
    tb[g] = c.transb;
    m[g] = c.m;
    n[g] = c.n;
    k[g] = c.k;
    lda[g] = c.lda;
    ldb[g] = c.ldb;
    ldc[g] = c.ldc;
    alpha[g] = gs[g].alpha;
    beta[g] = gs[g].beta;
    ptrs[g] = c.A;
    ptrs[G + g] = c.B;
    ptrs[2 * G + g] = c.C;
  }
  const auto** table = static_cast<const void**>(context().stage_to_device(ptrs.data(), ptrs.size() * sizeof(void*)));
  CUMO_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
      context().blas(), ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(), table, cuda_type(in),
      lda.data(), table + G, cuda_type(in), ldb.data(), beta.data(), const_cast<void* const*>(table + 2 * G),
      cuda_type(out), ldc.data(), G, group_size.data(), compute_type(in, tf32)));
}

inline const char* byte_ptr(const Tensor& t) { return static_cast<const char*>(t.raw()); }
inline char* byte_ptr(Tensor& t) { return static_cast<char*>(t.raw()); }

inline void check_grouped(const char* where, const Tensor& w, const DispatchPlan& plan) {
  expect_contiguous(where, "w", w);
  CUMO_CHECK(w.dim() == 3 && w.size(0) == plan.experts, where, ": w has shape ", w.shape(), " but the plan has ",
             plan.experts, " experts (expected (E, N, K))");
  expect_contiguous(where, "plan.offsets", plan.offsets);
  CUMO_CHECK(plan.experts <= 65535, where, ": ", plan.experts, " experts exceed one launch");
}

inline void fill_bias_rows(const Tensor& bias, const DispatchPlan& plan, Tensor& c) {
  const std::int64_t N = c.size(1), cap = c.size(0);
  dispatch_float(bias.dtype(), "gpu::grouped_linear", [&](auto btag) {
    dispatch_float(c.dtype(), "gpu::grouped_linear", [&](auto ctag) {
      using B = decltype(btag);
      using C = decltype(ctag);
      kernels::bias_rows<B, C><<<grid_for(cap * N, 256), 256, 0, stream()>>>(
          ptr<std::int32_t>(plan.offsets), plan.experts, ptr<B>(bias), N, ptr<C>(c), N);
    });
  });
  CUMO_CUDA_LAUNCH_CHECK("bias_rows");
}

// Grid of the row-grouped kernel: every expert's row tiles fit in ⌈rows/64⌉ + E tile rows.
inline dim3 rows_tile_grid(const char* where, std::int64_t cap_rows, int E, std::int64_t cols) {
  const std::int64_t y = (cap_rows + kernels::kTileM - 1) / kernels::kTileM + E;
  const std::int64_t x = (cols + kernels::kTileN - 1) / kernels::kTileN;
  CUMO_CHECK(y <= 65535 && x <= INT_MAX, where, ": ", cap_rows, " rows exceed the device kernel's grid");
  return dim3(unsigned(x < 1 ? 1 : x), unsigned(y));
}

}  // namespace detail

// C (rows, N) = grouped A (rows, K) · W (E, N, K)ᵀ [+ bias (E, N)]. A and W share a dtype; C is f32 or that dtype;
// the bias has W's dtype, or f32 (exact in an f32 C; a 16-bit C holds it rounded before the cuBLAS paths accumulate
// onto it). Rows past offsets[E] are left alone.
// Expert weights held in bf16 / f16 for inference (ParameterStorage) with f32 rows and an f32 C: the rows are rounded
// to W's dtype in a workspace copy, then as above (fp32 accumulation, an f32 bias kept as it is). The CPU keeps the
// rows in fp32 below 32 rows; the difference is within the 16-bit dtype's rounding of the rows.
inline void grouped_linear(const Tensor& a, const Tensor& w, const Tensor* bias, const DispatchPlan& plan, Tensor& c,
                           const Options& options = {}, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::grouped_linear";
  detail::check_grouped(where, w, plan);
  expect_contiguous(where, "a", a);
  expect_contiguous(where, "c", c);
  const int E = plan.experts;
  const std::int64_t N = w.size(1), K = w.size(2);
  CUMO_CHECK(a.dim() == 2 && a.size(1) == K, where, ": a has shape ", a.shape(), " but w has shape ", w.shape());
  CUMO_CHECK(c.dim() == 2 && c.size(1) == N && c.size(0) >= plan.rows(), where, ": c has shape ", c.shape(),
             " but needs (", plan.rows(), ", ", N, ")");
  if (a.dtype() == DType::f32 && (w.dtype() == DType::bf16 || w.dtype() == DType::f16)) {  // inference weights
    check_dtype(where, "c", c, DType::f32);
    const Tensor ah = cast_copy(a, w.dtype(), ws);  // (rows, K)
    return grouped_linear(ah, w, bias, plan, c, options, ws);
  }
  CUMO_CHECK(a.dtype() == w.dtype(), where, ": a has dtype ", name_of(a.dtype()), " but w has ", name_of(w.dtype()));
  const bool has_bias = bias && bias->defined();
  if (has_bias) {
    expect_contiguous(where, "bias", *bias);
    check_shape(where, "bias", *bias, {E, N});
    CUMO_CHECK(bias->dtype() == w.dtype() || bias->dtype() == DType::f32, where, ": bias has dtype ",
               name_of(bias->dtype()), " but w has ", name_of(w.dtype()), " (the bias may be ", name_of(w.dtype()),
               " or f32)");
  }
  check_gemm_types(where, a.dtype(), c.dtype());
  const DType in = a.dtype(), out = c.dtype();
  const std::size_t ei = size_of(in), eo = size_of(out);
  const GroupedGemm algo = detail::resolve(options.grouped_gemm, plan, in, out);

  if (algo == GroupedGemm::device_offsets) {
    const dim3 grid = detail::rows_tile_grid(where, c.size(0), E, N);
    dispatch_float(in, where, [&](auto tag) {
      using T = decltype(tag);
      auto launch = [&](auto otag, auto btag) {
        using O = decltype(otag);
        using B = decltype(btag);
        kernels::grouped_rows<T, O, B><<<grid, kernels::kTileThreads, 0, stream()>>>(
            ptr<std::int32_t>(plan.offsets), E, ptr<T>(a), K, ptr<T>(w), N * K, /*w_sk=*/1, /*w_sj=*/K,
            has_bias ? ptr<B>(*bias) : nullptr, ptr<O>(c), N, int(N), int(K));
      };
      const bool f32_bias = has_bias && bias->dtype() == DType::f32;
      if (out == DType::f32 && f32_bias) launch(float{}, float{});
      else if (out == DType::f32) launch(float{}, T{});
      else if (f32_bias) launch(T{}, float{});
      else launch(T{}, T{});
    });
    CUMO_CUDA_LAUNCH_CHECK("grouped_rows (forward)");
    return;
  }

  if (has_bias) detail::fill_bias_rows(*bias, plan, c);
  std::vector<GemmArgs> gs;
  for (int e = 0; e < E; ++e) {
    const std::int64_t r0 = plan.host_offsets[e], n = plan.host_offsets[e + 1] - r0;
    if (n == 0) continue;
    gs.push_back({Op::N, Op::T, n, N, K, 1.f, detail::byte_ptr(a) + r0 * K * ei, K,
                  detail::byte_ptr(w) + e * N * K * ei, K, has_bias ? 1.f : 0.f, detail::byte_ptr(c) + r0 * N * eo,
                  N});
  }
  detail::run_gemms(std::move(gs), in, out, algo == GroupedGemm::grouped_batched, options.allow_tf32);
}

// dA (rows, K) = grouped dC (rows, N) · W (E, N, K).
inline void grouped_linear_dinput(const Tensor& dc, const Tensor& w, const DispatchPlan& plan, Tensor& da,
                                  const Options& options = {}) {
  constexpr const char* where = "gpu::grouped_linear_dinput";
  detail::check_grouped(where, w, plan);
  expect_contiguous(where, "dc", dc);
  expect_contiguous(where, "da", da);
  const int E = plan.experts;
  const std::int64_t N = w.size(1), K = w.size(2);
  CUMO_CHECK(dc.dim() == 2 && dc.size(1) == N, where, ": dc has shape ", dc.shape(), " but w has shape ", w.shape());
  CUMO_CHECK(da.dim() == 2 && da.size(1) == K && da.size(0) >= plan.rows(), where, ": da has shape ", da.shape(),
             " but needs (", plan.rows(), ", ", K, ")");
  CUMO_CHECK(dc.dtype() == w.dtype(), where, ": dc has dtype ", name_of(dc.dtype()), " but w has ",
             name_of(w.dtype()));
  check_gemm_types(where, dc.dtype(), da.dtype());
  const DType in = dc.dtype(), out = da.dtype();
  const std::size_t ei = size_of(in), eo = size_of(out);
  const GroupedGemm algo = detail::resolve(options.grouped_gemm, plan, in, out);

  if (algo == GroupedGemm::device_offsets) {
    const dim3 grid = detail::rows_tile_grid(where, da.size(0), E, K);
    dispatch_float(in, where, [&](auto tag) {
      using T = decltype(tag);
      auto launch = [&](auto otag) {
        using O = decltype(otag);
        kernels::grouped_rows<T, O><<<grid, kernels::kTileThreads, 0, stream()>>>(
            ptr<std::int32_t>(plan.offsets), E, ptr<T>(dc), N, ptr<T>(w), N * K, /*w_sk=*/K, /*w_sj=*/1,
            static_cast<const T*>(nullptr), ptr<O>(da), K, int(K), int(N));
      };
      if (out == DType::f32) launch(float{});
      else launch(T{});
    });
    CUMO_CUDA_LAUNCH_CHECK("grouped_rows (dinput)");
    return;
  }

  std::vector<GemmArgs> gs;
  for (int e = 0; e < E; ++e) {
    const std::int64_t r0 = plan.host_offsets[e], n = plan.host_offsets[e + 1] - r0;
    if (n == 0) continue;
    gs.push_back({Op::N, Op::N, n, K, N, 1.f, detail::byte_ptr(dc) + r0 * N * ei, N,
                  detail::byte_ptr(w) + e * N * K * ei, K, 0.f, detail::byte_ptr(da) + r0 * K * eo, K});
  }
  detail::run_gemms(std::move(gs), in, out, algo == GroupedGemm::grouped_batched, options.allow_tf32);
}

// dW (E, N, K) += grouped dC (rows, N)ᵀ · A (rows, K);  dbias (E, N) += per-expert column sums of dC.
inline void grouped_linear_dweight(const Tensor& dc, const Tensor& a, const DispatchPlan& plan, Tensor& dw,
                                   Tensor* dbias, const Options& options = {}, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::grouped_linear_dweight";
  detail::check_grouped(where, dw, plan);
  expect_contiguous(where, "dc", dc);
  expect_contiguous(where, "a", a);
  const int E = plan.experts;
  const std::int64_t N = dw.size(1), K = dw.size(2);
  CUMO_CHECK(dc.dim() == 2 && dc.size(1) == N && a.dim() == 2 && a.size(1) == K, where, ": dc ", dc.shape(),
             " and a ", a.shape(), " do not fit dw ", dw.shape());
  CUMO_CHECK(dc.dtype() == a.dtype(), where, ": dc has dtype ", name_of(dc.dtype()), " but a has ",
             name_of(a.dtype()));
  check_gemm_types(where, dc.dtype(), dw.dtype());
  const DType in = dc.dtype(), out = dw.dtype();
  const std::size_t ei = size_of(in), eo = size_of(out);
  const GroupedGemm chosen = detail::resolve(options.grouped_gemm, plan, in, out);

  if (chosen == GroupedGemm::device_offsets) {
    CUMO_CHECK(N <= INT_MAX && K <= INT_MAX && (N + kernels::kTileM - 1) / kernels::kTileM <= 65535, where,
               ": dw has shape ", dw.shape(), ", too large for the device kernel's grid");
    const dim3 grid(unsigned((K + kernels::kTileN - 1) / kernels::kTileN),
                    unsigned((N + kernels::kTileM - 1) / kernels::kTileM), unsigned(E));
    dispatch_float(in, where, [&](auto tag) {
      using T = decltype(tag);
      auto launch = [&](auto otag) {
        using O = decltype(otag);
        kernels::grouped_dweight<T, O><<<grid, kernels::kTileThreads, 0, stream()>>>(
            ptr<std::int32_t>(plan.offsets), ptr<T>(dc), ptr<T>(a), int(N), int(K), ptr<O>(dw));
      };
      if (out == DType::f32) launch(float{});
      else launch(T{});
    });
    CUMO_CUDA_LAUNCH_CHECK("grouped_dweight");
  } else {
    std::vector<GemmArgs> gs;
    for (int e = 0; e < E; ++e) {
      const std::int64_t r0 = plan.host_offsets[e], n = plan.host_offsets[e + 1] - r0;
      if (n == 0) continue;
      gs.push_back({Op::T, Op::N, N, K, n, 1.f, detail::byte_ptr(dc) + r0 * N * ei, N,
                    detail::byte_ptr(a) + r0 * K * ei, K, 1.f, detail::byte_ptr(dw) + e * N * K * eo, K});
    }
    detail::run_gemms(std::move(gs), in, out, chosen == GroupedGemm::grouped_batched, options.allow_tf32);
  }

  if (dbias && dbias->defined()) {
    expect_contiguous(where, "dbias", *dbias);
    check_shape(where, "dbias", *dbias, {E, N});
    Tensor partial = device_empty(ws, {E, kernels::kBiasChunks, N});  // (E, chunks, N)
    const dim3 grid(unsigned((N + 255) / 256), kernels::kBiasChunks, unsigned(E));
    dispatch_float(in, where, [&](auto tag) {
      using T = decltype(tag);
      kernels::dbias_partial<T><<<grid, 256, 0, stream()>>>(ptr<std::int32_t>(plan.offsets), ptr<T>(dc), N,
                                                            ptr<float>(partial));
    });
    CUMO_CUDA_LAUNCH_CHECK("dbias_partial");
    dispatch_float(dbias->dtype(), where, [&](auto tag) {
      using O = decltype(tag);
      kernels::dbias_finish<O><<<grid_for(E * N, 256), 256, 0, stream()>>>(ptr<float>(partial), E, N,
                                                                           ptr<O>(*dbias));
    });
    CUMO_CUDA_LAUNCH_CHECK("dbias_finish");
  }
}

}  // namespace cumo::gpu
