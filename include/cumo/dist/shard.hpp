#pragma once
// dist::shard_of: which contiguous share of n items (a global batch's rows, a vector's chunk) rank r of a world of
// N holds. The one split every data-parallel piece uses, so the data shards and the reduction chunks agree.
#include <algorithm>
#include <cstdint>

#include "cumo/core/error.hpp"

namespace cumo::dist {

// [begin, end) of rank r's contiguous share of n items over `world` ranks: the first n % world ranks hold one more.
struct Shard {
  std::int64_t begin = 0, end = 0;
  std::int64_t size() const { return end - begin; }
};
inline Shard shard_of(std::int64_t n, int rank, int world) {
  CUMO_CHECK(world >= 1 && rank >= 0 && rank < world, "shard_of: rank ", rank, " of a world of ", world);
  CUMO_CHECK(n >= 0, "shard_of: ", n, " items");
  const std::int64_t base = n / world, extra = n % world;
  const std::int64_t b = rank * base + std::min<std::int64_t>(rank, extra);
  return {b, b + base + (rank < extra ? 1 : 0)};
}

}  // namespace cumo::dist
