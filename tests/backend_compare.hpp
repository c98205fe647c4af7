#pragma once
// Whole layers and models on backend B against the same ones on backend::Cpu, the reference: relative / absolute
// comparisons of tensors on any device, parameter copies, host-drawn random values, the tiny CuMo's batch, and the
// comparisons themselves. tests/cuda/test_cuda_model.cu runs them with B = backend::Cuda; tests/test_backend_generic.cpp
// runs them with B = backend::Cpu at tolerance 0 — two models built from one config must agree bit for bit (the
// determinism every backend promises).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "cumo/core/compare.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo_test_config.hpp"

namespace cumo::backend_test {

inline Tensor on_cpu(const Tensor& t) { return t.device() == Device::cpu ? t : t.to(Device::cpu); }

inline void expect_close(const std::string& what, const Tensor& got, const Tensor& want, double tol) {
  REQUIRE(got.shape() == want.shape());
  const double e = rel_error(got, want);  // NaN anywhere → ∞
  CAPTURE(what);
  CAPTURE(e);
  CHECK(e <= tol);
}
inline void expect_near(const std::string& what, double got, double want, double tol) {
  CAPTURE(what);
  CAPTURE(got);
  CAPTURE(want);
  CHECK(std::abs(got - want) <= tol * std::max(1.0, std::abs(want)));
}

// Same-named parameter lists in the same order (the two models are built from one config).
inline void copy_parameters(const ParameterList& from, const ParameterList& to) {
  REQUIRE(from.size() == to.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    REQUIRE(from[i]->name == to[i]->name);
    to[i]->value.copy_from(from[i]->value);
  }
}
// ‖a − b‖₂ (f32 tensors on any device)
inline double abs_error(const Tensor& a, const Tensor& b) {
  const Tensor x = on_cpu(a).contiguous(), y = on_cpu(b).contiguous();
  double s = 0;
  for (std::int64_t j = 0; j < y.numel(); ++j) {
    const double d = double(x.data<float>()[j]) - double(y.data<float>()[j]);
    s += d * d;
  }
  return std::sqrt(s);
}

// A gradient that is zero in exact arithmetic — the key bias of attention without RoPE (a bias on every key adds the
// same q·b to all of a query's scores, which the softmax ignores) — is rounding noise on both sides, so a relative
// error means nothing there: such a gradient (CPU norm below kNoiseNorm) is checked in absolute terms
// (tools/parity/models.hpp does the same against PyTorch). Returns the names of those parameters.
inline constexpr double kNoiseNorm = 1e-6, kNoiseAbsTol = 1e-5;
inline std::set<std::string> expect_grads_close(const ParameterList& cpu, const ParameterList& other, double tol) {
  REQUIRE(cpu.size() == other.size());
  std::set<std::string> noise;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const Tensor zero = Tensor::zeros(cpu[i]->grad.shape());
    if (rel_error(cpu[i]->grad, zero) < kNoiseNorm) {
      noise.insert(cpu[i]->name);
      const double abs_err = abs_error(other[i]->grad, cpu[i]->grad);
      CAPTURE(cpu[i]->name);
      CAPTURE(abs_err);
      CHECK(abs_err <= kNoiseAbsTol);
    } else {
      expect_close("grad " + cpu[i]->name, other[i]->grad, cpu[i]->grad, tol);
    }
  }
  return noise;
}

inline Tensor random_tensor(Shape s, Rng& rng, float scale = 1.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, 0.f, scale);
  return t;
}
// Fresh N(0, scale²) values, drawn on the host (so every backend gets the same bits).
inline void randomize(const ParameterList& ps, Rng& rng, float scale) {
  for (Parameter* p : ps) {
    Tensor v = random_tensor(p->value.shape(), rng, scale);
    p->value.copy_from(p->value.device() == Device::cpu ? v : v.to(p->value.device()));
  }
}

// Two sequences of 9 tokens, one image each (4 image tokens), labels on the text after it (tests/test_models_cumo),
// one padding key.
struct Batch {
  std::vector<std::int64_t> ids{1, 12, 12, 12, 12, 4, 5, 6, 7, 2, 12, 12, 12, 12, 8, 3, 9, 1};
  std::vector<std::int64_t> labels{-100, -100, -100, -100, -100, 4, 5, 6, 7, -100, -100, -100, -100, -100, 8, 3, 9, 1};
  std::vector<std::uint8_t> key_valid{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0};  // one padding key
  std::int64_t B = 2, T = 9;
  Tensor px;
  explicit Batch(Rng& rng) : px(random_tensor({2, 3, 8, 8}, rng)) {}
};


// ---- the comparisons themselves: model on backend B against the same model on backend::Cpu ----------------------
// `tol` is the relative tolerance of outputs and gradients, `step_tol` the one after optimizer steps.

// nn::Linear with a bias: output, dx twice (the backward may run again on the saved input), accumulated grads.
template <class B>
void compare_linear(Rng& rng, double tol) {
  nn::Linear<backend::Cpu> c("l", 24, 40, true);
  nn::Linear<B> o("l", 24, 40, true);
  ParameterList pc, po;
  c.collect(pc);
  o.collect(po);
  randomize(pc, rng, 0.3f);
  copy_parameters(pc, po);
  const Tensor x = random_tensor({37, 24}, rng), dy = random_tensor({37, 40}, rng);
  expect_close("y", o.forward(x.to(B::device)), c.forward(x), tol);
  for (int rep = 0; rep < 2; ++rep) expect_close("dx", o.backward(dy.to(B::device)), c.backward(dy), tol);
  expect_grads_close(pc, po, tol);
}

// nn::ClipVision: every hidden state, the features, every parameter gradient and d pixels. Only parameters that get
// no gradient by construction may be noise-level: the key biases, the unused last layer and post_layernorm.
template <class B>
void compare_clip_vision(Rng& rng, double tol) {
  const nn::VisionConfig vc = test::tiny_cumo_config().llava.vision;
  nn::ClipVision<backend::Cpu> c(vc);
  nn::ClipVision<B> o(vc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), o.parameters());
  const Tensor px = random_tensor({3, 3, 8, 8}, rng);
  const auto oc = c.forward(px);
  const auto oo = o.forward(px);
  REQUIRE(oc.hidden_states.size() == oo.hidden_states.size());
  for (std::size_t l = 0; l < oc.hidden_states.size(); ++l)
    expect_close("hidden_state " + std::to_string(l), oo.hidden_states[l], oc.hidden_states[l], tol);
  expect_close("features", oo.features, oc.features, tol);
  const Tensor df = random_tensor(oc.features.shape(), rng);
  c.backward(df);
  o.backward(df.to(B::device));
  expect_close("d pixel_values", o.input_grad(), c.input_grad(), tol);
  for (const auto& n : expect_grads_close(c.parameters(), o.parameters(), tol))
    CHECK((n.find("k_proj.bias") != std::string::npos || n.find("post_layernorm") != std::string::npos ||
           n.find("layers.1.") != std::string::npos));
}

// nn::DecoderLM (GQA 3/1, RoPE, 2 layers): logits, CE, target count, every gradient; dense with a padding key, or
// Mixtral (top-2-of-4 FFNs, HF's cross-layer aux loss weighted 0.02).
template <class B>
void compare_decoder(Rng& rng, double tol, bool mixtral) {
  nn::DecoderConfig dc = test::tiny_cumo_config().llava.text;
  dc.layers = 2;
  if (mixtral) {
    dc.experts = 4;
    dc.top_k = 2;
    dc.aux_coef = 0.02;
  }
  nn::DecoderLM<backend::Cpu> c(dc);
  nn::DecoderLM<B> o(dc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), o.parameters());
  Batch b(rng);
  std::vector<std::int64_t> ids = b.ids;
  for (auto& id : ids) id %= 12;  // no image tokens: a plain LM batch
  const std::vector<std::uint8_t>* kv = mixtral ? nullptr : &b.key_valid;
  const auto oc = c.forward(ids, b.B, b.T, &b.labels, kv);
  const auto oo = o.forward(ids, b.B, b.T, &b.labels, kv);
  expect_close("logits", oo.logits, oc.logits, tol);
  expect_near("ce", oo.ce, oc.ce, tol);
  expect_near("aux", oo.aux, oc.aux, tol);
  CHECK(oo.targets == oc.targets);
  if (mixtral) CHECK(oc.aux > 0);
  c.backward_all(0.5f);
  o.backward_all(0.5f);
  expect_grads_close(c.parameters(), o.parameters(), tol);
}

// The same upcycled CuMo on the CPU and on B: both initialised from `seed` (drawn on the host: the same bits),
// random N(0, scale²) weights, then upcycled (experts copies of the random dense MLPs) — or, with
// random_experts, upcycled first so that the experts differ too — and B's parameters copied from the CPU's.
template <class B>
void upcycled_twins(models::CuMo<backend::Cpu>& c, models::CuMo<B>& o, std::uint64_t seed, Rng& rng, float scale,
                    bool random_experts) {
  Rng init_c(seed), init_o(seed);
  c.reset_parameters(init_c);
  o.reset_parameters(init_o);
  for (std::size_t i = 0; i < c.parameters().size(); ++i)
    CHECK(bitwise_equal(o.parameters()[i]->value, c.parameters()[i]->value));
  if (!random_experts) randomize(c.parameters(), rng, scale);
  c.upcycle(init_c);
  o.upcycle(init_o);
  REQUIRE(o.vision_is_sparse());
  REQUIRE(o.connector_is_sparse());
  if (random_experts) randomize(c.parameters(), rng, scale);
  copy_parameters(c.parameters(), o.parameters());
}

// The whole upcycled models::CuMo: the same initial bits from the same seed; logits, every loss term, expert loads,
// every gradient; then three clipped optimizer steps (train::AdamW on the CPU, train::OptimizerFor<B> on B, both
// clipped by train::clip_gradients) — losses, gradient norms and every parameter whose gradient is not noise.
template <class B>
void compare_cumo(Rng& rng, double tol, double step_tol) {
  const models::CuMoConfig cfg = test::tiny_cumo_config();
  models::CuMo<backend::Cpu> c(cfg);
  models::CuMo<B> o(cfg);
  upcycled_twins(c, o, 7, rng, 0.3f, /*random_experts=*/false);
  Batch b(rng);

  const auto oc = c.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  const auto oo = o.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  expect_close("logits", oo.logits, oc.logits, tol);
  expect_near("ce", oo.ce, oc.ce, tol);
  expect_near("vision_balance", oo.vision_balance, oc.vision_balance, tol);
  expect_near("vision_z", oo.vision_z, oc.vision_z, tol);
  expect_near("projector_balance", oo.projector_balance, oc.projector_balance, tol);
  expect_near("projector_z", oo.projector_z, oc.projector_z, tol);
  expect_near("total", oo.total, oc.total, tol);
  REQUIRE(oo.vision_load.size() == oc.vision_load.size());
  for (std::size_t l = 0; l < oc.vision_load.size(); ++l) CHECK(oo.vision_load[l].tokens == oc.vision_load[l].tokens);
  CHECK(oo.projector_load.tokens == oc.projector_load.tokens);
  c.backward();
  o.backward();
  const std::set<std::string> noise = expect_grads_close(c.parameters(), o.parameters(), tol);

  train::AdamWOptions ao;
  ao.lr = 1e-2;
  ao.weight_decay = 0.01;
  ParameterList pc = c.parameters(), po = o.parameters();
  train::AdamW opt_c(pc, ao);
  typename train::OptimizerFor<B>::type opt_o(po, ao);
  for (int s = 0; s < 3; ++s) {
    zero_grad(pc);
    zero_grad(po);
    const double lc = c.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid).total;
    const double lo = o.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid).total;
    expect_near("step loss " + std::to_string(s), lo, lc, step_tol);
    c.backward();
    o.backward();
    const float nc = train::clip_gradients(opt_c, 0.5, s + 1);
    const float no = train::clip_gradients(opt_o, 0.5, s + 1);
    expect_near("grad norm " + std::to_string(s), no, nc, step_tol);
    opt_c.step();
    opt_o.step();
  }
  // Adam turns a noise-level gradient into a ±lr step of either sign on either side: those parameters (which
  // cannot change the loss) are left out; every other one must agree.
  for (std::size_t i = 0; i < pc.size(); ++i)
    if (!noise.count(pc[i]->name)) expect_close("after steps " + pc[i]->name, po[i]->value, pc[i]->value, step_tol);
}

// KV-cache generation on B: a prefill of 5 tokens then 3 single-token steps of a GQA decoder (2 sequences, so the
// device packs the strided cache), each step's logits against the CPU's, then CuMo::generate's greedy tokens for an image
// prompt (the upcycled model; exact token equality — the tiny random model's top-2 logits are far apart).
template <class B>
void compare_cached_decode(Rng& rng, double tol) {
  nn::DecoderConfig dc = test::tiny_cumo_config().llava.text;
  dc.layers = 2;
  nn::DecoderLM<backend::Cpu> c(dc);
  nn::DecoderLM<B> o(dc);
  randomize(c.parameters(), rng, 0.3f);
  copy_parameters(c.parameters(), o.parameters());
  const std::int64_t Bn = 2, P = 5;
  std::vector<std::int64_t> prompt{1, 4, 5, 6, 7, 2, 8, 3, 9, 1};
  auto cc = c.make_cache(Bn, P + 3);
  auto co = o.make_cache(Bn, P + 3);
  expect_close("prefill logits", o.forward_cached(prompt, Bn, P, co), c.forward_cached(prompt, Bn, P, cc), tol);
  for (int s = 0; s < 3; ++s) {
    const std::vector<std::int64_t> next{std::int64_t(3 + s), std::int64_t(5 + s)};
    expect_close("decode step " + std::to_string(s), o.forward_cached(next, Bn, 1, co),
                 c.forward_cached(next, Bn, 1, cc), tol);
  }
  CHECK(co[0].len == P + 3);

  const models::CuMoConfig cfg = test::tiny_cumo_config();
  models::CuMo<backend::Cpu> mc(cfg);
  models::CuMo<B> mo(cfg);
  upcycled_twins(mc, mo, 3, rng, 0.5f, /*random_experts=*/true);
  const Tensor px = random_tensor({1, 3, 8, 8}, rng);
  const std::vector<std::int64_t> ids{1, cfg.llava.image_token_id, 4, 5};
  CHECK(mo.generate(ids, px, 6, -1) == mc.generate(ids, px, 6, -1));
}

// S² multi-scale vision features on B: a CuMo whose tower runs on the image and its 3×3 tiles, upcycled, with every
// loss term and gradient against the CPU's.
template <class B>
void compare_s2(Rng& rng, double tol) {
  models::CuMoConfig cfg = test::tiny_cumo_config();
  cfg.llava.vision.s2 = true;
  models::CuMo<backend::Cpu> c(cfg);
  models::CuMo<B> o(cfg);
  upcycled_twins(c, o, 5, rng, 0.3f, /*random_experts=*/true);
  Batch b(rng);
  const auto oc = c.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  const auto oo = o.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  expect_close("S2 logits", oo.logits, oc.logits, tol);
  expect_near("S2 vision_balance", oo.vision_balance, oc.vision_balance, tol);
  expect_near("S2 vision_z", oo.vision_z, oc.vision_z, tol);
  expect_near("S2 total", oo.total, oc.total, tol);
  REQUIRE(oo.vision_load.size() == oc.vision_load.size());
  for (std::size_t l = 0; l < oc.vision_load.size(); ++l) CHECK(oo.vision_load[l].tokens == oc.vision_load[l].tokens);
  c.backward();
  o.backward();
  expect_grads_close(c.parameters(), o.parameters(), tol);
  expect_close("S2 d pixel_values", o.llava().last_dpixels(), c.llava().last_dpixels(), tol);
}

// Inference with the matrix weights held in bf16 or f16 (ParameterStorage, as cumo_generate --dtype loads them) on
// B, against the CPU holding the same weights: an upcycled CuMo saved in fp32 and loaded into both (loading makes the
// CLIP MLPs and the connector sparse and rounds each matrix once: the same bits on both sides); the multimodal
// prefill's logits through the KV cache, three decode steps, and, at tolerance 0, CuMo::generate's tokens.
template <class B>
void compare_half_weights(Rng& rng, DType dt, double tol, const std::string& path) {
  const models::CuMoConfig cfg = test::tiny_cumo_config();
  {
    models::CuMo<backend::Cpu> ref(cfg);
    Rng init(9);
    // Randomised before upcycling, so that every expert of a block is the same MLP: B and the CPU round the
    // activations differently (the GPU rounds x to the weights' dtype before every product, the CPU widens the
    // weights), and a token whose 2nd and 3rd router scores lie that close picks other experts on each side — with
    // identical experts (top-k renormalised) that changes nothing. Expert indexing with half weights is checked
    // op by op (test_cuda_backend.cu's grouped_linear with bf16 weights).
    ref.reset_parameters(init);
    randomize(ref.parameters(), rng, 0.5f);
    ref.upcycle(init);
    ref.save(path);
  }
  ParameterStorageScope storage({dt, /*grads=*/false});
  models::CuMo<backend::Cpu> c(cfg);
  models::CuMo<B> o(cfg);
  c.load(path);
  o.load(path);
  REQUIRE(o.vision_is_sparse());
  REQUIRE(o.connector_is_sparse());
  int held = 0;
  for (const Parameter* p : o.parameters()) held += p->value.dtype() == dt;
  CHECK(held > 0);
  const Tensor px = random_tensor({1, 3, 8, 8}, rng);
  const std::vector<std::int64_t> ids{1, 12, 12, 12, 12, 4, 5, 6};  // 4 image tokens (id 12), then text
  REQUIRE(cfg.llava.image_token_id == 12);
  auto& lc = c.llava().language_model;
  auto& lo = o.llava().language_model;
  const std::int64_t P = std::int64_t(ids.size());
  auto cc = lc.make_cache(1, P + 3);
  auto co = lo.make_cache(1, P + 3);
  expect_close("half-weight prefill logits",
               lo.forward_cached_embeds(o.llava().embed_multimodal(ids, px, /*training=*/false), 1, P, co),
               lc.forward_cached_embeds(c.llava().embed_multimodal(ids, px, /*training=*/false), 1, P, cc), tol);
  for (std::int64_t s = 0; s < 3; ++s)
    expect_close("half-weight decode step " + std::to_string(s), lo.forward_cached({3 + s}, 1, 1, co),
                 lc.forward_cached({3 + s}, 1, 1, cc), tol);
  if (tol == 0) CHECK(o.generate(ids, px, 6, -1) == c.generate(ids, px, 6, -1));
}

}  // namespace cumo::backend_test
