// Cross-entropy as HF's ForCausalLMLoss: value against a direct double computation, the gradient against central
// differences in double precision, ignore-index handling, the causal shift, numerical stability, and the two
// gradient-accumulation conventions.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/core.hpp"
#include "cumo/train/accumulate.hpp"
#include "cumo/train/loss.hpp"

namespace {

using cumo::DType;
using cumo::Rng;
using cumo::Tensor;
using cumo::train::CrossEntropyOptions;
using cumo::train::cross_entropy;

Tensor labels_of(std::initializer_list<std::int64_t> v) {
  Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::i64);
  std::int64_t i = 0;
  for (auto x : v) t.data<std::int64_t>()[i++] = x;
  return t;
}

Tensor random_logits(std::int64_t n, std::int64_t v, Rng& rng, float scale = 2.f) {
  Tensor t = Tensor::empty({n, v});
  rng.fill_normal(t, 0.f, scale);
  return t;
}

// -log softmax(x)[y], written the plain way, in double.
double row_nll(const Tensor& logits, std::int64_t i, std::int64_t y) {
  double s = 0;
  for (std::int64_t j = 0; j < logits.size(1); ++j) s += std::exp(double(logits.at<float>(i, j)));
  return std::log(s) - double(logits.at<float>(i, y));
}

}  // namespace

TEST_CASE("train/cross_entropy: mean of -log softmax over the targets, gradient softmax - onehot over count") {
  Rng rng(1);
  const Tensor logits = random_logits(5, 7, rng);
  const Tensor y = labels_of({3, 0, 6, 2, 2});
  Tensor d;
  const auto r = cross_entropy(logits, y, &d);
  double want = 0;
  for (std::int64_t i = 0; i < 5; ++i) want += row_nll(logits, i, y.data<std::int64_t>()[i]);
  CHECK(r.targets == 5);
  CHECK(r.sum == doctest::Approx(want).epsilon(1e-12));
  CHECK(r.loss == doctest::Approx(want / 5).epsilon(1e-12));
  // Every gradient row sums to zero (softmax minus one-hot).
  for (std::int64_t i = 0; i < 5; ++i) {
    double s = 0;
    for (std::int64_t j = 0; j < 7; ++j) s += d.at<float>(i, j);
    CHECK(std::abs(s) < 1e-7);
  }
}

TEST_CASE("train/cross_entropy: gradient matches central differences in double precision") {
  Rng rng(2);
  const Tensor l32 = random_logits(6, 9, rng, 3.f);
  const Tensor logits = l32.to(DType::f64);
  const Tensor y = labels_of({8, -100, 0, 4, 4, 1});
  CrossEntropyOptions opt;
  opt.grad_scale = 0.7;  // d objective / d loss, carried into the gradient
  Tensor d;
  cross_entropy(logits, y, &d, opt);
  const double h = 1e-5;
  double worst = 0;
  for (std::int64_t i = 0; i < 6; ++i)
    for (std::int64_t j = 0; j < 9; ++j) {
      Tensor xp = logits.clone(), xm = logits.clone();
      xp.at<double>(i, j) += h;
      xm.at<double>(i, j) -= h;
      const double fd = opt.grad_scale * (cross_entropy(xp, y).loss - cross_entropy(xm, y).loss) / (2 * h);
      worst = std::max(worst, std::abs(fd - d.at<double>(i, j)));
    }
  CHECK(worst < 1e-9);
  // The f32 path writes the same gradient up to fp32 rounding.
  Tensor d32;
  cross_entropy(l32, y, &d32, opt);
  CHECK(cumo::rel_error(d32, d) < 1e-6);
}

TEST_CASE("train/cross_entropy: ignore index -100 — no loss, no gradient, not counted in the mean") {
  Rng rng(3);
  Tensor logits = random_logits(4, 5, rng);
  const Tensor y = labels_of({1, -100, 3, -100});
  Tensor d;
  const auto r = cross_entropy(logits, y, &d);
  CHECK(r.targets == 2);
  CHECK(r.loss == doctest::Approx((row_nll(logits, 0, 1) + row_nll(logits, 2, 3)) / 2).epsilon(1e-12));
  for (std::int64_t j = 0; j < 5; ++j) {
    CHECK(d.at<float>(1, j) == 0.f);
    CHECK(d.at<float>(3, j) == 0.f);
  }
  // Changing an ignored row's logits changes nothing.
  logits.at<float>(1, 2) += 100.f;
  CHECK(cross_entropy(logits, y).loss == r.loss);
  // A custom ignore index, and i32 labels.
  Tensor y32 = Tensor::empty({4}, DType::i32);
  const std::int32_t v[] = {1, 7, 3, 7};
  for (int i = 0; i < 4; ++i) y32.data<std::int32_t>()[i] = v[i];
  CrossEntropyOptions opt;
  opt.ignore_index = 7;
  CHECK(cross_entropy(logits, y32, nullptr, opt).loss == r.loss);
  // Sum over a given normalizer (HF's num_items_in_batch).
  opt = {};
  opt.normalizer = 8;
  CHECK(cross_entropy(logits, y, nullptr, opt).loss == doctest::Approx(r.sum / 8).epsilon(1e-15));
}

TEST_CASE("train/cross_entropy: all targets ignored gives loss 0 and a zero gradient (PyTorch would give NaN)") {
  Rng rng(4);
  const Tensor logits = random_logits(3, 4, rng);
  Tensor d;
  const auto r = cross_entropy(logits, labels_of({-100, -100, -100}), &d);
  CHECK(r.loss == 0.0);
  CHECK(r.targets == 0);
  for (std::int64_t i = 0; i < d.numel(); ++i) CHECK(d.data<float>()[i] == 0.f);
}

TEST_CASE("train/cross_entropy: numerically stable for huge logits") {
  Tensor logits = Tensor::empty({2, 3});
  const float v[] = {1e4f, 1e4f + 1.f, 1e4f - 2.f, -1e30f, 0.f, 1e30f};
  for (int i = 0; i < 6; ++i) logits.data<float>()[i] = v[i];
  Tensor d;
  const auto r = cross_entropy(logits, labels_of({1, 2}), &d);
  const double lse0 = std::log(std::exp(-1.0) + 1.0 + std::exp(-3.0));  // shifted by 1e4 + 1
  CHECK(r.loss == doctest::Approx((lse0 + 0.0) / 2).epsilon(1e-9));
  for (std::int64_t i = 0; i < 6; ++i) CHECK(std::isfinite(d.data<float>()[i]));
}

TEST_CASE("train/cross_entropy: labels out of the vocabulary are refused with the position") {
  Rng rng(5);
  const Tensor logits = random_logits(3, 4, rng);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, labels_of({0, 4, 1})), doctest::Contains("label 4 at position 1"),
                       cumo::Error);
  CHECK_THROWS_WITH_AS(cross_entropy(logits, labels_of({0, 1})), doctest::Contains("labels has shape (2,)"),
                       cumo::Error);
  CHECK_THROWS_AS(cross_entropy(logits.to(DType::bf16), labels_of({0, 1, 2})), cumo::Error);
}

TEST_CASE("train/cross_entropy: causal LM loss shifts labels by one as HF ForCausalLMLoss") {
  Tensor labels = Tensor::empty({2, 4}, DType::i64);
  const std::int64_t v[] = {-100, -100, 5, 2, 7, 1, -100, 3};
  for (int i = 0; i < 8; ++i) labels.data<std::int64_t>()[i] = v[i];
  const Tensor shifted = cumo::train::shift_labels(labels);
  const std::int64_t want[] = {-100, 5, 2, -100, 1, -100, 3, -100};
  for (int i = 0; i < 8; ++i) CHECK(shifted.data<std::int64_t>()[i] == want[i]);
  CHECK(cumo::train::count_targets(labels) == 4);
  CHECK(cumo::train::count_targets(labels, false) == 5);

  Rng rng(6);
  const Tensor logits = random_logits(8, 9, rng).view({2, 4, 9});
  Tensor d;
  const auto r = cumo::train::causal_lm_loss(logits, labels, &d);
  CHECK(d.shape() == logits.shape());
  const Tensor flat = logits.view({8, 9});
  const double nll = row_nll(flat, 1, 5) + row_nll(flat, 2, 2) + row_nll(flat, 4, 1) + row_nll(flat, 6, 3);
  CHECK(r.targets == 4);
  CHECK(r.loss == doctest::Approx(nll / 4).epsilon(1e-12));
  // The last position of every sequence predicts nothing.
  for (std::int64_t j = 0; j < 9; ++j) {
    CHECK(d.at<float>(0, 3, j) == 0.f);
    CHECK(d.at<float>(1, 3, j) == 0.f);
  }
}

TEST_CASE("train/accumulate: per-token averaging over micro-batches equals one big batch") {
  Rng rng(7);
  const Tensor logits = random_logits(10, 6, rng);
  const Tensor y = labels_of({1, -100, 2, 3, -100, -100, 0, 5, 4, -100});
  Tensor d_full;
  const auto full = cross_entropy(logits, y, &d_full);

  // Micro-batches of 3 and 7 rows with 2 and 4 targets.
  const Tensor l0 = logits.slice(0, 0, 3), l1 = logits.slice(0, 3, 10);
  const Tensor y0 = y.slice(0, 0, 3), y1 = y.slice(0, 3, 10);
  const cumo::train::Accumulation acc(cumo::train::LossAveraging::per_token,
                                      {cumo::train::count_targets(y0, false), cumo::train::count_targets(y1, false)});
  CHECK(acc.total_targets() == 6);
  Tensor d0, d1;
  const auto r0 = cross_entropy(l0, y0, &d0, acc.ce_options(0));
  const auto r1 = cross_entropy(l1, y1, &d1, acc.ce_options(1));
  CHECK(acc.step_loss({r0, r1}) == doctest::Approx(full.loss).epsilon(1e-14));
  for (std::int64_t j = 0; j < 6; ++j) {
    CHECK(d0.at<float>(0, j) == d_full.at<float>(0, j));
    CHECK(d1.at<float>(4, j) == d_full.at<float>(7, j));
  }

  // per_micro_batch (HF < 4.46, LLaVA / CuMo): the mean of the two means, each gradient scaled by 1/2.
  const cumo::train::Accumulation old(cumo::train::LossAveraging::per_micro_batch, {2, 4});
  Tensor e0;
  const auto m0 = cross_entropy(l0, y0, &e0, old.ce_options(0));
  const auto m1 = cross_entropy(l1, y1, nullptr, old.ce_options(1));
  CHECK(old.step_loss({m0, m1}) == doctest::Approx((m0.sum / 2 + m1.sum / 4) / 2).epsilon(1e-14));
  CHECK(e0.at<float>(0, 1) == doctest::Approx(d0.at<float>(0, 1) * 6.0 / 2.0 / 2.0).epsilon(1e-6));
  CHECK(old.aux_scale() == 0.5);
}

TEST_CASE("train/accumulate: gradients of micro-batches add up, scale_grads and add_grads") {
  cumo::Parameter a("a", Tensor::zeros({3})), b("a", Tensor::zeros({3}));
  for (int i = 0; i < 3; ++i) {
    a.grad.data<float>()[i] = float(i);
    b.grad.data<float>()[i] = 1.f;
  }
  cumo::train::add_grads({&a}, {&b}, 0.5f);
  CHECK(a.grad.data<float>()[2] == 2.5f);
  cumo::train::scale_grads({&a}, 2.f);
  CHECK(a.grad.data<float>()[2] == 5.f);
  CHECK_THROWS_AS(cumo::train::add_grads({&a}, {}), cumo::Error);
  CHECK_THROWS_WITH_AS(cumo::train::check_finite_loss(NAN, 17, "ce"), doctest::Contains("step 17: ce is nan"),
                       cumo::Error);
}
