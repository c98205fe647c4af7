#pragma once
// What the nn layers share: the checks every forward runs at the door, residual adds, and parameters.
//
// Backends. Every layer is a template on a Backend (backend::Cpu by default, backend::Cuda from
// <cumo/backend/cuda.cuh>) and holds an instance of it, handed down from the model that built it. A forward or a
// backward is one path of named backend operations (backend/contract.hpp) — a layer never asks which backend it
// runs on — so the CPU tests exercise exactly the wiring a GPU runs, and the CPU backend, the reference, is where
// each operation's arithmetic lives.
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "cumo/backend/contract.hpp"
#include "cumo/backend/cpu.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::nn {

// x must be a contiguous fp32 matrix (rows, cols) on `device`; cols < 0 accepts any width. A strided view on the
// host is copied; on a device it is refused (the caller owns its layout there).
inline Tensor check_input(std::string_view where, std::string_view name, const Tensor& x, std::int64_t cols,
                          Device device = Device::cpu) {
  check_device(where, name, x, device);  // first: a 16-bit x on another device is a device error, not a dtype one
  check_dtype(where, name, x, DType::f32);
  check_shape(where, name, x, {-1, cols});
  if (device == Device::cpu) return x.contiguous();
  CUMO_CHECK(x.is_contiguous(), where, ": ", name, " with shape ", x.shape(), " must be contiguous on ",
             name_of(device));
  return x;
}

// A bf16/f16 activation on the layer's device, which the layers widen to fp32 at their door (Backend::convert; one
// on another device goes on to the device check's message).
inline bool is_half(const Tensor& x, Device device) {
  return x.defined() && (x.dtype() == DType::bf16 || x.dtype() == DType::f16) && x.device() == device;
}

// a += b (same numel) on backend `be`.
template <class B>
void add_(const B& be, Tensor& a, const Tensor& b) {
  CUMO_CHECK(a.numel() == b.numel(), "nn::add_: shapes ", a.shape(), " and ", b.shape(), " differ");
  be.add(a, b, a);
}
// a + b (same numel) as a new tensor of backend `be`.
template <class B>
Tensor add(const B& be, const Tensor& a, const Tensor& b) {
  CUMO_CHECK(a.numel() == b.numel(), "nn::add: shapes ", a.shape(), " and ", b.shape(), " differ");
  Tensor c = be.empty(a.shape(), a.dtype());
  be.add(a, b, c);
  return c;
}

// A parameter of the given shape filled with `value` (0: HF's zero init for biases; 1: norm weights), named as the
// HF state_dict names it, on `device`, in `dtype` (matrix weights: weight_dtype()). Filled on the host and copied,
// so every backend starts from the same bits.
inline Parameter param(std::string name, Shape shape, Device device = Device::cpu, float value = 0.f,
                       DType dtype = DType::f32) {
  Tensor t = Tensor::zeros(shape, dtype);
  if (value != 0.f) {
    CUMO_CHECK(dtype == DType::f32, "nn::param: '", name, "' filled with ", value, " must be f32");
    float* p = t.data<float>();
    for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = value;
  }
  return Parameter(std::move(name), device == Device::cpu ? t : t.to(device));
}

// The dtype matrix weights are created in (ParameterStorage, core/parameter.hpp), once backend B is known to
// compute with it: a backend that cannot is refused when the layer is built, not at its first forward.
template <class B>
DType weight_dtype(std::string_view where) {
  const DType t = parameter_storage().weights;
  if (t == DType::bf16) backend::require<B>(B::capabilities.bf16_weights, where, "bf16 weights");
  if (t == DType::f16) backend::require<B>(B::capabilities.f16_weights, where, "f16 weights");
  return t;
}

}  // namespace cumo::nn
