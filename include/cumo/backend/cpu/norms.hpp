#pragma once
// CPU LayerNorm and RMSNorm over the last dimension of (N, H) fp32 rows, forward and backward, the references of
// backend/cuda/layers.cuh. Row statistics accumulate in double (cpu::sum8) so long rows do not lose the mean in fp32
// cancellation; each row is one work item, and the parameter gradients are summed over rows in row order (threads
// take blocks of columns), so the results do not depend on the thread count.
//   LayerNorm  y = (x − μ) / √(σ² + ε) · γ + β   (biased variance, as PyTorch)
//              dx = (1/σ)(ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)), ĝ = dy γ;  dγ += Σ dy x̂;  dβ += Σ dy
//   RMSNorm    y = γ · x / √(mean(x²) + ε)            (Mistral / Qwen2 / Mixtral, fp32 as HF)
//              dx = r (dy γ) − x r³ mean(dy γ x);  dγ += Σ dy x r
// What the forward saves (`stats`) is this backend's choice; the layer keeps it and hands it back:
//   LayerNorm (N, 2) f64 {μ, 1/σ} — the backward recomputes x̂ = (x − μ)/σ bit for bit as the forward rounded it;
//   RMSNorm   (N,) f32 1/rms.
#include <cmath>
#include <cstdint>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/backend/cpu/reduce.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

inline void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y,
                              Tensor& stats) {
  const std::int64_t N = x.size(0), H = x.size(1);
  stats = Tensor::empty({N, 2}, DType::f64);
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  const float* pb = b.data<float>();
  float* py = y.data<float>();
  double* st = stats.data<double>();
  parallel_for(N, [&](std::int64_t r) {
    const float* xr = px + r * H;
    const double mean = sum8(H, [&](std::int64_t j) { return double(xr[j]); }) / double(H);
    const double var = sum8(H, [&](std::int64_t j) { return (xr[j] - mean) * (xr[j] - mean); });
    const double rstd = 1.0 / std::sqrt(var / double(H) + eps);
    st[2 * r] = mean;
    st[2 * r + 1] = rstd;
    for (std::int64_t j = 0; j < H; ++j) {
      const float xh = float((px[r * H + j] - mean) * rstd);
      py[r * H + j] = xh * pw[j] + pb[j];
    }
  }, 8 * H);
}

inline void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, Tensor& dx,
                               Tensor& dw, Tensor& db) {
  const std::int64_t N = x.size(0), H = x.size(1);
  const float* pg = dy.data<float>();
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  const double* st = stats.data<double>();
  float* pdw = dw.data<float>();
  float* pdb = db.data<float>();
  auto xhat = [&](std::int64_t r, std::int64_t j) { return float((px[r * H + j] - st[2 * r]) * st[2 * r + 1]); };
  add_column_sums(H, N, pdw, [&](std::int64_t r, std::int64_t j) { return pg[r * H + j] * xhat(r, j); });
  add_column_sums(H, N, pdb, [&](std::int64_t r, std::int64_t j) { return pg[r * H + j]; });
  float* pdx = dx.data<float>();
  parallel_for(N, [&](std::int64_t r) {
    const float* gr = pg + r * H;
    const double m1 = sum8(H, [&](std::int64_t j) { return double(gr[j]) * pw[j]; }) / double(H);
    const double m2 = sum8(H, [&](std::int64_t j) { return double(gr[j]) * pw[j] * xhat(r, j); }) / double(H);
    const double rstd = double(float(st[2 * r + 1]));  // 1/σ at fp32 precision, as the fused kernel keeps it
    for (std::int64_t j = 0; j < H; ++j)
      pdx[r * H + j] = float(rstd * (double(pg[r * H + j]) * pw[j] - m1 - xhat(r, j) * m2));
  }, 8 * H);
}

inline void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& stats) {
  const std::int64_t N = x.size(0), H = x.size(1);
  stats = Tensor::empty({N});
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  float* py = y.data<float>();
  float* rr = stats.data<float>();
  parallel_for(N, [&](std::int64_t r) {
    const float* xr = px + r * H;
    const double ss = sum8(H, [&](std::int64_t j) { return double(xr[j]) * xr[j]; });
    rr[r] = float(1.0 / std::sqrt(ss / double(H) + eps));
    for (std::int64_t j = 0; j < H; ++j) py[r * H + j] = pw[j] * (px[r * H + j] * rr[r]);
  }, 8 * H);
}

inline void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, Tensor& dx,
                             Tensor& dw) {
  const std::int64_t N = x.size(0), H = x.size(1);
  const float* pg = dy.data<float>();
  const float* px = x.data<float>();
  const float* pw = w.data<float>();
  const float* rr = stats.data<float>();
  float* pdw = dw.data<float>();
  add_column_sums(H, N, pdw, [&](std::int64_t r, std::int64_t j) { return pg[r * H + j] * px[r * H + j] * rr[r]; });
  float* pdx = dx.data<float>();
  parallel_for(N, [&](std::int64_t r) {
    const float* gr = pg + r * H;
    const float* xr = px + r * H;
    const double m = sum8(H, [&](std::int64_t j) { return double(gr[j]) * pw[j] * xr[j]; }) / double(H);
    const double rs = rr[r];
    for (std::int64_t j = 0; j < H; ++j)
      pdx[r * H + j] = float(rs * double(pg[r * H + j]) * pw[j] - double(px[r * H + j]) * rs * rs * rs * m);
  }, 8 * H);
}

}  // namespace cumo::cpu
