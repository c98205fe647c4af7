// Finite-difference checks of every backward in the sparse block: each activation, both expert kinds, the router
// (with and without renormalisation, with jitter), both aux losses (both countings, per-image), capacity drops.
//
// Method: the objective J = Σ y·dy + c_b·balance + c_z·z is evaluated in double from the fp32 forward; for each
// parameter tensor (and x) we compare the analytic directional derivative <∇J, v> with the central difference
// (J(θ + h v) − J(θ − h v)) / 2h along 3 random normal directions v. h = 2e-3 keeps the truncation error
// (O(h²)) near 1e-4 relative; the fp32 rounding of J adds an absolute error of about ε·Σ|y·dy| / h, which we bound
// with ε = 1e-6 (≈ 8 fp32 ulps). Tolerance: 2e-3 relative + that rounding floor.
// Inputs are re-drawn until every token's k-th and (k+1)-th logits differ by > 0.1, so no perturbation changes
// a top-k choice (the loss is piecewise smooth; its gradient is only defined away from those switches).
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>

#include "cumo/moe.hpp"
#include "moe_reference.hpp"

using namespace cumo;
using test::randn;

namespace {

constexpr double kStep = 2e-3;
constexpr double kTol = 2e-3;

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += double(a.data<float>()[i]) * b.data<float>()[i];
  return s;
}

void axpy(Tensor& t, float a, const Tensor& v) {
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] += a * v.data<float>()[i];
}

// Checks ∇J of every parameter of `moe` and of x against central differences.
template <class MoE>
void check_block_gradients(MoE& moe, Tensor x, ForwardArgs args, AuxLossWeights coef, std::uint64_t seed,
                           float jitter_seed = 0) {
  Rng rng(seed);
  const Tensor dy = randn(x.shape(), rng);
  const bool counts_top1 = moe.options().balance == BalanceCounts::top1;
  auto objective = [&]() {
    Rng noise(777);  // the same jitter in every evaluation
    auto out = moe.forward(x, args, &noise);
    const double b = backend::Cpu::item(counts_top1 ? out.aux.balance_top1 : out.aux.balance_allk);
    return dot(out.y, dy) + coef.balance * b + coef.z * backend::Cpu::item(out.aux.z);
  };
  moe.zero_grad();
  Rng noise(777);  // the forward that backward differentiates
  moe.forward(x, args, &noise);
  const Tensor dx = moe.backward(dy, coef);

  // size of the terms of J, for the rounding floor
  double scale = 0;
  {
    Rng n2(777);
    auto out = moe.forward(x, args, &n2);
    for (std::int64_t i = 0; i < dy.numel(); ++i) scale += std::abs(double(out.y.template data<float>()[i]) * dy.template data<float>()[i]);
    scale += std::abs(coef.balance) * 4 + std::abs(coef.z) * 4;
  }
  const double rounding_floor = 1e-6 * scale / kStep;
  auto check = [&](const std::string& name, Tensor& value, const Tensor& grad) {
    for (int d = 0; d < 3; ++d) {
      const Tensor v = randn(value.shape(), rng);
      axpy(value, float(kStep), v);
      const double jp = objective();
      axpy(value, float(-2 * kStep), v);
      const double jm = objective();
      axpy(value, float(kStep), v);
      const double numeric = (jp - jm) / (2 * kStep);
      const double analytic = dot(grad, v);
      CAPTURE(name);
      CAPTURE(numeric);
      CAPTURE(analytic);
      CHECK(std::abs(numeric - analytic) <= kTol * std::abs(analytic) + rounding_floor);
    }
  };
  for (Parameter* p : moe.parameters()) check(p->name, p->value, p->grad);
  check("x", x, dx);
}

template <class MoE>
Tensor well_separated_input(MoE& moe, std::int64_t T, Rng& rng) {
  for (int attempt = 0; attempt < 200; ++attempt) {
    moe.reset_parameters(rng);
    // a stronger router than the default init, so gaps between logits are wide
    for (std::int64_t i = 0; i < moe.router().weight.value.numel(); ++i) moe.router().weight.value.template data<float>()[i] *= 4.f;
    Tensor x = randn({T, moe.hidden()}, rng);
    if (test::min_topk_gap(moe, x) > 0.1) return x;
  }
  FAIL("could not draw inputs with well-separated top-k");
  return {};
}

template <class Act>
void check_activation() {
  for (float x = -5.f; x <= 5.f; x += 0.37f) {
    // the step actually taken is what float(x ± h) rounds to
    const float xp = x + 1e-3f, xm = x - 1e-3f;
    const double numeric = (double(Act::f(xp)) - double(Act::f(xm))) / (double(xp) - double(xm));
    CAPTURE(x);
    CHECK(std::abs(numeric - Act::df(x)) <= 2e-3 * std::abs(numeric) + 1e-4);  // 1e-4: f's fp32 rounding / 2h
  }
}

template <class ExpertT>
void check_expert_kind(std::uint64_t seed) {
  Rng rng(seed);
  SparseMoE<Router<TopK<2>>, ExpertT> moe(12, 20, 4);
  Tensor x = well_separated_input(moe, 14, rng);
  check_block_gradients(moe, x, {}, {0.1f, 0.01f}, seed);
}

}  // namespace

TEST_CASE("gradcheck: activations' derivatives (quick_gelu, gelu, gelu_tanh, silu, relu)") {
  check_activation<QuickGELU>();
  check_activation<GELU>();
  check_activation<GELUTanh>();
  check_activation<SiLU>();
  check_activation<ReLU>();  // 0 is never hit by the grid, where ReLU has no derivative
}

TEST_CASE("gradcheck: MLP experts, every activation, through the whole block") {
  check_expert_kind<Expert<MLP<QuickGELU>>>(1);
  check_expert_kind<Expert<MLP<GELU>>>(2);
  check_expert_kind<Expert<MLP<GELUTanh>>>(3);
  check_expert_kind<Expert<MLP<SiLU>>>(4);
}

TEST_CASE("gradcheck: GatedMLP (SwiGLU) experts through the whole block") {
  check_expert_kind<Expert<GatedMLP<SiLU>>>(5);
}

TEST_CASE("gradcheck: router without renormalisation, top-1 and top-3") {
  for (int K : {1, 3}) {
    CAPTURE(K);
    Rng rng(10 + K);
    SparseMoEOptions o;
    o.renormalize = false;
    SparseMoE<Router<TopKDynamic>, Expert<MLP<GELU>>> moe(10, 16, 5, o, TopKDynamic{K});
    Tensor x = well_separated_input(moe, 12, rng);
    check_block_gradients(moe, x, {}, {0.f, 0.f}, 20 + K);
  }
}

TEST_CASE("gradcheck: balance loss alone, top-1 and all-k counts, per-image reduction") {
  for (auto counting : {BalanceCounts::top1, BalanceCounts::all_k}) {
    Rng rng(30);
    SparseMoEOptions o;
    o.balance = counting;
    SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>> moe(10, 16, 4, o);
    Tensor x = well_separated_input(moe, 12, rng);
    // dy is random but the balance term dominates with coefficient 50
    check_block_gradients(moe, x, {.segments = 3}, {50.f, 0.f}, 31);
  }
}

TEST_CASE("gradcheck: router z-loss alone and with balance, per-image reduction") {
  Rng rng(40);
  SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>> moe(10, 16, 4);
  Tensor x = well_separated_input(moe, 12, rng);
  check_block_gradients(moe, x, {.segments = 2}, {0.f, 5.f}, 41);
  check_block_gradients(moe, x, {.segments = 4}, {0.1f, 0.01f}, 42);
}

TEST_CASE("gradcheck: capacity drops (dropped slots pass no gradient)") {
  Rng rng(50);
  SparseMoEOptions o;
  o.capacity_factor = 0.6f;
  SparseMoE<Router<TopK<2>>, Expert<GatedMLP<SiLU>>> moe(10, 16, 4, o);
  Tensor x = well_separated_input(moe, 16, rng);
  moe.forward(x);
  REQUIRE(moe.load().dropped > 0);
  check_block_gradients(moe, x, {}, {0.1f, 0.01f}, 51);
}

TEST_CASE("gradcheck: router jitter (fixed noise) while training") {
  Rng rng(60);
  SparseMoEOptions o;
  o.jitter = 0.01f;
  SparseMoE<Router<TopK<2>>, Expert<MLP<GELU>>> moe(10, 16, 4, o);
  Tensor x = well_separated_input(moe, 12, rng);
  check_block_gradients(moe, x, {.training = true}, {0.1f, 0.01f}, 61);
  // jitter changes the logits while training and never in eval
  Rng a(1), b(1);
  auto train = moe.forward(x, {.training = true}, &a);
  const Tensor lt = moe.router_output().logits.clone();
  moe.forward(x, {.training = false}, &b);
  CHECK(!bitwise_equal(lt, moe.router_output().logits));
}

TEST_CASE("gradcheck: a connector-shaped block (hidden 10 → out 7) ") {
  Rng rng(70);
  SparseMoE<Router<TopK<2>>, Expert<MLP<GELU>>> moe(10, 16, 4, {}, {}, /*out_features=*/7);
  Tensor x = well_separated_input(moe, 12, rng);
  CHECK(moe.forward(x).y.shape() == Shape{12, 7});
  Rng r2(71);
  const Tensor dy = randn({12, 7}, r2);
  // check_block_gradients draws dy with x's shape, so differentiate here along random directions directly
  moe.zero_grad();
  moe.forward(x);
  const Tensor dx = moe.backward(dy, {0.1f, 0.01f});
  auto objective = [&] {
    auto out = moe.forward(x);
    return dot(out.y, dy) + 0.1 * backend::Cpu::item(out.aux.balance_top1) + 0.01 * backend::Cpu::item(out.aux.z);
  };
  auto check = [&](Tensor& value, const Tensor& grad) {
    const Tensor v = randn(value.shape(), r2);
    axpy(value, float(kStep), v);
    const double jp = objective();
    axpy(value, float(-2 * kStep), v);
    const double jm = objective();
    axpy(value, float(kStep), v);
    const double numeric = (jp - jm) / (2 * kStep), analytic = dot(grad, v);
    CHECK(std::abs(numeric - analytic) <= kTol * std::abs(analytic) + 1e-3);
  };
  for (Parameter* p : moe.parameters()) check(p->value, p->grad);
  check(x, dx);
}
