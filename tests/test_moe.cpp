// The sparse MoE block on the CPU: parity with the PyTorch fixtures, agreement with a plain double-precision
// reference, the upcycling invariant, determinism, capacity drops, per-image losses, and bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "cumo/io/safetensors.hpp"
#include "cumo/moe.hpp"
#include "moe_reference.hpp"
#include "parity/moe.hpp"

using namespace cumo;
using test::randn;

namespace {

std::string fixture(const char* name) { return std::string(CUMO_FIXTURE_DIR) + "/" + name; }

parity::Report run_fixture(const char* name) {
  const auto f = io::SafeTensors::open(fixture(name));
  const auto cfg = nlohmann::json::parse(f.metadata().at("config"));
  parity::Report r;
  if (f.metadata().at("kind") == "moe_mlp")
    parity::run_moe_mlp<backend::Cpu>(f, cfg, r);
  else
    parity::run_moe_swiglu<backend::Cpu>(f, cfg, r);
  return r;
}

using ClipMoE = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>>;
using MixtralMoE = SparseMoE<Router<TopK<2>>, Expert<GatedMLP<SiLU>>>;

}  // namespace

TEST_CASE("parity: CuMo block of CLIP MLPs (quick_gelu, top-2) matches PyTorch") {
  const auto r = run_fixture("moe_clipmlp_quick_gelu_h16_f32_e4_k2_t10.safetensors");
  CHECK(r.failed == 0);
  CHECK(r.passed == 15);  // y, logits, idx, w, 2 balances, z, objective, dense_y, dx, 5 grads
}

TEST_CASE("parity: CuMo block of CLIP MLPs (erf gelu, top-1) matches PyTorch") {
  const auto r = run_fixture("moe_clipmlp_gelu_h16_f32_e4_k1_t7.safetensors");
  CHECK(r.failed == 0);
  CHECK(r.passed == 15);
}

TEST_CASE("parity: HF MixtralSparseMoeBlock (SwiGLU, all-k balance) matches PyTorch") {
  const auto r = run_fixture("moe_mixtral_h16_f32_e8_k2_t10.safetensors");
  CHECK(r.failed == 0);
  CHECK(r.passed == 9);  // y, logits, balance, z, objective, dx, 3 grads
}

TEST_CASE("moe: forward agrees with a double-precision per-token reference (MLP and GatedMLP, K = 1, 2, 3)") {
  Rng rng(11);
  for (int K : {1, 2, 3}) {
    CAPTURE(K);
    SparseMoE<Router<TopKDynamic>, Expert<MLP<GELU>>> mlp(24, 40, 6, {}, TopKDynamic{K});
    mlp.reset_parameters(rng);
    const Tensor x = randn({33, 24}, rng);
    CHECK(rel_error(mlp.forward(x).y, test::reference_forward<GELU>(mlp, x)) < 1e-5);

    SparseMoE<Router<TopKDynamic>, Expert<GatedMLP<SiLU>>> glu(24, 40, 6, {}, TopKDynamic{K});
    glu.reset_parameters(rng);
    CHECK(rel_error(glu.forward(x).y, test::reference_forward<SiLU>(glu, x)) < 1e-5);
  }
}

TEST_CASE("moe: renormalize=false uses the raw top-k probabilities (Qwen-MoE / DeepSeek-V2)") {
  Rng rng(12);
  SparseMoEOptions o;
  o.renormalize = false;
  SparseMoE<Router<TopK<2>>, Expert<MLP<ReLU>>> moe(16, 24, 5, o);
  moe.reset_parameters(rng);
  const Tensor x = randn({20, 16}, rng);
  const auto out = moe.forward(x);
  CHECK(rel_error(out.y, test::reference_forward<ReLU>(moe, x)) < 1e-5);
  const Tensor& w = moe.router_output().topk_w;
  const Tensor& p = moe.router_output().probs;
  for (int t = 0; t < 20; ++t) CHECK(w.at<float>(t, 0) == p.at<float>(t, moe.router_output().topk_idx.at<std::int32_t>(t, 0)));
}

TEST_CASE("router: renormalised top-k weights sum to 1 and come best first") {
  Rng rng(13);
  ClipMoE moe(16, 32, 8);
  moe.reset_parameters(rng);
  moe.forward(randn({50, 16}, rng));
  const auto& r = moe.router_output();
  for (int t = 0; t < 50; ++t) {
    CHECK(r.topk_w.at<float>(t, 0) + r.topk_w.at<float>(t, 1) == doctest::Approx(1.f).epsilon(1e-6));
    CHECK(r.topk_w.at<float>(t, 0) >= r.topk_w.at<float>(t, 1));
    CHECK(r.topk_idx.at<std::int32_t>(t, 0) != r.topk_idx.at<std::int32_t>(t, 1));
  }
}

TEST_CASE("upcycling: identical copies of a dense MLP reproduce it for random routers, K = 1, 2, 4") {
  Rng rng(21);
  const std::int64_t H = 32, F = 48, T = 29;
  DenseMLPWeights d{randn({F, H}, rng, 0.2f), randn({F}, rng, 0.1f), randn({H, F}, rng, 0.2f), randn({H}, rng, 0.1f)};
  const Tensor x = randn({T, H}, rng);
  // the dense MLP, computed directly
  Tensor h = Tensor::empty({T, F}), dense_y = Tensor::empty({T, H});
  cpu::linear(x, d.fc1_weight, &d.fc1_bias, h);
  cpu::activation_forward<QuickGELU>(h, T, h);
  cpu::linear(h, d.fc2_weight, &d.fc2_bias, dense_y);
  for (int K : {1, 2, 4}) {
    for (int trial = 0; trial < 3; ++trial) {
      CAPTURE(K);
      auto moe = upcycle_from_dense<SparseMoE<Router<TopKDynamic>, Expert<MLP<QuickGELU>>>>(d, 4, rng, {},
                                                                                            TopKDynamic{K});
      // fp32 rounding of Σ_k w_k (= 1 ± ulp) and of the grouped vs whole GEMM is all that may differ
      CHECK(rel_error(moe.forward(x).y, dense_y) < 1e-6);
    }
  }
  // SwiGLU experts too
  DenseGatedWeights g{randn({F, H}, rng, 0.2f), randn({F, H}, rng, 0.2f), randn({H, F}, rng, 0.2f)};
  auto moe = upcycle_from_dense<MixtralMoE>(g, 8, rng);
  Tensor gate = Tensor::empty({T, F}), up = Tensor::empty({T, F}), yy = Tensor::empty({T, H});
  cpu::linear(x, g.gate_proj, nullptr, gate);
  cpu::linear(x, g.up_proj, nullptr, up);
  for (int i = 0; i < T * F; ++i) gate.data<float>()[i] = SiLU::f(gate.data<float>()[i]) * up.data<float>()[i];
  cpu::linear(gate, g.down_proj, nullptr, yy);
  CHECK(rel_error(moe.forward(x).y, yy) < 1e-6);
}

TEST_CASE("upcycling: the router is fresh, seeded and PyTorch-initialised") {
  Rng a(5), b(5), c(6);
  DenseMLPWeights d{Tensor::zeros({8, 4}), Tensor::zeros({8}), Tensor::zeros({4, 8}), Tensor::zeros({4})};
  auto m1 = upcycle_from_dense<ClipMoE>(d, 4, a), m2 = upcycle_from_dense<ClipMoE>(d, 4, b),
       m3 = upcycle_from_dense<ClipMoE>(d, 4, c);
  CHECK(bitwise_equal(m1.router().weight.value, m2.router().weight.value));
  CHECK(!bitwise_equal(m1.router().weight.value, m3.router().weight.value));
  const Tensor& w = m1.router().weight.value;
  for (int i = 0; i < w.numel(); ++i) CHECK(std::abs(w.data<float>()[i]) <= 0.5f);  // 1/√4
  CHECK_THROWS_WITH_AS(upcycle_from_dense<ClipMoE>(DenseMLPWeights{Tensor::zeros({8, 4}), Tensor::zeros({9}),
                                                                    Tensor::zeros({4, 8}), Tensor::zeros({4})},
                                                   4, a),
                       doctest::Contains("fc1.bias has shape (9,)"), Error);
}

TEST_CASE("determinism: two forward+backward runs are bitwise equal") {
  auto run = [] {
    Rng rng(31);
    MixtralMoE moe(32, 64, 8);
    moe.reset_parameters(rng);
    const Tensor x = randn({300, 32}, rng), dy = randn({300, 32}, rng);
    auto out = moe.forward(x, {.segments = 3});
    const Tensor dx = moe.backward(dy, {0.1f, 0.01f});
    std::vector<Tensor> all{out.y, dx, out.aux.balance_top1, out.aux.z};
    for (Parameter* p : moe.parameters()) all.push_back(p->grad.clone());
    return all;
  };
  const auto a = run(), b = run();
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(bitwise_equal(a[i], b[i]));
}

TEST_CASE("routing only: forward_routing + backward_routing give the aux losses, load and gradients of forward + "
          "backward of a zero dy, without the experts") {
  // Values compare with == (a signed zero of the full path's zero rows may differ; nothing else may).
  auto same = [](const Tensor& a, const Tensor& b) {
    REQUIRE(a.shape() == b.shape());
    for (std::int64_t i = 0; i < a.numel(); ++i)
      if (!(a.data<float>()[i] == b.data<float>()[i])) return false;
    return true;
  };
  for (bool renormalize : {true, false}) {
    CAPTURE(renormalize);
    Rng rng(43);
    SparseMoEOptions o;
    o.renormalize = renormalize;
    ClipMoE moe(16, 32, 4, o);
    moe.reset_parameters(rng);
    const Tensor x = randn({60, 16}, rng);
    const AuxLossWeights aux{0.1f, 0.01f};

    moe.zero_grad();
    const auto full = moe.forward(x, {.segments = 3});
    const ExpertLoad load_full = moe.load();
    const Tensor dx_full = moe.backward(Tensor::zeros({60, 16}), aux);
    std::vector<Tensor> g_full;
    for (Parameter* p : moe.parameters()) g_full.push_back(p->grad.clone());

    moe.zero_grad();
    const AuxLosses a = moe.forward_routing(x, {.segments = 3});
    CHECK(moe.load().tokens == load_full.tokens);
    CHECK_THROWS_AS(moe.backward(Tensor::zeros({60, 16}), aux), Error);  // a routing-only forward has no experts' part
    moe.forward_routing(x, {.segments = 3});
    const Tensor dx = moe.backward_routing(aux);
    CHECK(same(a.balance_top1, full.aux.balance_top1));
    CHECK(same(a.z, full.aux.z));
    CHECK(same(dx, dx_full));
    const ParameterList ps = moe.parameters();
    for (std::size_t i = 0; i < ps.size(); ++i) {
      CAPTURE(ps[i]->name);
      CHECK(same(ps[i]->grad, g_full[i]));  // the experts' are zero on both paths, the router's the aux losses'
    }
    float largest = 0.f;
    for (std::int64_t i = 0; i < dx.numel(); ++i) largest = std::max(largest, std::abs(dx.data<float>()[i]));
    CHECK(largest > 0.f);  // the aux losses do reach x
  }
}

TEST_CASE("load: every forward reports tokens per expert and max/mean") {
  Rng rng(41);
  ClipMoE moe(16, 32, 4);
  moe.reset_parameters(rng);
  moe.forward(randn({64, 16}, rng));
  const auto l = moe.load();
  REQUIRE(l.tokens.size() == 4);
  std::int64_t sum = 0;
  for (auto t : l.tokens) sum += t;
  CHECK(sum == 128);
  CHECK(l.dropped == 0);
  CHECK(l.max_over_mean() >= 1.0);
}

TEST_CASE("capacity: overflow slots are dropped in priority order and contribute nothing") {
  Rng rng(51);
  SparseMoEOptions o;
  o.capacity_factor = 0.5f;
  SparseMoE<Router<TopK<2>>, Expert<MLP<GELU>>> moe(16, 24, 4, o), free(16, 24, 4);
  moe.reset_parameters(rng);
  for (std::size_t i = 0; i < moe.parameters().size(); ++i)
    free.parameters()[i]->value.copy_from(moe.parameters()[i]->value);
  const std::int64_t T = 40;
  const Tensor x = randn({T, 16}, rng);
  const auto y = moe.forward(x).y;
  const std::int64_t cap = moe.capacity(T);
  CHECK(cap == 10);  // ceil(2 · 40 · 0.5 / 4)
  const auto l = moe.load();
  for (auto t : l.tokens) CHECK(t <= cap);
  CHECK(l.dropped > 0);
  // reference: the dropless block's per-slot outputs, summed over the kept slots only
  free.forward(x);
  const auto& plan = moe.plan();
  const auto& fr = free.router_output();
  std::vector<int> used(4, 0);
  std::vector<bool> kept(T * 2);
  for (int k = 0; k < 2; ++k)
    for (std::int64_t t = 0; t < T; ++t) {
      const int e = fr.topk_idx.at<std::int32_t>(t, k);
      kept[t * 2 + k] = used[e]++ < cap;
      CHECK(kept[t * 2 + k] == (plan.row_of_slot.at<std::int32_t>(t * 2 + k) >= 0));
    }
  for (std::int64_t t = 0; t < T; ++t) {
    const bool all_dropped = !kept[t * 2] && !kept[t * 2 + 1];
    if (all_dropped)
      for (int h = 0; h < 16; ++h) CHECK(y.at<float>(t, h) == 0.f);
  }
}

TEST_CASE("aux losses: per-image reduction is the mean of per-image losses") {
  Rng rng(61);
  ClipMoE moe(16, 32, 4);
  moe.reset_parameters(rng);
  const Tensor x = randn({30, 16}, rng);
  const auto whole = moe.forward(x, {.segments = 3});
  double b1 = 0, bk = 0, z = 0;
  for (int s = 0; s < 3; ++s) {
    const auto part = moe.forward(x.slice(0, s * 10, s * 10 + 10));
    b1 += backend::Cpu::item(part.aux.balance_top1) / 3;
    bk += backend::Cpu::item(part.aux.balance_allk) / 3;
    z += backend::Cpu::item(part.aux.z) / 3;
  }
  CHECK(backend::Cpu::item(whole.aux.balance_top1) == doctest::Approx(b1).epsilon(1e-6));
  CHECK(backend::Cpu::item(whole.aux.balance_allk) == doctest::Approx(bk).epsilon(1e-6));
  CHECK(backend::Cpu::item(whole.aux.z) == doctest::Approx(z).epsilon(1e-6));
}

TEST_CASE("aux losses: a perfectly balanced router gives balance 1 (top-1) and k (all-k)") {
  // Zero router weights: uniform probabilities; ties pick experts 0 and 1 for every token, so f is skewed but P is
  // uniform — E Σ f_e / E = 1 (top-1) and = k (all-k) regardless of f.
  ClipMoE moe(8, 8, 4);
  Rng rng(3);
  const auto out = moe.forward(randn({12, 8}, rng));
  CHECK(backend::Cpu::item(out.aux.balance_top1) == doctest::Approx(1.0));
  CHECK(backend::Cpu::item(out.aux.balance_allk) == doctest::Approx(2.0));
  CHECK(backend::Cpu::item(out.aux.z) == doctest::Approx(std::log(4.0) * std::log(4.0)).epsilon(1e-6));
}

TEST_CASE("bad input: shape mismatch, K > E, zero tokens, NaN, backward misuse give cumo::Error") {
  Rng rng(71);
  SparseMoE<Router<TopKDynamic>, Expert<MLP<GELU>>> moe(1024, 64, 4, {}, TopKDynamic{2});
  CHECK_THROWS_WITH_AS(moe.forward(Tensor::zeros({37, 512})),
                       "SparseMoE::forward: x has shape (37, 512) but the block was built for hidden = 1024", Error);
  CHECK_THROWS_WITH_AS(moe.forward(Tensor::zeros({4, 2, 1024})),
                       doctest::Contains("x has shape (4, 2, 1024) but expected (tokens, 1024)"), Error);
  CHECK_THROWS_WITH_AS((SparseMoE<Router<TopKDynamic>, Expert<MLP<GELU>>>(16, 32, 4, {}, TopKDynamic{5})),
                       doctest::Contains("top-k = 5 must be between 1 and the number of experts (4)"), Error);
  CHECK_THROWS_WITH_AS(moe.forward(Tensor::zeros({0, 1024})), doctest::Contains("zero tokens"), Error);
  Tensor x = Tensor::zeros({3, 1024});
  x.at<float>(1, 7) = NAN;
  CHECK_THROWS_WITH_AS(moe.forward(x), doctest::Contains("contains NaN or Inf"), Error);
  CHECK_THROWS_WITH_AS(moe.forward(Tensor::zeros({3, 1024}, DType::f64)), doctest::Contains("dtype f64"), Error);
  CHECK_THROWS_WITH_AS(moe.forward(Tensor::zeros({9, 1024}), {.segments = 2}),
                       doctest::Contains("9 tokens, which do not split into 2"), Error);
  CHECK_THROWS_WITH_AS(moe.backward(Tensor::zeros({3, 1024})), doctest::Contains("no saved forward"), Error);
  moe.forward(Tensor::zeros({3, 1024}));
  CHECK_THROWS_WITH_AS(moe.backward(Tensor::zeros({4, 1024})),
                       "SparseMoE::backward: dy has shape (4, 1024) but y has shape (3, 1024)", Error);
}

TEST_CASE("upcycling: a connector-shaped dense MLP (hidden → other width) is reproduced too") {
  Rng rng(81);
  const std::int64_t H = 12, F = 20, O = 9, T = 15;
  DenseMLPWeights d{randn({F, H}, rng, 0.3f), randn({F}, rng, 0.1f), randn({O, F}, rng, 0.3f), randn({O}, rng, 0.1f)};
  auto moe = upcycle_from_dense<SparseMoE<Router<TopK<2>>, Expert<MLP<GELU>>>>(d, 4, rng);
  CHECK(moe.out_features() == O);
  const Tensor x = randn({T, H}, rng);
  Tensor h = Tensor::empty({T, F}), y = Tensor::empty({T, O});
  cpu::linear(x, d.fc1_weight, &d.fc1_bias, h);
  cpu::activation_forward<GELU>(h, T, h);
  cpu::linear(h, d.fc2_weight, &d.fc2_bias, y);
  CHECK(rel_error(moe.forward(x).y, y) < 1e-6);
  CHECK_THROWS_WITH_AS(moe.backward(Tensor::zeros({T, H})),
                       doctest::Contains("dy has shape (15, 12) but y has shape (15, 9)"), Error);
}
