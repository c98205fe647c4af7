#pragma once
// Element types. bf16 and f16 are stored as raw 16-bit patterns with exact round-to-nearest-even conversions,
// bit-compatible with CUDA's __nv_bfloat16 / __half, so a buffer can move between host and device unchanged.
#include <cstdint>
#include <cstring>
#include <string_view>

#include "cumo/core/error.hpp"
#include "cumo/core/macros.hpp"

namespace cumo {

enum class DType : std::uint8_t { f32, f16, bf16, f64, i64, i32 };

constexpr std::size_t size_of(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::f64: return 8;
    case DType::i64: return 8;
    case DType::i32: return 4;
  }
  return 0;
}

constexpr std::string_view name_of(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::f64: return "f64";
    case DType::i64: return "i64";
    case DType::i32: return "i32";
  }
  return "?";
}

constexpr bool is_floating(DType t) { return t == DType::f32 || t == DType::f16 || t == DType::bf16 || t == DType::f64; }

struct bf16_t {
  std::uint16_t bits;
};
struct f16_t {
  std::uint16_t bits;
};

CUMO_HD inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
CUMO_HD inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

CUMO_HD inline float to_float(bf16_t h) { return bits_float(std::uint32_t(h.bits) << 16); }

CUMO_HD inline bf16_t to_bf16(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{std::uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                         // nearest, ties to even
  return bf16_t{std::uint16_t(u >> 16)};
}

CUMO_HD inline float to_float(f16_t h) {
  const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
  std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  std::uint32_t man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // subnormal: normalise the mantissa
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    return bits_float(sign | std::uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13);
  }
  return bits_float(sign | (exp + 112u) << 23 | man << 13);
}

CUMO_HD inline f16_t to_f16(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{std::uint16_t(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return f16_t{std::uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {                                               // subnormal or zero in f16
    const int shift = 126 - int(a >> 23);                               // 14..
    if (shift > 24) return f16_t{sign};
    std::uint32_t man = (a & 0x7fffffu) | 0x800000u;
    const std::uint32_t half = 1u << (shift - 1);
    std::uint32_t r = man >> shift;
    const std::uint32_t rem = man & ((1u << shift) - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return f16_t{std::uint16_t(sign | r)};
  }
  std::uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return f16_t{std::uint16_t(sign | (r >> 13))};
}

template <class T>
struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<bf16_t> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<f16_t> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<std::int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<std::int32_t> { static constexpr DType value = DType::i32; };

template <class T>
inline constexpr DType dtype_v = dtype_of<T>::value;

}  // namespace cumo
