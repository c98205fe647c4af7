// Central-difference gradient checks of every nn layer's backward (see nn_test_util.hpp for the error budget).
#include <doctest/doctest.h>

#include "cumo/nn.hpp"
#include "nn_test_util.hpp"

using namespace cumo;
using namespace cumo::test;

namespace {

// A layer with forward(x) → y and backward(dy) → dx: checks d(Σ y·R)/d params and d/dx.
template <class Fwd, class Bwd>
void check_layer(const ParameterList& params, Tensor x, Fwd fwd, Bwd bwd, Rng& rng, bool check_input = true) {
  zero_grad(params);
  const Tensor y0 = fwd(x);
  const Tensor R = random_tensor(y0.shape(), rng);
  const Tensor dx = bwd(R);
  auto targets = targets_of(params);
  if (check_input) targets.push_back({"input", x, dx});
  gradcheck(targets, [&] { return dot(fwd(x), R); });
}

}  // namespace

TEST_CASE("nn gradcheck: Linear with and without bias") {
  Rng rng(1);
  for (bool bias : {true, false}) {
    nn::Linear<> l("lin", 6, 5, bias);
    ParameterList p;
    l.collect(p);
    randomize(p, rng);
    check_layer(p, random_tensor({7, 6}, rng), [&](const Tensor& x) { return l.forward(x); },
                [&](const Tensor& d) { return l.backward(d); }, rng);
  }
}

TEST_CASE("nn gradcheck: LayerNorm and RMSNorm") {
  Rng rng(2);
  nn::LayerNorm<> ln("ln", 9, 1e-5);
  ParameterList p;
  ln.collect(p);
  randomize(p, rng);
  check_layer(p, random_tensor({5, 9}, rng), [&](const Tensor& x) { return ln.forward(x); },
              [&](const Tensor& d) { return ln.backward(d); }, rng);
  nn::RMSNorm<> rms("norm", 9, 1e-6);
  ParameterList q;
  rms.collect(q);
  randomize(q, rng);
  check_layer(q, random_tensor({5, 9}, rng), [&](const Tensor& x) { return rms.forward(x); },
              [&](const Tensor& d) { return rms.backward(d); }, rng);
}

TEST_CASE("nn gradcheck: Embedding scatters into the rows it read, repeated ids accumulate") {
  Rng rng(3);
  nn::Embedding<> e("embed_tokens", 11, 4);
  ParameterList p;
  e.collect(p);
  randomize(p, rng);
  const std::vector<std::int64_t> ids{3, 0, 3, 10, 7, 3};
  zero_grad(p);
  const Tensor R = random_tensor({6, 4}, rng);
  e.forward(ids);
  e.backward(R);
  gradcheck(targets_of(p), [&] { return dot(e.forward(ids), R); }, 44);
}

TEST_CASE("nn gradcheck: bidirectional attention with biases (CLIP)") {
  Rng rng(4);
  nn::Attention<> a("attn", nn::AttentionConfig{12, 3, 3, 0, true, true, false, 0.0, "out_proj"});
  ParameterList p;
  a.collect(p);
  randomize(p, rng, 0.4f);
  check_layer(p, random_tensor({2 * 5, 12}, rng), [&](const Tensor& x) { return a.forward(x, 2, 5); },
              [&](const Tensor& d) { return a.backward(d); }, rng);
}

TEST_CASE("nn gradcheck: causal GQA attention with RoPE, q/k/v biases and a padding mask") {
  Rng rng(5);
  nn::Attention<> a("self_attn", nn::AttentionConfig{16, 4, 2, 6, true, false, true, 10000.0, "o_proj"});
  ParameterList p;
  a.collect(p);
  randomize(p, rng, 0.4f);
  const std::vector<std::uint8_t> valid{0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};  // left pad in seq 0, right pad in seq 1
  check_layer(p, random_tensor({2 * 6, 16}, rng), [&](const Tensor& x) { return a.forward(x, 2, 6, &valid); },
              [&](const Tensor& d) { return a.backward(d); }, rng);
}

TEST_CASE("nn gradcheck: dense MLP (quick_gelu), SwiGLU MLP, and the sparse FeedForward slot") {
  Rng rng(6);
  nn::DenseMLP<QuickGELU> m("mlp", 8, 16);
  ParameterList p;
  m.collect(p);
  randomize(p, rng);
  check_layer(p, random_tensor({6, 8}, rng), [&](const Tensor& x) { return m.forward(x); },
              [&](const Tensor& d) { return m.backward(d); }, rng);

  nn::DenseGatedMLP<SiLU> g("mlp", 8, 12);
  ParameterList q;
  g.collect(q);
  randomize(q, rng);
  check_layer(q, random_tensor({6, 8}, rng), [&](const Tensor& x) { return g.forward(x); },
              [&](const Tensor& d) { return g.backward(d); }, rng);

  // upcycled: the slot keeps the dense MLP's function (weights sum to 1), then its backward is checked
  nn::VisionFFN<> ffn("mlp", nn::DenseMLP<QuickGELU>("mlp", 8, 16));
  ParameterList d;
  ffn.collect(d);
  randomize(d, rng);
  const Tensor x = random_tensor({10, 8}, rng);
  const Tensor dense_y = ffn.forward(x);
  ffn.upcycle(4, 2, rng);
  CHECK(ffn.is_sparse());
  CHECK(rel_error(ffn.forward(x), dense_y) < 1e-6);
  ParameterList s;
  ffn.collect(s);
  CHECK(s.back()->name == "mlp.gate.weight");
  randomize(s, rng);  // distinct experts, so routing matters
  check_layer(s, x, [&](const Tensor& in) { return ffn.forward(in); }, [&](const Tensor& dd) { return ffn.backward(dd); },
              rng);
}

TEST_CASE("nn gradcheck: RoPE's backward is its inverse rotation") {
  Rng rng(7);
  nn::RotaryEmbedding rope(8, 10000.0);
  const Tensor x = random_tensor({5, 16}, rng);
  Tensor y = x.clone();
  const std::vector<std::int64_t> pos{0, 3, 7, 100, 4095};
  rope.rotate(y, 2, pos);
  CHECK(rel_error(y, x) > 1e-2);
  rope.rotate(y, 2, pos, /*inverse=*/true);
  CHECK(rel_error(y, x) < 1e-6);
}

TEST_CASE("nn gradcheck: CLIP vision tower, features to pixels and every parameter") {
  Rng rng(8);
  nn::VisionConfig c;
  c.hidden = 8;
  c.layers = 3;
  c.heads = 2;
  c.ffn = 16;
  c.image_size = 8;
  c.patch_size = 4;
  nn::ClipVision<> m(c);
  const auto params = m.parameters();
  randomize(params, rng);
  const Tensor px = random_tensor({2, 3, 8, 8}, rng);
  zero_grad(params);
  const auto out = m.forward(px);
  const Tensor R = random_tensor(out.features.shape(), rng);
  m.backward(R);
  const Tensor dpx = m.input_grad();
  auto t = targets_of(params);
  t.push_back({"pixel_values", px, dpx});
  gradcheck(t, [&] { return dot(m.forward(px).features, R); });
}

TEST_CASE("nn gradcheck: decoder LMs (Mistral, Qwen2 tied + biases, Mixtral with the cross-layer aux loss)") {
  for (const char* kind : {"mistral", "qwen2", "mixtral"}) {
    CAPTURE(kind);
    Rng rng(9);
    nn::DecoderConfig c;
    c.model_type = kind;
    c.vocab = 13;
    c.hidden = 8;
    c.layers = 2;
    c.heads = 2;
    c.kv_heads = 1;
    c.head_dim = 4;
    c.ffn = 12;
    c.qkv_bias = std::string(kind) == "qwen2";
    c.tie_embeddings = c.qkv_bias;
    if (std::string(kind) == "mixtral") {
      c.experts = 4;
      c.top_k = 2;
      c.aux_coef = 0.5;  // large, so the aux gradient is visible in the check
    }
    nn::DecoderLM<> m(c);
    const auto params = m.parameters();
    randomize(params, rng, 0.5f);
    const std::vector<std::int64_t> ids{1, 5, 7, 2, 12, 0, 3, 3, 9, 4};
    const std::vector<std::int64_t> labels{-100, 5, 7, 2, 12, -100, -100, 3, 9, 4};
    zero_grad(params);
    m.forward(ids, 2, 5, &labels);
    m.backward_all();
    gradcheck(targets_of(params), [&] { return m.forward(ids, 2, 5, &labels).loss; });
  }
}

TEST_CASE("nn gradcheck: the LM head's backward over the supervised rows only (a few answer tokens per sequence)") {
  // 4 of 16 rows have a target, so DecoderLM::backward takes the compacted head backward (head_backward_targets);
  // its gradients must still be the whole loss's.
  Rng rng(19);
  nn::DecoderConfig c;
  c.model_type = "mistral";
  c.vocab = 11, c.hidden = 8, c.layers = 1, c.heads = 2, c.kv_heads = 1, c.head_dim = 4, c.ffn = 12;
  nn::DecoderLM<> m(c);
  const auto params = m.parameters();
  randomize(params, rng, 0.5f);
  const std::vector<std::int64_t> ids{1, 5, 7, 2, 10, 0, 3, 3, 9, 4, 6, 8, 2, 1, 0, 5};
  std::vector<std::int64_t> labels(ids.size(), -100);
  for (std::size_t t : {6u, 7u, 13u, 14u}) labels[t] = ids[t];  // the last answer tokens of each sequence
  zero_grad(params);
  const auto out = m.forward(ids, 2, 8, &labels);
  CHECK(out.targets == 4);
  const Tensor dx = m.backward();
  for (std::int64_t r : {0, 1, 2, 3}) CHECK(dx.at<float>(r, 0) != 0.f);  // every row still gets its gradient
  m.backward_embeddings(dx);
  gradcheck(targets_of(params), [&] { return m.forward(ids, 2, 8, &labels).loss; });
}

TEST_CASE("nn gradcheck: connector and the LLaVA composition") {
  Rng rng(10);
  nn::LlavaConfig c;
  c.vision.hidden = 8;
  c.vision.layers = 2;
  c.vision.heads = 2;
  c.vision.ffn = 16;
  c.vision.image_size = 8;
  c.vision.patch_size = 4;
  c.text.vocab = 11;
  c.text.hidden = 8;
  c.text.layers = 1;
  c.text.heads = 2;
  c.text.kv_heads = 1;
  c.text.head_dim = 4;
  c.text.ffn = 12;
  c.image_token_id = 10;
  nn::Llava<> m(c);
  const auto params = m.parameters();
  randomize(params, rng, 0.5f);
  const Tensor px = random_tensor({1, 3, 8, 8}, rng);
  const std::vector<std::int64_t> ids{1, 10, 10, 10, 10, 4, 5, 6};
  const std::vector<std::int64_t> labels{-100, -100, -100, -100, -100, 4, 5, 6};
  zero_grad(params);
  m.forward(ids, 1, 8, px, &labels);
  m.backward();
  gradcheck(targets_of(params), [&] { return m.forward(ids, 1, 8, px, &labels).loss; });
}
