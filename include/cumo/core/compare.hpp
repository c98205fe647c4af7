#pragma once
// Comparing tensors the way the tests and cumo_parity do: relative error ‖a − b‖ / ‖b‖ in double precision
// (with ‖b‖ = 0 falling back to ‖a − b‖), over any dtype and device.
#include <cmath>
#include <cstdint>

#include "cumo/core/tensor.hpp"

namespace cumo {

inline double rel_error(const Tensor& got, const Tensor& want) {
  CUMO_CHECK(got.numel() == want.numel(), "rel_error: got has shape ", got.shape(), " but want has shape ",
             want.shape());
  const Tensor a = got.device() == Device::cpu ? got.contiguous() : got.to(Device::cpu);
  const Tensor b = want.device() == Device::cpu ? want.contiguous() : want.to(Device::cpu);
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double x = detail::load_as_double(a.raw(), a.dtype(), i), y = detail::load_as_double(b.raw(), b.dtype(), i);
    num += (x - y) * (x - y);
    den += y * y;
  }
  if (std::isnan(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Bitwise equality of two tensors' bytes (determinism checks).
inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (!(a.shape() == b.shape()) || a.dtype() != b.dtype()) return false;
  const Tensor x = a.to(Device::cpu), y = b.to(Device::cpu);
  return std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
}

}  // namespace cumo
