// train/distill_trainer.hpp: the LLaVA-MoD step (shared frozen vision tower, teacher in eval mode, student under the
// distillation losses) against the model paths it recombines, finite-difference gradients of the D2S and DPO
// objectives through the whole student (connector, experts, routers, embeddings), the pair batch layout, the
// student's construction, and the config's errors.
#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "app/distill_config.hpp"
#include "app/distill_stage.hpp"
#include "cumo_test_config.hpp"
#include "nn_test_util.hpp"

using namespace cumo;
using cumo::test::gradcheck;
using cumo::test::random_tensor;
using cumo::test::randomize;

namespace {

// Teacher: the shared tiny CuMo (CLIP 2 layers of width 8, 4 patches; LLM 1 layer of width 12; vocabulary 13, image id 12).
models::CuMoConfig teacher_config() { return test::tiny_cumo_config(); }
app::StudentConfig student_config() {
  app::StudentConfig s;
  s.text.hidden = 8;
  s.text.layers = 2;
  s.text.heads = 2;
  s.text.kv_heads = 1;
  s.text.ffn = 10;
  s.experts = 4;
  s.top_k = 2;
  return s;
}

// Two rows of 9 tokens with one image each (4 image tokens at 1..4), labels on the text after it; the second row
// has one padding position at the end.
io::Batch make_batch(Rng& rng) {
  io::Batch b;
  b.B = 2;
  b.T = 9;
  b.input_ids = {1, 12, 12, 12, 12, 4, 5, 6, 7, 2, 12, 12, 12, 12, 8, 3, 9, 0};
  b.labels = {-100, -100, -100, -100, -100, 4, 5, 6, 7, -100, -100, -100, -100, -100, 8, 3, 9, -100};
  b.key_valid = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0};
  b.lengths = {9, 8};
  b.has_image = {1, 1};
  b.indices = {0, 1};
  b.pixels = random_tensor({2, 3, 8, 8}, rng);
  return b;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, double(std::abs(a.data<float>()[i] - b.data<float>()[i])));
  return m;
}

}  // namespace

TEST_CASE("distill trainer: make_student copies the teacher's vision tower and builds the student's own LLM") {
  Rng rng(1);
  models::CuMo<> teacher(teacher_config());
  randomize(teacher.parameters(), rng, 0.4f);
  models::CuMo<> student = app::make_student(teacher, student_config(), 7);
  const ParameterList tv = teacher.vision_parameters(), sv = student.vision_parameters();
  REQUIRE(tv.size() == sv.size());
  for (std::size_t i = 0; i < tv.size(); ++i) {
    CAPTURE(tv[i]->name);
    CHECK(max_abs_diff(tv[i]->value, sv[i]->value) == 0.0);
  }
  CHECK(student.config().llava.text.hidden == 8);
  CHECK(student.config().llava.text.layers == 2);
  CHECK(student.connector_parameters()[0]->value.shape() == Shape{8, 8});  // linear_1: Hv 8 → Hs 8
  CHECK_FALSE(app::student_is_sparse(student));
  Rng up(3);
  app::upcycle_student(student, student_config(), up);
  const auto& L = student.llava().language_model.layers;
  CHECK(L[0].mlp.is_sparse());  // every other layer: 0
  CHECK_FALSE(L[1].mlp.is_sparse());
  // A dense student stays dense through an "upcycle" stage.
  models::CuMo<> dense = app::make_student(teacher, student_config(), 7);
  app::StudentConfig dc = student_config();
  dc.sparse = false;
  app::upcycle_student(dense, dc, up);
  CHECK_FALSE(app::student_is_sparse(dense));
  // Active LLM parameters: the sparse layer counts top_k of its E experts and its router.
  CHECK(app::active_language_params(student) ==
        app::active_language_params(dense) + 3 * 8 * 10 /* a second expert */ + 4 * 8 /* router */);
}

TEST_CASE("distill trainer: the student's logits and CE gradients are CuMo::forward / backward's (frozen vision)") {
  Rng rng(2);
  models::CuMo<> teacher(teacher_config());
  randomize(teacher.parameters(), rng, 0.4f);
  models::CuMo<> student = app::make_student(teacher, student_config(), 5);
  randomize(student.language_parameters(), rng, 0.4f);
  randomize(student.connector_parameters(), rng, 0.4f);
  const io::Batch b = make_batch(rng);

  // reference: the model's own training path, CE only (dense student: no aux)
  zero_grad(student.parameters());
  const auto ref = student.forward(b.input_ids, b.B, b.T, b.pixels, &b.labels, &b.key_valid);
  student.backward();
  std::vector<Tensor> want;
  ParameterList trained = student.connector_parameters();
  for (Parameter* p : student.language_parameters()) trained.push_back(p);
  for (Parameter* p : trained) want.push_back(p->grad.clone());

  zero_grad(student.parameters());
  app::DistillStep step(teacher, student);
  auto f = step.forward(b, false);
  CHECK(max_abs_diff(f.student_logits, ref.logits) == 0.0);
  // the teacher's logits: its own forward, in eval mode
  const auto tref = teacher.forward(b.input_ids, b.B, b.T, b.pixels, nullptr, &b.key_valid);
  CHECK(max_abs_diff(f.teacher_logits, tref.logits) <= 1e-6);

  Tensor dl;
  train::MimicWeights w;
  w.align = 0;
  w.kl = 0;
  w.ce = 1;
  const auto r = train::mimic_distill_loss(f.student_logits, f.teacher_logits, app::labels_tensor(b), &dl, w);
  CHECK(r.ce == doctest::Approx(ref.ce).epsilon(1e-6));
  step.backward(dl, 0.0);
  for (std::size_t i = 0; i < trained.size(); ++i) {
    CAPTURE(trained[i]->name);
    const double scale = std::max(1e-3, std::sqrt(test::dot(want[i], want[i]) / double(want[i].numel())));
    CHECK(max_abs_diff(trained[i]->grad, want[i]) <= 1e-5 * scale * 10);
  }
  for (Parameter* p : student.vision_parameters()) CHECK(test::dot(p->grad, p->grad) == 0.0);  // frozen: no backward
}

TEST_CASE("distill trainer: finite differences of D2S (KL + CE + aux) and DPO through the sparse student") {
  Rng rng(3);
  models::CuMo<> teacher(teacher_config());
  randomize(teacher.parameters(), rng, 0.4f);
  app::StudentConfig sc = student_config();
  models::CuMo<> student = app::make_student(teacher, sc, 5);
  randomize(student.language_parameters(), rng, 0.4f);
  randomize(student.connector_parameters(), rng, 0.4f);
  Rng up(9);
  app::upcycle_student(student, sc, up);
  for (Parameter* p : student.language_parameters())
    if (p->name.ends_with(".gate.weight")) rng.fill_normal(p->value, 0.f, 0.8f);  // aux with real gradient
  const io::Batch single = make_batch(rng);
  const double aux_coef = 0.3;  // larger than LLaVA-MoD's 0.01 so the aux term's gradient is visible in the check

  for (const bool pairs : {false, true}) {
    CAPTURE(pairs);
    io::Batch b = single;
    if (pairs) {
      // rejected: the same prompts and images, other answers
      io::Batch l = single;
      l.input_ids = {1, 12, 12, 12, 12, 4, 9, 6, 2, 2, 12, 12, 12, 12, 8, 1, 0, 0};
      l.labels = {-100, -100, -100, -100, -100, 4, 9, 6, 2, -100, -100, -100, -100, -100, 8, 1, -100, -100};
      l.key_valid = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
      l.lengths = {9, 7};
      b = app::concat_pair_batches(single, l, 0);
      REQUIRE(b.B == 4);
      REQUIRE(b.images() == 2);
    }
    const Tensor labels = app::labels_tensor(b);
    app::DistillStep step(teacher, student);
    auto objective_and_grad = [&](bool grad) {
      auto f = step.forward(b, pairs);
      Tensor dl;
      double obj = 0;
      if (pairs) {
        const auto ref = train::sequence_logps(f.teacher_logits, labels);
        const std::vector<double> rw(ref.begin(), ref.begin() + 2), rl(ref.begin() + 2, ref.end());
        train::PreferenceOptions po;
        po.beta = 0.5;
        obj = train::preference_distill_loss(f.student_logits, labels, rw, rl, grad ? &dl : nullptr, po).pref.loss;
      } else {
        train::MimicWeights w;
        w.align = 0;
        w.kl = 1;
        w.ce = 1;
        obj = train::mimic_distill_loss(f.student_logits, f.teacher_logits, labels, grad ? &dl : nullptr, w).objective;
      }
      obj += aux_coef * f.out.aux;
      if (grad) step.backward(dl, aux_coef);
      return obj;
    };
    zero_grad(student.parameters());
    (void)objective_and_grad(true);
    std::vector<test::GradTarget> targets;
    for (Parameter* p : student.connector_parameters()) targets.push_back({p->name, p->value, p->grad});
    for (Parameter* p : student.language_parameters()) targets.push_back({p->name, p->value, p->grad});
    gradcheck(targets, [&] { return objective_and_grad(false); }, 5, 2e-3, 2e-2);
  }
}

TEST_CASE("distill trainer: pair batches put chosen rows first and fold both halves onto the shared images") {
  Rng rng(4);
  const io::Batch w = make_batch(rng);
  io::Batch l = w;
  l.T = 7;
  l.input_ids = {1, 12, 12, 12, 12, 4, 2, 2, 12, 12, 12, 12, 8, 3};
  l.labels = {-100, -100, -100, -100, -100, 4, 2, -100, -100, -100, -100, -100, 8, 3};
  l.key_valid.assign(14, 1);
  l.lengths = {7, 7};
  const io::Batch b = app::concat_pair_batches(w, l, 0);
  CHECK(b.B == 4);
  CHECK(b.T == 9);
  CHECK(b.input_ids[2 * 9 + 6] == 2);
  CHECK(b.input_ids[2 * 9 + 7] == 0);    // padded
  CHECK(b.key_valid[2 * 9 + 7] == 0);
  CHECK(b.labels[3 * 9 + 8] == -100);
  CHECK(b.pixels.size(0) == 2);
  io::Batch bad = l;
  bad.B = 1;
  CHECK_THROWS_WITH_AS(app::concat_pair_batches(w, bad, 0), doctest::Contains("2 chosen rows but 1 rejected"), Error);
}

TEST_CASE("distill trainer: config errors name the stage and the field") {
  auto parse = [](const char* s) { return app::DistillConfig::from_json(nlohmann::json::parse(s), "cfg"); };
  CHECK_THROWS_WITH_AS(parse(R"({"stages": [{"name": "a", "kind": "ce"}]})"), doctest::Contains("'teacher'"), Error);
  CHECK_THROWS_WITH_AS(parse(R"({"teacher": "t", "stages": [{"name": "a", "kind": "kd"}]})"),
                       doctest::Contains("unknown distillation stage kind 'kd'"), Error);
  CHECK_THROWS_WITH_AS(parse(R"({"teacher": "t", "stages": [{"name": "a", "kind": "ce", "stepz": 3}]})"),
                       doctest::Contains("unknown field 'stepz'"), Error);
  CHECK_THROWS_WITH_AS(parse(R"({"teacher": "t", "stages": [{"name": "a", "kind": "ce", "train": ["vision"]}]})"),
                       doctest::Contains("unknown part 'vision'"), Error);
  CHECK_THROWS_WITH_AS(parse(R"({"teacher": "t", "stages": [{"name": "a", "kind": "ce"}], "pipeline": ["b"]})"),
                       doctest::Contains("no stage named 'b'"), Error);
  CHECK_THROWS_WITH_AS(parse(R"({"teacher": "t", "student": {"layers": 2, "moe_layers": [2]}, "stages": [{"name": "a", "kind": "ce"}]})"),
                       doctest::Contains("moe_layers holds 2"), Error);
  const auto c = parse(R"({"teacher": "t", "stage_defaults": {"steps": 7},
                          "stages": [{"name": "a", "kind": "d2d"}, {"name": "b", "kind": "d2s", "upcycle": true,
                                      "train": ["connector", "ffn"]}]})");
  CHECK(c.stage("a").steps == 7);
  CHECK(c.stage("a").ce_weight == 0.0);  // D2D: KL only
  CHECK(c.stage("b").ce_weight == 1.0);  // D2S: KL + CE
  CHECK_FALSE(c.stage("b").train_attention);
  CHECK(c.pipeline == std::vector<std::string>{"a", "b"});
}
