#pragma once
// parallel_for over [0, n): OpenMP when the build has it and the loop is worth it, a plain loop otherwise.
// Work items must be independent and every result written by exactly one item, so outputs never depend on the
// thread count. `cost` is a rough count of scalar operations per item: a parallel region costs microseconds
// (far more on a loaded machine, where a descheduled thread stalls the barrier), so loops under ~2^17
// operations stay serial.
#include <cstdint>

namespace cumo::cpu {

inline constexpr std::int64_t kParallelMinWork = std::int64_t(1) << 17;

template <class F>
inline void parallel_for(std::int64_t n, F&& f, std::int64_t cost = 1) {
#if defined(_OPENMP)
  if (n > 1 && n * cost >= kParallelMinWork) {
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

// Dynamic schedule, for items of very different cost (experts with different row counts); `total_cost` is the
// whole loop's operation count.
template <class F>
inline void parallel_for_dynamic(std::int64_t n, F&& f, std::int64_t total_cost) {
#if defined(_OPENMP)
  if (n > 1 && total_cost >= kParallelMinWork) {
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace cumo::cpu
