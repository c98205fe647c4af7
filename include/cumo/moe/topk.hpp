#pragma once
#include <type_traits>
// How many experts each token goes to: TopK<K> fixes K at compile time (the common case, and what lets kernels
// unroll over K); TopKDynamic takes it at run time (configs read from files).
namespace cumo {

template <int K>
struct TopK {
  static_assert(K >= 1, "TopK<K>: K must be at least 1");
  static_assert(K <= 64, "TopK<K>: K above 64 is not supported (top-k selection is per token in registers)");
  static constexpr int compile_time_k = K;
  constexpr int k() const { return K; }
};

struct TopKDynamic {
  static constexpr int compile_time_k = 0;  // 0 = decided at run time
  int value = 2;
  constexpr int k() const { return value; }
};

template <class T>
struct is_topk : std::false_type {};
template <int K>
struct is_topk<TopK<K>> : std::true_type {};
template <>
struct is_topk<TopKDynamic> : std::true_type {};

}  // namespace cumo
