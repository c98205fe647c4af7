#pragma once
// CPU GEMMs on row-major fp32 buffers through Eigen::Map (no copies). Eigen parallelises a large product with
// OpenMP when the caller is not already inside a parallel region; define CUMO_CPU_BLAS (and link a BLAS) to hand
// every product to cblas_sgemm instead — with OpenBLAS that is ~1.5x Eigen 3.4's own kernel on AVX2 machines.
#include <cstdint>

#include <Eigen/Core>

#include "cumo/core/tensor.hpp"

#if defined(CUMO_CPU_BLAS)
extern "C" void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
#endif

namespace cumo::cpu {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstMatrixMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

enum class Op : bool { N = false, T = true };

// C (m, n) = alpha * op(A) op(B) + beta * C, all row-major; op(A) is (m, k), op(B) is (k, n).
// lda/ldb/ldc are row strides of the stored matrices (A stored (m, k) or (k, m) when transposed).
inline void gemm(Op op_a, Op op_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                 std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
#if defined(CUMO_CPU_BLAS)
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  if (k == 0) {
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  cblas_sgemm(kRowMajor, op_a == Op::T ? kTrans : kNoTrans, op_b == Op::T ? kTrans : kNoTrans, int(m), int(n),
              int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
#else
  MatrixMap C(c, m, n, Eigen::OuterStride<>(ldc));
  if (beta == 0.f)
    C.setZero();
  else if (beta != 1.f)
    C *= beta;
  if (k == 0) return;
  const ConstMatrixMap A(a, op_a == Op::T ? k : m, op_a == Op::T ? m : k, Eigen::OuterStride<>(lda));
  const ConstMatrixMap B(b, op_b == Op::T ? n : k, op_b == Op::T ? k : n, Eigen::OuterStride<>(ldb));
  // noalias: C never overlaps A or B here, which spares Eigen a temporary.
  if (op_a == Op::N && op_b == Op::N) C.noalias() += alpha * (A * B);
  if (op_a == Op::N && op_b == Op::T) C.noalias() += alpha * (A * B.transpose());
  if (op_a == Op::T && op_b == Op::N) C.noalias() += alpha * (A.transpose() * B);
  if (op_a == Op::T && op_b == Op::T) C.noalias() += alpha * (A.transpose() * B.transpose());
#endif
}

// Matrix views of 2-D fp32 CPU tensors with unit column stride.
inline MatrixMap as_matrix(const Tensor& t) {
  CUMO_CHECK(t.dim() == 2 && t.strides()[1] == 1, "as_matrix: need a 2-D row-major tensor, got shape ", t.shape());
  return MatrixMap(t.data<float>(), t.size(0), t.size(1), Eigen::OuterStride<>(t.strides()[0]));
}

}  // namespace cumo::cpu
