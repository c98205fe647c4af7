// The model on backend::Cuda against the same model on backend::Cpu, which is its reference: the layers of nn/
// (Linear, ClipVision, DecoderLM with GQA + RoPE + padding keys) and the whole models::CuMo<Backend> — logits, every
// loss term, every parameter gradient, and a few optimizer steps (train::CudaAdamW against train::AdamW with
// clipping). Both sides start from the same bits: the CUDA model's parameters are copied from the CPU model's.
//
// Tolerances, relative error ‖gpu − cpu‖ / ‖cpu‖ (max-abs for scalars):
//   kF32 = 1e-5 in fp32 (TF32 off): the two sides differ only in the summation order of fp32 dot products
//     (cuBLAS against Eigen, ~√K·2⁻²⁴ per product) and CUDA's expf/erff against glibc's (≤ 2 ulp); any indexing or
//     formula error gives O(1). Top-k routing is discrete: with random weights no two router probabilities of a
//     token are within 1e-5 of each other in these sizes, so both sides pick the same experts.
//   kSteps = 1e-4 after three AdamW steps: the 1e-6-level gradient differences pass through Adam's m/√v, which
//     amplifies relative differences of small gradients.
//   A gradient that is zero in exact arithmetic (CLIP's key bias) is noise on both sides: absolute 1e-5 instead,
//     and Adam's ±lr step on it is left out of the after-steps comparison (it cannot change the loss).
//   kBf16 = 3e-2 for options().dense_bf16 (bf16 GEMM operands against fp32): bf16 keeps 8 bits, 2⁻⁹ ≈ 2e-3 per
//     operand, accumulated over a few layers.
//
// Without a usable GPU the binary prints "SKIPPED: no CUDA device (...)" and exits 77 (ctest: skipped).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <vector>

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "cuda_test_main.cuh"

#include "cumo/backend/cuda.cuh"
#include "cumo/core/compare.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/train/adamw_cuda.cuh"
#include "cumo/train/clip.hpp"
#include "cumo/train/optimizer.hpp"
#include "../backend_compare.hpp"
#include "../cumo_test_config.hpp"

using namespace cumo;
using Cpu = backend::Cpu;
using Cuda = backend::Cuda;
using namespace cumo::backend_test;

namespace {

std::uint64_t g_seed = 0;

constexpr double kF32 = 1e-5;
constexpr double kSteps = 1e-4;
constexpr double kBf16 = 3e-2;

}  // namespace

TEST_CASE("cuda nn::Linear<Cuda> matches nn::Linear<Cpu> (bias, backward accumulates)") {
  Rng rng(g_seed + __LINE__);
  nn::Linear<Cpu> c("l", 24, 40, true);
  nn::Linear<Cuda> g("l", 24, 40, true);
  ParameterList pc, pg;
  c.collect(pc);
  g.collect(pg);
  randomize(pc, rng, 0.3f);
  copy_parameters(pc, pg);
  const Tensor x = random_tensor({37, 24}, rng), dy = random_tensor({37, 40}, rng);
  expect_close("y", g.forward(x.to(Device::cuda)), c.forward(x), kF32);
  for (int rep = 0; rep < 2; ++rep) expect_close("dx", g.backward(dy.to(Device::cuda)), c.backward(dy), kF32);
  expect_grads_close(pc, pg, kF32);
}

TEST_CASE("cuda nn::ClipVision<Cuda> matches the CPU: hidden states, features, parameter gradients") {
  Rng rng(g_seed + __LINE__);
  const nn::VisionConfig vc = test::tiny_cumo_config().llava.vision;
  nn::ClipVision<Cpu> c(vc);
  nn::ClipVision<Cuda> g(vc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), g.parameters());
  const Tensor px = random_tensor({3, 3, 8, 8}, rng);
  const auto oc = c.forward(px);
  const auto og = g.forward(px);
  REQUIRE(oc.hidden_states.size() == og.hidden_states.size());
  for (std::size_t l = 0; l < oc.hidden_states.size(); ++l)
    expect_close("hidden_state " + std::to_string(l), og.hidden_states[l], oc.hidden_states[l], kF32);
  expect_close("features", og.features, oc.features, kF32);
  const Tensor df = random_tensor(oc.features.shape(), rng);
  c.backward(df);
  const Tensor dpx = g.backward(df.to(Device::cuda));
  CHECK_FALSE(dpx.defined());  // d pixels are not computed on the device
  expect_grads_close(c.parameters(), g.parameters(), kF32);
}

TEST_CASE("cuda nn::DecoderLM<Cuda> matches the CPU: GQA, RoPE, a padding key, loss and every gradient") {
  Rng rng(g_seed + __LINE__);
  nn::DecoderConfig dc = test::tiny_cumo_config().llava.text;
  dc.layers = 2;
  nn::DecoderLM<Cpu> c(dc);
  nn::DecoderLM<Cuda> g(dc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), g.parameters());
  Batch b(rng);
  std::vector<std::int64_t> ids = b.ids;
  for (auto& id : ids) id %= 12;
  const auto oc = c.forward(ids, b.B, b.T, &b.labels, &b.key_valid);
  const auto og = g.forward(ids, b.B, b.T, &b.labels, &b.key_valid);
  expect_close("logits", og.logits, oc.logits, kF32);
  expect_near("ce", og.ce, oc.ce, kF32);
  CHECK(og.targets == oc.targets);
  c.backward_all(0.5f);
  g.backward_all(0.5f);
  expect_grads_close(c.parameters(), g.parameters(), kF32);
}

TEST_CASE("cuda a Mixtral DecoderLM<Cuda> matches the CPU (sparse FFNs, HF's cross-layer aux loss, gradients)") {
  Rng rng(g_seed + __LINE__);
  nn::DecoderConfig dc = test::tiny_cumo_config().llava.text;
  dc.layers = 2;
  dc.experts = 4;
  dc.top_k = 2;
  dc.aux_coef = 0.02;
  nn::DecoderLM<Cpu> c(dc);
  nn::DecoderLM<Cuda> g(dc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), g.parameters());
  Batch b(rng);
  std::vector<std::int64_t> ids = b.ids;
  for (auto& id : ids) id %= 12;
  const auto oc = c.forward(ids, b.B, b.T, &b.labels);
  const auto og = g.forward(ids, b.B, b.T, &b.labels);
  expect_close("logits", og.logits, oc.logits, kF32);
  expect_near("ce", og.ce, oc.ce, kF32);
  expect_near("aux", og.aux, oc.aux, kF32);
  c.backward_all();
  g.backward_all();
  expect_grads_close(c.parameters(), g.parameters(), kF32);
}

TEST_CASE("cuda models::CuMo<Cuda> matches CuMo<Cpu>: logits, every loss term, every gradient, AdamW steps") {
  Rng rng(g_seed + __LINE__);
  const models::CuMoConfig cfg = test::tiny_cumo_config();
  models::CuMo<Cpu> c(cfg);
  models::CuMo<Cuda> g(cfg);
  Rng init_c(7), init_g(7);
  c.reset_parameters(init_c);
  g.reset_parameters(init_g);  // drawn on the host: the same bits
  {
    const ParameterList pc = c.parameters(), pg = g.parameters();
    REQUIRE(pc.size() == pg.size());
    for (std::size_t i = 0; i < pc.size(); ++i) expect_close("init " + pc[i]->name, pg[i]->value, pc[i]->value, 0.0);
  }
  randomize(c.parameters(), rng, 0.3f);
  c.upcycle(init_c);
  g.upcycle(init_g);
  REQUIRE(g.vision_is_sparse());
  REQUIRE(g.connector_is_sparse());
  copy_parameters(c.parameters(), g.parameters());  // the routers were drawn on each side; make every bit equal
  Batch b(rng);

  const auto oc = c.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  const auto og = g.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  expect_close("logits", og.logits, oc.logits, kF32);
  expect_near("ce", og.ce, oc.ce, kF32);
  expect_near("vision_balance", og.vision_balance, oc.vision_balance, kF32);
  expect_near("vision_z", og.vision_z, oc.vision_z, kF32);
  expect_near("projector_balance", og.projector_balance, oc.projector_balance, kF32);
  expect_near("projector_z", og.projector_z, oc.projector_z, kF32);
  expect_near("total", og.total, oc.total, kF32);
  REQUIRE(og.vision_load.size() == oc.vision_load.size());
  for (std::size_t l = 0; l < oc.vision_load.size(); ++l) CHECK(og.vision_load[l].tokens == oc.vision_load[l].tokens);
  c.backward();
  g.backward();
  const std::set<std::string> noise = expect_grads_close(c.parameters(), g.parameters(), kF32);

  SUBCASE("three clipped AdamW steps: losses and parameters") {
    train::AdamWOptions ao;
    ao.lr = 1e-2;
    ao.weight_decay = 0.01;
    ParameterList pc = c.parameters(), pg = g.parameters();
    train::AdamW oc_opt(pc, ao);
    train::CudaAdamW og_opt(pg, ao);
    for (int s = 0; s < 3; ++s) {
      zero_grad(pc);
      zero_grad(pg);
      const double lc = c.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid).total;
      const double lg = g.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid).total;
      expect_near("step loss " + std::to_string(s), lg, lc, kSteps);
      c.backward();
      g.backward();
      const float nc = train::clip_grad_norm(pc, 0.5);
      const Tensor ng = on_cpu(og_opt.clip_grad_norm(0.5));
      expect_near("grad norm " + std::to_string(s), ng.data<float>()[0], nc, kSteps);
      oc_opt.step();
      og_opt.step();
    }
    // Adam turns a noise-level gradient into a ±lr step of either sign on either side: those parameters (which
    // cannot change the loss) are left out; every other one must agree.
    for (std::size_t i = 0; i < pc.size(); ++i)
      if (!noise.count(pc[i]->name)) expect_close("after steps " + pc[i]->name, pg[i]->value, pc[i]->value, kSteps);
  }
}

TEST_CASE("cuda models::CuMo<Cuda> with bf16 dense GEMMs (options().dense_bf16) stays near fp32") {
  Rng rng(g_seed + __LINE__);
  const models::CuMoConfig cfg = test::tiny_cumo_config();
  models::CuMo<Cuda> g(cfg);
  Rng init(11);
  g.reset_parameters(init);
  randomize(g.parameters(), rng, 0.3f);
  g.upcycle(init);
  Batch b(rng);
  const auto f32 = g.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  gpu::options().dense_bf16 = true;
  const auto bf = g.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  gpu::options().dense_bf16 = false;
  expect_close("logits bf16 vs fp32", bf.logits, f32.logits, kBf16);
  expect_near("ce bf16 vs fp32", bf.ce, f32.ce, kBf16);
}

TEST_CASE("cuda models::CuMo<Cuda>: bad input gets the CPU's errors (host-side ids, shapes)") {
  Rng rng(g_seed + __LINE__);
  models::CuMo<Cuda> g(test::tiny_cumo_config());
  Batch b(rng);
  std::vector<std::int64_t> bad = b.ids;
  bad[6] = 99;  // outside the vocabulary
  CHECK_THROWS_AS(g.forward(bad, b.B, b.T, b.px, &b.labels), Error);
  CHECK_THROWS_AS(g.forward(b.ids, b.B, b.T, Tensor::zeros({1, 3, 8, 8}), &b.labels), Error);  // 4 features for 8
  nn::LlavaConfig s2 = test::tiny_cumo_config().llava;
  s2.vision.s2 = true;
  CHECK_THROWS_AS(nn::Llava<Cuda>{s2}, Error);  // S² is CPU-only for now: a clear error, not a wrong answer
}

// =================================================================================================================
int main(int argc, char** argv) { return cumo::test::run_cuda_tests(argc, argv, "cuda model tests", g_seed); }
