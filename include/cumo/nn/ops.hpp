#pragma once
// Small helpers shared by the nn layers: row-major (rows, features) buffers, residual adds, parameters, the checks
// every layer's forward runs at the door.
//
// Backends. Every layer is a template on a Backend policy (backend::Cpu by default, backend::Cuda from
// <cumo/backend/cuda.cuh>), whose device holds the layer's parameters and activations. The CPU path is the
// reference: its math stays in plain loops beside the GEMMs inside the layer, so each backward can be read next to
// its forward. Any other backend supplies the same operation as a static function of the policy
// (`B::layernorm_forward`, …), called from the `else` branch of `if constexpr (on_cpu<B>)`; tests compare the two.
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "cumo/backend/cpu.hpp"
#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::nn {

// Whether layers built on backend B run the inline CPU reference code. Any other backend takes the other branch,
// even one whose tensors live on the host (tests/emulated_backend.hpp runs the device paths that way).
template <class B>
inline constexpr bool on_cpu = std::is_same_v<B, backend::Cpu>;

// A 2-D fp32 activation (rows, cols) on the CPU, or on `device`.
inline Tensor matrix(std::int64_t rows, std::int64_t cols, Device device = Device::cpu) {
  return Tensor::empty({rows, cols}, DType::f32, device);
}
inline Tensor zeros(std::int64_t rows, std::int64_t cols, Device device = Device::cpu) {
  return Tensor::zeros({rows, cols}, DType::f32, device);
}

// x must be a contiguous fp32 matrix (rows, cols) on `device`; cols < 0 accepts any width.
inline Tensor check_input(std::string_view where, std::string_view name, const Tensor& x, std::int64_t cols,
                          Device device = Device::cpu) {
  check_dtype(where, name, x, DType::f32);
  check_device(where, name, x, device);
  check_shape(where, name, x, {-1, cols});
  if (device == Device::cpu) return x.contiguous();
  CUMO_CHECK(x.is_contiguous(), where, ": ", name, " with shape ", x.shape(), " must be contiguous on ",
             name_of(device));
  return x;
}

// a += b (same numel), on a's backend.
template <class B = backend::Cpu>
void add_(Tensor& a, const Tensor& b) {
  CUMO_CHECK(a.numel() == b.numel(), "nn::add_: shapes ", a.shape(), " and ", b.shape(), " differ");
  if constexpr (on_cpu<B>) {
    float* pa = a.data<float>();
    const float* pb = b.data<float>();
    for (std::int64_t i = 0; i < a.numel(); ++i) pa[i] += pb[i];
  } else {
    B::add(a, b, a);
  }
}
template <class B = backend::Cpu>
Tensor add(const Tensor& a, const Tensor& b) {
  if constexpr (on_cpu<B>) {
    Tensor c = a.clone();
    add_(c, b);
    return c;
  } else {
    CUMO_CHECK(a.numel() == b.numel(), "nn::add: shapes ", a.shape(), " and ", b.shape(), " differ");
    Tensor c = Tensor::empty(a.shape(), a.dtype(), a.device());
    B::add(a, b, c);
    return c;
  }
}

// t *= alpha (nothing for 1), on backend B.
template <class B = backend::Cpu>
void scale_(Tensor& t, float alpha) {
  if (alpha == 1.f) return;
  if constexpr (on_cpu<B>) {
    float* p = t.data<float>();
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] *= alpha;
  } else {
    B::scale(t, alpha);
  }
}

// A parameter of the given shape filled with `value` (0: HF's zero init for biases; 1: norm weights), named as the
// HF state_dict names it, on `device`. Filled on the host and copied, so every backend starts from the same bits.
inline Parameter param(std::string name, Shape shape, Device device = Device::cpu, float value = 0.f) {
  Tensor t = Tensor::zeros(shape);
  if (value != 0.f) {
    float* p = t.data<float>();
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = value;
  }
  return Parameter(std::move(name), device == Device::cpu ? t : t.to(device));
}

}  // namespace cumo::nn
