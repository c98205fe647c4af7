// AdamW against PyTorch's formulas: a double-precision reference of torch.optim.AdamW's update written out here,
// hand-derived numbers for weight decay and bias correction, parameter groups (lr multiplier, weight decay,
// frozen), and the state export/import that checkpoints rely on.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/core.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/train/clip.hpp"
#include "cumo/train/optimizer.hpp"

namespace {

using cumo::Parameter;
using cumo::ParameterList;
using cumo::Rng;
using cumo::Tensor;
using cumo::train::AdamW;
using cumo::train::AdamWOptions;
using cumo::train::ParamGroup;

Parameter make_param(const std::string& name, cumo::Shape shape, Rng& rng) {
  Tensor v = Tensor::empty(shape);
  rng.fill_normal(v);
  return Parameter(name, v);
}

Parameter scalar_param(const std::string& name, float value) {
  return Parameter(name, Tensor::full<float>({1}, value));
}

std::vector<double> to_double(const Tensor& t) {
  std::vector<double> out;
  for (std::int64_t i = 0; i < t.numel(); ++i) out.push_back(t.data<float>()[i]);
  return out;
}

// torch.optim.AdamW (adamw.py / adam.py _single_tensor_adam, decoupled weight decay), every operation in double.
struct ReferenceAdamW {
  std::vector<double> p, m, v;
  std::int64_t step = 0;
  explicit ReferenceAdamW(std::vector<double> init) : p(std::move(init)), m(p.size(), 0.0), v(p.size(), 0.0) {}
  void update(const std::vector<double>& g, double lr, double wd, double b1, double b2, double eps) {
    ++step;
    const double bc1 = 1 - std::pow(b1, double(step)), bc2 = 1 - std::pow(b2, double(step));
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1 - lr * wd;                    // param.mul_(1 - lr * weight_decay)
      m[i] += (1 - b1) * (g[i] - m[i]);       // exp_avg.lerp_(grad, 1 - beta1)
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
      const double denom = std::sqrt(v[i]) / std::sqrt(bc2) + eps;
      p[i] -= lr / bc1 * m[i] / denom;        // param.addcdiv_(exp_avg, denom, value=-step_size)
    }
  }
};

double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) e = std::max(e, std::abs(a[i] - b[i]) / std::max(1.0, std::abs(b[i])));
  return e;
}

}  // namespace

TEST_CASE("train/adamw: matches a double-precision PyTorch reference over 25 steps with decay and a varying lr") {
  Rng rng(7);
  Parameter w = make_param("w", {6, 5}, rng);
  Parameter b = make_param("b", {5}, rng);
  AdamWOptions o;
  o.beta1 = 0.9;
  o.beta2 = 0.95;  // not the default, so a swapped beta would show
  o.eps = 1e-6;
  o.weight_decay = 0.05;
  AdamW opt({&w, &b}, o);
  ReferenceAdamW rw(to_double(w.value)), rb(to_double(b.value));
  for (int s = 0; s < 25; ++s) {
    rng.fill_normal(w.grad, 0.f, 0.5f);
    rng.fill_normal(b.grad, 0.f, 2.f);
    const double lr = 1e-2 * (1.0 + 0.1 * s);  // as a schedule would vary it
    rw.update(to_double(w.grad), lr, o.weight_decay, o.beta1, o.beta2, o.eps);
    rb.update(to_double(b.grad), lr, o.weight_decay, o.beta1, o.beta2, o.eps);
    opt.step(lr);
  }
  CHECK(max_rel(to_double(w.value), rw.p) < 2e-6);
  CHECK(max_rel(to_double(b.value), rb.p) < 2e-6);
  CHECK(max_rel(to_double(opt.state(w)->exp_avg), rw.m) < 2e-6);
  CHECK(max_rel(to_double(opt.state(w)->exp_avg_sq), rw.v) < 2e-6);
  CHECK(opt.state(w)->step == 25);
  CHECK(opt.steps() == 25);
}

TEST_CASE("train/adamw: hand-derived values — decoupled weight decay comes first, then the bias-corrected step") {
  // Constant gradient g: m̂ = g and v̂ = g² exactly, so every update is lr·g/(|g| + eps) after p *= (1 - lr·wd):
  //   p1 = 1·0.99 − 0.1/(1 + 2e-8) = 0.890000002,  p2 = p1·0.99 − 0.1(1 − 2e-8) = 0.78110000398,
  //   p3 = 0.67328900594.  (Coupled L2 decay — Adam's — would give 0.9 after step 1 instead.)
  Parameter p = scalar_param("p", 1.f);
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.1;
  AdamW opt({&p}, o);
  const double want[] = {0.890000002000, 0.781100003980, 0.673289005940};
  for (double w : want) {
    p.grad.data<float>()[0] = 0.5f;
    opt.step();
    CHECK(p.value.data<float>()[0] == doctest::Approx(w).epsilon(1e-6));
  }
}

TEST_CASE("train/adamw: hand-derived values — bias correction of the first and second moments") {
  // g = +1 then −1, lr 0.1, no decay. Step 2: m = 0.9·0.1 − 0.1 = −0.01, v = 0.001999, bc1 = 0.19,
  // bc2 = 0.001999, so m̂ = −0.0526315789, v̂ = 1 and p2 = −0.1/(1+1e-8) + 0.1·0.0526315789/(1+1e-8)
  // = −0.094736841158. Without bias correction p2 would be −0.1 + 0.1·0.01/√0.001999 ≈ −0.0776.
  Parameter p = scalar_param("p", 0.f);
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0;
  AdamW opt({&p}, o);
  p.grad.data<float>()[0] = 1.f;
  opt.step();
  CHECK(p.value.data<float>()[0] == doctest::Approx(-0.099999999000).epsilon(1e-6));
  p.grad.data<float>()[0] = -1.f;
  opt.step();
  CHECK(p.value.data<float>()[0] == doctest::Approx(-0.094736841158).epsilon(1e-6));
  CHECK(opt.state(p)->exp_avg.data<float>()[0] == doctest::Approx(-0.01).epsilon(1e-6));
  CHECK(opt.state(p)->exp_avg_sq.data<float>()[0] == doctest::Approx(0.001999).epsilon(1e-6));
}

TEST_CASE("train/adamw: eps is added after sqrt(v_hat), not inside it") {
  // A tiny constant gradient g = 1e-6 with eps = 1e-6: update = lr · g/(g + eps) = lr/2.
  // eps inside the root (sqrt(v̂ + eps)) would give lr · 1e-6/sqrt(1e-12 + 1e-6) ≈ lr · 1e-3.
  Parameter p = scalar_param("p", 0.f);
  AdamWOptions o;
  o.lr = 1.0;
  o.eps = 1e-6;
  o.weight_decay = 0;
  AdamW opt({&p}, o);
  p.grad.data<float>()[0] = 1e-6f;
  opt.step();
  CHECK(p.value.data<float>()[0] == doctest::Approx(-0.5).epsilon(1e-5));
}

TEST_CASE("train/adamw: group lr multiplier and per-group weight decay") {
  Parameter a = scalar_param("a", 1.f), b = scalar_param("b", 1.f), c = scalar_param("c", 1.f);
  std::vector<ParamGroup> groups(3);
  groups[0].name = "full";
  groups[0].params = {&a};
  groups[1].name = "half_lr";
  groups[1].params = {&b};
  groups[1].lr_scale = 0.5;
  groups[2].name = "no_decay";
  groups[2].params = {&c};
  groups[2].weight_decay = 0.0;
  AdamWOptions o;
  o.weight_decay = 0.1;
  AdamW opt(groups, o);
  for (Parameter* p : {&a, &b, &c}) p->grad.data<float>()[0] = 2.f;
  opt.step(0.1);
  // First step: p·(1 − lr·wd) − lr·g/(|g| + eps)
  CHECK(a.value.data<float>()[0] == doctest::Approx(0.99 - 0.1).epsilon(1e-6));
  CHECK(b.value.data<float>()[0] == doctest::Approx(0.995 - 0.05).epsilon(1e-6));
  CHECK(c.value.data<float>()[0] == doctest::Approx(1.0 - 0.1).epsilon(1e-6));
}

TEST_CASE("train/adamw: a frozen group gets no update and no state, even with gradients and weight decay") {
  Rng rng(3);
  Parameter connector = make_param("mm_projector.0.weight", {4, 3}, rng);
  Parameter vision = make_param("vision_tower.fc.weight", {3, 3}, rng);
  Parameter untrainable = make_param("lm_head.weight", {2, 3}, rng);
  untrainable.trainable = false;  // a parameter flagged off inside a live group is skipped the same way
  std::vector<ParamGroup> groups(2);
  groups[0].name = "connector";
  groups[0].params = {&connector, &untrainable};
  groups[1].name = "vision";
  groups[1].params = {&vision};
  groups[1].frozen = true;
  AdamWOptions o;
  o.weight_decay = 0.1;
  AdamW opt(groups, o);
  const Tensor vision_before = vision.value.clone(), untrainable_before = untrainable.value.clone();
  const Tensor connector_before = connector.value.clone();
  for (int s = 0; s < 3; ++s) {
    rng.fill_normal(connector.grad);
    rng.fill_normal(vision.grad);
    rng.fill_normal(untrainable.grad);
    opt.step(1e-2);
  }
  CHECK(cumo::bitwise_equal(vision.value, vision_before));
  CHECK(cumo::bitwise_equal(untrainable.value, untrainable_before));
  CHECK_FALSE(cumo::bitwise_equal(connector.value, connector_before));
  CHECK(opt.state(vision) == nullptr);
  CHECK(opt.state(untrainable) == nullptr);
  REQUIRE(opt.state(connector) != nullptr);
  CHECK(opt.state(connector)->step == 3);
  for (const auto& [name, t] : opt.state_tensors()) CHECK(name.rfind("mm_projector.0.weight.", 0) == 0);
  const ParameterList live = opt.trainable_parameters();
  REQUIRE(live.size() == 1);
  CHECK(live[0] == &connector);

  // Unfreezing later (the next CuMo stage) starts that group's state at step 1, as PyTorch would.
  opt.set_frozen("vision", false);
  opt.step(1e-2);
  REQUIRE(opt.state(vision) != nullptr);
  CHECK(opt.state(vision)->step == 1);
  CHECK(opt.state(connector)->step == 4);
}

TEST_CASE("train/adamw: exported state reloaded into fresh objects continues bitwise") {
  Rng rng(11);
  Parameter w1 = make_param("w", {5, 4}, rng), b1 = make_param("b", {4}, rng);
  AdamW opt1({&w1, &b1});
  for (int s = 0; s < 3; ++s) {
    rng.fill_normal(w1.grad);
    rng.fill_normal(b1.grad);
    opt1.step(1e-2);
  }
  const auto exported = opt1.state_tensors();
  CHECK(exported.size() == 6);

  Parameter w2("w", w1.value.clone()), b2("b", b1.value.clone());
  AdamW opt2({&w2, &b2});
  std::vector<std::string> names;
  for (const auto& [n, t] : exported) names.push_back(n);
  auto get = [&](const std::string& n) {
    for (const auto& [k, t] : exported)
      if (k == n) return t;
    FAIL("missing ", n);
    return Tensor();
  };
  opt2.load_state_tensors(names, get, opt1.steps(), "memory");
  CHECK(opt2.steps() == 3);
  for (int s = 0; s < 4; ++s) {
    rng.fill_normal(w1.grad);
    rng.fill_normal(b1.grad);
    w2.grad.copy_from(w1.grad);
    b2.grad.copy_from(b1.grad);
    opt1.step(1e-2);
    opt2.step(1e-2);
  }
  CHECK(cumo::bitwise_equal(w1.value, w2.value));
  CHECK(cumo::bitwise_equal(b1.value, b2.value));

  // Mismatched state is refused with the tensor's name and both shapes, and leaves the optimizer as it was.
  Parameter w3("w", Tensor::zeros({4, 5})), b3("b", Tensor::zeros({4}));
  AdamW opt3({&w3, &b3});
  try {
    opt3.load_state_tensors(names, get, 3, "ckpt");
    FAIL("a shape mismatch was accepted");
  } catch (const cumo::Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("'w.exp_avg'") != std::string::npos);
    CHECK(msg.find("(5, 4)") != std::string::npos);
    CHECK(msg.find("(4, 5)") != std::string::npos);
  }
  CHECK(opt3.steps() == 0);
  CHECK(opt3.state(w3) == nullptr);
  // State for a parameter the optimizer does not have.
  Parameter other("other", Tensor::zeros({5, 4}));
  AdamW opt4({&other, &b3});
  CHECK_THROWS_WITH_AS(opt4.load_state_tensors(names, get, 3, "ckpt"),
                       doctest::Contains("'w', which is not a parameter"), cumo::Error);
  // Incomplete state.
  std::vector<std::string> partial = {"b.exp_avg", "b.step"};
  AdamW opt5({&b3});
  CHECK_THROWS_WITH_AS(opt5.load_state_tensors(partial, get, 3, "ckpt"), doctest::Contains("incomplete"),
                       cumo::Error);
}

TEST_CASE("train/adamw: misuse is reported in words") {
  Parameter a = scalar_param("a", 1.f), dup = scalar_param("a", 2.f);
  CHECK_THROWS_WITH_AS(AdamW({&a, &a}), doctest::Contains("more than one group"), cumo::Error);
  CHECK_THROWS_WITH_AS(AdamW({&a, &dup}), doctest::Contains("both named 'a'"), cumo::Error);
  AdamWOptions bad;
  bad.beta2 = 1.0;
  CHECK_THROWS_WITH_AS(AdamW({&a}, bad), doctest::Contains("beta2"), cumo::Error);
  AdamW opt({&a});
  CHECK_THROWS_WITH_AS(opt.group("vision"), doctest::Contains("no group named 'vision'"), cumo::Error);
  CHECK_THROWS_AS(opt.step(std::nan("")), cumo::Error);
}
