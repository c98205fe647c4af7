// nn::S2Vision (S² multi-scale CLIP features, nn/s2.hpp) and CuMo with it: the bicubic resize against a hand-computed
// matrix and a plain 16-tap reference, its adjoint, the area pooling, the chessboard order, the 1× half equal to the
// plain tower bitwise and the 3× half equal to a hand-run of the tiles, finite-difference gradients (tower parameters,
// routers with their aux losses, pixels through the upsampling), CuMo with "s2": true end to end, and the cumo_train
// JSON switch.
//
// No PyTorch here: the bicubic reference is PyTorch's documented algorithm (upsample_bicubic2d, align_corners=False:
// src = (dst + ½)·in/out − ½, taps floor(src) − 1 … + 2 clamped, A = −0.75) computed by hand for 2 → 6 and written
// out independently for the general case, not numbers produced by torch.
#include <doctest/doctest.h>

#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "cumo/models/cumo.hpp"
#include "cumo/nn/s2.hpp"
#include "app/run_config.hpp"
#include "cumo_test_config.hpp"
#include "nn_test_util.hpp"

using namespace cumo;
using cumo::test::gradcheck;
using cumo::test::random_tensor;
using cumo::test::randomize;

namespace {

// CLIP 2 layers, width 8, 8×8 images in 4×4 patches: G = 2, 4 patches + CLS; 3× = 24×24 in 9 tiles.
nn::VisionConfig tiny_vision() { return test::tiny_cumo_config().llava.vision; }

// The tiny CuMo of test_models_cumo.cpp, with S².
models::CuMoConfig tiny_cumo_s2() {
  models::CuMoConfig c = test::tiny_cumo_config();
  c.llava.vision.s2 = true;
  return c;
}

// PyTorch's cubic convolution (A = −0.75), written out for the reference below.
double keys(double x) {
  constexpr double A = -0.75;
  x = std::fabs(x);
  if (x <= 1) return (A + 2) * x * x * x - (A + 3) * x * x + 1;
  if (x < 2) return A * x * x * x - 5 * A * x * x + 8 * A * x - 4 * A;
  return 0;
}

// Plain 2-D reference: every output pixel as a 16-tap sum in double, taps clamped to the border.
std::vector<double> bicubic_reference(const Tensor& x, std::int64_t out) {
  const std::int64_t P = x.size(0) * x.size(1), S = x.size(2);
  std::vector<double> y(std::size_t(P * out * out));
  auto clampi = [&](std::int64_t i) { return i < 0 ? 0 : (i >= S ? S - 1 : i); };
  for (std::int64_t p = 0; p < P; ++p)
    for (std::int64_t oy = 0; oy < out; ++oy)
      for (std::int64_t ox = 0; ox < out; ++ox) {
        const double sy = (oy + 0.5) * double(S) / double(out) - 0.5, sx = (ox + 0.5) * double(S) / double(out) - 0.5;
        const auto fy = std::int64_t(std::floor(sy)), fx = std::int64_t(std::floor(sx));
        double s = 0;
        for (std::int64_t i = fy - 1; i <= fy + 2; ++i)
          for (std::int64_t j = fx - 1; j <= fx + 2; ++j)
            s += keys(sy - double(i)) * keys(sx - double(j)) *
                 x.data<float>()[(p * S + clampi(i)) * S + clampi(j)];
        y[std::size_t((p * out + oy) * out + ox)] = s;
      }
  return y;
}

double max_abs_diff(const Tensor& a, const std::vector<double>& b) {
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    m = std::max(m, std::fabs(double(a.data<float>()[i]) - b[std::size_t(i)]));
  return m;
}

// Top-k choices of every sparse layer of a tower (for "routing did not change under ±h").
void append_routing(const nn::ClipVision<>& t, std::vector<std::int32_t>& r) {
  for (const auto& l : t.layers)
    if (l.mlp.is_sparse()) {
      const Tensor& idx = l.mlp.sparse().router_output().topk_idx;
      r.insert(r.end(), idx.data<std::int32_t>(), idx.data<std::int32_t>() + idx.numel());
    }
}

}  // namespace

TEST_CASE("s2: bicubic 2→6 equals the hand-computed cubic-convolution matrix (A = -0.75, align_corners=False)") {
  // 1-D weights for in = 2, out = 6 (src = (o + ½)/3 − ½): o = 0 → src −1/3, taps (−2, −1, 0, 1) clamped to
  // (0, 0, 0, 1) with weights (−1/18, 10/27, 43/54, −1/9): 10/9 on x0, −1/9 on x1; o = 1 → src 0: x0 exactly;
  // o = 2 → src 1/3: 37/54 x0 + 17/54 x1; the rest by symmetry.
  const double M[6][2] = {{10. / 9, -1. / 9}, {1, 0}, {37. / 54, 17. / 54}, {17. / 54, 37. / 54}, {0, 1},
                          {-1. / 9, 10. / 9}};
  Tensor x = Tensor::empty({1, 1, 2, 2});
  const double X[2][2] = {{1, 2}, {3, 5}};
  for (int i = 0; i < 4; ++i) x.data<float>()[i] = float(X[i / 2][i % 2]);
  const Tensor y = nn::s2::bicubic_resize(x, 6);
  REQUIRE(y.shape() == Shape{1, 1, 6, 6});
  for (int r = 0; r < 6; ++r)
    for (int c = 0; c < 6; ++c) {
      double want = 0;  // (M X Mᵀ)[r][c]
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) want += M[r][i] * X[i][j] * M[c][j];
      CAPTURE(r);
      CAPTURE(c);
      CHECK(y.data<float>()[r * 6 + c] == doctest::Approx(want).epsilon(1e-6));
    }
  CHECK(y.data<float>()[0] == doctest::Approx(100. / 81 * 1 - 10. / 81 * 2 - 10. / 81 * 3 + 1. / 81 * 5));
}

TEST_CASE("s2: bicubic resize equals a plain 16-tap reference; the same size is exactly the identity") {
  Rng rng(11);
  for (const auto& [S, out] : {std::pair<std::int64_t, std::int64_t>{8, 24}, {5, 15}, {7, 12}, {6, 4}}) {
    const Tensor x = random_tensor({2, 3, S, S}, rng);
    const Tensor y = nn::s2::bicubic_resize(x, out);
    REQUIRE(y.shape() == Shape{2, 3, out, out});
    CAPTURE(S);
    CAPTURE(out);
    CHECK(max_abs_diff(y, bicubic_reference(x, out)) <= 1e-5);  // fp32 output of O(1) values
  }
  const Tensor x = random_tensor({2, 3, 8, 8}, rng);
  CHECK(bitwise_equal(nn::s2::bicubic_resize(x, 8), x));  // s2wrapper's 1× resize changes nothing
  Tensor c = Tensor::empty({1, 2, 4, 4});
  for (std::int64_t i = 0; i < c.numel(); ++i) c.data<float>()[i] = 0.75f;
  const Tensor yc = nn::s2::bicubic_resize(c, 12);  // the weights sum to 1: a constant stays constant
  for (std::int64_t i = 0; i < yc.numel(); ++i) CHECK(yc.data<float>()[i] == doctest::Approx(0.75).epsilon(1e-6));
}

TEST_CASE("s2: bicubic backward is the adjoint of the forward (<A x, y> = <x, Aᵀ y>)") {
  Rng rng(12);
  for (const auto& [S, out] : {std::pair<std::int64_t, std::int64_t>{8, 24}, {5, 15}, {6, 4}}) {
    const Tensor x = random_tensor({2, 3, S, S}, rng), g = random_tensor({2, 3, out, out}, rng);
    const Tensor ax = nn::s2::bicubic_resize(x, out), atg = nn::s2::bicubic_resize_backward(g, S);
    REQUIRE(atg.shape() == x.shape());
    const double lhs = test::dot(ax, g), rhs = test::dot(x, atg);
    CAPTURE(S);
    CHECK(std::fabs(lhs - rhs) <= 1e-5 * (std::fabs(lhs) + 1));
  }
}

TEST_CASE("s2: area pooling is the exact n×n window mean, and its backward is its adjoint") {
  Rng rng(13);
  const std::int64_t B = 2, M = 6, n = 3, G = 2, H = 5;
  const Tensor x = random_tensor({B * M * M, H}, rng);
  const Tensor y = nn::s2::area_pool(x, B, M, n);
  REQUIRE(y.shape() == Shape{B * G * G, H});
  double worst = 0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t gy = 0; gy < G; ++gy)
      for (std::int64_t gx = 0; gx < G; ++gx)
        for (std::int64_t h = 0; h < H; ++h) {
          double s = 0;
          for (std::int64_t Y = n * gy; Y < n * gy + n; ++Y)
            for (std::int64_t X = n * gx; X < n * gx + n; ++X) s += x.data<float>()[((b * M + Y) * M + X) * H + h];
          worst = std::max(worst, std::fabs(s / 9 - y.data<float>()[((b * G + gy) * G + gx) * H + h]));
        }
  CHECK(worst <= 1e-6);
  const Tensor g = random_tensor({B * G * G, H}, rng);
  CHECK(test::dot(y, g) == doctest::Approx(test::dot(x, nn::s2::area_pool_backward(g, B, G, n))).epsilon(1e-5));
  CHECK_THROWS_AS(nn::s2::area_pool(x, B, 5, 3), Error);  // 5 is not a multiple of 3
}

TEST_CASE("s2: tiles follow s2wrapper's (nh nw b) order, and tile features merge back where their tile came from") {
  Rng rng(14);
  const std::int64_t B = 2, C = 3, S = 4, n = 3;
  const Tensor x = random_tensor({B, C, n * S, n * S}, rng);
  const Tensor t = nn::s2::split_tiles(x, n);
  REQUIRE(t.shape() == Shape{n * n * B, C, S, S});
  bool ok = true;
  for (std::int64_t ty = 0; ty < n; ++ty)
    for (std::int64_t tx = 0; tx < n; ++tx)
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t c = 0; c < C; ++c)
          for (std::int64_t i = 0; i < S; ++i)
            for (std::int64_t j = 0; j < S; ++j)
              ok = ok && t.data<float>()[((((ty * n + tx) * B + b) * C + c) * S + i) * S + j] ==
                             x.data<float>()[((b * C + c) * n * S + ty * S + i) * n * S + tx * S + j];
  CHECK(ok);
  CHECK(bitwise_equal(nn::s2::merge_tiles(t, n), x));

  // A feature map laid out as an image (B, H, nG, nG), split with the pixels' chessboard into (n²B, H, G, G),
  // flattened per tile into the tower's rows (crop, gy, gx): merging those rows must give back the original grid.
  const std::int64_t G = 2, H = 5, M = n * G;
  const Tensor fmap = random_tensor({B, H, M, M}, rng);
  const Tensor ftiles = nn::s2::split_tiles(fmap, n);  // (n²B, H, G, G)
  Tensor rows = Tensor::empty({n * n * B * G * G, H});
  for (std::int64_t k = 0; k < n * n * B; ++k)
    for (std::int64_t p = 0; p < G * G; ++p)
      for (std::int64_t h = 0; h < H; ++h)
        rows.data<float>()[(k * G * G + p) * H + h] = ftiles.data<float>()[(k * H + h) * G * G + p];
  const Tensor merged = nn::s2::merge_tile_features(rows, B, G, n);  // (B·M², H) rows (b, Y, X)
  ok = true;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t p = 0; p < M * M; ++p)
      for (std::int64_t h = 0; h < H; ++h)
        ok = ok && merged.data<float>()[(b * M * M + p) * H + h] == fmap.data<float>()[(b * H + h) * M * M + p];
  CHECK(ok);
  CHECK(bitwise_equal(nn::s2::split_tile_features(merged, B, G, n), rows));
}

TEST_CASE("s2: the 1× half equals the plain tower's features bitwise; the 3× half is the hand-run of the 9 tiles") {
  Rng rng(15);
  const nn::VisionConfig vc = tiny_vision();
  for (const bool sparse : {false, true}) {
    CAPTURE(sparse);
    nn::ClipVision<> tower(vc);
    randomize(tower.parameters(), rng, 0.4f);
    if (sparse)
      for (auto& l : tower.layers) l.mlp.upcycle(4, 2, rng);
    const std::int64_t B = 2, H = vc.hidden, N = vc.patches(), G = vc.grid(), S = vc.image_size;
    const Tensor px = random_tensor({B, 3, S, S}, rng);

    nn::ClipVision<> plain = tower;  // shares the parameters
    const Tensor f1 = plain.forward(px).features.clone();  // (B·N, H)
    // the 3× pass by hand: upsample, cut the tiles in s2wrapper's order, run, pool each image's 3×3 windows
    const Tensor up = nn::s2::bicubic_resize(px, 3 * S);
    Tensor crops = Tensor::empty({9 * B, 3, S, S});
    for (std::int64_t ty = 0; ty < 3; ++ty)
      for (std::int64_t tx = 0; tx < 3; ++tx)
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t c = 0; c < 3; ++c)
            for (std::int64_t i = 0; i < S; ++i)
              for (std::int64_t j = 0; j < S; ++j)
                crops.data<float>()[((((ty * 3 + tx) * B + b) * 3 + c) * S + i) * S + j] =
                    up.data<float>()[((b * 3 + c) * 3 * S + ty * S + i) * 3 * S + tx * S + j];
    const Tensor ft = plain.forward(crops).features;  // (9B·N, H)
    std::vector<double> f3(std::size_t(B * N * H), 0.0);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t Y = 0; Y < 3 * G; ++Y)
        for (std::int64_t X = 0; X < 3 * G; ++X) {
          const std::int64_t crop = ((Y / G) * 3 + X / G) * B + b, row = crop * N + (Y % G) * G + X % G;
          for (std::int64_t h = 0; h < H; ++h)
            f3[std::size_t(((b * G + Y / 3) * G + X / 3) * H + h)] += ft.data<float>()[row * H + h] / 9.0;
        }

    nn::S2Vision s2;
    const Tensor f = s2.forward(tower, px);
    REQUIRE(f.shape() == Shape{B * N, 2 * H});
    bool same = true;
    double worst = 0;
    for (std::int64_t r = 0; r < B * N; ++r)
      for (std::int64_t h = 0; h < H; ++h) {
        same = same && f.data<float>()[r * 2 * H + h] == f1.data<float>()[r * H + h];
        worst = std::max(worst, std::fabs(f.data<float>()[r * 2 * H + H + h] - f3[std::size_t(r * H + h)]));
      }
    CHECK(same);
    CHECK(worst <= 1e-6);
    // the tower itself ran the 1× pass: its features and aux losses are those of the plain forward
    if (sparse) {
      const auto a = s2.aux_losses(tower);
      REQUIRE(a.size() == 2);
      const auto loads = s2.loads(tower);
      std::int64_t routed = 0;
      for (auto t : loads[0].tokens) routed += t;
      CHECK(routed == 2 * (B + 9 * B) * (N + 1));  // k × (images + tiles) × (patches + CLS)
    }
  }
}

TEST_CASE("s2: finite differences of Σ features·R w.r.t. every tower parameter and the pixels (dense tower)") {
  Rng rng(16);
  nn::ClipVision<> tower(tiny_vision());
  randomize(tower.parameters(), rng, 0.4f);
  Tensor px = random_tensor({2, 3, 8, 8}, rng);
  nn::S2Vision s2;
  const Tensor R = random_tensor({2 * 4, 16}, rng);
  auto objective = [&] { return test::dot(s2.forward(tower, px), R); };
  const ParameterList params = tower.parameters();
  zero_grad(params);
  s2.forward(tower, px);
  s2.backward(tower, R);
  const Tensor dpx = s2.input_grad(tower);
  REQUIRE(dpx.shape() == px.shape());
  auto targets = test::targets_of(params);
  std::erase_if(targets, [](const test::GradTarget& t) { return t.name.find("post_layernorm") != std::string::npos; });
  targets.push_back({"pixel_values", px, dpx});
  gradcheck(targets, objective, 6, 5e-3, 1e-2);
  for (Parameter* p : params)
    if (p->name.find("post_layernorm") != std::string::npos) CHECK(test::dot(p->grad, p->grad) == 0.0);
}

TEST_CASE("s2: finite differences with a sparse tower — features plus every layer's ½(1× + 3×) balance and z losses") {
  Rng rng(17);
  nn::ClipVision<> tower(tiny_vision());
  randomize(tower.parameters(), rng, 0.4f);
  for (auto& l : tower.layers) l.mlp.upcycle(4, 2, rng);
  const ParameterList params = tower.parameters();
  for (Parameter* p : params)
    if (p->name.ends_with(".gate.weight")) rng.fill_normal(p->value, 0.f, 0.8f);  // aux losses with real gradient
  Tensor px = random_tensor({2, 3, 8, 8}, rng);
  nn::S2Vision s2;
  const Tensor R = random_tensor({2 * 4, 16}, rng);
  const float wb = 0.7f, wz = 0.3f;
  auto routing = [&] {
    std::vector<std::int32_t> r;
    append_routing(tower, r);
    append_routing(*s2.tile_tower(), r);
    return r;
  };
  auto value = [&] {
    double f = test::dot(s2.forward(tower, px), R);
    for (const AuxLosses& a : s2.aux_losses(tower))
      f += wb * double(a.balance_top1.data<float>()[0]) + wz * double(a.z.data<float>()[0]);
    return f;
  };
  zero_grad(params);
  value();
  const auto want_routing = routing();
  s2.backward(tower, R, AuxLossWeights{wb, wz});
  const Tensor dpx = s2.input_grad(tower);
  int flips = 0;
  auto objective = [&] {
    const double f = value();
    flips += routing() != want_routing;
    return f;
  };
  auto targets = test::targets_of(params);
  // post_layernorm never runs into the features; the last layer's experts feed nothing (features are layer −2)
  std::erase_if(targets, [](const test::GradTarget& t) {
    return t.name.find("post_layernorm") != std::string::npos ||
           t.name.find("layers.1.mlp.experts") != std::string::npos;
  });
  targets.push_back({"pixel_values", px, dpx});
  gradcheck(targets, objective, 6, 2e-3, 1e-2);
  CHECK(flips == 0);
  for (Parameter* p : params)
    if (p->name == "encoder.layers.1.mlp.gate.weight") CHECK(test::dot(p->grad, p->grad) > 0.0);

  // the aux weights really reach the losses: without them the router of the last layer gets nothing
  zero_grad(params);
  s2.forward(tower, px);
  s2.backward(tower, R);
  for (Parameter* p : params)
    if (p->name == "encoder.layers.1.mlp.gate.weight") CHECK(test::dot(p->grad, p->grad) == 0.0);
}

TEST_CASE("s2: CuMo with s2 — connector input 2·Hv, loss terms, load over 1 + 9 crops, finite differences") {
  Rng rng(18);
  const models::CuMoConfig cfg = tiny_cumo_s2();
  models::CuMo<> m(cfg);
  randomize(m.parameters(), rng, 0.4f);
  const std::vector<std::int64_t> ids{1, 12, 12, 12, 12, 4, 5, 6, 7, 2, 12, 12, 12, 12, 8, 3, 9, 1};
  const std::vector<std::int64_t> labels{-100, -100, -100, -100, -100, 4, 5, 6, 7,
                                         -100, -100, -100, -100, -100, 8, 3, 9, 1};
  const std::int64_t B = 2, T = 9;
  const Tensor px = random_tensor({2, 3, 8, 8}, rng);
  auto shape_of = [&](const std::string& suffix) {
    for (Parameter* p : m.connector_parameters())
      if (p->name.ends_with(suffix)) return p->value.shape();
    return Shape{};
  };
  CHECK(shape_of(".linear_1.weight") == Shape{12, 16});  // (Ht, 2·Hv)

  // dense: the logits' shape, and backward reaches the pixels
  const auto dense = m.forward(ids, B, T, px, &labels);
  CHECK(dense.logits.shape() == Shape{B * T, 13});
  CHECK(dense.total == doctest::Approx(dense.ce));
  m.backward();
  CHECK(m.llava().last_dpixels().shape() == px.shape());

  // sparse: upcycling keeps the function (both passes' blocks are exact copies)
  const Tensor dense_logits = dense.logits.clone();
  Rng up(5);
  m.upcycle(up);
  CHECK(shape_of(".experts.fc1.weight") == Shape{4, 12, 16});  // (E, Ht, 2·Hv)
  const ParameterList params = m.parameters();
  CHECK(rel_error(m.forward(ids, B, T, px, &labels).logits, dense_logits) <= 1e-5);
  for (Parameter* p : params)
    if (p->name.ends_with(".gate.weight")) rng.fill_normal(p->value, 0.f, 0.8f);
  zero_grad(params);
  const auto base = m.forward(ids, B, T, px, &labels);
  REQUIRE(base.vision_balance_per_layer.size() == 2);
  REQUIRE(base.vision_load.size() == 2);
  std::int64_t routed = 0;
  for (auto t : base.vision_load[0].tokens) routed += t;
  CHECK(routed == 2 * (B + 9 * B) * 5);  // k × (images + tiles) × (patches + CLS)
  CHECK(base.total == doctest::Approx(base.ce + 0.1 * (base.vision_balance + base.projector_balance) +
                                      0.01 * (base.vision_z + base.projector_z)));
  m.backward();

  auto routing = [&] {
    std::vector<std::int32_t> r;
    append_routing(m.llava().vision_tower, r);
    const Tensor& idx = m.llava().projector.mlp.sparse().router_output().topk_idx;
    r.insert(r.end(), idx.data<std::int32_t>(), idx.data<std::int32_t>() + idx.numel());
    return r;
  };
  const auto want_routing = routing();
  int flips = 0;
  auto objective = [&] {
    const double t = m.forward(ids, B, T, px, &labels).total;
    flips += routing() != want_routing;
    return t;
  };
  std::vector<test::GradTarget> targets;
  for (Parameter* p : params) {
    const std::string& n = p->name;
    const bool connector = n.starts_with("model.multi_modal_projector.");
    const bool vision_probe = n.ends_with(".gate.weight") || n.ends_with("patch_embedding.weight") ||
                              n.ends_with("layers.0.self_attn.q_proj.weight");
    if (connector || vision_probe) targets.push_back({n, p->value, p->grad});
  }
  CHECK(targets.size() == 10);  // the connector's 5 (router + fused experts), 4 vision probes and the LM's q_proj
  // h = 5e-3, the suite's step (nn_test_util.hpp's budget): with 2e-3 the fp32 rounding of the objective was ~1 % of
  // CLIP layer 0's small router gradient (its error fell as 1/h: 1.6 % at 1e-3, 1.1 % at 2e-3, 0.2 % at 4e-3 and
  // 5e-3), and no routing flips at 5e-3 (checked below).
  gradcheck(targets, objective, 6, 5e-3, 1e-2);
  CHECK(flips == 0);

  // generation runs the same S² features (up to the feature layer)
  Tensor one = Tensor::empty({1, 3, 8, 8});
  std::copy_n(px.data<float>(), one.numel(), one.data<float>());
  const auto g2 = m.generate({1, 12, 4, 5}, one, 2, -1);
  const std::vector<std::int64_t> seq{1, 12, 12, 12, 12, 4, 5};
  const auto full = m.forward(seq, 1, 7, one, nullptr, nullptr, false);
  const float* z = full.logits.data<float>() + 6 * 13;
  CHECK(g2.at(0) == std::int64_t(std::max_element(z, z + 13) - z));
}

TEST_CASE("s2: the CuMo config JSON carries \"s2\" (top level), and cumo_train reads model.vision.s2") {
  const models::CuMoConfig c = tiny_cumo_s2();
  const auto j = c.to_json();
  CHECK(j.at("s2") == true);
  const auto back = models::CuMoConfig::from_json(j);
  CHECK(back.llava.vision.s2);
  CHECK(back.to_json() == j);
  auto plain = j.at("llava");
  CHECK_FALSE(models::CuMoConfig::from_json(plain).llava.vision.s2);
  plain["s2"] = true;
  CHECK(models::CuMoConfig::from_json(plain).llava.vision.s2);

  io::ByteTokenizer tok;
  const auto on = app::RunConfig::from_json(nlohmann::json::parse(R"({"model": {"vision": {"s2": true}}})"));
  CHECK(on.model.llava.vision.s2);
  const auto mc = on.model_config(tok);
  CHECK(mc.llava.vision.s2);
  CHECK(mc.llava.vision.feature_width() == 2 * mc.llava.vision.hidden);
  CHECK(on.image_tokens() == 16);  // S² keeps one feature per 1× patch
  const auto off = app::RunConfig::from_json(nlohmann::json::parse(R"({"model": {"vision": {"hidden": 64}}})"));
  CHECK_FALSE(off.model_config(tok).llava.vision.s2);
  CHECK_THROWS_AS(app::RunConfig::from_json(nlohmann::json::parse(R"({"model": {"vision": {"s2": "yes"}}})")),
                  Error);
  CHECK_THROWS_AS(app::RunConfig::from_json(nlohmann::json::parse(R"({"model": {"s2": true}})")), Error);
}
