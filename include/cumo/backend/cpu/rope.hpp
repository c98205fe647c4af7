#pragma once
// CPU rotary position embedding in Hugging Face's rotate_half convention (nn/rope.hpp explains it):
//   out = x ⊙ cos + rotate_half(x) ⊙ sin over the pairs (i, i + D/2) of each head, angle θ_i · p in fp32.
// inverse = the transpose of the rotation (the backward). out may be x itself.
#include <cmath>
#include <cstdint>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// x, out (N, heads·D) f32; positions (N,) i32; inv_freq (D/2,) f32.
inline void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, std::int64_t heads, bool inverse,
                 Tensor& out) {
  const std::int64_t N = x.size(0), half = inv_freq.numel(), D = 2 * half;
  const float* px = x.data<float>();
  float* po = out.data<float>();
  const std::int32_t* pos = positions.data<std::int32_t>();
  const float* f = inv_freq.data<float>();
  const float s = inverse ? -1.f : 1.f;
  parallel_for(N, [&](std::int64_t r) {
    for (std::int64_t i = 0; i < half; ++i) {
      const float ang = f[i] * float(pos[r]);
      const float c = std::cos(ang), sn = s * std::sin(ang);
      for (std::int64_t h = 0; h < heads; ++h) {
        const float* v = px + r * heads * D + h * D;
        float* o = po + r * heads * D + h * D;
        const float a = v[i], b = v[i + half];
        o[i] = a * c - b * sn;
        o[i + half] = b * c + a * sn;
      }
    }
  }, 8 * half);
}

}  // namespace cumo::cpu
