// LLaVA-MoD: fixture parity of the distillation losses and their gradients (kind llava_mod_distill), finite-difference
// checks of every loss's gradient w.r.t. the logits in double, DPO / KTO-pair against hand-computed values, the
// sparse student (upcycling invariant, StudentPass == DecoderLM, segments), the preference pairs of the shapes world
// and the hallucination metric.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cumo/data/preference.hpp"
#include "cumo/models/llava_mod.hpp"
#include "cumo/train/distill.hpp"
#include "fixture_runs.hpp"
#include "nn_test_util.hpp"

using namespace cumo;

namespace {

Tensor random_f64(Shape s, Rng& rng, double scale) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, 0.f, float(scale));
  return t.to(DType::f64);
}

Tensor labels_of(const std::vector<std::int64_t>& v, std::int64_t B, std::int64_t T) {
  Tensor t = Tensor::empty({B, T}, DType::i64);
  std::copy(v.begin(), v.end(), t.data<std::int64_t>());
  return t;
}

// Central differences of f w.r.t. every entry of z (f64), against the analytic gradient g: max abs error.
double fd_max_error(Tensor& z, const Tensor& g, const std::function<double()>& f, double h = 1e-5) {
  double worst = 0;
  for (std::int64_t i = 0; i < z.numel(); ++i) {
    double* p = z.data<double>() + i;
    const double keep = *p;
    *p = keep + h;
    const double fp = f();
    *p = keep - h;
    const double fm = f();
    *p = keep;
    worst = std::max(worst, std::abs((fp - fm) / (2 * h) - g.data<double>()[i]));
  }
  return worst;
}

double max_abs(const Tensor& t) {
  double m = 0;
  const Tensor d = t.to(DType::f64);
  for (std::int64_t i = 0; i < d.numel(); ++i) m = std::max(m, std::abs(d.data<double>()[i]));
  return m;
}

nn::DecoderConfig tiny_qwen2() {
  nn::DecoderConfig c;
  c.model_type = "qwen2";
  c.vocab = 17;
  c.hidden = 8;
  c.layers = 3;
  c.heads = 2;
  c.kv_heads = 1;
  c.head_dim = 4;
  c.ffn = 12;
  c.qkv_bias = true;
  c.tie_embeddings = true;
  return c;
}

// B = 2, T = 6: prompt positions -100
const std::vector<std::int64_t> kIds{1, 5, 7, 2, 12, 0, 3, 3, 9, 4, 16, 8};
const std::vector<std::int64_t> kLabels{-100, -100, -100, 2, 12, 0, -100, -100, 9, 4, 16, 8};

}  // namespace

// ---- fixture parity ------------------------------------------------------------------------------------------------
TEST_CASE("llava_mod parity: logits, kl, align, ce, aux, sequence log-probs, DPO, KTO-pair and all three grad sets") {
  CHECK(test::run_fixture_kinds<backend::Cpu>({"llava_mod_distill"}, 100) >= 1);
}

// ---- finite differences on the logits (double) -----------------------------------------------------------------------
TEST_CASE("distill: mimic loss gradient (align, kl, ce, temperature) matches finite differences in double") {
  Rng rng(3);
  const std::int64_t B = 2, T = 6, V = 9;
  std::vector<std::int64_t> lab{-100, -100, -100, 2, 8, 0, -100, -100, 1, 4, 7, 8};
  const Tensor labels = labels_of(lab, B, T);
  for (double tau : {1.0, 2.5}) {
    for (const train::MimicWeights w : {train::MimicWeights{1, 0, 0}, train::MimicWeights{0, 1, 0},
                                        train::MimicWeights{0, 0, 1}, train::MimicWeights{0.7, 0.2, 1.3}}) {
      CAPTURE(tau);
      CAPTURE(w.align);
      CAPTURE(w.ce);
      Tensor zs = random_f64({B * T, V}, rng, 2.0), zt = random_f64({B * T, V}, rng, 2.0);
      train::KDOptions opt;
      opt.temperature = tau;
      opt.grad_scale = 0.75;
      Tensor g;
      const auto res = train::mimic_distill_loss(zs, zt, labels, &g, w, opt);
      CHECK(res.targets == 7);
      CHECK(res.kl >= 0);
      CHECK(res.align == doctest::Approx(res.kl + tau * tau * res.teacher_entropy).epsilon(1e-12));
      const double err = fd_max_error(zs, g, [&] { return 0.75 * train::mimic_distill_loss(zs, zt, labels, nullptr, w, opt).objective; });
      CHECK(err < 1e-8);
      // unmasked rows get nothing
      for (std::int64_t v = 0; v < V; ++v) CHECK(g.data<double>()[0 * V + v] == 0.0);
    }
  }
}

TEST_CASE("distill: kl and align on hand-made logits") {
  const std::int64_t V = 3;
  const Tensor labels = labels_of({-100, 1, 2}, 1, 3);  // rows 0 and 1 counted, targets 1 and 2
  Tensor zs = Tensor::zeros({3, V}, DType::f64), zt = Tensor::zeros({3, V}, DType::f64);
  // row 0: student uniform, teacher log(1,2,1)
  zt.data<double>()[1] = std::log(2.0);
  // row 1: student log(1,1,2), teacher uniform
  zs.data<double>()[V + 2] = std::log(2.0);
  Tensor g;
  const auto r = train::mimic_distill_loss(zs, zt, labels, &g, train::MimicWeights{1, 0, 1});
  const double pt0[3] = {0.25, 0.5, 0.25}, ps1[3] = {0.25, 0.25, 0.5};
  double kl0 = 0, kl1 = 0, x0 = 0, x1 = 0;
  for (int v = 0; v < 3; ++v) {
    kl0 += pt0[v] * std::log(pt0[v] / (1.0 / 3));
    x0 -= pt0[v] * std::log(1.0 / 3);
    kl1 += (1.0 / 3) * std::log((1.0 / 3) / ps1[v]);
    x1 -= (1.0 / 3) * std::log(ps1[v]);
  }
  CHECK(r.kl == doctest::Approx((kl0 + kl1) / 2).epsilon(1e-12));
  CHECK(r.align == doctest::Approx((x0 + x1) / 2).epsilon(1e-12));
  CHECK(r.ce == doctest::Approx((-std::log(1.0 / 3) - std::log(0.5)) / 2).epsilon(1e-12));
  // identical logits: kl 0, align = teacher entropy, and the KD gradient vanishes
  Tensor g2;
  const auto same = train::mimic_distill_loss(zt, zt, labels, &g2, train::MimicWeights{1, 0, 0});
  CHECK(same.kl == doctest::Approx(0.0).epsilon(1e-15));
  CHECK(max_abs(g2) < 1e-15);
  // no counted row: zeros, no gradient (PyTorch would give NaN)
  Tensor g3;
  const auto none = train::mimic_distill_loss(zs, zt, labels_of({-100, -100, -100}, 1, 3), &g3);
  CHECK(none.targets == 0);
  CHECK(none.objective == 0.0);
  CHECK(max_abs(g3) == 0.0);
}

TEST_CASE("distill: sequence log-probs and their gradient match finite differences; gradients accumulate") {
  Rng rng(4);
  const std::int64_t B = 2, T = 6, V = 9;
  std::vector<std::int64_t> lab{-100, -100, 3, 2, 8, 0, -100, -100, -100, 4, 7, 8};
  const Tensor labels = labels_of(lab, B, T);
  Tensor z = random_f64({B * T, V}, rng, 2.0);
  const auto lp = train::sequence_logps(z, labels);
  REQUIRE(lp.size() == 2);
  // by hand: Σ over counted rows of z[target] − lse
  for (std::int64_t b = 0; b < B; ++b) {
    double want = 0;
    for (std::int64_t t = 0; t + 1 < T; ++t) {
      const std::int64_t y = lab[std::size_t(b * T + t + 1)];
      if (y < 0) continue;
      double s = 0;
      for (std::int64_t v = 0; v < V; ++v) s += std::exp(z.data<double>()[(b * T + t) * V + v]);
      want += z.data<double>()[(b * T + t) * V + y] - std::log(s);
    }
    CHECK(lp[std::size_t(b)] == doctest::Approx(want).epsilon(1e-12));
  }
  const std::vector<double> w{0.3, -1.7};
  Tensor g = Tensor::full<double>({B * T, V}, 0.5);  // pre-filled: the backward adds to it
  train::sequence_logps_backward(z, labels, w, g);
  for (std::int64_t i = 0; i < g.numel(); ++i) g.data<double>()[i] -= 0.5;
  const double err = fd_max_error(z, g, [&] {
    const auto l = train::sequence_logps(z, labels);
    return w[0] * l[0] + w[1] * l[1];
  });
  CHECK(err < 1e-8);
}

TEST_CASE("distill: DPO and KTO-pair gradients w.r.t. the policy logits match finite differences in double") {
  Rng rng(5);
  const std::int64_t B = 3, T = 5, V = 7;
  std::vector<std::int64_t> lab;
  for (std::int64_t s = 0; s < 2 * B; ++s)
    for (std::int64_t t = 0; t < T; ++t) lab.push_back(t < 2 ? -100 : std::int64_t(rng.next_u32() % V));
  const Tensor labels = labels_of(lab, 2 * B, T);
  struct Case {
    train::PreferenceLoss loss;
    double beta, smoothing, ref_shift;  // ref_shift moves the reference so KTO's clamped means take both branches
  };
  for (const Case c : {Case{train::PreferenceLoss::sigmoid, 0.1, 0.0, 0.0}, Case{train::PreferenceLoss::sigmoid, 2.0, 0.1, 0.0},
                       Case{train::PreferenceLoss::kto_pair, 0.5, 0.0, 3.0}, Case{train::PreferenceLoss::kto_pair, 0.5, 0.0, -3.0},
                       Case{train::PreferenceLoss::kto_pair, 1.5, 0.0, 0.0}}) {
    CAPTURE(int(c.loss));
    CAPTURE(c.ref_shift);
    Tensor z = random_f64({2 * B * T, V}, rng, 1.5);
    const auto lp0 = train::sequence_logps(z, labels);
    std::vector<double> ref_w(B), ref_l(B);
    for (std::int64_t b = 0; b < B; ++b) {
      ref_w[std::size_t(b)] = lp0[std::size_t(b)] + 0.4 * double(b) - 0.3 - c.ref_shift;
      ref_l[std::size_t(b)] = lp0[std::size_t(B + b)] - 0.2 * double(b) + 0.1 + c.ref_shift;
    }
    train::PreferenceOptions opt;
    opt.loss = c.loss;
    opt.beta = c.beta;
    opt.label_smoothing = c.smoothing;
    Tensor g;
    const auto res = train::preference_distill_loss(z, labels, ref_w, ref_l, &g, opt, 0.5);
    CHECK(std::isfinite(res.pref.loss));
    const double err = fd_max_error(z, g, [&] { return 0.5 * train::preference_distill_loss(z, labels, ref_w, ref_l, nullptr, opt).pref.loss; });
    CHECK(err < 1e-8);
  }
}

TEST_CASE("distill: DPO and KTO-pair against hand-computed values") {
  const double beta = 0.5;
  // dw = (0.5, 0), dl = (-1, 1)
  const std::vector<double> pw{-1.0, -2.0}, pl{-3.0, -1.0}, rw{-1.5, -2.0}, rl{-2.0, -2.0};
  auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  {
    const auto r = train::dpo_loss(pw, pl, rw, rl, beta);
    // h = dw − dl = (1.5, −1): loss = mean −log σ(β h)
    const double h0 = 1.5, h1 = -1.0;
    CHECK(r.loss == doctest::Approx(-(std::log(sig(beta * h0)) + std::log(sig(beta * h1))) / 2).epsilon(1e-13));
    CHECK(r.d_chosen[0] == doctest::Approx(-beta * sig(-beta * h0) / 2).epsilon(1e-13));
    CHECK(r.d_chosen[1] == doctest::Approx(-beta * sig(-beta * h1) / 2).epsilon(1e-13));
    CHECK(r.d_rejected[0] == doctest::Approx(beta * sig(-beta * h0) / 2).epsilon(1e-13));
    CHECK(r.chosen_rewards[0] == doctest::Approx(0.25));
    CHECK(r.rejected_rewards[1] == doctest::Approx(0.5));
    CHECK(r.reward_accuracy == doctest::Approx(0.5));
    CHECK(r.reward_margin == doctest::Approx(beta * (h0 + h1) / 2));
  }
  {
    // KL_w = max(0, mean dw) = 0.25, KL_l = max(0, mean dl) = 0
    const auto r = train::kto_pair_loss(pw, pl, rw, rl, beta);
    const double u0 = beta * (0.5 - 0), u1 = beta * (0 - 0), v0 = beta * (0.25 + 1), v1 = beta * (0.25 - 1);
    CHECK(r.kl_chosen == doctest::Approx(0.25));
    CHECK(r.kl_rejected == 0.0);
    CHECK(r.loss == doctest::Approx((4 - sig(u0) - sig(u1) - sig(v0) - sig(v1)) / 4).epsilon(1e-13));
    auto sp = [&](double x) { return sig(x) * (1 - sig(x)); };
    // chosen: direct −β s'(u_b)/(2B) plus the KL_w path: (1/B) · (−β/(2B)) Σ_c s'(v_c)
    const double kl_path = -beta / 4 * (sp(v0) + sp(v1)) / 2;
    CHECK(r.d_chosen[0] == doctest::Approx(-beta / 4 * sp(u0) + kl_path).epsilon(1e-13));
    CHECK(r.d_chosen[1] == doctest::Approx(-beta / 4 * sp(u1) + kl_path).epsilon(1e-13));
    // rejected: mean dl = 0 ≥ 0, so the clamp passes (PyTorch's clamp backward): + (1/B) (β/(2B)) Σ_c s'(u_c)
    const double kll_path = beta / 4 * (sp(u0) + sp(u1)) / 2;
    CHECK(r.d_rejected[0] == doctest::Approx(beta / 4 * sp(v0) + kll_path).epsilon(1e-13));
    CHECK(r.d_rejected[1] == doctest::Approx(beta / 4 * sp(v1) + kll_path).epsilon(1e-13));
  }
  {
    // policy == reference: DPO = log 2, KTO-pair = 1/2
    const std::vector<double> a{-1.0, -4.0};
    const auto d = train::dpo_loss(a, a, a, a, 0.1);
    CHECK(d.loss == doctest::Approx(std::log(2.0)).epsilon(1e-14));
    CHECK(d.d_chosen[0] == doctest::Approx(-0.1 * 0.5 / 2));
    const auto k = train::kto_pair_loss(a, a, a, a, 0.1);
    CHECK(k.loss == doctest::Approx(0.5).epsilon(1e-14));
    CHECK(k.d_chosen[0] == doctest::Approx(-0.1 / 4 * 0.25 - 0.1 / 4 * 0.5 / 2));
  }
  // DPO with label smoothing ε: −(1−ε) log σ(x) − ε log σ(−x)
  const auto s = train::dpo_loss({0.0}, {0.0}, {-1.0}, {0.0}, 1.0, 0.2);
  CHECK(s.loss == doctest::Approx(-0.8 * std::log(sig(1.0)) - 0.2 * std::log(sig(-1.0))).epsilon(1e-13));
  CHECK_THROWS_AS(train::dpo_loss({0.0}, {0.0, 1.0}, {0.0}, {0.0}, 1.0), Error);
  CHECK(train::preference_loss_from_string("kto_pair") == train::PreferenceLoss::kto_pair);
  CHECK_THROWS_AS(train::preference_loss_from_string("ipo"), Error);
}

// ---- the student ------------------------------------------------------------------------------------------------------
TEST_CASE("llava_mod student: upcycling every other layer keeps the dense student's logits; eval forward == training forward") {
  Rng rng(11);
  const auto c = tiny_qwen2();
  nn::DecoderLM<> dense(c), sparse(c);
  test::randomize(dense.parameters(), rng, 0.5f);
  const auto dp = dense.parameters(), sp = sparse.parameters();
  for (std::size_t i = 0; i < dp.size(); ++i) sp[i]->value.copy_from(dp[i]->value);
  const auto want = dense.forward(kIds, 2, 6, &kLabels);

  // the teacher's eval forward: bitwise the training forward's logits
  CHECK(bitwise_equal(models::eval_logits(dense, kIds, 2, 6), want.logits));

  Rng router_rng(12);
  const auto layers = models::make_sparse_student(sparse, 4, 2, router_rng);
  CHECK(layers == std::vector<int>{0, 2});
  CHECK(sparse.layers[0].mlp.is_sparse());
  CHECK_FALSE(sparse.layers[1].mlp.is_sparse());
  CHECK(sparse.layers[2].mlp.is_sparse());
  CHECK(sparse.layers[0].mlp.sparse().options().balance == BalanceCounts::top1);
  CHECK(rel_error(models::eval_logits(sparse, kIds, 2, 6), want.logits) < 1e-6);
  models::StudentPass pass(sparse);
  const auto out = pass.forward(kIds, 2, 6);
  CHECK(rel_error(out.logits, want.logits) < 1e-6);
  CHECK(out.aux_layers.size() == 2);
  CHECK(out.aux == doctest::Approx(out.aux_layers[0] + out.aux_layers[1]));
  // parameter names load_hf and save_hf use
  bool found = false;
  for (Parameter* p : sparse.parameters()) found |= p->name == "model.layers.2.mlp.experts.gate_up_proj";
  CHECK(found);
  CHECK_THROWS_AS(models::make_sparse_student(sparse, 4, 2, router_rng, {2}), Error);  // already sparse
  CHECK_THROWS_AS(models::make_sparse_student(dense, 4, 5, router_rng), Error);        // k > E
  // LLaVA-MoD's default trainable set: 2 sparse blocks × (gate_up, down, router) + 1 dense FFN × (gate, up, down)
  CHECK(models::train_only_ffn(sparse) == 9);
  CHECK_FALSE(sparse.embed_tokens.weight.trainable);
  CHECK_FALSE(sparse.layers[1].self_attn.q_proj.weight.trainable);
  CHECK(sparse.layers[1].mlp.dense().up_proj.weight.trainable);
}

TEST_CASE("llava_mod student: StudentPass under CE gives DecoderLM's gradients (dense), and segments add the aux losses") {
  Rng rng(13);
  const auto c = tiny_qwen2();
  nn::DecoderLM<> a(c), b(c);
  test::randomize(a.parameters(), rng, 0.5f);
  const auto pa = a.parameters(), pb = b.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) pb[i]->value.copy_from(pa[i]->value);
  zero_grad(pa);
  a.forward(kIds, 2, 6, &kLabels);
  a.backward_all();
  zero_grad(pb);
  models::StudentPass pass(b);
  const auto out = pass.forward(kIds, 2, 6);
  Tensor dl;
  train::causal_lm_loss(out.logits, labels_of(kLabels, 2, 6), &dl);
  pass.backward_all(dl);
  for (std::size_t i = 0; i < pa.size(); ++i) {
    CAPTURE(pa[i]->name);
    CHECK(rel_error(pb[i]->grad, pa[i]->grad) < 1e-6);
  }

  // segments: one forward of [x; y] with 2 segments has aux(x) + aux(y)
  Rng r2(14);
  models::make_sparse_student(b, 4, 2, r2);
  const std::vector<std::int64_t> x(kIds.begin(), kIds.begin() + 6), y(kIds.begin() + 6, kIds.end());
  const double ax = pass.forward(x, 1, 6).aux, ay = pass.forward(y, 1, 6).aux;
  const auto both = pass.forward(kIds, 2, 6, 2);
  CHECK(both.aux == doctest::Approx(ax + ay).epsilon(1e-6));
  CHECK_THROWS_AS(pass.forward(kIds, 2, 6, 3), Error);
}

TEST_CASE("llava_mod student: finite differences of the whole D2S objective (KD + CE + aux) through the sparse student") {
  Rng rng(15);
  const auto c = tiny_qwen2();
  nn::DecoderLM<> m(c);
  test::randomize(m.parameters(), rng, 0.5f);
  Rng r2(16);
  models::make_sparse_student(m, 4, 2, r2);
  test::randomize(m.parameters(), rng, 0.5f);  // experts no longer identical: routing matters
  const auto params = m.parameters();
  const Tensor zt = test::random_tensor({12, c.vocab}, rng, 2.f);
  const Tensor labels = labels_of(kLabels, 2, 6);
  const double aux_coef = 0.5;  // large, so the aux gradient shows
  models::StudentPass pass(m);
  auto objective = [&]() {
    const auto o = pass.forward(kIds, 2, 6, 2);
    return train::mimic_distill_loss(o.logits, zt, labels).objective + aux_coef * o.aux;
  };
  zero_grad(params);
  const auto o = pass.forward(kIds, 2, 6, 2);
  Tensor dl;
  train::mimic_distill_loss(o.logits, zt, labels, &dl);
  pass.backward_all(dl, AuxLossWeights{float(aux_coef), 0.f});
  // h = 1e-3: a ±5e-3 step flips a top-2 choice of this draw (the objective jumps; the gradient is right on both sides)
  test::gradcheck(test::targets_of(params), objective, 8, 1e-3);
}

// ---- preference data and hallucination ----------------------------------------------------------------------------
namespace {
data::Scene scene_red_circle_blue_square() {
  data::Scene sc;
  sc.size = 32;
  data::ShapeObject a, b;
  a.shape = data::ShapeKind::circle;
  a.colour = 0;  // red
  a.cx = 8;
  b.shape = data::ShapeKind::square;
  b.colour = 2;  // blue
  b.cx = 24;
  sc.objects = {a, b};
  return sc;
}
}  // namespace

TEST_CASE("hallucination metric on hand-made answers") {
  const auto sc = scene_red_circle_blue_square();
  auto h = [&](const char* answer, const char* q = "") { return data::check_hallucination(sc, answer, q).hallucinated; };
  CHECK_FALSE(h("red"));
  CHECK_FALSE(h("blue"));  // wrong for "what colour is the circle?" but blue is in the image
  CHECK(h("green"));
  CHECK(h("triangle"));
  CHECK(h("two triangles"));
  CHECK_FALSE(h("circle"));
  CHECK_FALSE(h("a red circle and a blue square."));
  CHECK(h("a blue circle and a red square."));  // both colours and shapes exist, neither pair does
  CHECK(h("a red circle, a blue square and a green triangle."));
  CHECK_FALSE(h("there are 2 shapes: a red circle to the left of a blue square."));
  CHECK_FALSE(h("left"));
  CHECK(h("yes", "is there a green triangle?"));
  CHECK(h("yes", "is there a blue circle?"));
  CHECK_FALSE(h("no", "is there a green triangle?"));
  CHECK_FALSE(h("yes", "is there a red circle?"));
  CHECK(h("3", "how many shapes are there?"));
  CHECK_FALSE(h("2", "how many shapes are there?"));
  CHECK_FALSE(h("1", "how many shapes are there?"));  // an under-count is wrong, not a hallucination
  CHECK(h("2", "how many circles are there?"));
  CHECK_FALSE(h("1", "how many circles are there?"));
  CHECK(h("1", "how many green shapes are there?"));
  CHECK_FALSE(h("0", "how many green shapes are there?"));
  const auto r = data::check_hallucination(sc, "a green triangle", "");
  CHECK(r.absent == std::vector<std::string>{"green", "triangle"});

  data::HallucinationStats s;
  s.add(sc, "what colour is the circle?", "red", "colour");
  s.add(sc, "what colour is the circle?", "purple", "colour");
  s.add(sc, "is there a green triangle?", "yes", "yesno");
  s.add(sc, "is there a green triangle?", "no", "yesno");
  CHECK(s.answers == 4);
  CHECK(s.rate() == doctest::Approx(0.5));
  CHECK(s.rate("colour") == doctest::Approx(0.5));
  CHECK(data::hallucination_rate({sc, sc}, {"", ""}, {"a red circle.", "a red triangle."}) == doctest::Approx(0.5));
}

TEST_CASE("preference pairs of the shapes world: chosen is correct, rejected is wrong, hallucinating where it can") {
  data::ShapesConfig c;
  c.seed = 5;
  c.train_images = 60;
  c.eval_images = 0;
  const auto w = data::generate_shapes_world(c);
  const auto pairs = data::preference_pairs(w, c);
  REQUIRE(pairs.size() == 60 * 6);
  std::map<std::string, int> errors;
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    const auto& p = pairs[i];
    const auto& sc = w.train[i / 6];
    CAPTURE(p.id);
    CAPTURE(p.prompt);
    CAPTURE(p.chosen);
    CAPTURE(p.rejected);
    CHECK(p.chosen != p.rejected);
    CHECK(p.image == "images/" + p.id.substr(0, 12) + ".png");
    ++errors[p.error];
    // the correct answer never hallucinates
    CHECK_FALSE(data::check_hallucination(sc, p.chosen, p.prompt).hallucinated);
    const bool rejected_h = data::check_hallucination(sc, p.rejected, p.prompt).hallucinated;
    if (p.error.starts_with("absent") || p.error == "over_count" || p.error == "false_yes") CHECK(rejected_h);
    else CHECK_FALSE(rejected_h);  // wrong_colour / wrong_shape / wrong_side / false_no: wrong but about present things
    // chosen is the ground truth
    if (p.type == "caption") CHECK(p.chosen == data::brief_caption(sc));
    if (p.type == "yesno") {
      const auto q = data::detail::words(p.prompt);
      const int col = data::detail::colour_of_word(q[3]), k = data::detail::shape_of_word(q[4]);
      CHECK(p.chosen == (data::detail::has_pair(sc, col, k) ? "yes" : "no"));
    }
    if (p.type == "count" && p.prompt == "how many shapes are there?") CHECK(p.chosen == std::to_string(sc.objects.size()));
    if (p.type == "colour") {  // the asked-about object has the chosen colour; the rejected colour is not the answer
      CHECK(data::detail::has_colour(sc, data::detail::colour_of_word(p.chosen)));
    }
  }
  // with 6 colours and <= 3 objects every colour / shape question has an absent option
  CHECK(errors["absent_colour"] > 0);
  CHECK(errors["over_count"] == 60);
  CHECK(errors["wrong_colour"] == 0);
  // deterministic by seed
  const auto again = data::preference_pairs(w, c);
  CHECK(data::preference_json(again).dump() == data::preference_json(pairs).dump());
  const auto j = data::preference_json(pairs);
  CHECK(j[0]["conversations"][0]["value"].get<std::string>().starts_with("<image>\n"));

  // a 2-colour world with every colour present: the colour pair falls back to a wrong (present) colour
  auto sc = scene_red_circle_blue_square();
  sc.objects[1].colour = 1;  // green square; the world has red and green only
  Rng rng(1);
  data::Question q{"colour", "what colour is the circle?", "red"};
  const auto p = data::preference_pair(sc, q, rng, 2);
  CHECK(p.rejected == "green");
  CHECK(p.error == "wrong_colour");
  // a scene whose one colour carries all three shapes: caption pairs still hallucinate
  data::Scene mono = scene_red_circle_blue_square();
  mono.objects[1].colour = 0;
  data::ShapeObject t = mono.objects[0];
  t.shape = data::ShapeKind::triangle;
  mono.objects.push_back(t);
  for (int s = 0; s < 20; ++s) {
    Rng r{std::uint64_t(s)};
    const auto cp = data::caption_preference_pair(mono, r, 6);
    CHECK(data::check_hallucination(mono, cp.rejected).hallucinated);
  }
}
