#pragma once
// CPU dense Linear in PyTorch's weight layout (W is (out, in)): the forward y = x Wᵀ + b and its backward, and the
// two backward GEMMs on their own (the router and the patch embedding use them). fp32, row-major, through
// backend/cpu/gemm.hpp. The forward also takes bf16/f16 weights (inference): widened_product below.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// y (m, n) = beta·y + x (m, k) · w (n, k)ᵀ with w's elements of dtype `wt` (bf16 or f16) at `w`, row stride ldw.
// The weight is widened to fp32 a block of rows at a time into a per-thread buffer and multiplied by the fp32 GEMM,
// so products accumulate in fp32, as PyTorch's CPU bf16 matmul does; threads take blocks. A decode step (few rows of
// x) is bound by reading the weight, so its block stays in L2 (256 KiB of fp32); a prefill is bound by the GEMM,
// which wants wider blocks (2 MiB), over which the widening is spread.
inline void widened_product(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, const void* w, DType wt,
                            std::int64_t n, std::int64_t ldw, float beta, float* y, std::int64_t ldy) {
  if (m == 0 || n == 0) return;
  const std::int64_t block_bytes = m <= 16 ? (std::int64_t(256) << 10) : (std::int64_t(2) << 20);
  const std::int64_t nb = std::max<std::int64_t>(16, block_bytes / (4 * std::max<std::int64_t>(k, 1)) / 16 * 16);
  const std::int64_t blocks = (n + nb - 1) / nb;
  const std::size_t es = size_of(wt);
  parallel_for(
      blocks,
      [&](std::int64_t b) {
        thread_local std::vector<float> wide;
        const std::int64_t j0 = b * nb, rows = std::min(nb, n - j0);
        wide.resize(std::size_t(rows * k));
        for (std::int64_t r = 0; r < rows; ++r)
          detail::convert_n(static_cast<const char*>(w) + std::size_t((j0 + r) * ldw) * es, wt, wide.data() + r * k,
                            DType::f32, k);
        gemm(Op::N, Op::T, m, rows, k, 1.f, x, ldx, wide.data(), k, beta, y + j0, ldy);  // (m, rows)
      },
      2 * m * nb * k);
}

// y (m, n) = x (m, k) · w (n, k)ᵀ [+ bias (n)]; w fp32, or bf16/f16 (inference, widened_product).
inline void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, float beta = 0.f) {
  const std::int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  if (w.dtype() == DType::f32)
    gemm(Op::N, Op::T, m, n, k, 1.f, x.data<float>(), x.strides()[0], w.data<float>(), w.strides()[0], beta,
         y.data<float>(), y.strides()[0]);
  else
    widened_product(x.data<float>(), x.strides()[0], m, k, w.raw(), w.dtype(), n, w.strides()[0], beta,
                    y.data<float>(), y.strides()[0]);
  if (bias) as_matrix(y).rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias->data<float>(), n);
}

// dx (M, K) (+)= dy (M, N) · w (N, K)
inline void linear_dinput(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) {
  gemm(Op::N, Op::N, dy.size(0), w.size(1), w.size(0), 1.f, dy.data<float>(), dy.strides()[0], w.data<float>(),
       w.strides()[0], accumulate ? 1.f : 0.f, dx.data<float>(), dx.strides()[0]);
}

// dw (N, K) += dy (M, N)ᵀ · x (M, K)
inline void linear_dweight(const Tensor& dy, const Tensor& x, Tensor& dw) {
  gemm(Op::T, Op::N, dw.size(0), dw.size(1), dy.size(0), 1.f, dy.data<float>(), dy.strides()[0], x.data<float>(),
       x.strides()[0], 1.f, dw.data<float>(), dw.strides()[0]);
}

// dy (N, out), the forward's x (N, in), w (out, in) → dw (out, in) +=, db (out,) += Σ_rows dy (row order), dx =.
inline void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dw, Tensor* db, Tensor& dx) {
  linear_dweight(dy, x, dw);  // (out, in)
  if (db) {
    const std::int64_t N = dy.size(0), out = dy.size(1), ld = dy.strides()[0];
    float* b = db->data<float>();
    const float* g = dy.data<float>();
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t j = 0; j < out; ++j) b[j] += g[r * ld + j];
  }
  linear_dinput(dy, w, dx, /*accumulate=*/false);  // (N, in)
}

}  // namespace cumo::cpu
