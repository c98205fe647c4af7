// Central-difference gradient checks of every nn layer's backward (see nn_test_util.hpp for the error budget).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <tuple>

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

// An attention layer's parameters, collected into p and drawn at scale 0.4.
ParameterList random_parameters(nn::Attention<>& a, Rng& rng) {
  ParameterList p;
  a.collect(p);
  randomize(p, rng, 0.4f);
  return p;
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
  const ParameterList p = random_parameters(a, rng);
  check_layer(p, random_tensor({2 * 5, 12}, rng), [&](const Tensor& x) { return a.forward(x, 2, 5); },
              [&](const Tensor& d) { return a.backward(d); }, rng);
}

TEST_CASE("nn gradcheck: causal GQA attention with RoPE, q/k/v biases and a padding mask") {
  Rng rng(5);
  nn::Attention<> a("self_attn", nn::AttentionConfig{16, 4, 2, 6, true, false, true, 10000.0, "o_proj"});
  const ParameterList p = random_parameters(a, rng);
  const std::vector<std::uint8_t> valid{0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};  // left pad in seq 0, right pad in seq 1
  check_layer(p, random_tensor({2 * 6, 16}, rng), [&](const Tensor& x) { return a.forward(x, 2, 6, &valid); },
              [&](const Tensor& d) { return a.backward(d); }, rng);
}

TEST_CASE("nn gradcheck: causal attention with the queries of the last rows only (first_query > 0)") {
  // Rows t >= 4 of each sequence are queries, every row a key: the output is (B*(T − 4), hidden) and the input's
  // gradient reaches the earlier rows through the keys and values only.
  Rng rng(25);
  nn::Attention<> a("self_attn", nn::AttentionConfig{16, 4, 2, 6, true, false, true, 10000.0, "o_proj"});
  const ParameterList p = random_parameters(a, rng);
  const std::vector<std::uint8_t> valid{0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0};  // left pad, right pad
  const auto layout = nn::TokenLayout::make(backend::Cpu{}, 2, 7, &valid);
  const Tensor x = random_tensor({2 * 7, 16}, rng);
  CHECK(a.forward(x, layout, 4).shape() == Shape{2 * 3, 16});
  check_layer(p, x, [&](const Tensor& in) { return a.forward(in, layout, 4); },
              [&](const Tensor& d) { return a.backward(d); }, rng);
  // The rows computed are the full layer's rows t >= 4 (the same math; GEMMs over fewer rows may round apart).
  const Tensor full = a.forward(x, layout).clone(), last = a.forward(x, layout, 4);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t t = 4; t < 7; ++t)
      for (std::int64_t j = 0; j < 16; ++j)
        CHECK(last.at<float>(b * 3 + t - 4, j) == doctest::Approx(full.at<float>(b * 7 + t, j)).epsilon(1e-5));
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

TEST_CASE("nn gradcheck: DecoderLM with LogitRows::loss (the last layer and the head from the first target row "
          "on) gives the loss and gradients of every row's logits") {
  for (const std::string kind : {"mistral", "qwen2", "mixtral"}) {
    CAPTURE(kind);
    Rng rng(27);
    nn::DecoderConfig c;
    c.model_type = kind;
    c.vocab = 11, c.hidden = 8, c.layers = 2, c.heads = 2, c.kv_heads = 1, c.head_dim = 4, c.ffn = 12;
    c.qkv_bias = c.tie_embeddings = kind == "qwen2";
    if (kind == "mixtral") c.experts = 4, c.top_k = 2, c.aux_coef = 0.5;
    nn::DecoderLM<> m(c);
    const auto params = m.parameters();
    randomize(params, rng, 0.5f);
    // Targets from row 4 of sequence 0 and row 5 of sequence 1 on (labels shifted by one); sequence 1 right-padded.
    const std::vector<std::int64_t> ids{1, 5, 7, 2, 10, 0, 3, 3, 9, 4, 6, 8, 2, 1, 0, 5};
    std::vector<std::int64_t> labels(ids.size(), -100);
    for (std::size_t t : {5u, 6u, 7u, 14u}) labels[t] = ids[t];
    const std::vector<std::uint8_t> valid{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0};

    auto run = [&](nn::DecoderLM<>::LogitRows rows, std::vector<Tensor>* grads) {
      m.set_logit_rows(rows);
      zero_grad(params);
      const auto out = m.forward(ids, 2, 8, &labels, &valid);
      m.backward_all();
      if (grads)
        for (Parameter* p : params) grads->push_back(p->grad.clone());
      return out;
    };
    std::vector<Tensor> g_all, g_loss;
    const auto all = run(nn::DecoderLM<>::LogitRows::all, &g_all);
    const auto out = run(nn::DecoderLM<>::LogitRows::loss, &g_loss);
    // A sparse last layer keeps every row (its router's aux loss counts them all).
    const std::int64_t from = c.experts > 0 ? 0 : 4;
    CHECK(out.logits_from == from);
    CHECK(out.logits.shape() == Shape{2 * (8 - from), 11});
    CHECK(all.logits_from == 0);
    CHECK(out.targets == all.targets);
    CHECK(out.loss == doctest::Approx(all.loss).epsilon(1e-6));
    for (std::size_t i = 0; i < params.size(); ++i) {
      CAPTURE(params[i]->name);
      double num = 0, den = 0;
      for (std::int64_t j = 0; j < g_all[i].numel(); ++j) {
        const double d = double(g_loss[i].data<float>()[j]) - g_all[i].data<float>()[j];
        num += d * d;
        den += double(g_all[i].data<float>()[j]) * g_all[i].data<float>()[j];
      }
      CHECK(std::sqrt(num) <= 1e-5 * std::max(1.0, std::sqrt(den)));
    }
    // And against finite differences of the loss itself, where the mode skips rows (Mixtral's runs every row, the
    // path the test above checks; its top-2 routing flips under these perturbations, which differences cannot follow).
    if (from == 0) continue;
    run(nn::DecoderLM<>::LogitRows::loss, nullptr);
    gradcheck(targets_of(params), [&] { return m.forward(ids, 2, 8, &labels, &valid).loss; });
  }
}

TEST_CASE("CLIP tower, top_read = false: the unread top layer runs its routing only, with the same features, aux "
          "losses, loads and gradients") {
  // Layers 0-1 give the features (feature_layer -2), layer 2 runs for its aux losses only (training).
  auto same = [](const Tensor& a, const Tensor& b) {  // == per element: a signed zero may differ, nothing else
    REQUIRE(a.shape() == b.shape());
    for (std::int64_t i = 0; i < a.numel(); ++i)
      if (!(a.data<float>()[i] == b.data<float>()[i])) return false;
    return true;
  };
  nn::VisionConfig c;
  c.hidden = 8, c.layers = 3, c.heads = 2, c.ffn = 16, c.image_size = 8, c.patch_size = 4;
  for (bool sparse_top : {true, false}) {
    CAPTURE(sparse_top);
    Rng rng(29);
    nn::ClipVision<> m(c);
    for (std::size_t l = 0; l < 3; ++l)
      if (sparse_top || l < 2) m.layers[l].mlp.upcycle(4, 2, rng);
    const auto params = m.parameters();
    randomize(params, rng);
    const Tensor px = random_tensor({2, 3, 8, 8}, rng);
    const AuxLossWeights aux{0.1f, 0.01f};
    auto run = [&](bool top_read, std::vector<Tensor>& grads) {
      zero_grad(params);
      const auto out = m.forward(px, /*all_layers=*/true, /*keep_activations=*/true, top_read);
      const Tensor features = out.features.clone();
      const auto losses = m.aux_losses();
      const auto loads = m.loads();
      m.backward(features, aux);  // any gradient on the features
      for (Parameter* p : params) grads.push_back(p->grad.clone());
      return std::tuple{features, losses, loads, out.hidden_states.size()};
    };
    std::vector<Tensor> g_read, g_unread;
    const auto [f_read, aux_read, load_read, hs_read] = run(true, g_read);
    const auto [f_unread, aux_unread, load_unread, hs_unread] = run(false, g_unread);
    CHECK(hs_read == 4);
    CHECK(hs_unread == 3);  // the top layer's output was not computed
    CHECK(same(f_unread, f_read));
    REQUIRE(aux_unread.size() == aux_read.size());
    CHECK(aux_read.size() == (sparse_top ? 3u : 2u));
    for (std::size_t l = 0; l < aux_read.size(); ++l) {
      CHECK(same(aux_unread[l].balance_top1, aux_read[l].balance_top1));
      CHECK(same(aux_unread[l].z, aux_read[l].z));
      CHECK(load_unread[l].tokens == load_read[l].tokens);
    }
    for (std::size_t i = 0; i < params.size(); ++i) {
      CAPTURE(params[i]->name);
      CHECK(same(g_unread[i], g_read[i]));
    }
  }
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
