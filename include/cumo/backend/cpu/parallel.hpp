#pragma once
// parallel_for over [0, n): OpenMP when the build has it and the loop is worth it, a plain loop otherwise.
// Work items must be independent and every result written by exactly one item, so outputs never depend on the
// thread count. `cost` is a rough count of scalar operations per item: a parallel region costs microseconds
// (far more on a loaded machine, where a descheduled thread stalls the barrier), so loops under ~2^17
// operations stay serial.
#include <cstddef>
#include <exception>
#include <cstdint>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace cumo::cpu {

inline constexpr std::int64_t kParallelMinWork = std::int64_t(1) << 17;

// Whether the caller runs inside one of our parallel regions (a library that threads itself would run serially
// there). omp_get_level counts regions whatever their team size, so the answer does not depend on the thread count
// (omp_in_parallel is false inside a one-thread team).
inline bool in_parallel() {
#if defined(_OPENMP)
  return omp_get_level() > 0;
#else
  return false;
#endif
}

// The threads a parallel_for here would use (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace detail {
// An exception may not leave an OpenMP region (std::terminate): the first one an item throws is kept, the other
// items still run (each is independent), and it is rethrown on the calling thread after the region.
class FirstError {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
#if defined(_OPENMP)
#pragma omp critical(cumo_first_error)
#endif
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
};
}  // namespace detail

template <class F>
inline void parallel_for(std::int64_t n, F&& f, std::int64_t cost = 1) {
#if defined(_OPENMP)
  if (n > 1 && n * cost >= kParallelMinWork) {
    detail::FirstError error;
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) error.run([&] { f(i); });
    error.rethrow();
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
    detail::FirstError error;
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t i = 0; i < n; ++i) error.run([&] { f(i); });
    error.rethrow();
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

// f(j0, j1) over blocks of 16 columns of [0, cols), in parallel: column sums over `rows` rows (a parameter gradient
// summed over tokens) keep their row order per column whatever the thread count.
inline constexpr std::int64_t kColumnBlock = 16;
template <class F>
inline void for_column_blocks(std::int64_t cols, std::int64_t rows, F&& f) {
  constexpr std::int64_t kBlock = kColumnBlock;
  const std::int64_t blocks = (cols + kBlock - 1) / kBlock;
  parallel_for(blocks, [&](std::int64_t b) { f(b * kBlock, b * kBlock + kBlock < cols ? b * kBlock + kBlock : cols); },
               2 * kBlock * rows);
}

// out[j] += Σ_r term(r, j) over rows 0 … rows−1 in that order, for every column j of [0, cols) (a parameter gradient
// summed over tokens). A whole block of columns accumulates in a local array the compiler keeps in a register:
// summed into `out` itself, each row's add waited for the store of the row before (a load-add-store chain through
// memory, ~5× slower). The same fp32 operations in the same order either way, so the bits do not change.
template <class Term>
inline void add_column_sums(std::int64_t cols, std::int64_t rows, float* out, Term&& term) {
  for_column_blocks(cols, rows, [&](std::int64_t j0, std::int64_t j1) {
    if (j1 - j0 == kColumnBlock) {
      float acc[kColumnBlock];
      for (std::int64_t l = 0; l < kColumnBlock; ++l) acc[l] = out[j0 + l];
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t l = 0; l < kColumnBlock; ++l) acc[l] += term(r, j0 + l);
      for (std::int64_t l = 0; l < kColumnBlock; ++l) out[j0 + l] = acc[l];
      return;
    }
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t j = j0; j < j1; ++j) out[j] += term(r, j);
  });
}

// Pieces of many tensors for one parallel loop: [begin, end) ranges of at most `chunk` elements of tensor 0, then
// tensor 1, … (numel(t) gives the sizes). One region over all of them, where a region per tensor cost more than
// the work of most (a model's biases and norms); the boundaries depend on the sizes alone, never on the threads.
struct Piece {
  std::size_t tensor;
  std::int64_t begin, end;
};
template <class Numel>
std::vector<Piece> pieces_of(std::size_t tensors, Numel&& numel, std::int64_t chunk) {
  std::vector<Piece> out;
  for (std::size_t t = 0; t < tensors; ++t) {
    const std::int64_t n = numel(t);
    for (std::int64_t b = 0; b < n; b += chunk) out.push_back({t, b, b + chunk < n ? b + chunk : n});
  }
  return out;
}
inline std::int64_t numel_of(const std::vector<Piece>& pieces) {
  std::int64_t n = 0;
  for (const Piece& p : pieces) n += p.end - p.begin;
  return n;
}

}  // namespace cumo::cpu
