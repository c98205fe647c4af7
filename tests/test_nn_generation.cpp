// Generation with the KV cache computes exactly what a full causal forward computes.
#include <doctest/doctest.h>

#include <cmath>
#include <set>
#include <vector>

#include "cumo/nn.hpp"
#include "nn_test_util.hpp"

using namespace cumo;

TEST_CASE("nn generation: prefill + token-by-token decoding with the KV cache equals the full forward") {
  Rng rng(11);
  nn::DecoderConfig c;
  c.vocab = 17;
  c.hidden = 16;
  c.layers = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 4;
  c.ffn = 24;
  c.qkv_bias = true;
  nn::DecoderLM<> m(c);
  test::randomize(m.parameters(), rng, 0.4f);
  const std::int64_t B = 2, T = 7, prefill = 3;
  std::vector<std::int64_t> ids(B * T);
  for (auto& i : ids) i = std::int64_t(rng.next_u32() % 17);
  const Tensor full = m.forward(ids, B, T).logits;  // (B*T, V)

  auto cache = m.make_cache(B, T);
  std::vector<std::int64_t> first;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < prefill; ++t) first.push_back(ids[std::size_t(b * T + t)]);
  const Tensor pre = m.forward_cached(first, B, prefill, cache);
  for (std::int64_t b = 0; b < B; ++b)
    CHECK(rel_error(pre.slice(0, b * prefill, (b + 1) * prefill), full.slice(0, b * T, b * T + prefill)) < 1e-5);
  for (std::int64_t t = prefill; t < T; ++t) {
    const std::vector<std::int64_t> step{ids[std::size_t(t)], ids[std::size_t(T + t)]};
    const Tensor lg = m.forward_cached(step, B, 1, cache);
    for (std::int64_t b = 0; b < B; ++b) {
      CAPTURE(t);
      CHECK(rel_error(lg.slice(0, b, b + 1), full.slice(0, b * T + t, b * T + t + 1)) < 1e-5);
    }
  }
  CHECK(cache[0].len == T);
}

TEST_CASE("nn sampling: greedy is the argmax; temperature sampling follows softmax(z/T); top-p keeps the nucleus") {
  const std::vector<float> z{1.0f, 3.0f, 2.0f, -1.0f, 3.0f};  // a tie at 1 and 4: greedy takes the lower id
  nn::TokenSampler greedy(nn::SamplingOptions{});
  CHECK(greedy.next(z.data(), 5) == 1);

  // frequencies of 200k draws at T = 2 against softmax(z / 2): 5 standard errors at most (about 0.005)
  const float T = 2.f;
  nn::TokenSampler s(nn::SamplingOptions{T, 1.f, 42});
  std::vector<double> want(5), got(5, 0.0);
  double sum = 0;
  for (int i = 0; i < 5; ++i) sum += want[i] = std::exp(z[i] / T);
  const int n = 200000;
  for (int k = 0; k < n; ++k) got[std::size_t(s.next(z.data(), 5))] += 1.0 / n;
  for (int i = 0; i < 5; ++i) {
    const double p = want[i] / sum, se = std::sqrt(p * (1 - p) / n);
    CAPTURE(i);
    CHECK(std::abs(got[i] - p) < 5 * se + 1e-12);
  }

  // top-p: probabilities at T = 1 are 0.0537, 0.3966, 0.1459, 0.0073, 0.3966 (sorted: ids 1, 4, 2, 0, 3).
  // top_p 0.5 keeps {1, 4} (0.3966 < 0.5 before id 4, 0.7932 ≥ 0.5 before id 2); top_p 0.3 keeps {1} alone.
  nn::TokenSampler half(nn::SamplingOptions{1.f, 0.5f, 7});
  std::set<std::int64_t> seen;
  for (int k = 0; k < 2000; ++k) seen.insert(half.next(z.data(), 5));
  CHECK(seen == std::set<std::int64_t>{1, 4});
  nn::TokenSampler tiny(nn::SamplingOptions{1.f, 0.3f, 7});
  for (int k = 0; k < 100; ++k) CHECK(tiny.next(z.data(), 5) == 1);

  // the same seed draws the same tokens
  nn::TokenSampler a(nn::SamplingOptions{0.8f, 0.9f, 5}), b(nn::SamplingOptions{0.8f, 0.9f, 5});
  for (int k = 0; k < 50; ++k) CHECK(a.next(z.data(), 5) == b.next(z.data(), 5));

  CHECK_THROWS_AS(nn::TokenSampler(nn::SamplingOptions{-1.f, 1.f, 0}), Error);
  CHECK_THROWS_AS(nn::TokenSampler(nn::SamplingOptions{1.f, 0.f, 0}), Error);
  CHECK_THROWS_AS(nn::TokenSampler(nn::SamplingOptions{1.f, 1.5f, 0}), Error);
}
