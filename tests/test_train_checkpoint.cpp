// Checkpoints: a full round trip (weights, optimizer state, schedule step, RNGs, data position, metadata), the
// HF-loadable weights file, atomic replacement, and every kind of bad checkpoint refused with a named error that
// leaves the model untouched.
#include <doctest/doctest.h>

#include "test_tmp.hpp"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "cumo/core.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/io/safetensors.hpp"
#include "cumo/train/checkpoint.hpp"

namespace {

namespace fs = std::filesystem;
using cumo::Parameter;
using cumo::ParameterList;
using cumo::Rng;
using cumo::Tensor;
using cumo::train::AdamW;
using cumo::train::ParamGroup;
using cumo::train::TrainerState;

fs::path scratch(const std::string& name) {
  const fs::path d = cumo::test::tmp_root() / ("train_checkpoint_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A connector-like model: two Linear layers under LLaVA names.
struct Model {
  Parameter w1{"model.mm_projector.0.weight", Tensor::zeros({6, 4})};
  Parameter b1{"model.mm_projector.0.bias", Tensor::zeros({6})};
  Parameter w2{"model.mm_projector.2.weight", Tensor::zeros({3, 6})};
  Parameter frozen{"model.embed_tokens.weight", Tensor::zeros({5, 3})};
  explicit Model(std::uint64_t seed) {
    Rng rng(seed);
    for (Parameter* p : params()) rng.fill_normal(p->value);
  }
  ParameterList params() { return {&w1, &b1, &w2, &frozen}; }
  std::vector<ParamGroup> groups() {
    std::vector<ParamGroup> g(2);
    g[0].name = "connector";
    g[0].params = {&w1, &b1, &w2};
    g[1].name = "llm";
    g[1].params = {&frozen};
    g[1].frozen = true;
    return g;
  }
};

void train_steps(Model& m, AdamW<>& opt, Rng& rng, int n) {
  for (int s = 0; s < n; ++s) {
    for (Parameter* p : m.params()) rng.fill_normal(p->grad);
    opt.step(1e-2);
  }
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const cumo::Error& e) {
    return e.what();
  }
  return "<no cumo::Error>";
}

void truncate_file(const fs::path& p, std::uintmax_t keep) { fs::resize_file(p, keep); }

}  // namespace

TEST_CASE("train/checkpoint: round trip of weights, optimizer state, step, RNGs, data position and metadata") {
  const fs::path root = scratch("round_trip");
  Model m(1);
  AdamW opt(m.groups());
  Rng grads(2);
  train_steps(m, opt, grads, 3);
  TrainerState st;
  st.step = 3;
  st.epoch = 1;
  st.sample = 17;
  Rng data(99), jitter(123);
  data.normal();
  jitter.next_u32();
  st.rngs["data"] = data.state();
  st.rngs["jitter"] = Rng::State{0xfedcba9876543210ull, 0xffffffffffffffffull};  // full 64-bit range survives JSON
  st.metadata["stage"] = "pretrain";
  const std::string dir = cumo::train::checkpoint_dir(root.string(), st.step);
  cumo::train::save_checkpoint(dir, m.params(), &opt, st);

  // Fresh objects with other weights: everything comes from the checkpoint.
  Model m2(77);
  AdamW opt2(m2.groups());
  const TrainerState st2 = cumo::train::load_checkpoint(dir, m2.params(), &opt2);
  for (std::size_t i = 0; i < m.params().size(); ++i)
    CHECK(cumo::bitwise_equal(m.params()[i]->value, m2.params()[i]->value));
  CHECK(opt2.steps() == 3);
  for (std::size_t i = 0; i < 3; ++i) {  // the connector's three parameters
    const AdamW<>::State* a = opt.state(*m.params()[i]);
    const AdamW<>::State* b = opt2.state(*m2.params()[i]);
    REQUIRE(a);
    REQUIRE(b);
    CHECK(a->step == b->step);
    CHECK(cumo::bitwise_equal(a->exp_avg, b->exp_avg));
    CHECK(cumo::bitwise_equal(a->exp_avg_sq, b->exp_avg_sq));
  }
  CHECK(opt2.state(m2.frozen) == nullptr);
  CHECK(st2.step == 3);
  CHECK(st2.epoch == 1);
  CHECK(st2.sample == 17);
  REQUIRE(st2.rngs.size() == 2);
  CHECK(st2.rngs.at("data").seed == data.state().seed);
  CHECK(st2.rngs.at("data").counter == data.state().counter);
  CHECK(st2.rngs.at("jitter").seed == 0xfedcba9876543210ull);
  CHECK(st2.rngs.at("jitter").counter == 0xffffffffffffffffull);
  CHECK(st2.metadata.at("stage") == "pretrain");

  // The weights file is a plain HF state_dict: exactly the model's names, fp32, format "pt".
  const auto w = cumo::io::SafeTensors::open(dir + "/model.safetensors");
  CHECK(w.size() == 4);
  CHECK(w.metadata().at("format") == "pt");
  CHECK(w.info("model.mm_projector.0.weight").shape == cumo::Shape{6, 4});
  // The optimizer file holds state only for the trained parameters.
  const auto o = cumo::io::SafeTensors::open(dir + "/optimizer.safetensors");
  CHECK(o.size() == 9);
  CHECK_FALSE(o.contains("model.embed_tokens.weight.exp_avg"));
  CHECK(cumo::train::latest_checkpoint(root.string()) == dir);
}

TEST_CASE("train/checkpoint: saving over an existing checkpoint replaces it atomically and leaves no temporaries") {
  const fs::path root = scratch("overwrite");
  const std::string dir = (root / "ckpt").string();
  Model a(1), b(2);
  TrainerState s1, s2;
  s1.step = 1;
  s2.step = 2;
  cumo::train::save_checkpoint(dir, a.params(), nullptr, s1);
  cumo::train::save_checkpoint(dir, b.params(), nullptr, s2);
  Model c(3);
  const TrainerState got = cumo::train::load_checkpoint(dir, c.params(), nullptr);
  CHECK(got.step == 2);
  CHECK(cumo::bitwise_equal(c.w1.value, b.w1.value));
  int entries = 0;
  for (const auto& e : fs::directory_iterator(root)) {
    ++entries;
    CHECK(e.path().filename() == "ckpt");
  }
  CHECK(entries == 1);
  // A checkpoint saved without an optimizer cannot restore one.
  AdamW opt(c.groups());
  CHECK_THROWS_WITH_AS(cumo::train::load_checkpoint(dir, c.params(), &opt),
                       doctest::Contains("saved without optimizer state"), cumo::Error);
}

TEST_CASE("train/checkpoint: a shape mismatch names the tensor and both shapes, and changes nothing") {
  const fs::path root = scratch("shape");
  Model m(1);
  cumo::train::save_checkpoint((root / "c").string(), m.params(), nullptr, {});
  Model other(5);
  other.w1 = Parameter("model.mm_projector.0.weight", Tensor::zeros({4, 6}));
  const Tensor b1_before = other.b1.value.clone();
  const std::string msg = message_of([&] { cumo::train::load_checkpoint((root / "c").string(), other.params(), nullptr); });
  CHECK(msg.find("'model.mm_projector.0.weight'") != std::string::npos);
  CHECK(msg.find("(6, 4)") != std::string::npos);
  CHECK(msg.find("(4, 6)") != std::string::npos);
  CHECK(cumo::bitwise_equal(other.b1.value, b1_before));

  // A missing tensor and an unexpected one, by name.
  Model fewer(1);
  ParameterList three = {&fewer.w1, &fewer.b1, &fewer.w2};
  CHECK_THROWS_WITH_AS(cumo::train::load_checkpoint((root / "c").string(), three, nullptr),
                       doctest::Contains("'model.embed_tokens.weight'"), cumo::Error);
  Parameter extra("lm_head.weight", Tensor::zeros({2}));
  ParameterList five = m.params();
  five.push_back(&extra);
  CHECK_THROWS_WITH_AS(cumo::train::load_checkpoint((root / "c").string(), five, nullptr),
                       doctest::Contains("lacks 1 of the model's 5 tensors: 'lm_head.weight'"), cumo::Error);
  // load_weights (non-strict) accepts a file with more tensors than the model.
  cumo::train::load_weights((root / "c" / "model.safetensors").string(), three, /*strict=*/false);
  CHECK(cumo::bitwise_equal(fewer.w1.value, m.w1.value));
}

TEST_CASE("train/checkpoint: truncated or corrupted files give cumo::Error and leave the model untouched") {
  const fs::path root = scratch("corrupt");
  Model m(1);
  AdamW opt(m.groups());
  Rng g(3);
  train_steps(m, opt, g, 2);
  TrainerState st;
  st.step = 2;
  const auto fresh = [&](const char* name) {
    const fs::path d = root / name;
    cumo::train::save_checkpoint(d.string(), m.params(), &opt, st);
    return d;
  };
  Model target(9);
  const Tensor before = target.w1.value.clone();
  AdamW topt(target.groups());
  const auto load = [&](const fs::path& d) { cumo::train::load_checkpoint(d.string(), target.params(), &topt); };

  const fs::path a = fresh("trunc_model");
  truncate_file(a / "model.safetensors", fs::file_size(a / "model.safetensors") - 7);
  CHECK_THROWS_AS(load(a), cumo::Error);

  const fs::path b = fresh("trunc_optimizer");
  truncate_file(b / "optimizer.safetensors", 100);
  CHECK_THROWS_AS(load(b), cumo::Error);

  const fs::path c = fresh("bad_json");
  std::ofstream(c / "trainer_state.json") << "{\"format\": \"cumo.checkpoint\", \"version\": 1, \"step\": ";
  CHECK_THROWS_WITH_AS(load(c), doctest::Contains("not valid JSON"), cumo::Error);

  const fs::path d = fresh("wrong_field");
  std::ofstream(d / "trainer_state.json")
      << R"({"format": "cumo.checkpoint", "version": 1, "step": -4, "epoch": 0, "sample": 0, "rngs": {}, "metadata": {}})";
  CHECK_THROWS_WITH_AS(load(d), doctest::Contains("'step' must be a non-negative integer"), cumo::Error);

  const fs::path e = fresh("no_state");
  fs::remove(e / "trainer_state.json");
  CHECK_THROWS_WITH_AS(load(e), doctest::Contains("no trainer_state.json"), cumo::Error);

  const fs::path f = fresh("garbage_model");
  std::ofstream(f / "model.safetensors", std::ios::trunc) << "this is not a safetensors file";
  CHECK_THROWS_AS(load(f), cumo::Error);

  CHECK_THROWS_WITH_AS(load(root / "does_not_exist"), doctest::Contains("is not a directory"), cumo::Error);

  CHECK(cumo::bitwise_equal(target.w1.value, before));
  CHECK(topt.steps() == 0);
  CHECK(topt.state(target.w1) == nullptr);
}

TEST_CASE("train/checkpoint: latest_checkpoint ignores incomplete and hidden directories") {
  const fs::path root = scratch("latest");
  Model m(1);
  TrainerState st;
  for (std::int64_t s : {5, 40, 300}) {
    st.step = s;
    cumo::train::save_checkpoint(cumo::train::checkpoint_dir(root.string(), s), m.params(), nullptr, st);
  }
  fs::create_directories(root / "checkpoint-9000");          // no trainer_state.json: a crash mid-save elsewhere
  fs::create_directories(root / ".checkpoint-99999.tmp.abc");  // a temporary
  CHECK(cumo::train::latest_checkpoint(root.string()) == cumo::train::checkpoint_dir(root.string(), 300));
  CHECK_FALSE(cumo::train::latest_checkpoint((root / "none").string()).has_value());
}

TEST_CASE("train/checkpoint: an optimizer that has not stepped yet round-trips as empty state") {
  const fs::path root = scratch("empty_optimizer");
  Model m(1);
  AdamW opt(m.groups());
  cumo::train::save_checkpoint((root / "c").string(), m.params(), &opt, {});
  Model m2(2);
  AdamW opt2(m2.groups());
  Rng g(4);
  train_steps(m2, opt2, g, 1);  // state that the load must clear
  const TrainerState st = cumo::train::load_checkpoint((root / "c").string(), m2.params(), &opt2);
  CHECK(st.step == 0);
  CHECK(opt2.steps() == 0);
  CHECK(opt2.state(m2.w1) == nullptr);
  CHECK(cumo::bitwise_equal(m2.w1.value, m.w1.value));
}
