// models::CuMo: parity with the PyTorch fixture (kind `cumo`), the upcycling invariant, the from-scratch ablation,
// finite-difference gradients of the whole model's total loss (every part, routers included), KV-cached greedy
// generation against the full forward, stage-1 freezing through the parameter lists, and checkpoint round trips.
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "../tools/parity/cumo.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/models/cumo_release.hpp"
#include "cumo/models/llava_mod.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo_test_config.hpp"
#include "nn_test_util.hpp"

using namespace cumo;
using cumo::test::gradcheck;
using cumo::test::random_tensor;
using cumo::test::randomize;

namespace {

// A tiny CuMo: CLIP 2 layers (width 8, 4 patches + CLS per image), connector 8 → 12, Mistral 1 layer of width 12.
models::CuMoConfig tiny_config() { return test::tiny_cumo_config(); }

// Two sequences of 9 tokens, each with one image (4 image tokens) at positions 1..4; labels on the text after it.
struct Batch {
  std::vector<std::int64_t> ids{1, 12, 12, 12, 12, 4, 5, 6, 7, 2, 12, 12, 12, 12, 8, 3, 9, 1};
  std::vector<std::int64_t> labels{-100, -100, -100, -100, -100, 4, 5, 6, 7, -100, -100, -100, -100, -100, 8, 3, 9, 1};
  std::int64_t B = 2, T = 9;
  Tensor px;
  explicit Batch(Rng& rng) : px(random_tensor({2, 3, 8, 8}, rng)) {}
};

const std::string kFixture = std::string(CUMO_FIXTURE_DIR) + "/cumo_e4_k2_v32_t32.safetensors";

}  // namespace

TEST_CASE("models cumo: parity with the PyTorch CuMo fixture (outputs, every bzloss term, every grad, AdamW steps)") {
  const auto f = io::SafeTensors::open(kFixture);
  REQUIRE(f.metadata().at("kind") == "cumo");
  parity::Report r;
  parity::run_cumo(f, nlohmann::json::parse(f.metadata().at("config")), r);
  CHECK(r.failed == 0);
  CHECK(r.passed > 60);
}

TEST_CASE("models cumo: config JSON — the fixture's nested form, a plain LlavaConfig, and to_json round trip") {
  const auto f = io::SafeTensors::open(kFixture);
  const auto j = nlohmann::json::parse(f.metadata().at("config"));
  const auto c = models::CuMoConfig::from_json(j);
  CHECK(c.experts == 4);
  CHECK(c.top_k == 2);
  CHECK(c.balance_coef == doctest::Approx(0.1));
  CHECK(c.z_coef == doctest::Approx(0.01));
  CHECK(c.llava.vision.hidden == 32);
  CHECK(c.llava.text.vocab == 97);
  CHECK(c.llava.image_token_id == 96);
  const auto plain = models::CuMoConfig::from_json(j.at("llava"));
  CHECK(plain.llava.text.ffn == 72);
  const auto back = models::CuMoConfig::from_json(c.to_json());
  CHECK(back.to_json() == c.to_json());
  CHECK(back.llava.text.kv_heads == 2);
  CHECK(back.llava.vision.feature_layer == -2);
  CHECK_THROWS_AS(models::CuMoConfig::from_json(nlohmann::json{{"experts", 4}}), Error);
}

TEST_CASE("models cumo: upcycling with exact copies keeps the dense logits; from-scratch experts do not") {
  Rng rng(3);
  Batch b(rng);
  models::CuMo<> m(tiny_config());
  randomize(m.parameters(), rng, 0.4f);
  CHECK_FALSE(m.vision_is_sparse());
  CHECK_FALSE(m.connector_is_sparse());
  const auto dense = m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  CHECK(dense.vision_balance == 0);
  CHECK(dense.vision_load.empty());
  CHECK(dense.total == doctest::Approx(dense.ce));
  const Tensor dense_logits = dense.logits.clone();
  const std::size_t dense_count = m.parameters().size();

  models::CuMo<> scratch = m;  // same dense weights, upcycled with random experts below
  Rng up(7);
  m.upcycle(up);
  CHECK(m.vision_is_sparse());
  CHECK(m.connector_is_sparse());
  // each dense MLP (4 tensors) becomes fused experts (4 tensors) + a router
  CHECK(m.parameters().size() == dense_count + 2 + 1);
  const auto sparse = m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  CHECK(rel_error(sparse.logits, dense_logits) <= 1e-5);
  CHECK(sparse.ce == doctest::Approx(dense.ce).epsilon(1e-5));
  REQUIRE(sparse.vision_balance_per_layer.size() == 2);
  REQUIRE(sparse.vision_load.size() == 2);
  for (const auto& l : sparse.vision_load) {
    std::int64_t s = 0;
    for (auto t : l.tokens) s += t;
    CHECK(s == 2 * 5 * 2);  // images × (patches + CLS) × k
  }
  CHECK(sparse.vision_balance > 0);
  CHECK(sparse.projector_z > 0);
  CHECK(sparse.total == doctest::Approx(sparse.ce + 0.1 * (sparse.vision_balance + sparse.projector_balance) +
                                        0.01 * (sparse.vision_z + sparse.projector_z)));

  Rng up2(7);
  scratch.upcycle(up2, true, true, /*from_scratch=*/true);
  const auto s2 = scratch.forward(b.ids, b.B, b.T, b.px, &b.labels);
  CHECK(rel_error(s2.logits, dense_logits) > 1e-2);

  // upcycling only one part
  models::CuMo<> only_vision(tiny_config());
  Rng r3(1);
  only_vision.upcycle(r3, true, false);
  CHECK(only_vision.vision_is_sparse());
  CHECK_FALSE(only_vision.connector_is_sparse());
}

TEST_CASE("models cumo: parameter_count() from the sizes alone equals the built model's, dense and upcycled") {
  // What the trainer's memory check (tools/app/footprint.hpp) and cumo_parity's size check rely on.
  auto built = [](models::CuMo<>& m) { return double(models::parameter_count(m.parameters())); };
  for (const bool s2 : {false, true}) {
    models::CuMoConfig c = tiny_config();
    c.llava.vision.s2 = s2;
    CAPTURE(s2);
    models::CuMo<> m(c);
    CHECK(c.parameter_count() == built(m));
    Rng rng(1);
    m.upcycle(rng, /*vision=*/true, /*connector=*/false);
    CHECK(c.parameter_count(true, false) == built(m));
    m.upcycle(rng, /*vision=*/false, /*connector=*/true);
    CHECK(c.parameter_count(true, true) == built(m));
    CHECK(c.parameter_count(true, true) > c.parameter_count());
  }
  // tied embeddings and QKV biases (Qwen-style) change the decoder's count the way the built decoder does
  models::CuMoConfig c = tiny_config();
  c.llava.text.tie_embeddings = true;
  c.llava.text.qkv_bias = true;
  models::CuMo<> tied(c);
  CHECK(c.parameter_count() == built(tied));
}

TEST_CASE("models cumo: finite differences of the total loss (CE + bzloss) w.r.t. every part, routers included") {
  Rng rng(21);
  Batch b(rng);
  models::CuMo<> m(tiny_config());
  randomize(m.parameters(), rng, 0.4f);
  Rng up(5);
  m.upcycle(up);
  const ParameterList params = m.parameters();
  // routers a little sharper than PyTorch's init so the aux losses carry real gradient
  for (Parameter* p : params)
    if (p->name.ends_with(".gate.weight")) rng.fill_normal(p->value, 0.f, 0.8f);
  zero_grad(params);
  const auto base = m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  m.backward();

  // Routing must not change under the ±h perturbations (top-k is piecewise constant; a flip would be a jump, not a
  // gradient): record every block's choices and require the same choices at every evaluation.
  auto routing = [&] {
    std::vector<std::int32_t> r;
    auto add = [&](const Tensor& idx) { r.insert(r.end(), idx.data<std::int32_t>(), idx.data<std::int32_t>() + idx.numel()); };
    for (auto& l : m.llava().vision_tower.layers) add(l.mlp.sparse().router_output().topk_idx);
    add(m.llava().projector.mlp.sparse().router_output().topk_idx);
    return r;
  };
  m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  const auto want_routing = routing();
  int flips = 0;
  auto objective = [&] {
    const double t = m.forward(b.ids, b.B, b.T, b.px, &b.labels).total;
    flips += routing() != want_routing;
    return t;
  };
  CHECK(base.vision_balance > 0);

  // the last CLIP layer's output is unused: only its router's aux losses reach it (attention, norms, router)
  std::vector<test::GradTarget> targets;
  std::set<std::string> seen_parts;
  for (Parameter* p : params) {
    const std::string& n = p->name;
    if (n.find("post_layernorm") != std::string::npos) continue;  // no gradient by construction (checked below)
    if (n.find("layers.1.mlp.experts") != std::string::npos) continue;  // idem
    targets.push_back({n, p->value, p->grad});
  }
  gradcheck(targets, objective, 6, 2e-3, 1e-2);
  CHECK(flips == 0);

  for (Parameter* p : params) {
    const std::string& n = p->name;
    if (n.find("post_layernorm") != std::string::npos || n.find("layers.1.mlp.experts") != std::string::npos) {
      CAPTURE(n);
      CHECK(test::dot(p->grad, p->grad) == 0.0);
    }
    if (n == "model.vision_tower.encoder.layers.1.mlp.gate.weight" ||
        n == "model.vision_tower.encoder.layers.1.self_attn.q_proj.weight") {
      CAPTURE(n);
      CHECK(test::dot(p->grad, p->grad) > 0.0);  // the last layer's aux losses do reach it
    }
  }
}

TEST_CASE("models cumo: greedy generation with the KV cache equals the argmax of the full forward, step by step") {
  Rng rng(8);
  models::CuMo<> m(tiny_config());
  randomize(m.parameters(), rng, 0.6f);
  Rng up(2);
  m.upcycle(up);
  const Tensor px = random_tensor({1, 3, 8, 8}, rng);
  const std::vector<std::int64_t> prompt{1, 12, 12, 12, 12, 4, 5};
  const std::int64_t max_new = 6;
  const auto gen = m.generate(prompt, px, max_new, /*eos_id=*/-1);
  REQUIRE(gen.size() == std::size_t(max_new));
  std::vector<std::int64_t> seq = prompt;
  for (std::int64_t s = 0; s < max_new; ++s) {
    const std::int64_t T = std::int64_t(seq.size());
    const auto out = m.forward(seq, 1, T, px, nullptr, nullptr, /*training=*/false);
    const float* z = out.logits.data<float>() + (T - 1) * 13;
    const std::int64_t best = std::int64_t(std::max_element(z, z + 13) - z);
    CAPTURE(s);
    CHECK(gen[std::size_t(s)] == best);
    seq.push_back(gen[std::size_t(s)]);
  }
  // a single image token is expanded to one per patch
  const auto gen1 = m.generate({1, 12, 4, 5}, px, max_new, -1);
  CHECK(gen1 == gen);
  // stops at eos (included)
  const auto stop = m.generate(prompt, px, max_new, gen[2]);
  CHECK(stop.size() <= 3);
  CHECK(stop.back() == gen[2]);
  CHECK_THROWS_AS(m.generate({1, 12, 12, 4}, px, 2, -1), Error);  // 2 image tokens for 4 patches
}

TEST_CASE("models cumo: sincos vision positions — MAE's 2-D table, CLS row 0, every other draw unchanged") {
  // tiny config: H 8, 2x2 grid → Q = 2 frequencies ω = 1, 0.01 per axis.
  const models::CuMoConfig c = tiny_config();
  models::CuMo<> plain(c), sincos(c);
  Rng r1(9), r2(9);
  plain.reset_parameters(r1);
  sincos.reset_parameters(r2, models::CuMoInit{.sincos_vision_positions = true});
  const Tensor& pos = sincos.llava().vision_tower.position_embedding.value;  // (5, 8)
  REQUIRE(pos.size(0) == 5);
  REQUIRE(pos.size(1) == 8);
  const float* d = pos.data<float>();
  for (int h = 0; h < 8; ++h) CHECK(d[h] == 0.f);  // CLS
  const double w[2] = {1.0, 0.01};
  for (int gy = 0; gy < 2; ++gy)
    for (int gx = 0; gx < 2; ++gx) {
      const float* row = d + (1 + gy * 2 + gx) * 8;
      for (int i = 0; i < 2; ++i) {
        CAPTURE(gy);
        CAPTURE(gx);
        CAPTURE(i);
        CHECK(row[i] == doctest::Approx(std::sin(gx * w[i])));
        CHECK(row[2 + i] == doctest::Approx(std::cos(gx * w[i])));
        CHECK(row[4 + i] == doctest::Approx(std::sin(gy * w[i])));
        CHECK(row[6 + i] == doctest::Approx(std::cos(gy * w[i])));
      }
    }
  // distinct patches get distinct rows (the point of the table)
  CHECK(rel_error(pos.select(0, 1).contiguous(), pos.select(0, 2).contiguous()) > 0.1);
  const ParameterList a = plain.parameters(), b = sincos.parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    CAPTURE(a[i]->name);
    if (a[i]->name.ends_with("embeddings.position_embedding.weight")) continue;
    CHECK(bitwise_equal(a[i]->value, b[i]->value));
  }
  // H not a multiple of 4 is refused by name
  Tensor odd = Tensor::zeros({5, 6});
  CHECK_THROWS_WITH_AS(nn::fill_sincos_positions(odd, 2), doctest::Contains("multiple of 4"), Error);
  Tensor wrong = Tensor::zeros({4, 8});
  CHECK_THROWS_WITH_AS(nn::fill_sincos_positions(wrong, 2), doctest::Contains("position_embedding"), Error);
}

TEST_CASE("models cumo: stage 1 trains only the connector (parameter lists partition the model)") {
  Rng rng(4);
  Batch b(rng);
  models::CuMo<> m(tiny_config());
  m.reset_parameters(rng);
  const ParameterList all = m.parameters(), vis = m.vision_parameters(), con = m.connector_parameters(),
                      lang = m.language_parameters();
  CHECK(all.size() == vis.size() + con.size() + lang.size());
  std::set<Parameter*> u(vis.begin(), vis.end());
  u.insert(con.begin(), con.end());
  u.insert(lang.begin(), lang.end());
  CHECK(u == std::set<Parameter*>(all.begin(), all.end()));
  for (Parameter* p : con) CHECK(p->name.starts_with("model.multi_modal_projector."));
  // reset_parameters: norms 1/0, biases 0, matrices N(0, 0.02²)
  for (Parameter* p : all) {
    if (p->name.ends_with("layer_norm1.weight")) CHECK(p->value.data<float>()[0] == 1.f);
    if (p->name.ends_with("fc1.bias")) CHECK(p->value.data<float>()[0] == 0.f);
    if (p->name == "lm_head.weight") {
      const double rms = std::sqrt(test::dot(p->value, p->value) / double(p->value.numel()));
      CHECK(rms == doctest::Approx(0.02).epsilon(0.2));
    }
  }

  std::vector<Tensor> before;
  for (Parameter* p : all) before.push_back(p->value.clone());
  train::AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0;
  train::AdamW opt({train::ParamGroup{"vision", vis, 1.0, std::nullopt, true},
                    train::ParamGroup{"connector", con, 1.0, std::nullopt, false},
                    train::ParamGroup{"language", lang, 1.0, std::nullopt, true}},
                   o);
  opt.zero_grad();
  m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  m.backward();
  opt.step();
  for (std::size_t i = 0; i < all.size(); ++i) {
    const bool changed = rel_error(all[i]->value, before[i]) > 0;
    const bool is_con = all[i]->name.starts_with("model.multi_modal_projector.");
    CAPTURE(all[i]->name);
    CHECK(changed == is_con);
  }
}

TEST_CASE("models cumo: save/load — a sparse checkpoint loads into a freshly built (dense) model") {
  namespace fs = std::filesystem;
  Rng rng(6);
  Batch b(rng);
  models::CuMo<> m(tiny_config());
  randomize(m.parameters(), rng, 0.4f);
  Rng up(9);
  m.upcycle(up);
  const auto want = m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  const fs::path dir = cumo::test::tmp_root() / "cumo_model";
  fs::create_directories(dir);
  const std::string path = (dir / "cumo.safetensors").string();
  m.save(path);
  const auto f = io::SafeTensors::open(path);
  const auto cfg = models::CuMoConfig::from_json(nlohmann::json::parse(f.metadata().at("cumo_config")));
  models::CuMo<> back(cfg);
  back.load(path);
  CHECK(back.vision_is_sparse());
  CHECK(back.connector_is_sparse());
  const auto got = back.forward(b.ids, b.B, b.T, b.px, &b.labels);
  CHECK(bitwise_equal(got.logits, want.logits));
  CHECK(got.total == want.total);

  // a dense checkpoint into a sparse model: a clear error naming the missing tensors
  models::CuMo<> dense(tiny_config());
  randomize(dense.parameters(), rng, 0.4f);
  const std::string dpath = (dir / "dense.safetensors").string();
  dense.save(dpath);
  models::CuMo<> sparse(tiny_config());
  Rng r(1);
  sparse.upcycle(r);
  CHECK_THROWS_AS(sparse.load(dpath), Error);
}

TEST_CASE("models cumo: connector_experts — the connector top-k of its own E (8), counted, saved and loaded back") {
  namespace fs = std::filesystem;
  Rng rng(7);
  Batch b(rng);
  models::CuMoConfig c = tiny_config();
  c.connector_experts = 8;
  CHECK(c.connector_E() == 8);
  // JSON: written only when set, read back; a count below top_k is refused with its value
  CHECK(models::CuMoConfig::from_json(c.to_json()).connector_experts == 8);
  CHECK_FALSE(tiny_config().to_json().contains("connector_experts"));
  models::CuMoConfig bad = c;
  bad.connector_experts = 1;
  CHECK_THROWS_WITH_AS(bad.validate("t"), doctest::Contains("connector_experts (1)"), Error);

  models::CuMo<> m(c);
  randomize(m.parameters(), rng, 0.4f);
  const auto dense = m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  Rng up(3);
  m.upcycle(up);
  CHECK(m.llava().projector.mlp.sparse().num_experts() == 8);
  CHECK(m.llava().vision_tower.layers[0].mlp.sparse().num_experts() == c.experts);
  CHECK(c.parameter_count(true, true) == double(models::parameter_count(m.parameters())));
  // exact copies: the upcycled model still computes the dense logits (8 copies as well as 4)
  const auto want = m.forward(b.ids, b.B, b.T, b.px, &b.labels);
  CHECK(rel_error(want.logits, dense.logits) < 1e-6);

  // a checkpoint with E = 4 in the CLIP layers and 8 in the connector loads into a fresh model built from a config
  // that says neither (the loader reads E from each router)
  const fs::path dir = cumo::test::tmp_root() / "cumo_conn8";
  fs::create_directories(dir);
  const std::string path = (dir / "cumo.safetensors").string();
  m.save(path);
  models::CuMo<> back(tiny_config());
  back.load(path);
  CHECK(back.config().connector_E() == 8);
  CHECK(back.config().experts == c.experts);
  CHECK(bitwise_equal(back.forward(b.ids, b.B, b.T, b.px, &b.labels).logits, want.logits));
}

namespace {
// Whether `a` and `b` hold the same dtype, shape and bytes.
bool same_bytes(const io::SafeTensors& a, const std::string& an, const io::SafeTensors& b, const std::string& bn) {
  const Tensor x = a.get(an), y = b.get(bn);
  return x.dtype() == y.dtype() && x.shape() == y.shape() && bitwise_equal(x, y);
}
}  // namespace

TEST_CASE("models cumo: the released CuMo layout loads as it is, and saving in it writes every tensor back bitwise") {
  namespace fs = std::filesystem;
  const auto f = io::SafeTensors::open(std::string(CUMO_FIXTURE_DIR) + "/cumo_release_e4_k2_v32_t32.safetensors");
  const auto cfg = models::CuMoConfig::from_json(nlohmann::json::parse(f.metadata().at("config")));
  const io::HFCheckpoint ck = io::HFCheckpoint::from(f);
  const fs::path dir = cumo::test::tmp_root() / "cumo_release";
  fs::create_directories(dir);
  // the sparse model (param.*) and the dense one it was upcycled from (param.dense.*)
  for (const std::string prefix : {"param.", "param.dense."}) {
    CAPTURE(prefix);
    models::CuMo<> m(cfg);
    m.load(ck, prefix);
    CHECK(m.vision_is_sparse() == (prefix == "param."));
    CHECK(m.connector_is_sparse() == (prefix == "param."));
    const std::string path = (dir / "release.safetensors").string();
    m.save(path, io::Layout::cumo_release);
    const auto saved = io::SafeTensors::open(path);
    std::size_t in_fixture = 0;
    for (const auto& n : f.names()) {
      if (!n.starts_with(prefix) || (prefix == "param." && n.starts_with("param.dense."))) continue;
      ++in_fixture;
      const std::string bare = n.substr(prefix.size());
      CAPTURE(bare);
      REQUIRE(saved.contains(bare));
      CHECK(same_bytes(saved, bare, f, n));
    }
    CHECK(saved.names().size() == in_fixture);  // nothing written beyond the release's tensors
    // and back: the release file loads into a fresh model, which saves the transformers layout bitwise as before
    models::CuMo<> back(cfg);
    back.load(path);
    const std::string a = (dir / "a.safetensors").string(), b = (dir / "b.safetensors").string();
    m.save(a);
    back.save(b);
    const auto fa = io::SafeTensors::open(a), fb = io::SafeTensors::open(b);
    REQUIRE(fa.names() == fb.names());
    for (const auto& n : fa.names()) CHECK(same_bytes(fa, n, fb, n));
  }
}

TEST_CASE("models cumo: release names — every one is a name load_hf accepts; a Mixtral decoder's experts are w1/w2/w3") {
  namespace fs = std::filesystem;
  CHECK(io::release_name("model.vision_tower.encoder.layers.3.mlp.gate.weight") ==
        "model.vision_tower.vision_model.encoder.layers.3.gate.weight");
  CHECK(io::release_name("model.vision_tower.encoder.layers.3.mlp.fc1.weight") ==
        "model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight");
  CHECK(io::release_name("model.multi_modal_projector.linear_2.bias") == "model.mm_projector.2.bias");
  CHECK(io::release_name("model.multi_modal_projector.gate.weight") == "model.mm_projector.gate.weight");
  CHECK(io::release_name("model.language_model.layers.0.mlp.gate.weight") == "model.layers.0.block_sparse_moe.gate.weight");
  CHECK(io::release_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight");
  CHECK(io::release_name("lm_head.weight") == "lm_head.weight");
  std::string module;
  std::vector<std::string> parts;
  REQUIRE(io::release_expert_parts("model.multi_modal_projector.experts.fc2.bias", module, parts));
  CHECK(module == "model.mm_projector");
  CHECK(parts == std::vector<std::string>{"2.bias"});
  REQUIRE(io::release_expert_parts("model.language_model.layers.1.mlp.experts.gate_up_proj", module, parts));
  CHECK(module == "model.layers.1.block_sparse_moe");
  CHECK(parts == std::vector<std::string>{"w1.weight", "w3.weight"});
  CHECK_FALSE(io::release_expert_parts("model.language_model.layers.1.mlp.gate_proj.weight", module, parts));

  // a CuMo-Mixtral-like model: sparse CLIP, connector and decoder
  auto cfg = tiny_config();
  cfg.llava.text.experts = 2;
  cfg.llava.text.top_k = 1;
  Rng rng(4);
  models::CuMo<> m(cfg);
  Rng up(5);
  m.upcycle(up);
  randomize(m.parameters(), rng, 0.4f);
  for (Parameter* p : m.parameters()) {
    std::vector<std::string> ps;
    if (io::release_expert_parts(p->name, module, ps)) continue;
    const auto v = io::hf_name_variants(p->name);
    CHECK_MESSAGE(std::find(v.begin(), v.end(), io::release_name(p->name)) != v.end(), p->name);
  }
  const fs::path dir = cumo::test::tmp_root() / "cumo_release_mixtral";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "m.safetensors").string();
  m.save(path, io::Layout::cumo_release);
  const auto saved = io::SafeTensors::open(path);
  CHECK(saved.contains("model.layers.0.block_sparse_moe.experts.1.w3.weight"));
  CHECK(saved.contains("model.layers.0.block_sparse_moe.gate.weight"));
  CHECK(saved.contains("model.vision_tower.vision_model.encoder.layers.1.experts.3.fc2.bias"));
  CHECK(saved.contains("model.mm_projector.experts.0.0.weight"));
  models::CuMo<> back(cfg);  // the decoder is sparse from the config; CLIP and connector are detected by load()
  back.load(path);
  const auto pa = m.parameters(), pb = back.parameters();
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) CHECK_MESSAGE(bitwise_equal(pa[i]->value, pb[i]->value), pa[i]->name);
}

TEST_CASE("models cumo: sampled generation — reproducible per seed, streamed in order, greedy when top-p leaves one") {
  Rng rng(8);
  models::CuMo<> m(tiny_config());
  randomize(m.parameters(), rng, 0.6f);
  const Tensor px = random_tensor({1, 3, 8, 8}, rng);
  const std::vector<std::int64_t> prompt{1, 12, 4, 5};
  models::CuMo<>::GenerateOptions o;
  o.max_new = 8;
  o.sampling = nn::SamplingOptions{1.5f, 0.95f, 123};
  std::vector<std::int64_t> streamed;
  o.on_token = [&](std::int64_t t) { streamed.push_back(t); };
  const auto a = m.generate(prompt, px, o);
  CHECK(streamed == a);
  o.on_token = nullptr;
  CHECK(m.generate(prompt, px, o) == a);  // same seed, same tokens
  std::set<std::vector<std::int64_t>> draws;
  for (std::uint64_t seed = 0; seed < 8; ++seed) {
    o.sampling.seed = seed;
    draws.insert(m.generate(prompt, px, o));
  }
  CHECK(draws.size() > 1);  // at T = 1.5 over 13 tokens, eight seeds do not all draw the same 8 tokens
  o.sampling = nn::SamplingOptions{1.f, 1e-6f, 3};  // the nucleus is the top token alone: greedy
  CHECK(m.generate(prompt, px, o) == m.generate(prompt, px, 8, -1));
}

TEST_CASE("models cumo: a release config.json (LlavaMistralConfig) with or without a CLIP config builds the model") {
  namespace fs = std::filesystem;
  const auto f = io::SafeTensors::open(std::string(CUMO_FIXTURE_DIR) + "/cumo_release_e4_k2_v32_t32.safetensors");
  const auto fixture = nlohmann::json::parse(f.metadata().at("config"));
  const auto cfg = models::CuMoConfig::from_json(fixture);
  nlohmann::json j = models::release_config_json(cfg, true, true);
  CHECK(j.at("model_type") == "llava_mistral");
  CHECK(j.at("mm_projector_type") == "smoe_mlp");
  const io::HFCheckpoint ck = io::HFCheckpoint::from(f);

  // with the CLIP config: the fixture's model exactly, and its logits
  const nlohmann::json clip = fixture.at("llava").at("vision_config");
  const auto r = models::release_config(j, &clip, &ck);
  CHECK(r.sparse_vision);
  CHECK(r.sparse_connector);
  CHECK(r.pad_to_square);
  CHECK(r.model.experts == 4);
  CHECK(r.model.top_k == 2);
  CHECK(r.model.llava.vision.heads == 4);
  CHECK(r.model.llava.text.kv_heads == 2);
  CHECK(r.model.llava.image_token_id == 96);  // the fixture's, a row of its vocabulary: written as image_token_index
  models::CuMo<> m(r.model);
  m.load(ck, "param.");

  // without it: the sizes inferred from the tensors, and the notes say what was assumed
  const auto inf = models::release_config(j, nullptr, &ck, "param.");
  CHECK(inf.model.llava.vision.hidden == 32);
  CHECK(inf.model.llava.vision.layers == 2);
  CHECK(inf.model.llava.vision.ffn == 64);
  CHECK(inf.model.llava.vision.patch_size == 8);
  CHECK(inf.model.llava.vision.image_size == 32);
  REQUIRE(inf.notes.size() == 2);
  CHECK(inf.notes[1].find("assumed") != std::string::npos);

  // bad values name the accepted ones
  auto bad = j;
  bad["mm_projector_type"] = "qformer";
  CHECK_THROWS_WITH_AS(models::release_config(bad, &clip, &ck), doctest::Contains("accepted: smoe_mlp, mlp2x_gelu"), Error);
  bad = j;
  bad["model_type"] = "llama";
  CHECK_THROWS_AS(models::release_config(bad, &clip, &ck), Error);
  bad = j;
  bad["scales"] = {1, 2};
  CHECK_THROWS_WITH_AS(models::release_config(bad, &clip, &ck), doctest::Contains("scales"), Error);

  // an "<image>" id inside the vocabulary (the fixture's; a byte-level run's, exported by cumo_export) is written
  // and read back; without the key (SHI-Labs' releases) it is one past the vocabulary, as SentencePieceTokenizer's
  // <image>, and a model whose id is that is written without it
  const std::int64_t vocab = cfg.llava.text.vocab;
  CHECK(j.at("image_token_index") == vocab - 1);
  auto released = j;
  released.erase("image_token_index");
  CHECK(models::release_config(released, &clip, &ck).model.llava.image_token_id == vocab);
  auto past = cfg;
  past.llava.image_token_id = vocab;
  CHECK_FALSE(models::release_config_json(past, true, true).contains("image_token_index"));
  bad = j;
  bad["image_token_index"] = vocab + 1;
  CHECK_THROWS_WITH_AS(models::release_config(bad, &clip, &ck), doctest::Contains("image_token_index"), Error);
  bad = j;
  bad["image_token_index"] = -200;  // CuMo's IMAGE_TOKEN_INDEX is a constant in its code, never an embedding row
  CHECK_THROWS_WITH_AS(models::release_config(bad, &clip, &ck), doctest::Contains("image_token_index -200"), Error);
  // the tokenizer and template a cumo_export names; anything but a string is refused
  auto named = j;
  named["cumo_tokenizer"] = "byte";
  named["cumo_chat_template"] = "plain";
  const auto rn = models::release_config(named, &clip, &ck);
  CHECK(rn.tokenizer == "byte");
  CHECK(rn.chat_template == "plain");
  CHECK(r.tokenizer.empty());
  CHECK(r.chat_template.empty());
  bad = j;
  bad["cumo_tokenizer"] = 3;
  CHECK_THROWS_WITH_AS(models::release_config(bad, &clip, &ck), doctest::Contains("cumo_tokenizer must be a string"),
                       Error);

  // a directory as released: config.json + model.safetensors (release layout), the CLIP config beside it
  const fs::path dir = cumo::test::tmp_root() / "release_dir" / "cumo-mistral-tiny";
  fs::create_directories(dir);
  j["mm_vision_tower"] = "openai/clip-tiny";
  std::ofstream(dir / "config.json") << j.dump(2);
  m.save((dir / "model.safetensors").string(), io::Layout::cumo_release);
  const auto plain = models::load_release_config(dir.string());
  CHECK(plain.notes.size() == 2);  // inferred
  fs::create_directories(dir.parent_path() / "clip-tiny");
  std::ofstream(dir.parent_path() / "clip-tiny" / "config.json") << nlohmann::json{{"vision_config", clip}}.dump();
  const auto beside = models::load_release_config(dir.string());
  CHECK(beside.model.llava.vision.heads == 4);
  models::CuMo<> back(beside.model);
  back.load(dir.string());
  CHECK(back.vision_is_sparse());
  const auto pa = m.parameters(), pb = back.parameters();
  REQUIRE(pa.size() == pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) CHECK(bitwise_equal(pa[i]->value, pb[i]->value));

  // a tower saved without post_layernorm (unused at feature layer -2) still loads; any other missing tensor fails
  const auto full = io::SafeTensors::open((dir / "model.safetensors").string());
  std::vector<std::pair<std::string, Tensor>> kept, kept_but_one;
  for (const auto& n : full.names()) {
    if (n.find("post_layernorm") != std::string::npos) continue;
    kept.emplace_back(n, full.get(n));
    if (n != "lm_head.weight") kept_but_one.emplace_back(n, full.get(n));
  }
  const std::string no_post = (dir.parent_path() / "no_post.safetensors").string();
  io::save(no_post, kept);
  models::CuMo<> without(beside.model);
  without.load(no_post);
  const auto pw = without.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i)
    if (pa[i]->name.find("post_layernorm") == std::string::npos) CHECK(bitwise_equal(pa[i]->value, pw[i]->value));
  const std::string no_head = (dir.parent_path() / "no_head.safetensors").string();
  io::save(no_head, kept_but_one);
  models::CuMo<> headless(beside.model);
  CHECK_THROWS_WITH_AS(headless.load(no_head), doctest::Contains("missing 'lm_head.weight'"), Error);
}
