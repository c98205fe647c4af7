#pragma once
// Counter-based RNG (Philox4x32-10, Salmon et al. 2011): the stream is a pure function of (seed, counter), so the
// same seed gives the same numbers on every platform and on the GPU, and the state is two integers that a
// checkpoint can store and restore exactly.
#include <cmath>
#include <cstdint>

#include "cumo/core/macros.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo {

struct Philox4x32 {
  CUMO_HD static void round(std::uint32_t (&c)[4], std::uint32_t (&k)[2]) {
    const std::uint64_t p0 = std::uint64_t(0xD2511F53u) * c[0];
    const std::uint64_t p1 = std::uint64_t(0xCD9E8D57u) * c[2];
    const std::uint32_t hi0 = std::uint32_t(p0 >> 32), lo0 = std::uint32_t(p0);
    const std::uint32_t hi1 = std::uint32_t(p1 >> 32), lo1 = std::uint32_t(p1);
    c[0] = hi1 ^ c[1] ^ k[0];
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k[1];
    c[3] = lo0;
    k[0] += 0x9E3779B9u;
    k[1] += 0xBB67AE85u;
  }
  // Four 32-bit random words for block `counter` of stream `seed`.
  CUMO_HD static void block(std::uint64_t seed, std::uint64_t counter, std::uint32_t (&out)[4]) {
    std::uint32_t c[4] = {std::uint32_t(counter), std::uint32_t(counter >> 32), 0u, 0u};
    std::uint32_t k[2] = {std::uint32_t(seed), std::uint32_t(seed >> 32)};
    for (int r = 0; r < 10; ++r) round(c, k);
    for (int i = 0; i < 4; ++i) out[i] = c[i];
  }
};

class Rng {
 public:
  struct State {
    std::uint64_t seed = 0;
    std::uint64_t counter = 0;
  };

  explicit Rng(std::uint64_t seed = 0) : state_{seed, 0} {}

  State state() const { return state_; }
  void set_state(State s) { state_ = s; }

  std::uint32_t next_u32() {
    std::uint32_t out[4];
    Philox4x32::block(state_.seed, state_.counter++, out);
    return out[0];
  }
  // Uniform in [0, 1) with 24 random bits (exactly representable in float).
  float uniform() { return float(next_u32() >> 8) * (1.0f / 16777216.0f); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
  // Standard normal by Box–Muller from one Philox block (two uniforms, one variate: simple and reproducible).
  float normal() {
    std::uint32_t out[4];
    Philox4x32::block(state_.seed, state_.counter++, out);
    const double u1 = (double(out[0]) + 1.0) / 4294967297.0;  // (0, 1)
    const double u2 = double(out[1]) / 4294967296.0;
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
  // A child generator with an independent stream, e.g. one per layer.
  Rng fork() { return Rng((std::uint64_t(next_u32()) << 32) | next_u32()); }

  // Fill a contiguous host tensor; a bf16/f16 one (inference weights) gets the same draws, rounded.
  void fill_normal(Tensor& t, float mean = 0.f, float std = 1.f) {
    fill(t, "Rng::fill_normal", [&] { return mean + std * normal(); });
  }
  void fill_uniform(Tensor& t, float lo, float hi) {
    fill(t, "Rng::fill_uniform", [&] { return uniform(lo, hi); });
  }

 private:
  template <class Draw>
  void fill(Tensor& t, const char* where, Draw&& draw) {
    check_device(where, "tensor", t, Device::cpu);
    CUMO_CHECK(t.is_contiguous(), where, ": tensor must be contiguous");
    const bool half = t.dtype() == DType::bf16 || t.dtype() == DType::f16;
    CUMO_CHECK(t.dtype() == DType::f32 || half, where, ": tensor has dtype ", name_of(t.dtype()),
               " but expected f32, bf16 or f16");
    Tensor f = half ? Tensor::empty(t.shape()) : t;
    float* p = f.data<float>();
    for (std::int64_t i = 0; i < f.numel(); ++i) p[i] = draw();
    if (half) copy_converted(t, f);
  }
  State state_;
};

}  // namespace cumo
