#pragma once
// CPU dense Linear in PyTorch's weight layout (W is (out, in)): the forward y = x Wᵀ + b and its backward, and the
// two backward GEMMs on their own (the router and the patch embedding use them). fp32, row-major, through
// backend/cpu/gemm.hpp.
#include <cstdint>

#include <Eigen/Core>

#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// y (m, n) = x (m, k) · w (n, k)ᵀ [+ bias (n)]
inline void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, float beta = 0.f) {
  const std::int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  gemm(Op::N, Op::T, m, n, k, 1.f, x.data<float>(), x.strides()[0], w.data<float>(), w.strides()[0], beta,
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
