#pragma once
// CPU dense Linear in PyTorch's weight layout (W is (out, in)): the forward y = x Wᵀ + b and its backward, and the
// two backward GEMMs on their own (the router and the patch embedding use them). fp32, row-major, through
// backend/cpu/gemm.hpp. The forward also takes bf16/f16 weights (inference): widened_product below.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/backend/cpu/packed_weights.hpp"
#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

namespace detail {
// y[j] = beta·y[j] + Σ_k x[k] · w[j, k] for a bf16 w, the product of one decode step: bound by reading w, so each
// element is widened in a register and fused into the dot product (no fp32 copy of w), eight rows sharing each
// load of x. fp32 accumulation in 16 (AVX-512) or 8 (AVX2) lanes, then summed across lanes.
inline void bf16_gemv(const float* x, std::int64_t k, const std::uint16_t* w, std::int64_t n, std::int64_t ldw,
                      float beta, float* y) {
  auto finish = [&](std::int64_t j, float dot) { y[j] = beta == 0.f ? dot : beta * y[j] + dot; };
  auto tail = [&](const std::uint16_t* row, std::int64_t k0) {
    float s = 0.f;
    for (std::int64_t i = k0; i < k; ++i) s += x[i] * bits_float(std::uint32_t(row[i]) << 16);
    return s;
  };
#if defined(__AVX512F__)
  constexpr std::int64_t L = 16;
  auto widen = [](const std::uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  };
  auto sum = [](__m512 v) {  // (not _mm512_reduce_add_ps: GCC 12 warns inside it, -Wmaybe-uninitialized)
    alignas(64) float t[16];
    _mm512_store_ps(t, v);
    float s = 0.f;
    for (float f : t) s += f;
    return s;
  };
  auto zero = [] { return _mm512_setzero_ps(); };
  auto fma = [](__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); };
  auto loadx = [](const float* p) { return _mm512_loadu_ps(p); };
#elif defined(__AVX2__) && defined(__FMA__)
  constexpr std::int64_t L = 8;
  auto widen = [](const std::uint16_t* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  };
  auto sum = [](__m256 v) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  };
  auto zero = [] { return _mm256_setzero_ps(); };
  auto fma = [](__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); };
  auto loadx = [](const float* p) { return _mm256_loadu_ps(p); };
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // Eight rows per work item, each prefetched 512 bytes ahead: a row is a short stream (8 KiB at k = 4096) that the
  // hardware prefetcher picks up late, and eight of them keep enough loads in flight. Measured on one 14336 × 4096
  // product (2 threads, AVX-512): 22 GB/s with four rows and no prefetch, 27 GB/s like this; each row's dot product
  // is summed in the same order either way (bitwise the same y).
  constexpr std::int64_t R = 8, kAhead = 256;  // rows per item; prefetch distance in elements (512 bytes)
  const std::int64_t kv = k / L * L;
  const std::int64_t groups = n / R;
  parallel_for(
      groups,
      [&](std::int64_t g) {
        const std::int64_t j = R * g;
        const std::uint16_t* r[R];
        decltype(zero()) a[R];
        for (std::int64_t t = 0; t < R; ++t) r[t] = w + (j + t) * ldw, a[t] = zero();
        for (std::int64_t i = 0; i < kv; i += L) {
          if (i % 32 == 0)  // once per 64-byte line of each row
            for (std::int64_t t = 0; t < R; ++t)
              _mm_prefetch(reinterpret_cast<const char*>(r[t] + i + kAhead), _MM_HINT_T0);
          const auto xv = loadx(x + i);
          for (std::int64_t t = 0; t < R; ++t) a[t] = fma(xv, widen(r[t] + i), a[t]);
        }
        for (std::int64_t t = 0; t < R; ++t) finish(j + t, sum(a[t]) + tail(r[t], kv));
      },
      2 * R * k);
  for (std::int64_t j = R * groups; j < n; ++j) {
    const std::uint16_t* r = w + j * ldw;
    auto a = zero();
    for (std::int64_t i = 0; i < kv; i += L) a = fma(loadx(x + i), widen(r + i), a);
    finish(j, sum(a) + tail(r, kv));
  }
#else
  parallel_for(n, [&](std::int64_t j) { finish(j, tail(w + j * ldw, 0)); }, 2 * k);
#endif
}
}  // namespace detail

// y (m, n) = beta·y + x (m, k) · w (n, k)ᵀ with w's elements of dtype `wt` (bf16 or f16) at `w`, row stride ldw.
// A bf16 product of at least kBf16DotMinRows rows runs on the CPU's bf16 dot products when it has them
// (bf16_gemm_nt: x rounded to bf16 too). Otherwise the weight is widened to fp32 a block of rows at a time into a per-thread buffer and multiplied by the fp32 GEMM,
// so products accumulate in fp32, as PyTorch's CPU bf16 matmul does; threads take blocks. A decode step (few rows of
// x) is bound by reading the weight, so its block stays in L2 (256 KiB of fp32); a prefill is bound by the GEMM,
// which wants wider blocks (2 MiB), over which the widening is spread.
// Rows of x from which a bf16 product runs on bf16 dot products (bf16_gemm_nt) rather than widening the weight: a
// few-row product is bound by reading the weight either way, and keeps fp32 activations.
inline constexpr std::int64_t kBf16DotMinRows = 32;

inline void widened_product(const float* x, std::int64_t ldx, std::int64_t m, std::int64_t k, const void* w, DType wt,
                            std::int64_t n, std::int64_t ldw, float beta, float* y, std::int64_t ldy) {
  if (m == 0 || n == 0) return;
  if (m == 1 && wt == DType::bf16) {  // one decode step
    detail::bf16_gemv(x, k, static_cast<const std::uint16_t*>(w), n, ldw, beta, y);
    return;
  }
  // A prefill-sized product on the CPU's bf16 dot products, where it has them — outside a parallel region: small
  // experts (grouped_linear) call this one per thread, and widen.
  if (wt == DType::bf16 && m >= kBf16DotMinRows && !in_parallel() &&
      bf16_gemm_nt(m, n, k, x, ldx, static_cast<const std::uint16_t*>(w), ldw, beta, y, ldy))
    return;
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
          cumo::detail::convert_n(static_cast<const char*>(w) + std::size_t((j0 + r) * ldw) * es, wt, wide.data() + r * k,
                            DType::f32, k);
        gemm(Op::N, Op::T, m, rows, k, 1.f, x, ldx, wide.data(), k, beta, y + j0, ldy);  // (m, rows)
      },
      2 * m * nb * k);
}

// y (m, n) = x (m, k) · w (n, k)ᵀ [+ bias (n)]; w fp32, or bf16/f16 (inference, widened_product).
inline void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, float beta = 0.f) {
  const std::int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const Eigen::Map<const Eigen::RowVectorXf> b(bias ? bias->data<float>() : nullptr, bias ? n : 0);
  // y = b, then y += x wᵀ: the GEMM accumulates into C anyway (Eigen zeroes it first for beta = 0), so writing the
  // bias first saves a pass over y.
  const bool bias_first = bias && beta == 0.f;
  if (bias_first) {
    as_matrix(y).rowwise() = b;
    beta = 1.f;
  }
#if defined(CUMO_CPU_DNNL)
  if (const auto packed = (beta == 0.f || beta == 1.f) ? detail::find_packed(w) : nullptr)  // prepack_weight
    packed->product(0, m, x.data<float>(), x.strides()[0], beta == 1.f, y.data<float>(), y.strides()[0]);
  else
#endif
  if (w.dtype() == DType::f32)
    gemm(Op::N, Op::T, m, n, k, 1.f, x.data<float>(), x.strides()[0], w.data<float>(), w.strides()[0], beta,
         y.data<float>(), y.strides()[0]);
  else
    widened_product(x.data<float>(), x.strides()[0], m, k, w.raw(), w.dtype(), n, w.strides()[0], beta,
                    y.data<float>(), y.strides()[0]);
  if (bias && !bias_first) as_matrix(y).rowwise() += b;
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
    add_column_sums(out, N, b, [&](std::int64_t r, std::int64_t j) { return g[r * ld + j]; });
  }
  linear_dinput(dy, w, dx, /*accumulate=*/false);  // (N, in)
}

}  // namespace cumo::cpu
