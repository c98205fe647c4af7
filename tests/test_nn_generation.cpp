// Generation with the KV cache computes exactly what a full causal forward computes.
#include <doctest/doctest.h>

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
