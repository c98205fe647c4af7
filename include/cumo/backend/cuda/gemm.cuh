#pragma once
// CUDA GEMMs on row-major buffers through cuBLAS, the twin of backend/cpu/gemm.hpp. cuBLAS is column-major; a
// row-major (m, n) matrix with row stride ld is the column-major (n, m) matrix with the same ld, so
//   row-major  C = op(A) op(B)   is   column-major  Cᵀ = op(B)ᵀ op(A)ᵀ
// and gemm() below takes exactly cpu::gemm's arguments and swaps A and B for cuBLAS.
//
// Precision: inputs f32, bf16 or f16 (A and B alike), output f32 or the input dtype, accumulation always fp32
// (CUBLAS_COMPUTE_32F; TF32 tensor cores for fp32 inputs only when the call asks, GemmArgs::tf32). Deterministic: cuBLAS
// gives bitwise-identical results run to run on one GPU model with a fixed workspace, which the context sets.
#include <cstdint>

#include "cumo/backend/cuda/common.cuh"

namespace cumo::gpu {

enum class Op : bool { N = false, T = true };

// One row-major GEMM C (m, n) = alpha · op(A) op(B) + beta · C, as cpu::gemm; lda/ldb/ldc are row strides in
// elements of the stored matrices. beta may be 0 (C is not read) or anything else.
struct GemmArgs {
  Op op_a = Op::N, op_b = Op::N;
  std::int64_t m = 0, n = 0, k = 0;
  float alpha = 1.f;
  const void* a = nullptr;
  std::int64_t lda = 0;
  const void* b = nullptr;
  std::int64_t ldb = 0;
  float beta = 0.f;
  void* c = nullptr;
  std::int64_t ldc = 0;
  bool tf32 = false;  // fp32 inputs on TF32 tensor cores (the caller's backend::Cuda options)
};

// cuBLAS's view of a row-major GEMM: operands swapped, m and n swapped.
struct ColumnMajorGemm {
  cublasOperation_t transa, transb;
  int m, n, k;
  const void* A;
  int lda;
  const void* B;
  int ldb;
  void* C;
  int ldc;
};
inline ColumnMajorGemm to_column_major(const GemmArgs& g) {
  constexpr const char* where = "gpu::gemm";
  ColumnMajorGemm c;
  c.transa = g.op_b == Op::T ? CUBLAS_OP_T : CUBLAS_OP_N;
  c.transb = g.op_a == Op::T ? CUBLAS_OP_T : CUBLAS_OP_N;
  c.m = to_int(g.n, where, "n");
  c.n = to_int(g.m, where, "m");
  c.k = to_int(g.k, where, "k");
  c.A = g.b;
  c.lda = to_int(g.ldb, where, "ldb");
  c.B = g.a;
  c.ldb = to_int(g.lda, where, "lda");
  c.C = g.c;
  c.ldc = to_int(g.ldc, where, "ldc");
  return c;
}

inline cublasComputeType_t compute_type(DType in, bool tf32) {
  return in == DType::f32 && tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

inline void check_gemm_types(const char* where, DType in, DType out) {
  CUMO_CHECK(in == DType::f32 || in == DType::bf16 || in == DType::f16, where, ": input dtype ", name_of(in),
             " is not supported (f32, bf16, f16)");
  CUMO_CHECK(out == in || out == DType::f32, where, ": output dtype ", name_of(out), " must be f32 or the input dtype ",
             name_of(in));
}

// The one place the backend calls cublasGemmEx. `in` is the dtype of A and B, `out` the dtype of C.
inline void gemm(const GemmArgs& g, DType in, DType out) {
  constexpr const char* where = "gpu::gemm";
  check_gemm_types(where, in, out);
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    // C = beta · C with nothing to multiply; only the betas the backend uses (0: clear, 1: keep).
    CUMO_CHECK(g.beta == 0.f || g.beta == 1.f, where, ": k = 0 with beta = ", g.beta);
    if (g.beta == 0.f) {
      const std::size_t es = size_of(out);
      CUMO_CUDA_CHECK(cudaMemset2DAsync(g.c, std::size_t(g.ldc) * es, 0, std::size_t(g.n) * es, std::size_t(g.m),
                                        stream()));
    }
    return;
  }
  const ColumnMajorGemm c = to_column_major(g);
  CUMO_CUBLAS_CHECK(cublasGemmEx(context().blas(), c.transa, c.transb, c.m, c.n, c.k, &g.alpha, c.A, cuda_type(in),
                                 c.lda, c.B, cuda_type(in), c.ldb, &g.beta, c.C, cuda_type(out), c.ldc,
                                 compute_type(in, g.tf32), CUBLAS_GEMM_DEFAULT));
}

// ---- the router's dense Linear (PyTorch weight layout (out, in)) -----------------------------------------------
// y (M, N) = x (M, K) · w (N, K)ᵀ
inline void linear(const Tensor& x, const Tensor& w, Tensor& y, bool tf32 = false) {
  constexpr const char* where = "gpu::linear";
  expect_rows(where, "x", x);
  expect_rows(where, "w", w);
  expect_rows(where, "y", y);
  CUMO_CHECK(x.size(1) == w.size(1), where, ": x has shape ", x.shape(), " but w has shape ", w.shape());
  CUMO_CHECK(y.size(0) == x.size(0) && y.size(1) == w.size(0), where, ": y has shape ", y.shape(), " but x ",
             x.shape(), " · wᵀ ", w.shape(), " needs (", x.size(0), ", ", w.size(0), ")");
  CUMO_CHECK(x.dtype() == w.dtype(), where, ": x has dtype ", name_of(x.dtype()), " but w has ", name_of(w.dtype()));
  gemm({Op::N, Op::T, x.size(0), w.size(0), x.size(1), 1.f, x.raw(), x.strides()[0], w.raw(), w.strides()[0], 0.f,
        y.raw(), y.strides()[0], tf32},
       x.dtype(), y.dtype());
}

// dx (M, K) (+)= dy (M, N) · w (N, K)
inline void linear_dinput(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate, bool tf32 = false) {
  constexpr const char* where = "gpu::linear_dinput";
  expect_rows(where, "dy", dy);
  expect_rows(where, "w", w);
  expect_rows(where, "dx", dx);
  CUMO_CHECK(dy.size(1) == w.size(0) && dx.size(1) == w.size(1) && dx.size(0) == dy.size(0), where, ": dy ",
             dy.shape(), ", w ", w.shape(), " and dx ", dx.shape(), " do not fit dx = dy · w");
  CUMO_CHECK(dy.dtype() == w.dtype(), where, ": dy has dtype ", name_of(dy.dtype()), " but w has ",
             name_of(w.dtype()));
  gemm({Op::N, Op::N, dy.size(0), w.size(1), w.size(0), 1.f, dy.raw(), dy.strides()[0], w.raw(), w.strides()[0],
        accumulate ? 1.f : 0.f, dx.raw(), dx.strides()[0], tf32},
       dy.dtype(), dx.dtype());
}

// dw (N, K) += dy (M, N)ᵀ · x (M, K)
inline void linear_dweight(const Tensor& dy, const Tensor& x, Tensor& dw, bool tf32 = false) {
  constexpr const char* where = "gpu::linear_dweight";
  expect_rows(where, "dy", dy);
  expect_rows(where, "x", x);
  expect_rows(where, "dw", dw);
  CUMO_CHECK(dy.size(0) == x.size(0) && dw.size(0) == dy.size(1) && dw.size(1) == x.size(1), where, ": dy ",
             dy.shape(), ", x ", x.shape(), " and dw ", dw.shape(), " do not fit dw += dyᵀ · x");
  CUMO_CHECK(dy.dtype() == x.dtype(), where, ": dy has dtype ", name_of(dy.dtype()), " but x has ",
             name_of(x.dtype()));
  gemm({Op::T, Op::N, dw.size(0), dw.size(1), dy.size(0), 1.f, dy.raw(), dy.strides()[0], x.raw(), x.strides()[0],
        1.f, dw.raw(), dw.strides()[0], tf32},
       dy.dtype(), dw.dtype());
}

}  // namespace cumo::gpu
