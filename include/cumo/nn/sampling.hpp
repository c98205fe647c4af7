#pragma once
// nn::TokenSampler — the next token from one row of logits: greedy (temperature 0), or sampling with temperature
// and nucleus (top-p) filtering as Hugging Face's TemperatureLogitsWarper + TopPLogitsWarper do:
//   p = softmax(z / T); sort descending; keep the smallest prefix whose probability reaches top_p (at least one
//   token); renormalise; draw with the seeded Philox generator, so the same seed gives the same tokens.
// Ties in greedy mode go to the lowest id (std::max_element), as torch.argmax does.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/core/rng.hpp"

namespace cumo::nn {

struct SamplingOptions {
  float temperature = 0.f;  // 0: greedy
  float top_p = 1.f;        // 1: no nucleus filtering
  std::uint64_t seed = 0;

  void validate(const char* where) const {
    CUMO_CHECK(std::isfinite(temperature) && temperature >= 0.f, where, ": temperature must be >= 0, got ", temperature);
    CUMO_CHECK(top_p > 0.f && top_p <= 1.f, where, ": top_p must be in (0, 1], got ", top_p);
  }
};

class TokenSampler {
 public:
  explicit TokenSampler(const SamplingOptions& o) : o_(o), rng_(o.seed) { o.validate("TokenSampler"); }

  bool greedy() const { return o_.temperature == 0.f; }

  // The next token id from z[0..V).
  std::int64_t next(const float* z, std::int64_t V) {
    CUMO_CHECK(V > 0, "TokenSampler: empty logits row");
    if (greedy()) return std::int64_t(std::max_element(z, z + V) - z);
    const double zmax = *std::max_element(z, z + V);
    probs_.resize(std::size_t(V));
    double sum = 0;
    for (std::int64_t i = 0; i < V; ++i) sum += probs_[i] = std::exp((double(z[i]) - zmax) / o_.temperature);
    order_.resize(std::size_t(V));
    std::iota(order_.begin(), order_.end(), std::int64_t(0));
    // descending probability, lower id first among equals: the draw is reproducible across standard libraries
    std::sort(order_.begin(), order_.end(), [&](std::int64_t a, std::int64_t b) {
      return probs_[a] != probs_[b] ? probs_[a] > probs_[b] : a < b;
    });
    std::size_t keep = 0;
    double kept = 0;
    while (keep < order_.size() && (keep == 0 || kept < o_.top_p * sum)) kept += probs_[order_[keep++]];
    double u = double(rng_.uniform()) * kept;
    for (std::size_t i = 0; i < keep; ++i) {
      u -= probs_[order_[i]];
      if (u < 0) return order_[i];
    }
    return order_[keep - 1];  // u rounded to the very top of the range
  }

 private:
  SamplingOptions o_;
  Rng rng_;
  std::vector<double> probs_;
  std::vector<std::int64_t> order_;
};

}  // namespace cumo::nn
