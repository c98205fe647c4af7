#pragma once
// CPU pieces of S² multi-scale features (nn/s2.hpp describes the method): the n×n tiles' patch grids merged back
// into each image's grid and area-pooled to the 1× grid — s2wrapper's merge_chessboard then
// F.interpolate(mode='area') — and the adjoint of both. s2_pool_tiles / s2_pool_tiles_backward are the backend
// operations (backend/cuda/model.cuh has their twins); the four functions they compose are exposed for the tests.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

// ---- feature grids ------------------------------------------------------------------------------------------------

// The tiles' patch features, (n²·B·G², H) with rows (crop, gy, gx), merged into each image's (n·G)² grid:
// (B·(nG)², H) with rows (b, Y, X) — merge_chessboard on the features.
inline Tensor merge_tile_features(const Tensor& f, std::int64_t B, std::int64_t G, std::int64_t n) {
  constexpr const char* where = "cpu::merge_tile_features";
  CUMO_CHECK(f.dim() == 2 && f.size(0) == n * n * B * G * G, where, ": features have shape ", f.shape(),
             " but ", n * n, " tiles × ", B, " images × ", G * G, " patches were expected");
  const Tensor fc = f.contiguous();
  const std::int64_t H = f.size(1), M = n * G;
  Tensor y = Tensor::empty({B * M * M, H});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t Y = 0; Y < M; ++Y)
      for (std::int64_t X = 0; X < M; ++X) {
        const std::int64_t crop = ((Y / G) * n + X / G) * B + b;
        std::copy_n(fc.data<float>() + (crop * G * G + (Y % G) * G + X % G) * H, H,
                    y.data<float>() + ((b * M + Y) * M + X) * H);
      }
  return y;
}

// The inverse (and adjoint) of merge_tile_features: (B·(nG)², H) → (n²·B·G², H).
inline Tensor split_tile_features(const Tensor& g, std::int64_t B, std::int64_t G, std::int64_t n) {
  constexpr const char* where = "cpu::split_tile_features";
  const std::int64_t M = n * G;
  CUMO_CHECK(g.dim() == 2 && g.size(0) == B * M * M, where, ": gradient has shape ", g.shape(), " but ", B,
             " images × ", M * M, " merged patches were expected");
  const Tensor gc = g.contiguous();
  const std::int64_t H = g.size(1);
  Tensor y = Tensor::empty({n * n * B * G * G, H});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t Y = 0; Y < M; ++Y)
      for (std::int64_t X = 0; X < M; ++X) {
        const std::int64_t crop = ((Y / G) * n + X / G) * B + b;
        std::copy_n(gc.data<float>() + ((b * M + Y) * M + X) * H, H,
                    y.data<float>() + (crop * G * G + (Y % G) * G + X % G) * H);
      }
  return y;
}

// F.interpolate(mode='area') from an M×M grid to (M/n)×(M/n): each output is the mean of its n×n window.
// x (B·M², H) rows (b, Y, X) → (B·(M/n)², H) rows (b, gy, gx).
inline Tensor area_pool(const Tensor& x, std::int64_t B, std::int64_t M, std::int64_t n) {
  constexpr const char* where = "cpu::area_pool";
  CUMO_CHECK(n >= 1 && M % n == 0, where, ": grid side ", M, " is not a multiple of the factor ", n);
  CUMO_CHECK(x.dim() == 2 && x.size(0) == B * M * M, where, ": x has shape ", x.shape(), " but ", B, " images × ",
             M * M, " patches were expected");
  const Tensor xc = x.contiguous();
  const std::int64_t H = x.size(1), G = M / n;
  const float inv = 1.f / float(n * n);
  Tensor y = Tensor::empty({B * G * G, H});
  std::vector<float> acc(static_cast<std::size_t>(H));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t gy = 0; gy < G; ++gy)
      for (std::int64_t gx = 0; gx < G; ++gx) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (std::int64_t i = 0; i < n; ++i)
          for (std::int64_t j = 0; j < n; ++j) {
            const float* r = xc.data<float>() + ((b * M + gy * n + i) * M + gx * n + j) * H;
            for (std::int64_t h = 0; h < H; ++h) acc[std::size_t(h)] += r[h];
          }
        float* o = y.data<float>() + ((b * G + gy) * G + gx) * H;
        for (std::int64_t h = 0; h < H; ++h) o[h] = acc[std::size_t(h)] * inv;
      }
  return y;
}

// dy (B·G², H) → dx (B·(nG)², H): each window element gets dy / n².
inline Tensor area_pool_backward(const Tensor& dy, std::int64_t B, std::int64_t G, std::int64_t n) {
  constexpr const char* where = "cpu::area_pool_backward";
  CUMO_CHECK(dy.dim() == 2 && dy.size(0) == B * G * G, where, ": dy has shape ", dy.shape(), " but ", B,
             " images × ", G * G, " patches were expected");
  const Tensor gc = dy.contiguous();
  const std::int64_t H = dy.size(1), M = n * G;
  const float inv = 1.f / float(n * n);
  Tensor dx = Tensor::empty({B * M * M, H});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t Y = 0; Y < M; ++Y)
      for (std::int64_t X = 0; X < M; ++X) {
        const float* g = gc.data<float>() + ((b * G + Y / n) * G + X / n) * H;
        float* o = dx.data<float>() + ((b * M + Y) * M + X) * H;
        for (std::int64_t h = 0; h < H; ++h) o[h] = g[h] * inv;
      }
  return dx;
}

// tiles (n²·B·G², H), rows (crop, gy, gx) → pooled (B·G², H): each output the mean of its n×n window of the
// merged (nG)² grid.
inline void s2_pool_tiles(const Tensor& tiles, std::int64_t B, std::int64_t G, std::int64_t n, Tensor& out) {
  out.copy_from(area_pool(merge_tile_features(tiles, B, G, n), B, n * G, n));
}
// dpooled (B·G², H) → dtiles (n²·B·G², H) (overwritten)
inline void s2_pool_tiles_backward(const Tensor& dpooled, std::int64_t B, std::int64_t G, std::int64_t n,
                                   Tensor& dtiles) {
  dtiles.copy_from(split_tile_features(area_pool_backward(dpooled, B, G, n), B, G, n));
}

}  // namespace cumo::cpu
