// The layers' device code paths, run on the host: nn::*<backend::Emulated> (tests/emulated_backend.hpp: the CUDA
// backend's functions, written on the host from their contracts) against nn::*<backend::Cpu>, the reference. What
// this checks without a GPU is everything of the GPU path except the kernels themselves (which
// tests/cuda/test_cuda_layers.cu compares with the same contracts on a GPU): what each layer saves for its backward,
// the order of the calls, the row-block offsets (CLS rows, image rows in the prompt), the shifted LM labels, the
// per-layer aux losses and gradients of the whole upcycled CuMo, and optimizer steps over device-branch layers.
//
// Tolerance: relative 1e-5 (the emulation accumulates in double where the CPU layers use fp32 GEMMs: differences of
// a few 1e-7); a gradient that is zero in exact arithmetic (CLIP's key bias) is compared in absolute terms, 1e-5.
#include <doctest/doctest.h>

#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "../tools/parity/cumo.hpp"
#include "../tools/parity/models.hpp"
#include "cumo/core/compare.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/train/optimizer.hpp"
#include "backend_compare.hpp"
#include "cumo_test_config.hpp"
#include "emulated_backend.hpp"

using namespace cumo;
using Cpu = backend::Cpu;
using Emu = backend::Emulated;
using namespace cumo::backend_test;

namespace {

constexpr double kTol = 1e-5;

}  // namespace

TEST_CASE("nn device paths: Linear<Emulated> matches Linear<Cpu> (bias; backward twice accumulates)") {
  Rng rng(1);
  nn::Linear<Cpu> c("l", 6, 5, true);
  nn::Linear<Emu> e("l", 6, 5, true);
  ParameterList pc, pe;
  c.collect(pc);
  e.collect(pe);
  randomize(pc, rng, 0.5f);
  copy_parameters(pc, pe);
  const Tensor x = random_tensor({7, 6}, rng), dy = random_tensor({7, 5}, rng);
  expect_close("y", e.forward(x), c.forward(x), kTol);
  for (int rep = 0; rep < 2; ++rep) expect_close("dx", e.backward(dy), c.backward(dy), kTol);
  expect_grads_close(pc, pe, kTol);
}

TEST_CASE("nn device paths: ClipVision<Emulated> matches the CPU (hidden states, features, every gradient)") {
  Rng rng(2);
  const nn::VisionConfig vc = test::tiny_cumo_config().llava.vision;
  nn::ClipVision<Cpu> c(vc);
  nn::ClipVision<Emu> e(vc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), e.parameters());
  const Tensor px = random_tensor({3, 3, 8, 8}, rng);
  const auto oc = c.forward(px);
  const auto oe = e.forward(px);
  REQUIRE(oc.hidden_states.size() == oe.hidden_states.size());
  for (std::size_t l = 0; l < oc.hidden_states.size(); ++l)
    expect_close("hidden_state " + std::to_string(l), oe.hidden_states[l], oc.hidden_states[l], kTol);
  expect_close("features", oe.features, oc.features, kTol);
  const Tensor df = random_tensor(oc.features.shape(), rng);
  c.backward(df);
  CHECK_FALSE(e.backward(df).defined());  // the device path does not compute d pixels
  const auto noise = expect_grads_close(c.parameters(), e.parameters(), kTol);
  for (const auto& n : noise)  // only what is zero by construction: the key biases and the unused last parts
    CHECK((n.find("k_proj.bias") != std::string::npos || n.find("post_layernorm") != std::string::npos ||
           n.find("layers.1.") != std::string::npos));
}

TEST_CASE("nn device paths: DecoderLM<Emulated> matches the CPU (GQA, RoPE, a padding key, loss, gradients)") {
  Rng rng(3);
  nn::DecoderConfig dc = test::tiny_cumo_config().llava.text;
  dc.layers = 2;
  nn::DecoderLM<Cpu> c(dc);
  nn::DecoderLM<Emu> e(dc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), e.parameters());
  Batch b(rng);
  std::vector<std::int64_t> ids = b.ids;
  for (auto& id : ids) id %= 12;
  const auto oc = c.forward(ids, b.B, b.T, &b.labels, &b.key_valid);
  const auto oe = e.forward(ids, b.B, b.T, &b.labels, &b.key_valid);
  expect_close("logits", oe.logits, oc.logits, kTol);
  expect_near("ce", oe.ce, oc.ce, kTol);
  CHECK(oe.targets == oc.targets);
  c.backward_all(0.5f);
  e.backward_all(0.5f);
  expect_grads_close(c.parameters(), e.parameters(), kTol);
}

TEST_CASE("nn device paths: a Mixtral DecoderLM<Emulated> matches the CPU (sparse FFNs, HF's cross-layer aux loss)") {
  Rng rng(5);
  nn::DecoderConfig dc = test::tiny_cumo_config().llava.text;
  dc.layers = 2;
  dc.experts = 4;
  dc.top_k = 2;
  dc.aux_coef = 0.02;
  nn::DecoderLM<Cpu> c(dc);
  nn::DecoderLM<Emu> e(dc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), e.parameters());
  Batch b(rng);
  std::vector<std::int64_t> ids = b.ids;
  for (auto& id : ids) id %= 12;
  const auto oc = c.forward(ids, b.B, b.T, &b.labels);
  const auto oe = e.forward(ids, b.B, b.T, &b.labels);
  expect_close("logits", oe.logits, oc.logits, kTol);
  expect_near("ce", oe.ce, oc.ce, kTol);
  expect_near("aux", oe.aux, oc.aux, kTol);
  CHECK(oc.aux > 0);
  c.backward_all();
  e.backward_all();
  expect_grads_close(c.parameters(), e.parameters(), kTol);
}

TEST_CASE("nn device paths: the whole upcycled CuMo<Emulated> matches CuMo<Cpu>, then through AdamW steps") {
  Rng rng(4);
  const models::CuMoConfig cfg = test::tiny_cumo_config();
  models::CuMo<Cpu> c(cfg);
  models::CuMo<Emu> e(cfg);
  Rng init_c(7), init_e(7);
  c.reset_parameters(init_c);
  e.reset_parameters(init_e);
  for (std::size_t i = 0; i < c.parameters().size(); ++i)
    CHECK(bitwise_equal(c.parameters()[i]->value, e.parameters()[i]->value));  // the same init bits
  randomize(c.parameters(), rng, 0.3f);
  c.upcycle(init_c);
  e.upcycle(init_e);
  copy_parameters(c.parameters(), e.parameters());
  Batch b(rng);

  const auto oc = c.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  const auto oe = e.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  expect_close("logits", oe.logits, oc.logits, kTol);
  expect_near("ce", oe.ce, oc.ce, kTol);
  expect_near("vision_balance", oe.vision_balance, oc.vision_balance, kTol);
  expect_near("vision_z", oe.vision_z, oc.vision_z, kTol);
  expect_near("projector_balance", oe.projector_balance, oc.projector_balance, kTol);
  expect_near("projector_z", oe.projector_z, oc.projector_z, kTol);
  expect_near("total", oe.total, oc.total, kTol);
  REQUIRE(oe.vision_load.size() == oc.vision_load.size());
  for (std::size_t l = 0; l < oc.vision_load.size(); ++l) CHECK(oe.vision_load[l].tokens == oc.vision_load[l].tokens);
  c.backward();
  e.backward();
  const auto noise = expect_grads_close(c.parameters(), e.parameters(), kTol);

  // Three AdamW steps (both sides on host tensors): the device branches' saved state is rebuilt every forward.
  train::AdamWOptions ao;
  ao.lr = 1e-2;
  ParameterList pc = c.parameters(), pe = e.parameters();
  train::AdamW opt_c(pc, ao), opt_e(pe, ao);
  for (int s = 0; s < 3; ++s) {
    zero_grad(pc);
    zero_grad(pe);
    const double lc = c.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid).total;
    const double le = e.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid).total;
    expect_near("step loss " + std::to_string(s), le, lc, 1e-4);
    c.backward();
    e.backward();
    opt_c.step();
    opt_e.step();
  }
  for (std::size_t i = 0; i < pc.size(); ++i)  // Adam's ±lr step on a noise-level gradient is left out
    if (!noise.count(pc[i]->name)) expect_close("after steps " + pc[i]->name, pe[i]->value, pc[i]->value, 1e-4);
}

TEST_CASE("nn device paths: the PyTorch fixtures through the device branches (cumo_parity's runners on Emulated)") {
  // What `cumo_parity --device cuda` runs, with the kernels replaced by their contracts: clip_vision, mistral,
  // qwen2, mixtral, llava and cumo (outputs 1e-4, gradients 1e-3 against PyTorch, as on the CPU; the cumo fixture's AdamW
  // steps included).
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(CUMO_FIXTURE_DIR)) {
    if (entry.path().extension() != ".safetensors") continue;
    const auto f = io::SafeTensors::open(entry.path().string());
    const auto it = f.metadata().find("kind");
    if (it == f.metadata().end()) continue;
    const std::string& kind = it->second;
    const auto config = nlohmann::json::parse(f.metadata().at("config"));
    parity::Report r;
    if (kind == "clip_vision")
      parity::run_clip_vision<Emu>(f, config, r);
    else if (kind == "mistral")
      parity::run_mistral<Emu>(f, config, r);
    else if (kind == "qwen2")
      parity::run_qwen2<Emu>(f, config, r);
    else if (kind == "mixtral")
      parity::run_mixtral<Emu>(f, config, r);
    else if (kind == "llava")
      parity::run_llava<Emu>(f, config, r);
    else if (kind == "cumo")
      parity::run_cumo<Emu>(f, config, r);
    else
      continue;
    ++files;
    CAPTURE(entry.path().filename().string());
    CHECK(r.failed == 0);
    CHECK(r.passed > 10);
  }
  CHECK(files >= 6);  // one fixture each of clip_vision, mistral, qwen2, mixtral, llava, cumo ship today
}
