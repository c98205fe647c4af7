#pragma once
// CPU rotary position embedding in Hugging Face's rotate_half convention (nn/rope.hpp explains it):
//   out = x ⊙ cos + rotate_half(x) ⊙ sin over the pairs (i, i + D/2) of each head, angle θ_i · p in fp32.
// inverse = the transpose of the rotation (the backward). out may be x itself.
#include <cmath>
#include <cstdint>
#include <vector>

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
  // cos and s·sin of θ_i·p for every position p up to the largest, once: a batch's rows repeat the same positions
  // (0 … T−1 in every sequence), so the table is far smaller than a pair per row. Positions past N (a KV cache's
  // late decode step) or negative ones take the same values per row instead.
  std::int64_t pmax = -1;
  bool tabulate = true;
  for (std::int64_t r = 0; r < N; ++r) {
    tabulate = tabulate && pos[r] >= 0 && pos[r] < N;
    pmax = pos[r] > pmax ? pos[r] : pmax;
  }
  const std::int64_t rows = tabulate ? pmax + 1 : N;
  std::vector<float> cs(std::size_t(2 * rows * half));  // (rows, 2, half): cos, s·sin
  for (std::int64_t p = 0; p < rows; ++p) {
    const float at = float(tabulate ? std::int32_t(p) : pos[p]);
    for (std::int64_t i = 0; i < half; ++i) {
      const float ang = f[i] * at;
      cs[std::size_t((2 * p) * half + i)] = std::cos(ang);
      cs[std::size_t((2 * p + 1) * half + i)] = s * std::sin(ang);
    }
  }
  parallel_for(N, [&](std::int64_t r) {
    const std::int64_t p = tabulate ? pos[r] : r;
    const float* c = cs.data() + 2 * p * half;
    const float* sn = c + half;
    for (std::int64_t h = 0; h < heads; ++h) {
      const float* v = px + r * heads * D + h * D;
      float* o = po + r * heads * D + h * D;
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        o[i] = a * c[i] - b * sn[i];
        o[i + half] = b * c[i] + a * sn[i];
      }
    }
  }, 8 * half * heads);
}

}  // namespace cumo::cpu
