#pragma once
// CPU GEMMs on row-major fp32 buffers. Three engines, chosen at compile time:
//   CUMO_CPU_DNNL (link cumo::dnnl, which defines it): oneDNN's dnnl_sgemm, JIT-generated kernels for the ISA it
//     runs on. At the demo's shapes (K 64-384, a few thousand rows) Eigen 3.4 spends a third of each product packing
//     its operands; with oneDNN the CPU training step is 1.2x (1 thread) and 1.3x (2 threads) faster
//     (docs/benchmarks.md). It threads with OpenMP outside a parallel region and runs serially inside one; for a
//     given thread count its results are deterministic.
//   CUMO_CPU_BLAS (link a BLAS): cblas_sgemm.
//   otherwise Eigen's own kernel through Eigen::Map (no copies), threaded with OpenMP outside a parallel region.
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "cumo/core/tensor.hpp"

#if defined(CUMO_CPU_DNNL)
#include <dnnl.h>
#endif
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
#if defined(CUMO_CPU_DNNL)
  if (k > 0) {  // (k = 0 is C = beta·C, below; oneDNN would return an error status for it)
    const dnnl_status_t st = dnnl_sgemm(op_a == Op::T ? 'T' : 'N', op_b == Op::T ? 'T' : 'N', m, n, k, alpha, a, lda,
                                        b, ldb, beta, c, ldc);
    CUMO_CHECK(st == dnnl_success, "cpu::gemm: dnnl_sgemm(", m, ", ", n, ", ", k, ") failed with status ", int(st));
    return;
  }
#endif
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

#if defined(CUMO_CPU_DNNL)
namespace detail {
// The process's oneDNN CPU engine (made once; null when oneDNN cannot make one), for the matmul primitives.
inline dnnl_engine_t dnnl_cpu_engine() {
  static const dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    return dnnl_engine_create(&e, dnnl_cpu, 0) == dnnl_success ? e : nullptr;
  }();
  return engine;
}
}  // namespace detail
#endif

// y (m, n) = beta·y + bf16(x) (m, k) · w (n, k)ᵀ on the CPU's bf16 dot-product instructions (AVX512-BF16, AMX), for a
// bf16 weight w (row stride ldw) and fp32 x (row stride ldx) rounded to bf16 (nearest even) as it is read; products
// accumulate in fp32 (oneDNN's matmul, threaded by OpenMP outside a parallel region). Returns false — nothing
// written — when the build has no oneDNN or the CPU has no bf16 dot product, where the caller widens w instead.
// Rounding x as well is what bf16 inference does everywhere (PyTorch's autocast, the release's own bf16 runs): the
// prefill then runs at the bf16 rate instead of widening every weight to fp32 first.
inline bool bf16_gemm_available() {
#if defined(CUMO_CPU_DNNL)
  static const bool yes = [] {
    const dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    return isa == dnnl_cpu_isa_avx512_core_bf16 || isa == dnnl_cpu_isa_avx512_core_amx;
  }();
  return yes;
#else
  return false;
#endif
}

// (oneDNN's C API: its C++ header crashes nvcc's front end, and nvcc compiles translation units that hold the CPU
// backend too.)
inline bool bf16_gemm_nt(std::int64_t m, std::int64_t n, std::int64_t k, const float* x, std::int64_t ldx,
                         const std::uint16_t* w, std::int64_t ldw, float beta, float* y, std::int64_t ldy) {
#if defined(CUMO_CPU_DNNL)
  if (!bf16_gemm_available() || m == 0 || n == 0 || k == 0) return false;
  const dnnl_engine_t engine = detail::dnnl_cpu_engine();
  if (engine == nullptr) return false;
  std::vector<std::uint16_t> xb(std::size_t(m * k));  // (m, k) bf16, rounded as Tensor::to(bf16) rounds
  for (std::int64_t r = 0; r < m; ++r)
    cumo::detail::convert_n(x + r * ldx, DType::f32, xb.data() + r * k, DType::bf16, k);
  dnnl_memory_desc_t src_md, wei_md, dst_md;
  const dnnl_dims_t src_dims{m, k}, src_strides{k, 1};
  const dnnl_dims_t wei_dims{k, n}, wei_strides{1, ldw};  // w (n, k) read as wᵀ (k, n)
  const dnnl_dims_t dst_dims{m, n}, dst_strides{ldy, 1};
  dnnl_matmul_desc_t desc;
  bool ok = dnnl_memory_desc_init_by_strides(&src_md, 2, src_dims, dnnl_bf16, src_strides) == dnnl_success &&
            dnnl_memory_desc_init_by_strides(&wei_md, 2, wei_dims, dnnl_bf16, wei_strides) == dnnl_success &&
            dnnl_memory_desc_init_by_strides(&dst_md, 2, dst_dims, dnnl_f32, dst_strides) == dnnl_success &&
            dnnl_matmul_desc_init(&desc, &src_md, &wei_md, nullptr, &dst_md) == dnnl_success;
  // Every handle made below is released on every path (the oneDNN objects are plain C handles).
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_post_ops_t post_ops = nullptr;
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t prim = nullptr;
  dnnl_memory_t src = nullptr, wei = nullptr, dst = nullptr;
  dnnl_stream_t stream = nullptr;
  ok = ok && dnnl_primitive_attr_create(&attr) == dnnl_success;
  if (ok && beta != 0.f)  // y = beta·y + product
    ok = dnnl_post_ops_create(&post_ops) == dnnl_success &&
         dnnl_post_ops_append_sum(post_ops, beta) == dnnl_success &&
         dnnl_primitive_attr_set_post_ops(attr, post_ops) == dnnl_success;
  // oneDNN keeps the primitives it made in its own cache, keyed by these descriptors: a repeated shape is not
  // compiled again.
  ok = ok && dnnl_primitive_desc_create(&pd, &desc, attr, engine, nullptr) == dnnl_success &&
       dnnl_primitive_create(&prim, pd) == dnnl_success &&
       dnnl_memory_create(&src, &src_md, engine, xb.data()) == dnnl_success &&
       dnnl_memory_create(&wei, &wei_md, engine, const_cast<std::uint16_t*>(w)) == dnnl_success &&
       dnnl_memory_create(&dst, &dst_md, engine, y) == dnnl_success &&
       dnnl_stream_create(&stream, engine, dnnl_stream_default_flags) == dnnl_success;
  dnnl_status_t run_status = dnnl_success;
  if (ok) {
    const dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
    run_status = dnnl_primitive_execute(prim, stream, 3, args);
    if (run_status == dnnl_success) run_status = dnnl_stream_wait(stream);
  }
  if (stream) dnnl_stream_destroy(stream);
  for (dnnl_memory_t mem : {src, wei, dst})
    if (mem) dnnl_memory_destroy(mem);
  if (prim) dnnl_primitive_destroy(prim);
  if (pd) dnnl_primitive_desc_destroy(pd);
  if (post_ops) dnnl_post_ops_destroy(post_ops);
  if (attr) dnnl_primitive_attr_destroy(attr);
  // y may be partly written once the matmul has started: a failure there is an error, not a fallback.
  CUMO_CHECK(run_status == dnnl_success, "cpu::bf16_gemm_nt: oneDNN's matmul (", m, ", ", n, ", ", k,
             ") failed with status ", int(run_status));
  return ok;  // false: a shape or layout oneDNN declined before anything ran (the caller widens instead)
#else
  (void)m, (void)n, (void)k, (void)x, (void)ldx, (void)w, (void)ldw, (void)beta, (void)y, (void)ldy;
  return false;
#endif
}

// A matrix view of a 2-D fp32 CPU tensor with unit column stride.
inline MatrixMap as_matrix(const Tensor& t) {
  CUMO_CHECK(t.dim() == 2 && t.strides()[1] == 1, "as_matrix: need a 2-D row-major tensor, got shape ", t.shape());
  return MatrixMap(t.data<float>(), t.size(0), t.size(1), Eigen::OuterStride<>(t.strides()[0]));
}

}  // namespace cumo::cpu
