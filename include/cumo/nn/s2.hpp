#pragma once
// nn::S2Vision — S² multi-scale vision features (Shi et al. 2024, "When Do We Not Need Larger Vision Models?") as
// CuMo uses them: scales 1 and 3 with split size S, i.e. s2wrapper's
// `multiscale_forward(model, x, scales=[1, 3], max_split_size=S)` and CuMo's CLIPVisionTower.forward (`--scales 1,3`):
//
//   x (B, C, S, S) ───────────────────────────────────── tower ──→ f1 (B·G², Hv)            hidden state −2, no CLS
//   x ── bicubic (B, C, 3S, 3S) ── 3×3 tiles (9B, C, S, S) ── tower ──→ (9B·G², Hv)
//        ── merge the tiles' patch grids (B, 3G, 3G, Hv) ── area ↓ (exact 3×3 mean) ──→ f3 (B·G², Hv)
//   features = [f1 | f3] (B·G², 2·Hv): channel concatenation, the 1× features first (scales sorted ascending).
//
// Faithful details, each from the released code:
// - Bicubic: F.interpolate(mode='bicubic', align_corners=False): source coordinate (dst + ½)·in/out − ½, not
//   clamped; taps floor(src) − 1 … floor(src) + 2 clamped to the border; Keys' cubic convolution with A = −0.75.
//   Weights are computed here in double (PyTorch computes them in fp32: differences of order 1e-7 relative).
// - The 1× pass sees x itself. CuMo's code does not interpolate it; s2wrapper resizes to the same size, which for
//   align_corners=False bicubic is exactly the identity (t = 0 everywhere: weights 0, 1, 0, 0).
// - Tiles: split_chessboard's rearrange 'b c (nh h) (nw w) -> (nh nw b) c h w' — crop (ty·3 + tx)·B + b holds rows
//   ty·S … and columns tx·S … of image b; merge_chessboard puts its G×G patch grid back at (ty·G, tx·G).
// - Area: F.interpolate(mode='area') from 3G to G is adaptive_avg_pool2d with exact 3×3 windows.
//
// Both passes run the same ClipVision. The 1× pass runs in `tower` itself, so after forward() the tower holds exactly
// the state of a plain forward (its features, routing and saved activations); the 3× pass runs in a copy made at each
// forward. A copy shares the parameters' value and grad storage (Tensor copies are views), so the 3× pass's
// gradients accumulate into the tower's own grads and an optimizer step is seen by both.
//
// Aux losses of a sparse (CuMo) tower. The MoE tower sees 1 + 9 crops per image in two calls, as in CuMo's code:
// the 1× call treats each image as one segment, the 3× call each crop (each crop is a batch element there, and
// CuMo reduces f_e and P_e per batch element). Each call's per-layer loss is its segments' mean, and the two calls
// are averaged: L_layer = ½ (L_1×,layer + L_3×,layer) (CuMo: `torch.stack(balance_losses).mean()` over the scales).
// Per image that is weight ½ on the full view and 1/18 on each crop. We follow the released code rather than a
// plain mean over all 10 crops because it keeps the full view's routing — the one that also feeds the 1× features —
// at the same weight as without S², and keeps L's scale independent of the number of crops. Expert loads are the
// token counts of both calls added.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "cumo/backend/cpu/blocks.hpp"
#include "cumo/backend/cpu/s2.hpp"
#include "cumo/nn/vit.hpp"

namespace cumo::nn {

namespace s2 {

// ---- bicubic resize (F.interpolate mode='bicubic', align_corners=False) -------------------------------------------

// 1-D taps for resizing `in` samples to `out`: out[o] = Σ_k w[4o + k] · in[idx[4o + k]].
struct CubicTaps {
  std::vector<std::int64_t> idx;  // (out, 4) clamped source indices
  std::vector<double> w;          // (out, 4)
};

inline CubicTaps cubic_taps(std::int64_t in, std::int64_t out) {
  constexpr double A = -0.75;  // PyTorch's (and OpenCV's) cubic convolution coefficient
  auto near = [](double x) { return ((A + 2) * x - (A + 3)) * x * x + 1; };          // |x| ≤ 1
  auto far = [](double x) { return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A; };     // 1 < |x| < 2
  CubicTaps t;
  t.idx.resize(std::size_t(4 * out));
  t.w.resize(std::size_t(4 * out));
  const double scale = double(in) / double(out);
  for (std::int64_t o = 0; o < out; ++o) {
    const double src = scale * (double(o) + 0.5) - 0.5;  // not clamped at 0 for cubic (PyTorch)
    const double f = std::floor(src), d = src - f;
    const double w[4] = {far(d + 1), near(d), near(1 - d), far(2 - d)};
    for (int k = 0; k < 4; ++k) {
      t.idx[std::size_t(4 * o + k)] = std::clamp<std::int64_t>(std::int64_t(f) - 1 + k, 0, in - 1);
      t.w[std::size_t(4 * o + k)] = w[k];
    }
  }
  return t;
}

// x (B, C, S, S) → (B, C, out, out)
inline Tensor bicubic_resize(const Tensor& x, std::int64_t out) {
  constexpr const char* where = "s2::bicubic_resize";
  check_dtype(where, "x", x, DType::f32);
  CUMO_CHECK(x.dim() == 4 && x.size(2) == x.size(3), where, ": x must be (B, C, S, S), got ", x.shape());
  CUMO_CHECK(out >= 1, where, ": output size ", out, " must be positive");
  const Tensor xc = x.contiguous();
  const std::int64_t planes = x.size(0) * x.size(1), S = x.size(2);
  const CubicTaps t = cubic_taps(S, out);
  Tensor y = Tensor::empty({x.size(0), x.size(1), out, out});
  std::vector<double> rows(std::size_t(S * out));  // one plane resized along x: (S, out)
  for (std::int64_t p = 0; p < planes; ++p) {
    const float* src = xc.data<float>() + p * S * S;
    float* dst = y.data<float>() + p * out * out;
    for (std::int64_t i = 0; i < S; ++i)
      for (std::int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int k = 0; k < 4; ++k) s += t.w[std::size_t(4 * o + k)] * src[i * S + t.idx[std::size_t(4 * o + k)]];
        rows[std::size_t(i * out + o)] = s;
      }
    for (std::int64_t oy = 0; oy < out; ++oy)
      for (std::int64_t ox = 0; ox < out; ++ox) {
        double s = 0;
        for (int k = 0; k < 4; ++k) {
          const std::size_t tap = std::size_t(4 * oy + k);
          s += t.w[tap] * rows[std::size_t(t.idx[tap] * out + ox)];
        }
        dst[oy * out + ox] = float(s);
      }
  }
  return y;
}

// The adjoint: dy (B, C, out, out) → dx (B, C, in, in).
inline Tensor bicubic_resize_backward(const Tensor& dy, std::int64_t in) {
  constexpr const char* where = "s2::bicubic_resize_backward";
  check_dtype(where, "dy", dy, DType::f32);
  CUMO_CHECK(dy.dim() == 4 && dy.size(2) == dy.size(3), where, ": dy must be (B, C, out, out), got ", dy.shape());
  const Tensor g = dy.contiguous();
  const std::int64_t planes = dy.size(0) * dy.size(1), out = dy.size(2);
  const CubicTaps t = cubic_taps(in, out);
  Tensor dx = Tensor::empty({dy.size(0), dy.size(1), in, in});
  std::vector<double> drows(std::size_t(in * out)), dplane(std::size_t(in * in));
  for (std::int64_t p = 0; p < planes; ++p) {
    const float* gp = g.data<float>() + p * out * out;
    std::fill(drows.begin(), drows.end(), 0.0);
    for (std::int64_t oy = 0; oy < out; ++oy)
      for (int k = 0; k < 4; ++k) {
        const double w = t.w[std::size_t(4 * oy + k)];
        double* r = drows.data() + t.idx[std::size_t(4 * oy + k)] * out;
        for (std::int64_t ox = 0; ox < out; ++ox) r[ox] += w * gp[oy * out + ox];
      }
    std::fill(dplane.begin(), dplane.end(), 0.0);
    for (std::int64_t i = 0; i < in; ++i)
      for (std::int64_t o = 0; o < out; ++o)
        for (int k = 0; k < 4; ++k)
          dplane[std::size_t(i * in + t.idx[std::size_t(4 * o + k)])] +=
              t.w[std::size_t(4 * o + k)] * drows[std::size_t(i * out + o)];
    float* dp = dx.data<float>() + p * in * in;
    for (std::int64_t i = 0; i < in * in; ++i) dp[i] = float(dplane[std::size_t(i)]);
  }
  return dx;
}

// ---- chessboard split / merge of images ---------------------------------------------------------------------------

// x (B, C, n·S, n·S) → (n²·B, C, S, S), crop (ty·n + tx)·B + b = x[b, :, ty·S…, tx·S…] (s2wrapper's split_chessboard)
inline Tensor split_tiles(const Tensor& x, std::int64_t n) {
  constexpr const char* where = "s2::split_tiles";
  CUMO_CHECK(x.dim() == 4 && x.size(2) == x.size(3) && n >= 1 && x.size(2) % n == 0, where,
             ": x must be (B, C, n·S, n·S) with n = ", n, ", got ", x.shape());
  const Tensor xc = x.contiguous();
  const std::int64_t B = x.size(0), C = x.size(1), W = x.size(2), S = W / n;
  Tensor y = Tensor::empty({n * n * B, C, S, S});
  for (std::int64_t ty = 0; ty < n; ++ty)
    for (std::int64_t tx = 0; tx < n; ++tx)
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t c = 0; c < C; ++c)
          for (std::int64_t i = 0; i < S; ++i)
            std::copy_n(xc.data<float>() + ((b * C + c) * W + ty * S + i) * W + tx * S, S,
                        y.data<float>() + ((((ty * n + tx) * B + b) * C + c) * S + i) * S);
  return y;
}

// The inverse (and adjoint) of split_tiles: (n²·B, C, S, S) → (B, C, n·S, n·S).
inline Tensor merge_tiles(const Tensor& t, std::int64_t n) {
  constexpr const char* where = "s2::merge_tiles";
  CUMO_CHECK(t.dim() == 4 && t.size(2) == t.size(3) && n >= 1 && t.size(0) % (n * n) == 0, where,
             ": tiles must be (n²·B, C, S, S) with n = ", n, ", got ", t.shape());
  const Tensor tc = t.contiguous();
  const std::int64_t B = t.size(0) / (n * n), C = t.size(1), S = t.size(2), W = n * S;
  Tensor x = Tensor::empty({B, C, W, W});
  for (std::int64_t ty = 0; ty < n; ++ty)
    for (std::int64_t tx = 0; tx < n; ++tx)
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t c = 0; c < C; ++c)
          for (std::int64_t i = 0; i < S; ++i)
            std::copy_n(tc.data<float>() + ((((ty * n + tx) * B + b) * C + c) * S + i) * S, S,
                        x.data<float>() + ((b * C + c) * W + ty * S + i) * W + tx * S);
  return x;
}

// The feature-grid functions (merge_tile_features, split_tile_features, area_pool, area_pool_backward) are the
// CPU backend's (backend/cpu/s2.hpp): S2Vision reaches them through Backend::s2_pool_tiles on any backend.
using cpu::area_pool;
using cpu::area_pool_backward;
using cpu::merge_tile_features;
using cpu::split_tile_features;

}  // namespace s2

template <backend::Backend Backend = backend::Cpu>
class S2Vision {
 public:
  // scale: the second scale (CuMo: 3); the split size is the tower's image size.
  explicit S2Vision(std::int64_t scale = 3) : n_(scale) {
    CUMO_CHECK(scale >= 2, "S2Vision: the second scale must be at least 2, got ", scale);
  }
  std::int64_t scale() const { return n_; }
  // Feature width for a tower of width `hidden`: the two scales concatenated.
  static std::int64_t width(std::int64_t hidden) { return 2 * hidden; }

  // pixels (B, C, S, S) on the host → features (B·G², 2·Hv) = [1× | area-pooled n× tiles] on the tower's backend.
  // all_layers, keep_activations and top_read as ClipVision::forward (all_layers true: every layer runs in both
  // passes and every layer's aux losses count).
  Tensor forward(ClipVision<Backend>& tower, const Tensor& pixels, bool all_layers = true, bool keep_activations = true,
                 bool top_read = true) {
    constexpr const char* where = "S2Vision::forward";
    const VisionConfig& c = tower.config();
    const Backend& be = tower.backend();
    check_dtype(where, "pixel_values", pixels, DType::f32);
    check_device(where, "pixel_values", pixels, Device::cpu);
    check_shape(where, "pixel_values", pixels, {-1, c.channels, c.image_size, c.image_size});
    const std::int64_t B = pixels.size(0), S = c.image_size, G = c.grid(), H = c.hidden, N = c.patches();
    B_ = B;
    const Tensor f1 = tower.forward(pixels, all_layers, keep_activations, top_read).features;  // (B·N, H)
    const Tensor up = s2::bicubic_resize(pixels, n_ * S);           // (B, C, nS, nS) on the host
    tiles_.reset();
    tiles_.emplace(tower);                                          // shares the parameters' storage
    const Tensor ft =
        tiles_->forward(s2::split_tiles(up, n_), all_layers, keep_activations, top_read).features;  // (n²B·N, H)
    Tensor f3 = be.empty({B * N, H});
    be.s2_pool_tiles(ft, B, G, n_, f3);  // (B·N, H)
    Tensor out = be.empty({B * N, 2 * H});
    be.copy_blocks(f1, 0, H, out, 0, 2 * H, H, B * N);  // left half
    be.copy_blocks(f3, 0, H, out, H, 2 * H, H, B * N);  // right half
    return out;
  }

  // dfeatures (B·G², 2·Hv) → the tower's parameter gradients accumulate from both passes; input_grad() then gives
  // d pixel_values. aux: d objective / d (each layer's combined loss ½(L_1× + L_n×)) — each pass gets half of it.
  void backward(ClipVision<Backend>& tower, const Tensor& dfeatures, AuxLossWeights aux = {}) {
    constexpr const char* where = "S2Vision::backward";
    CUMO_CHECK(tiles_.has_value(), where, ": no forward to differentiate");
    const VisionConfig& c = tower.config();
    const Backend& be = tower.backend();
    const std::int64_t B = B_, G = c.grid(), H = c.hidden, N = c.patches();
    CUMO_CHECK(dfeatures.numel() == B * N * 2 * H, where, ": dfeatures has shape ", dfeatures.shape(),
               " but expected (", B * N, ", ", 2 * H, ")");
    check_shared(tower);
    const Tensor df = dfeatures.contiguous();
    Tensor d1 = be.empty({B * N, H}), d3 = be.empty({B * N, H});
    be.copy_blocks(df, 0, 2 * H, d1, 0, H, H, B * N);
    be.copy_blocks(df, H, 2 * H, d3, 0, H, H, B * N);
    const AuxLossWeights half{0.5f * aux.balance, 0.5f * aux.z};
    tower.backward(d1, half);
    Tensor dtiles = be.empty({n_ * n_ * B * N, H});
    be.s2_pool_tiles_backward(d3, B, G, n_, dtiles);  // (n²B·N, H)
    tiles_->backward(dtiles, half);
  }

  // d pixel_values (B, C, S, S) on the host for the last backward: the 1× pass's plus the n× pass's through the
  // tiling and the bicubic resize (both adjoints on the host, where the pixels live).
  Tensor input_grad(const ClipVision<Backend>& tower) const {
    CUMO_CHECK(tiles_.has_value(), "S2Vision::input_grad: no forward");
    Tensor dpx = tower.input_grad();                                   // (B, C, S, S)
    const Tensor dup = s2::merge_tiles(tiles_->input_grad(), n_);      // (B, C, nS, nS)
    cpu::add(dpx, s2::bicubic_resize_backward(dup, tower.config().image_size), dpx);
    return dpx;
  }

  // Expert parallelism (the tower's experts sharded over a group), on a rank without images: the tower's sharded
  // blocks run on zero tokens in forward()'s order — the 1× pass in `tower`, the n× pass in a fresh copy — and
  // backward the way backward() runs them (1×, then n×, each with half the aux weights), so that the group's
  // exchanges pair up with those of the ranks that have images. Each pass keeps its own exchange state for its
  // backward, as on those ranks.
  void serve_experts_forward(ClipVision<Backend>& tower, bool all_layers = true, bool top_read = true) {
    tower.serve_experts_forward(all_layers, top_read);
    tiles_.reset();
    tiles_.emplace(tower);
    tiles_->serve_experts_forward(all_layers, top_read);
  }
  void serve_experts_backward(ClipVision<Backend>& tower, AuxLossWeights aux = {}) {
    CUMO_CHECK(tiles_.has_value(), "S2Vision::serve_experts_backward: no forward to serve");
    const AuxLossWeights half{0.5f * aux.balance, 0.5f * aux.z};
    tower.serve_experts_backward(half);
    tiles_->serve_experts_backward(half);
  }

  // The copy that ran the n× pass of the last forward (null before one), e.g. to read its routing.
  const ClipVision<Backend>* tile_tower() const { return tiles_ ? &*tiles_ : nullptr; }

  // Per sparse layer of the last forward: ½(1× + n×) of the balance (top-1 and all-k) and z losses.
  std::vector<AuxLosses> aux_losses(const ClipVision<Backend>& tower) const {
    std::vector<AuxLosses> a = tower.aux_losses();
    if (!tiles_) return a;
    const std::vector<AuxLosses> t = tiles_->aux_losses();
    CUMO_CHECK(t.size() == a.size(), "S2Vision::aux_losses: the tower changed since the last forward");
    const Backend& be = tower.backend();
    auto mean = [&](const Tensor& x, const Tensor& y) {
      Tensor m = be.empty({1});
      be.add(x, y, m);
      be.scale(m, 0.5f);
      return m;
    };
    std::vector<AuxLosses> out(a.size());
    for (std::size_t l = 0; l < a.size(); ++l) {
      out[l].balance_top1 = mean(a[l].balance_top1, t[l].balance_top1);
      out[l].balance_allk = mean(a[l].balance_allk, t[l].balance_allk);
      out[l].z = mean(a[l].z, t[l].z);
    }
    return out;
  }
  // Per sparse layer of the last forward: tokens per expert over both passes.
  std::vector<ExpertLoad> loads(const ClipVision<Backend>& tower) const {
    std::vector<ExpertLoad> a = tower.loads();
    if (!tiles_) return a;
    const std::vector<ExpertLoad> t = tiles_->loads();
    CUMO_CHECK(t.size() == a.size(), "S2Vision::loads: the tower changed since the last forward");
    for (std::size_t l = 0; l < a.size(); ++l) {
      for (std::size_t e = 0; e < a[l].tokens.size() && e < t[l].tokens.size(); ++e) a[l].tokens[e] += t[l].tokens[e];
      a[l].dropped += t[l].dropped;
    }
    return a;
  }

 private:
  // The copy must still alias the tower's parameters (a load or upcycle between forward and backward replaces them).
  void check_shared(ClipVision<Backend>& tower) {
    const ParameterList a = tower.parameters(), b = tiles_->parameters();
    bool same = a.size() == b.size();
    for (std::size_t i = 0; same && i < a.size(); ++i)
      same = a[i]->value.raw() == b[i]->value.raw() && a[i]->grad.raw() == b[i]->grad.raw();
    CUMO_CHECK(same, "S2Vision::backward: the tower's parameters were replaced since forward (reload or upcycle "
                     "before forward, not between forward and backward)");
  }

  std::int64_t n_ = 3, B_ = 0;
  std::optional<ClipVision<Backend>> tiles_;  // the n× pass: a parameter-sharing copy of the tower, with its state
};

}  // namespace cumo::nn
