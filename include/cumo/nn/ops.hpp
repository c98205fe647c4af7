#pragma once
// Small fp32 CPU helpers shared by the nn layers: row-major (rows, features) buffers, residual adds, the checks
// every layer's forward runs at the door. The layers themselves keep their math in plain loops beside the GEMMs,
// so each backward can be read next to its forward.
#include <cstdint>
#include <string>
#include <string_view>

#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::nn {

// A 2-D fp32 activation (rows, cols) on the CPU.
inline Tensor matrix(std::int64_t rows, std::int64_t cols) { return Tensor::empty({rows, cols}); }
inline Tensor zeros(std::int64_t rows, std::int64_t cols) { return Tensor::zeros({rows, cols}); }

// x must be a contiguous fp32 CPU matrix (rows, cols); cols < 0 accepts any width.
inline Tensor check_input(std::string_view where, std::string_view name, const Tensor& x, std::int64_t cols) {
  check_dtype(where, name, x, DType::f32);
  check_device(where, name, x, Device::cpu);
  check_shape(where, name, x, {-1, cols});
  return x.contiguous();
}

// a += b (same numel)
inline void add_(Tensor& a, const Tensor& b) {
  CUMO_CHECK(a.numel() == b.numel(), "nn::add_: shapes ", a.shape(), " and ", b.shape(), " differ");
  float* pa = a.data<float>();
  const float* pb = b.data<float>();
  for (std::int64_t i = 0; i < a.numel(); ++i) pa[i] += pb[i];
}
inline Tensor add(const Tensor& a, const Tensor& b) {
  Tensor c = a.clone();
  add_(c, b);
  return c;
}

// A parameter with a zero value of the given shape, named as the HF state_dict names it.
inline Parameter param(std::string name, Shape shape) { return Parameter(std::move(name), Tensor::zeros(shape)); }

}  // namespace cumo::nn
