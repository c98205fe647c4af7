#pragma once
// parallel_for over [0, n): OpenMP when the build has it, a plain loop otherwise. Work items must be independent;
// every result is written by exactly one item, so outputs do not depend on the thread count.
#include <cstdint>

namespace cumo::cpu {

template <class F>
inline void parallel_for(std::int64_t n, F&& f, std::int64_t grain = 1) {
#if defined(_OPENMP)
  if (n >= 2 * grain) {
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

// Dynamic schedule, for items of very different cost (experts with different row counts).
template <class F>
inline void parallel_for_dynamic(std::int64_t n, F&& f) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t i = 0; i < n; ++i) f(i);
#else
  for (std::int64_t i = 0; i < n; ++i) f(i);
#endif
}

}  // namespace cumo::cpu
