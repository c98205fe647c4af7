// The HF checkpoint loader: naming variants, sharded sets, bf16 -> fp32, per-expert Mixtral weights, save round
// trip, and its errors (missing tensor, wrong shape, truncated file) naming the tensor and both shapes.
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <filesystem>
#include <fstream>
#include <string>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/nn.hpp"
#include "nn_test_util.hpp"

using namespace cumo;
namespace fs = std::filesystem;

namespace {

std::string tmpdir(const std::string& leaf) {
  const fs::path d = cumo::test::tmp_root() / ("nn_loader_" + leaf);
  fs::create_directories(d);
  return d.string();
}

nn::DecoderConfig tiny_text(int experts = 0) {
  nn::DecoderConfig c;
  c.vocab = 7;
  c.hidden = 4;
  c.layers = 1;
  c.heads = 2;
  c.kv_heads = 1;
  c.head_dim = 2;
  c.ffn = 6;
  c.experts = experts;
  return c;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("nn loader: name variants map to the canonical transformers-5 names") {
  auto has = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  const auto v = io::hf_name_variants("model.vision_tower.encoder.layers.3.mlp.fc1.weight");
  CHECK(has(v, "vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"));
  CHECK(has(v, "vision_model.encoder.layers.3.mlp.fc1.weight"));
  const auto t = io::hf_name_variants("model.language_model.layers.0.self_attn.q_proj.weight");
  CHECK(has(t, "language_model.model.layers.0.self_attn.q_proj.weight"));
  CHECK(has(t, "model.layers.0.self_attn.q_proj.weight"));
  CHECK(has(io::hf_name_variants("lm_head.weight"), "language_model.lm_head.weight"));
  const auto p = io::hf_name_variants("model.multi_modal_projector.linear_2.bias");
  CHECK(has(p, "multi_modal_projector.linear_2.bias"));
  CHECK(has(p, "model.mm_projector.2.bias"));
  CHECK(has(io::hf_name_variants("model.layers.1.mlp.gate.weight"), "model.layers.1.block_sparse_moe.gate.weight"));
  CHECK(has(io::hf_name_variants("embeddings.class_embedding"), "vision_model.embeddings.class_embedding"));
}

TEST_CASE("nn loader: llava-hf names, bf16 storage and a sharded index load into the canonical model") {
  Rng rng(1);
  nn::DecoderLM<> src(tiny_text(), "model.language_model.");
  test::randomize(src.parameters(), rng);
  // write under llava-hf 4.x names, bf16, split over two shards
  std::vector<std::pair<std::string, Tensor>> a, b;
  nlohmann::json index;
  int i = 0;
  for (Parameter* p : src.parameters()) {
    std::string name = p->name;
    if (name.starts_with("model.language_model.")) name = "language_model.model." + name.substr(21);
    if (name == "lm_head.weight") name = "language_model.lm_head.weight";
    const bool first = i++ % 2 == 0;
    (first ? a : b).emplace_back(name, p->value.to(DType::bf16));
    index["weight_map"][name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  const std::string dir = tmpdir("sharded");
  io::save(dir + "/model-00001-of-00002.safetensors", a);
  io::save(dir + "/model-00002-of-00002.safetensors", b);
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump();

  nn::DecoderLM<> dst(tiny_text(), "model.language_model.");
  const auto res = io::load_hf(dst.parameters(), dir);
  CHECK(res.loaded.size() == dst.parameters().size());
  auto ps = src.parameters(), pd = dst.parameters();
  for (std::size_t k = 0; k < ps.size(); ++k) {
    CAPTURE(ps[k]->name);
    CHECK(rel_error(pd[k]->value, ps[k]->value.to(DType::bf16)) == 0.0);  // bf16 values, exactly
    CHECK(rel_error(pd[k]->value, ps[k]->value) < 1e-2);
  }
}

TEST_CASE("nn loader: Mixtral per-expert w1/w2/w3 assemble into fused gate_up_proj / down_proj") {
  Rng rng(2);
  nn::DecoderLM<> src(tiny_text(3));
  test::randomize(src.parameters(), rng);
  std::vector<std::pair<std::string, Tensor>> t;
  const std::int64_t F = 6;
  for (Parameter* p : src.parameters()) {
    if (p->name.ends_with("experts.gate_up_proj")) {
      for (int e = 0; e < 3; ++e) {
        const Tensor ex = p->value.select(0, e);
        t.emplace_back("model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".w1.weight", ex.slice(0, 0, F).contiguous());
        t.emplace_back("model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".w3.weight", ex.slice(0, F, 2 * F).contiguous());
      }
    } else if (p->name.ends_with("experts.down_proj")) {
      for (int e = 0; e < 3; ++e)
        t.emplace_back("model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".w2.weight", p->value.select(0, e).contiguous());
    } else if (p->name.ends_with("mlp.gate.weight")) {
      t.emplace_back("model.layers.0.block_sparse_moe.gate.weight", p->value);
    } else {
      t.emplace_back(p->name, p->value);
    }
  }
  const std::string path = tmpdir("mixtral") + "/model.safetensors";
  io::save(path, t);
  nn::DecoderLM<> dst(tiny_text(3));
  io::load_hf(dst.parameters(), path);
  auto ps = src.parameters(), pd = dst.parameters();
  for (std::size_t k = 0; k < ps.size(); ++k) {
    CAPTURE(ps[k]->name);
    CHECK(bitwise_equal(pd[k]->value.contiguous(), ps[k]->value.contiguous()));
  }
}

TEST_CASE("nn loader: save_hf round-trips under canonical names") {
  Rng rng(3);
  nn::DecoderLM<> a(tiny_text()), b(tiny_text());
  test::randomize(a.parameters(), rng);
  const std::string path = tmpdir("roundtrip") + "/model.safetensors";
  io::save_hf(path, a.parameters());
  const auto f = io::SafeTensors::open(path);
  CHECK(f.contains("model.layers.0.self_attn.q_proj.weight"));
  CHECK(f.contains("lm_head.weight"));
  io::load_hf(b.parameters(), path);
  auto pa = a.parameters(), pb = b.parameters();
  for (std::size_t k = 0; k < pa.size(); ++k) CHECK(bitwise_equal(pa[k]->value, pb[k]->value));
}

TEST_CASE("nn loader: a missing tensor is named, with the names tried") {
  Rng rng(4);
  nn::DecoderLM<> a(tiny_text());
  std::vector<std::pair<std::string, Tensor>> t;
  for (Parameter* p : a.parameters())
    if (p->name != "model.norm.weight") t.emplace_back(p->name, p->value);
  const std::string path = tmpdir("missing") + "/model.safetensors";
  io::save(path, t);
  nn::DecoderLM<> b(tiny_text());
  const std::string msg = message_of([&] { io::load_hf(b.parameters(), path); });
  INFO(msg);
  CHECK(msg.find("missing 'model.norm.weight'") != std::string::npos);
  CHECK(msg.find("(4,)") != std::string::npos);
  CHECK(msg.find("language_model.model.norm.weight") != std::string::npos);
  io::LoadOptions opt;
  opt.allow_missing = true;
  CHECK(io::load_hf(b.parameters(), path, opt).missing == std::vector<std::string>{"model.norm.weight"});
}

TEST_CASE("nn loader: a mis-shaped tensor is reported with both shapes") {
  nn::DecoderLM<> a(tiny_text());
  std::vector<std::pair<std::string, Tensor>> t;
  for (Parameter* p : a.parameters())
    t.emplace_back(p->name, p->name == "model.layers.0.self_attn.k_proj.weight" ? Tensor::zeros({4, 4}) : p->value);
  const std::string path = tmpdir("shape") + "/model.safetensors";
  io::save(path, t);
  const std::string msg = message_of([&] { io::load_hf(a.parameters(), path); });
  INFO(msg);
  CHECK(msg.find("'model.layers.0.self_attn.k_proj.weight' has shape (4, 4) in the file") != std::string::npos);
  CHECK(msg.find("has shape (2, 4)") != std::string::npos);
}

TEST_CASE("nn loader: a truncated file gives a clear error, not a crash") {
  nn::DecoderLM<> a(tiny_text());
  const std::string dir = tmpdir("truncated");
  io::save_hf(dir + "/full.safetensors", a.parameters());
  const auto size = fs::file_size(dir + "/full.safetensors");
  fs::copy_file(dir + "/full.safetensors", dir + "/cut.safetensors", fs::copy_options::overwrite_existing);
  fs::resize_file(dir + "/cut.safetensors", size - 10);
  const std::string msg = message_of([&] { io::load_hf(a.parameters(), dir + "/cut.safetensors"); });
  INFO(msg);
  CHECK(msg.find("cut.safetensors") != std::string::npos);
  fs::resize_file(dir + "/cut.safetensors", 5);
  CHECK(message_of([&] { io::load_hf(a.parameters(), dir + "/cut.safetensors"); }).find("truncated") != std::string::npos);
  CHECK(!message_of([&] { io::HFCheckpoint::open(dir + "/nothing-here"); }).empty());
}
