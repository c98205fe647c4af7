#pragma once
// Grouped GEMMs over expert-contiguous rows: group e is rows [offsets[e], offsets[e+1]) of the activations and
// slice e of a stacked weight (E, N, K). Groups run one per thread (dynamic schedule) when there are at least two
// per thread to balance, or when each is too small to thread (fine-grained experts); otherwise (few large groups,
// many threads) one after another, each product threaded inside. A product of an expert's few rows threads badly:
// the library splits its weight's columns, every thread packs its share for those rows and they meet at a barrier.
// With oneDNN's sgemm a GEMM call computes every element the same way whichever threads run it, so the results do not
// depend on the choice (the demo's checkpoints are bitwise the same either way at 1 and 2 threads; test_cpu_kernels).
// Eigen's own kernel picks its blocking from the thread count: a product it threads may round differently from the
// same product on one thread, with or without this schedule.
#include <cstdint>
#include <vector>

#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/backend/cpu/linear.hpp"
#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

namespace detail {
// bf16_products: the groups' products may run on oneDNN's bf16 matmul (bf16 weights, ≥ 32 rows; widened_product),
// which only runs outside a parallel region and threads itself: large groups then stay one after another, as they
// always did (also keeping bf16 inference's rounding independent of the thread count).
template <class F>
void for_each_group(const std::vector<std::int64_t>& offsets, std::int64_t flops_per_row, F&& f,
                    bool bf16_products = false) {
  const std::int64_t E = std::int64_t(offsets.size()) - 1;
  const std::int64_t rows = offsets.back();
  // ~4 MFLOP per group is where one-thread-per-group starts beating a threaded product on 2 cores whatever the
  // group count; with ≥ 2 groups per thread it wins at every size measured (bench_moe_cpu on 2 threads, oneDNN:
  // fine-grained 64 × 33 MFLOP groups 26.3 → 22.8 ms, Mixtral-like 8 × 470 MFLOP 62 → 53 ms, 8 × 3.8 GFLOP at
  // T = 2048 339 → 311 ms; the demo's step 41.7 → 40.1 ms).
#if defined(CUMO_CPU_BLAS)
  // A threaded BLAS (OpenBLAS's pthread build) inside our OpenMP threads would oversubscribe the cores: let the
  // BLAS thread every product and run the groups in order.
  const bool per_thread = false;
  (void)bf16_products;
#else
  const bool many = !bf16_products && E >= 2 * std::int64_t(max_threads());
  const bool per_thread = E > 1 && (many || rows * flops_per_row / E < (std::int64_t(4) << 20));
#endif
  if (per_thread)
    parallel_for_dynamic(E, [&](std::int64_t e) { f(e); }, rows * flops_per_row);
  else
    for (std::int64_t e = 0; e < E; ++e) f(e);
}
}  // namespace detail

// C[g] (n_g, N) = A[g] (n_g, K) · W[e] (N, K)^T [+ bias[e]]   (forward of a stacked Linear; W fp32, or bf16/f16
// for inference, widened a block at a time)
inline void grouped_linear(const Tensor& a, const Tensor& w, const Tensor* bias, const std::vector<std::int64_t>& off,
                           Tensor& c) {
  const std::int64_t N = w.size(1), K = w.size(2);
  const float* A = a.data<float>();
  const bool wide = w.dtype() == DType::f32;
  const float* W = wide ? w.data<float>() : nullptr;
  const char* Wn = static_cast<const char*>(w.raw());
  float* C = c.data<float>();
#if defined(CUMO_CPU_DNNL)
  const auto packed = wide ? detail::find_packed(w) : nullptr;  // prepack_weight (inference)
#endif
  detail::for_each_group(off, 2 * N * K, [&](std::int64_t e) {
    const std::int64_t r0 = off[std::size_t(e)], n = off[std::size_t(e) + 1] - r0;
    if (n == 0) return;
    MatrixMap Ce(C + r0 * N, n, N, Eigen::OuterStride<>(N));  // (n, N)
    // As cpu::linear: the bias first, then the product accumulated onto it (no zeroing pass, no second pass).
    if (bias) Ce.rowwise() = Eigen::Map<const Eigen::RowVectorXf>(bias->data<float>() + e * N, N);
    const float beta = bias ? 1.f : 0.f;
#if defined(CUMO_CPU_DNNL)
    if (packed)
      packed->product(e, n, A + r0 * K, K, bias != nullptr, C + r0 * N, N);
    else
#endif
    if (wide)
      gemm(Op::N, Op::T, n, N, K, 1.f, A + r0 * K, K, W + e * N * K, K, beta, C + r0 * N, N);
    else
      widened_product(A + r0 * K, K, n, K, Wn + std::size_t(e * N * K) * size_of(w.dtype()), w.dtype(), N, K, beta,
                      C + r0 * N, N);
  }, /*bf16_products=*/w.dtype() == DType::bf16);
}

// dA[g] (n_g, K) = dC[g] (n_g, N) · W[e] (N, K)   (input gradient)
inline void grouped_linear_dinput(const Tensor& dc, const Tensor& w, const std::vector<std::int64_t>& off,
                                  Tensor& da) {
  const std::int64_t N = w.size(1), K = w.size(2);
  const float* dC = dc.data<float>();
  const float* W = w.data<float>();
  float* dA = da.data<float>();
  detail::for_each_group(off, 2 * N * K, [&](std::int64_t e) {
    const std::int64_t r0 = off[std::size_t(e)], n = off[std::size_t(e) + 1] - r0;
    if (n == 0) return;
    gemm(Op::N, Op::N, n, K, N, 1.f, dC + r0 * N, N, W + e * N * K, K, 0.f, dA + r0 * K, K);
  });
}

// dW[e] (N, K) += dC[g]^T (N, n_g) · A[g] (n_g, K);  dbias[e] (N) += Σ rows of dC[g]   (weight gradients)
inline void grouped_linear_dweight(const Tensor& dc, const Tensor& a, const std::vector<std::int64_t>& off,
                                   Tensor& dw, Tensor* dbias) {
  const std::int64_t N = dw.size(1), K = dw.size(2);
  const float* dC = dc.data<float>();
  const float* A = a.data<float>();
  float* dW = dw.data<float>();
  detail::for_each_group(off, 2 * N * K, [&](std::int64_t e) {
    const std::int64_t r0 = off[std::size_t(e)], n = off[std::size_t(e) + 1] - r0;
    if (n == 0) return;
    gemm(Op::T, Op::N, N, K, n, 1.f, dC + r0 * N, N, A + r0 * K, K, 1.f, dW + e * N * K, K);
    if (dbias) {
      const ConstMatrixMap dCe(dC + r0 * N, n, N, Eigen::OuterStride<>(N));
      Eigen::Map<Eigen::RowVectorXf>(dbias->data<float>() + e * N, N) += dCe.colwise().sum();
    }
  });
}

}  // namespace cumo::cpu
