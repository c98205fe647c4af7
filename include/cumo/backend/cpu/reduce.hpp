#pragma once
// Σ_j term(j) in double with eight interleaved partial sums, added in a fixed order at the end. One running sum is a
// chain of dependent adds the compiler must keep in order (no -ffast-math here), so a row reduction ran at one add
// per 4 cycles; eight independent sums vectorise (one AVX-512 register of doubles, or two AVX2 ones). The order is
// fixed by n alone, so results are deterministic and independent of the thread count.
#include <cstdint>

namespace cumo::cpu {

template <class F>
inline double sum8(std::int64_t n, F&& term) {
  double acc[8] = {};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += term(j + l);
  for (int l = 0; j < n; ++j, ++l) acc[l] += term(j);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace cumo::cpu
