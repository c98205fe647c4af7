// The cosine-with-warmup schedule against HF get_cosine_schedule_with_warmup's values, and global-norm gradient
// clipping against torch.nn.utils.clip_grad_norm_.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cumo/core.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/train/clip.hpp"
#include "cumo/train/schedule.hpp"

using cumo::Parameter;
using cumo::Tensor;
using cumo::train::CosineWithWarmup;

TEST_CASE("train/schedule: warmup steps from a ratio are ceil(N * ratio), as HF TrainingArguments") {
  CHECK(CosineWithWarmup::warmup_steps_for(1000, 0.03) == 30);
  CHECK(CosineWithWarmup::warmup_steps_for(100, 0.03) == 3);
  CHECK(CosineWithWarmup::warmup_steps_for(103, 0.03) == 4);  // 3.09 rounds up
  CHECK(CosineWithWarmup::warmup_steps_for(33, 0.03) == 1);
  CHECK(CosineWithWarmup::warmup_steps_for(50, 0.0) == 0);
}

TEST_CASE("train/schedule: cosine with warmup — values at warmup, its end, the middle and the end") {
  const double base = 2e-3;
  const auto s = CosineWithWarmup::with_warmup_ratio(base, 100, 0.03);  // W = 3, N = 100
  REQUIRE(s.warmup_steps() == 3);
  CHECK(s.lr(0) == 0.0);  // HF: the first update runs at lr 0
  CHECK(s.lr(1) == base * (1.0 / 3.0));
  CHECK(s.lr(2) == base * (2.0 / 3.0));
  CHECK(s.lr(3) == base);  // warmup end: cos(0) = 1
  // step 50: progress = 47/97, factor = 0.5 (1 + cos(pi · 47/97)) = 0.5242811110572242 (Python, HF's lambda)
  CHECK(s.factor(50) == doctest::Approx(0.5242811110572242).epsilon(1e-15));
  CHECK(s.factor(99) == doctest::Approx(0.00026221547724253336).epsilon(1e-12));
  CHECK(s.lr(100) == 0.0);  // end: cos(pi) = -1
  // The exact middle of the decay: N = 103, W = 3, step 53 → progress 0.5 → factor 0.5.
  const CosineWithWarmup m(1.0, 103, 3);
  CHECK(m.factor(53) == doctest::Approx(0.5).epsilon(1e-15));
  // Monotone decay after warmup.
  for (std::int64_t k = 3; k < 100; ++k) CHECK(s.lr(k + 1) <= s.lr(k));
  // No warmup: full lr at step 0.
  CHECK(CosineWithWarmup(1.0, 10, 0).lr(0) == 1.0);
  CHECK_THROWS_AS(CosineWithWarmup(1.0, 10, 11), cumo::Error);
  CHECK_THROWS_AS(s.lr(-1), cumo::Error);
}

namespace {
Parameter grad_param(const std::string& name, std::initializer_list<float> g) {
  Parameter p(name, Tensor::zeros({std::int64_t(g.size())}));
  std::int64_t i = 0;
  for (float x : g) p.grad.data<float>()[i++] = x;
  return p;
}
}  // namespace

TEST_CASE("train/clip: total norm over all trainable gradients and PyTorch's clip coefficient") {
  Parameter a = grad_param("a", {3.f, 4.f});
  Parameter b = grad_param("b", {12.f});
  Parameter frozen = grad_param("frozen", {1000.f});
  frozen.trainable = false;  // requires_grad=False in PyTorch: no .grad, not in the norm
  const float total = cumo::train::clip_grad_norm({&a, &b, &frozen}, 1.0);
  CHECK(total == 13.f);
  // coef = reciprocal(13 + 1e-6) * 1.0 in fp32
  const float coef = (1.f / (13.f + float(1e-6))) * 1.f;
  CHECK(cumo::train::clip_coefficient(13.f, 1.0) == coef);
  CHECK(a.grad.data<float>()[0] == 3.f * coef);
  CHECK(a.grad.data<float>()[1] == 4.f * coef);
  CHECK(b.grad.data<float>()[0] == 12.f * coef);
  CHECK(frozen.grad.data<float>()[0] == 1000.f);  // untouched
  CHECK(cumo::train::grad_norm({&a, &b}) == doctest::Approx(1.0).epsilon(1e-6));
}

TEST_CASE("train/clip: a norm below max_norm leaves the gradients bitwise unchanged (coefficient clamped to 1)") {
  Parameter a = grad_param("a", {0.1f, -0.2f, 0.3f});
  const Tensor before = a.grad.clone();
  const float total = cumo::train::clip_grad_norm({&a}, 1.0);
  CHECK(total == doctest::Approx(std::sqrt(0.14)).epsilon(1e-6));
  CHECK(cumo::bitwise_equal(a.grad, before));
  CHECK(cumo::train::clip_coefficient(0.f, 1.0) == 1.f);
  CHECK(cumo::train::clip_coefficient(2.f, 1.0) == doctest::Approx(0.5).epsilon(1e-6));
}

TEST_CASE("train/clip: a NaN or Inf gradient stops training, naming the parameter and the step") {
  Parameter a = grad_param("model.layers.0.mlp.fc1.weight", {1.f, 2.f});
  Parameter b = grad_param("model.layers.1.mlp.fc2.weight", {1.f, NAN});
  Parameter c = grad_param("lm_head.weight", {INFINITY});
  try {
    cumo::train::clip_grad_norm({&a, &b, &c}, 1.0, 42);
    FAIL("a NaN gradient was accepted");
  } catch (const cumo::Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("'model.layers.1.mlp.fc2.weight'") != std::string::npos);
    CHECK(msg.find("step 42") != std::string::npos);
  }
  CHECK_THROWS_WITH_AS(cumo::train::clip_grad_norm({&a, &c}, 1.0), doctest::Contains("'lm_head.weight'"),
                       cumo::Error);
  CHECK_THROWS_AS(cumo::train::clip_grad_norm({&a}, 0.0), cumo::Error);
}

TEST_CASE("train/clip: large gradients do not overflow the norm, and the norm is thread-count independent") {
  Parameter big("big", Tensor::zeros({200000}));
  for (std::int64_t i = 0; i < big.grad.numel(); ++i) big.grad.data<float>()[i] = 1e30f * float((i % 7) - 3);
  const float n1 = cumo::train::grad_norm({&big});
  CHECK(std::isfinite(n1));
  double ref = 0;
  for (std::int64_t i = 0; i < big.grad.numel(); ++i) ref += double(big.grad.data<float>()[i]) * big.grad.data<float>()[i];
  CHECK(n1 == doctest::Approx(std::sqrt(ref)).epsilon(1e-6));
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const float one = cumo::train::grad_norm({&big});
  omp_set_num_threads(3);
  const float three = cumo::train::grad_norm({&big});
  omp_set_num_threads(threads);
  CHECK(one == n1);
  CHECK(three == n1);
#endif
}
