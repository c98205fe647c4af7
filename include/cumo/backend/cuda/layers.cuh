#pragma once
// CUDA kernels of the dense model layers and the loss, each the twin of a backend::Cpu operation that is its
// reference in tests/cuda/test_backend_ops.cu:
//   layernorm_forward / layernorm_backward   cpu/norms.hpp       statistics in double; saves mean and 1/σ
//   rmsnorm_forward / rmsnorm_backward       cpu/norms.hpp       Σx² in double; saves 1/rms
//   rope                                     cpu/rope.hpp        HF rotate_half, fp32 angles; inverse = backward
//   gated_forward / gated_backward           cpu/elementwise.hpp Act(gate) ⊙ up on separate gate / up tensors
//   cross_entropy / read_result              cpu/loss.hpp        ignore_index, mean or Σ / normalizer
// The plain activations (GELU, QuickGELU, SiLU, …) are gpu::activation_forward / activation_backward in
// elementwise.cuh; the [gate | up] GLU of the experts is gpu::glu_forward / glu_backward there.
//
// Storage: activations f32, bf16 or f16 (the same dtype in and out), arithmetic in fp32 with every row reduction
// in double, parameters and their gradients f32 (master weights), saved statistics f32.
// Where the CPU code rounds a float expression in a given order we use __fmul_rn / __fadd_rn, which nvcc never
// contracts into an FMA (the CPU build has no -march, so g++ does not contract either): the fp32 results are then
// bitwise the CPU's except where a double reduction's order differs.
// Determinism: no float atomics. Row statistics are fixed-order block trees; a parameter gradient (a sum over rows)
// is written as per-chunk partials (kRowChunk rows each, in row order) that a second kernel adds in chunk order.
#include <cstdint>
#include <vector>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/backend/ops.hpp"

namespace cumo::gpu {

namespace kernels {

constexpr int kRowThreads = 256;  // one block per row
constexpr int kRowChunk = 64;     // rows per partial sum of a norm's parameter gradient
constexpr int kColThreads = 256;  // columns per block of the partial-sum kernels

// x̂ = (x − μ)·(1/σ) from the saved fp32 statistics (the forward rounds x̂ from the double ones; ≤ 1 ulp apart).
__device__ __forceinline__ float ln_xhat(float x, float mean, float rstd) {
  return float((double(x) - double(mean)) * double(rstd));
}

// ---- LayerNorm ------------------------------------------------------------------------------------------------
// One block per row r: μ, σ² (biased) in double, two passes as nn::LayerNorm; y = x̂·γ + β in fp32.
template <class T>
__global__ void layernorm_forward(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                                  std::int64_t H, double eps, T* __restrict__ y, float* __restrict__ mean_out,
                                  float* __restrict__ rstd_out) {
  __shared__ double scratch[kWarp];
  const std::int64_t r = blockIdx.x;
  const T* xr = x + r * H;
  double s = 0;
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) s += double(to_f32(xr[j]));
  const double mean = block_sum(s, scratch) / double(H);
  double v = 0;
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const double d = double(to_f32(xr[j])) - mean;
    v += d * d;
  }
  const double rstd = 1.0 / sqrt(block_sum(v, scratch) / double(H) + eps);
  if (threadIdx.x == 0) {
    mean_out[r] = float(mean);
    rstd_out[r] = float(rstd);
  }
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float xh = float((double(to_f32(xr[j])) - mean) * rstd);
    y[r * H + j] = from_f32<T>(__fadd_rn(__fmul_rn(xh, w[j]), b[j]));
  }
}

// dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ x̂)), ĝ = dy·γ; both means in double. One block per row.
template <class T>
__global__ void layernorm_backward_dx(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ mean, const float* __restrict__ rstd, std::int64_t H,
                                      T* __restrict__ dx) {
  __shared__ double scratch[kWarp];
  const std::int64_t r = blockIdx.x;
  const float mu = mean[r], rs = rstd[r];
  double m1 = 0, m2 = 0;
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const double gh = double(to_f32(dy[r * H + j])) * w[j];
    m1 += gh;
    m2 += gh * ln_xhat(to_f32(x[r * H + j]), mu, rs);
  }
  m1 = block_sum(m1, scratch) / double(H);
  m2 = block_sum(m2, scratch) / double(H);
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const double gh = double(to_f32(dy[r * H + j])) * w[j];
    const double xh = ln_xhat(to_f32(x[r * H + j]), mu, rs);
    dx[r * H + j] = from_f32<T>(float(double(rs) * (gh - m1 - xh * m2)));
  }
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------
// y = γ · T(x · r), r = 1/√(mean(x²) + ε) with Σx² in double. For T = float this is nn::RMSNorm's w·(x·r); for
// bf16/f16 the normalised value is rounded to the storage type before γ, as HF's `weight * hs.to(input_dtype)`.
template <class T>
__global__ void rmsnorm_forward(const T* __restrict__ x, const float* __restrict__ w, std::int64_t H, double eps,
                                T* __restrict__ y, float* __restrict__ rrms) {
  __shared__ double scratch[kWarp];
  const std::int64_t r = blockIdx.x;
  const T* xr = x + r * H;
  double ss = 0;
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const double v = to_f32(xr[j]);
    ss += v * v;
  }
  const float rr = float(1.0 / sqrt(block_sum(ss, scratch) / double(H) + eps));
  if (threadIdx.x == 0) rrms[r] = rr;
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float n = to_f32(from_f32<T>(__fmul_rn(to_f32(xr[j]), rr)));
    y[r * H + j] = from_f32<T>(__fmul_rn(w[j], n));
  }
}

// dx = r·(dy γ) − x r³ mean(dy γ x), in double as nn::RMSNorm::backward. One block per row.
template <class T>
__global__ void rmsnorm_backward_dx(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ rrms, std::int64_t H, T* __restrict__ dx) {
  __shared__ double scratch[kWarp];
  const std::int64_t r = blockIdx.x;
  double m = 0;
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x)
    m += double(to_f32(dy[r * H + j])) * w[j] * to_f32(x[r * H + j]);
  m = block_sum(m, scratch) / double(H);
  const double rs = rrms[r];
  for (std::int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const double g = to_f32(dy[r * H + j]), xv = to_f32(x[r * H + j]);
    dx[r * H + j] = from_f32<T>(float(rs * g * w[j] - xv * rs * rs * rs * m));
  }
}

// ---- norm parameter gradients -----------------------------------------------------------------------------------
// Block (column block, chunk c): for its columns j, the rows of chunk c in order:
//   LayerNorm: pg[c][j] = Σ dy·x̂, pb[c][j] = Σ dy        RMSNorm (mean == nullptr): pg[c][j] = Σ (dy·x)·r
// Each product is rounded to fp32 as the CPU's `dw[j] += …` rounds it; the sums are double.
template <class T>
__global__ void norm_param_partials(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,
                                    const float* __restrict__ rstd, std::int64_t N, std::int64_t H,
                                    double* __restrict__ pg, double* __restrict__ pb) {
  const std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  const std::int64_t c = blockIdx.y, r0 = c * kRowChunk, r1 = r0 + kRowChunk < N ? r0 + kRowChunk : N;
  double g = 0, bsum = 0;
  for (std::int64_t r = r0; r < r1; ++r) {
    const float d = to_f32(dy[r * H + j]), xv = to_f32(x[r * H + j]);
    if (mean) {
      g += __fmul_rn(d, ln_xhat(xv, mean[r], rstd[r]));
      bsum += d;
    } else {
      g += __fmul_rn(__fmul_rn(d, xv), rstd[r]);
    }
  }
  pg[c * H + j] = g;
  if (pb) pb[c * H + j] = bsum;
}

// dγ[j] += Σ_c pg[c][j] (chunk order), dβ likewise when given.
template <int = 0>
__global__ void norm_param_finish(const double* __restrict__ pg, const double* __restrict__ pb, std::int64_t chunks,
                                  std::int64_t H, float* __restrict__ dw, float* __restrict__ db) {
  const std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= H) return;
  double g = 0, b = 0;
  for (std::int64_t c = 0; c < chunks; ++c) {
    g += pg[c * H + j];
    if (pb) b += pb[c * H + j];
  }
  dw[j] = float(double(dw[j]) + g);
  if (db) db[j] = float(double(db[j]) + b);
}

// ---- rotary embedding -------------------------------------------------------------------------------------------
// Element (r, h, i < D/2) rotates the pair (i, i + D/2) of head h of row r by θ_i·pos[r] (sign −1: the inverse).
// The angle is the same fp32 product as on the CPU; cos/sin are CUDA's sincosf (≤ 2 ulp from glibc's).
// out may alias x (each pair is read and written by one thread).
template <class T, class P>
__global__ void rope(const T* x, const P* __restrict__ pos, const float* __restrict__ inv_freq, std::int64_t N,
                     int heads, int D, float sign, T* out) {
  const int half = D / 2;
  const std::int64_t total = N * heads * half;
  for (std::int64_t e = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const int i = int(e % half);
    const std::int64_t rh = e / half, r = rh / heads;
    const int h = int(rh % heads);
    const float ang = __fmul_rn(inv_freq[i], float(pos[r]));
    float sn, c;
    sincosf(ang, &sn, &c);
    sn = sign * sn;
    const std::int64_t base = r * std::int64_t(heads) * D + std::int64_t(h) * D;
    const float a = to_f32(x[base + i]), b = to_f32(x[base + i + half]);
    out[base + i] = from_f32<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn)));
    out[base + i + half] = from_f32<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn)));
  }
}

// ---- gated activation (dense SwiGLU) -----------------------------------------------------------------------------
template <class Act, class T>
__global__ void gated_forward(const T* __restrict__ g, const T* __restrict__ u, std::int64_t n, T* __restrict__ a) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    a[i] = from_f32<T>(Act::f(to_f32(g[i])) * to_f32(u[i]));
}
// dg = da·u·Act'(g), du = da·Act(g) — nn::DenseGatedMLP::backward's products in its order.
template <class Act, class T>
__global__ void gated_backward(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ da,
                               std::int64_t n, T* __restrict__ dg, T* __restrict__ du) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float gv = to_f32(g[i]), uv = to_f32(u[i]), d = to_f32(da[i]);
    dg[i] = from_f32<T>(__fmul_rn(__fmul_rn(d, uv), Act::df(gv)));
    du[i] = from_f32<T>(__fmul_rn(d, Act::f(gv)));
  }
}

// ---- softmax cross-entropy ----------------------------------------------------------------------------------------
constexpr int kCeThreads = 256;
constexpr int kCeCountThreads = 1024;

// One block. meta[0] = labels ≠ ignore (the targets), meta[1] = first position whose label is neither the ignore
// index nor in [0, V) (−1 if none), meta[2] = that label. Integer reductions only.
template <class L>
__global__ void ce_count(const L* __restrict__ labels, std::int64_t N, std::int64_t V, std::int64_t ignore,
                         std::int64_t* __restrict__ meta) {
  __shared__ long long count_s[kCeCountThreads];
  __shared__ long long bad_s[kCeCountThreads];
  long long count = 0, bad = LLONG_MAX;
  for (std::int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const std::int64_t y = std::int64_t(labels[i]);
    if (y == ignore) continue;
    if (y >= 0 && y < V)
      ++count;
    else if (i < bad)
      bad = i;
  }
  count_s[threadIdx.x] = count;
  bad_s[threadIdx.x] = bad;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) {
      count_s[threadIdx.x] += count_s[threadIdx.x + s];
      bad_s[threadIdx.x] = bad_s[threadIdx.x] < bad_s[threadIdx.x + s] ? bad_s[threadIdx.x] : bad_s[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    meta[0] = count_s[0];
    meta[1] = bad_s[0] == LLONG_MAX ? -1 : bad_s[0];
    meta[2] = bad_s[0] == LLONG_MAX ? 0 : std::int64_t(labels[bad_s[0]]);
  }
}

// One block per row: lse = max + log Σ exp(x − max) in double (exp in double, as train::cross_entropy), the row's
// loss lse − x[y], and when dx is given d(grad_scale·loss)/dx = (softmax − onehot)·grad_scale / denominator, where
// the denominator is `normalizer` when > 0, else the target count meta[0]. Ignored (and invalid) rows: loss 0,
// gradient 0.
template <class T, class L>
__global__ void ce_rows(const T* __restrict__ x, const L* __restrict__ labels, std::int64_t V, std::int64_t ignore,
                        const std::int64_t* __restrict__ meta, double normalizer, double grad_scale,
                        double* __restrict__ row_loss, T* __restrict__ dx) {
  __shared__ double dscratch[kWarp];
  __shared__ float fscratch[kWarp];
  const std::int64_t r = blockIdx.x;
  const std::int64_t y = std::int64_t(labels[r]);
  const T* xr = x + r * V;
  if (y == ignore || y < 0 || y >= V) {
    if (threadIdx.x == 0) row_loss[r] = 0.0;
    if (dx)
      for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x) dx[r * V + j] = from_f32<T>(0.f);
    return;
  }
  float mx = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, to_f32(xr[j]));
  const double mxd = block_max(mx, fscratch);
  double s = 0;
  for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x) s += exp(double(to_f32(xr[j])) - mxd);
  const double log_s = log(block_sum(s, dscratch));
  if (threadIdx.x == 0) row_loss[r] = mxd + log_s - double(to_f32(xr[y]));
  if (dx) {
    const double denom = normalizer > 0 ? normalizer : double(meta[0]);
    const double gscale = denom > 0 ? grad_scale / denom : 0.0;
    for (std::int64_t j = threadIdx.x; j < V; j += blockDim.x)
      dx[r * V + j] = from_f32<T>(float((exp(double(to_f32(xr[j])) - mxd - log_s) - (j == y ? 1.0 : 0.0)) * gscale));
  }
}

// One block: out = {loss, Σ row losses, targets, first bad position, its label}. Each thread adds a contiguous
// range of rows in order, then the fixed block tree: the same bits every run.
template <int = 0>
__global__ void ce_finish(const double* __restrict__ row_loss, std::int64_t N, const std::int64_t* __restrict__ meta,
                          double normalizer, double* __restrict__ out) {
  __shared__ double scratch[kWarp];
  const std::int64_t per = (N + blockDim.x - 1) / blockDim.x;
  const std::int64_t b = threadIdx.x * per, e = b + per < N ? b + per : N;
  double s = 0;
  for (std::int64_t i = b; i < e; ++i) s += row_loss[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    const double denom = normalizer > 0 ? normalizer : double(meta[0]);
    out[0] = denom > 0 ? s / denom : 0.0;
    out[1] = s;
    out[2] = double(meta[0]);
    out[3] = double(meta[1]);
    out[4] = double(meta[2]);
  }
}

}  // namespace kernels

namespace detail {
// Parameter-gradient partials of a norm: (chunks, H) doubles each, summed into dw (and db) in chunk order.
template <class T>
void norm_param_grads(const char* where, const Tensor& dy, const Tensor& x, const float* mean, const float* rstd,
                      Tensor& dw, Tensor* db, Workspace* ws) {
  const std::int64_t N = x.size(0), H = x.size(1);
  const std::int64_t chunks = (N + kernels::kRowChunk - 1) / kernels::kRowChunk;
  if (chunks == 0) return;
  CUMO_CHECK(chunks <= 65535, where, ": ", N, " rows exceed one launch of the parameter-gradient kernel");
  Tensor pg = device_empty(ws, {chunks, H}, DType::f64);                   // (chunks, H)
  Tensor pb = db ? device_empty(ws, {chunks, H}, DType::f64) : Tensor();  // (chunks, H)
  const dim3 grid(unsigned((H + kernels::kColThreads - 1) / kernels::kColThreads), unsigned(chunks));
  kernels::norm_param_partials<T><<<grid, kernels::kColThreads, 0, stream()>>>(
      ptr<T>(dy), ptr<T>(x), mean, rstd, N, H, ptr<double>(pg), db ? ptr<double>(pb) : nullptr);
  CUMO_CUDA_LAUNCH_CHECK("norm_param_partials");
  kernels::norm_param_finish<><<<unsigned((H + kernels::kColThreads - 1) / kernels::kColThreads), kernels::kColThreads,
                                 0, stream()>>>(ptr<double>(pg), db ? ptr<double>(pb) : nullptr, chunks, H,
                                                ptr<float>(dw), db ? ptr<float>(*db) : nullptr);
  CUMO_CUDA_LAUNCH_CHECK("norm_param_finish");
}
}  // namespace detail

// ---- LayerNorm ------------------------------------------------------------------------------------------------------
// x (N, H) f32/bf16/f16 → y (N, H) same dtype; weight, bias (H,) f32; saves mean, rstd (N,) f32 for the backward.
inline void layernorm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps, Tensor& y,
                              Tensor& mean, Tensor& rstd) {
  constexpr const char* where = "gpu::layernorm_forward";
  const std::int64_t N = expect_matrix(where, "x", x), H = x.size(1);
  expect_same_layout(where, "y", y, "x", x);
  expect_f32_vector(where, "weight", weight, H);
  expect_f32_vector(where, "bias", bias, H);
  expect_f32_vector(where, "mean", mean, N);
  expect_f32_vector(where, "rstd", rstd, N);
  CUMO_CHECK(N <= INT_MAX, where, ": ", N, " rows exceed one launch");
  if (N == 0 || H == 0) return;
  dispatch_float(x.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::layernorm_forward<T><<<unsigned(N), kernels::kRowThreads, 0, stream()>>>(
        ptr<T>(x), ptr<float>(weight), ptr<float>(bias), H, eps, ptr<T>(y), ptr<float>(mean), ptr<float>(rstd));
  });
  CUMO_CUDA_LAUNCH_CHECK("layernorm_forward");
}

// dy, x (N, H) → dx (N, H) (overwritten); dweight, dbias (H,) f32 accumulate (+=), as parameter gradients do.
inline void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& mean,
                               const Tensor& rstd, Tensor& dx, Tensor& dweight, Tensor& dbias,
                               Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::layernorm_backward";
  const std::int64_t N = expect_matrix(where, "x", x), H = x.size(1);
  expect_same_layout(where, "dy", dy, "x", x);
  expect_same_layout(where, "dx", dx, "x", x);
  expect_f32_vector(where, "weight", weight, H);
  expect_f32_vector(where, "mean", mean, N);
  expect_f32_vector(where, "rstd", rstd, N);
  expect_f32_vector(where, "dweight", dweight, H);
  expect_f32_vector(where, "dbias", dbias, H);
  CUMO_CHECK(N <= INT_MAX, where, ": ", N, " rows exceed one launch");
  if (N == 0 || H == 0) return;
  dispatch_float(x.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::layernorm_backward_dx<T><<<unsigned(N), kernels::kRowThreads, 0, stream()>>>(
        ptr<T>(dy), ptr<T>(x), ptr<float>(weight), ptr<float>(mean), ptr<float>(rstd), H, ptr<T>(dx));
    CUMO_CUDA_LAUNCH_CHECK("layernorm_backward_dx");
    detail::norm_param_grads<T>(where, dy, x, ptr<float>(mean), ptr<float>(rstd), dweight, &dbias, ws);
  });
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------------
// x (N, H) → y (N, H) same dtype; weight (H,) f32; saves rrms (N,) f32 = 1/√(mean(x²) + ε).
inline void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rrms) {
  constexpr const char* where = "gpu::rmsnorm_forward";
  const std::int64_t N = expect_matrix(where, "x", x), H = x.size(1);
  expect_same_layout(where, "y", y, "x", x);
  expect_f32_vector(where, "weight", weight, H);
  expect_f32_vector(where, "rrms", rrms, N);
  CUMO_CHECK(N <= INT_MAX, where, ": ", N, " rows exceed one launch");
  if (N == 0 || H == 0) return;
  dispatch_float(x.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::rmsnorm_forward<T><<<unsigned(N), kernels::kRowThreads, 0, stream()>>>(
        ptr<T>(x), ptr<float>(weight), H, eps, ptr<T>(y), ptr<float>(rrms));
  });
  CUMO_CUDA_LAUNCH_CHECK("rmsnorm_forward");
}

// dy, x (N, H) → dx (N, H) (overwritten); dweight (H,) f32 accumulates.
inline void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rrms, Tensor& dx,
                             Tensor& dweight, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::rmsnorm_backward";
  const std::int64_t N = expect_matrix(where, "x", x), H = x.size(1);
  expect_same_layout(where, "dy", dy, "x", x);
  expect_same_layout(where, "dx", dx, "x", x);
  expect_f32_vector(where, "weight", weight, H);
  expect_f32_vector(where, "rrms", rrms, N);
  expect_f32_vector(where, "dweight", dweight, H);
  CUMO_CHECK(N <= INT_MAX, where, ": ", N, " rows exceed one launch");
  if (N == 0 || H == 0) return;
  dispatch_float(x.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::rmsnorm_backward_dx<T><<<unsigned(N), kernels::kRowThreads, 0, stream()>>>(
        ptr<T>(dy), ptr<T>(x), ptr<float>(weight), ptr<float>(rrms), H, ptr<T>(dx));
    CUMO_CUDA_LAUNCH_CHECK("rmsnorm_backward_dx");
    detail::norm_param_grads<T>(where, dy, x, nullptr, ptr<float>(rrms), dweight, nullptr, ws);
  });
}

// ---- rotary embedding -----------------------------------------------------------------------------------------------
// x (N, heads·D): row r rotated by positions[r] (i64 or i32, (N,) on the GPU); out may be x (in place).
// inverse = true applies the transpose (the backward: dx from dout).
inline void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, std::int64_t heads, bool inverse,
                 Tensor& out) {
  constexpr const char* where = "gpu::rope";
  const std::int64_t N = expect_matrix(where, "x", x);
  expect_same_layout(where, "out", out, "x", x);
  expect_contiguous(where, "inv_freq", inv_freq);
  check_dtype(where, "inv_freq", inv_freq, DType::f32);
  const std::int64_t D = 2 * inv_freq.numel();
  CUMO_CHECK(heads > 0 && x.size(1) == heads * D, where, ": x has shape ", x.shape(), " but ", heads,
             " heads of head_dim ", D, " (from inv_freq ", inv_freq.shape(), ") need (*, ", heads * D, ")");
  expect_contiguous(where, "positions", positions);
  CUMO_CHECK(positions.numel() == N, where, ": positions has shape ", positions.shape(), " for x of shape ",
             x.shape());
  CUMO_CHECK(positions.dtype() == DType::i64 || positions.dtype() == DType::i32, where, ": positions has dtype ",
             name_of(positions.dtype()), " but expected i64 or i32");
  const std::int64_t total = N * heads * (D / 2);
  if (total == 0) return;
  const int h = to_int(heads, where, "heads"), d = to_int(D, where, "head_dim");
  const float sign = inverse ? -1.f : 1.f;
  dispatch_float(x.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    if (positions.dtype() == DType::i64)
      kernels::rope<T, std::int64_t><<<grid_for(total, 256), 256, 0, stream()>>>(
          ptr<T>(x), ptr<std::int64_t>(positions), ptr<float>(inv_freq), N, h, d, sign, ptr<T>(out));
    else
      kernels::rope<T, std::int32_t><<<grid_for(total, 256), 256, 0, stream()>>>(
          ptr<T>(x), ptr<std::int32_t>(positions), ptr<float>(inv_freq), N, h, d, sign, ptr<T>(out));
  });
  CUMO_CUDA_LAUNCH_CHECK("rope");
}

// ---- gated activation -----------------------------------------------------------------------------------------------
// gate, up (N, F) → a (N, F) = Act(gate) ⊙ up (nn::DenseGatedMLP keeps gate and up as separate projections).
template <class Act>
void gated_forward(const Tensor& gate, const Tensor& up, Tensor& a) {
  constexpr const char* where = "gpu::gated_forward";
  expect_contiguous(where, "gate", gate);
  expect_same_layout(where, "up", up, "gate", gate);
  expect_same_layout(where, "a", a, "gate", gate);
  const std::int64_t n = gate.numel();
  if (n == 0) return;
  dispatch_float(gate.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::gated_forward<Act, T><<<grid_for(n, 256), 256, 0, stream()>>>(ptr<T>(gate), ptr<T>(up), n, ptr<T>(a));
  });
  CUMO_CUDA_LAUNCH_CHECK("gated_forward");
}

// da (N, F) → dgate = da ⊙ up ⊙ Act'(gate), dup = da ⊙ Act(gate) (both overwritten).
template <class Act>
void gated_backward(const Tensor& gate, const Tensor& up, const Tensor& da, Tensor& dgate, Tensor& dup) {
  constexpr const char* where = "gpu::gated_backward";
  expect_contiguous(where, "gate", gate);
  expect_same_layout(where, "up", up, "gate", gate);
  expect_same_layout(where, "da", da, "gate", gate);
  expect_same_layout(where, "dgate", dgate, "gate", gate);
  expect_same_layout(where, "dup", dup, "gate", gate);
  const std::int64_t n = gate.numel();
  if (n == 0) return;
  dispatch_float(gate.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::gated_backward<Act, T><<<grid_for(n, 256), 256, 0, stream()>>>(ptr<T>(gate), ptr<T>(up), ptr<T>(da), n,
                                                                            ptr<T>(dgate), ptr<T>(dup));
  });
  CUMO_CUDA_LAUNCH_CHECK("gated_backward");
}

// ---- softmax cross-entropy ------------------------------------------------------------------------------------------
using backend::CrossEntropyOptions;

// The result, still on the GPU (no host sync): values (5,) f64 = {loss, Σ −log p, targets, first bad position or
// −1, its label}. read_result() brings it to the host.
struct CrossEntropyStats {
  Tensor values;
  std::int64_t vocab = 0;
  std::int64_t ignore_index = -100;
};

using CrossEntropyHostResult = backend::CrossEntropyResult;

// logits (N, V) f32/bf16/f16, labels (N,) i64 or i32 on the GPU. When dlogits is non-null it receives
// d(grad_scale·loss)/d logits (N, V) in the logits' dtype (allocated when undefined). Semantics are
// backend::Cpu's (cpu/loss.hpp): rows labelled ignore_index count for nothing, the loss is the mean over the others (or
// Σ / normalizer), a batch with no target gives loss 0 and a zero gradient. A label outside [0, V) cannot be
// checked without a host sync: its row is treated as ignored and read_result() throws.
inline CrossEntropyStats cross_entropy(const Tensor& logits, const Tensor& labels, Tensor* dlogits = nullptr,
                                       const CrossEntropyOptions& options = {}, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::cross_entropy";
  const std::int64_t N = expect_matrix(where, "logits", logits), V = logits.size(1);
  CUMO_CHECK(V >= 1, where, ": logits has shape ", logits.shape(), " — an empty vocabulary");
  expect_contiguous(where, "labels", labels);
  CUMO_CHECK(labels.dim() == 1 && labels.size(0) == N, where, ": labels has shape ", labels.shape(),
             " but logits has shape ", logits.shape(), " (expected labels (", N, ",))");
  CUMO_CHECK(labels.dtype() == DType::i64 || labels.dtype() == DType::i32, where, ": labels has dtype ",
             name_of(labels.dtype()), " but expected i64 or i32");
  CUMO_CHECK(options.normalizer >= 0, where, ": normalizer must be >= 0, got ", options.normalizer);
  CUMO_CHECK(N <= INT_MAX, where, ": ", N, " rows exceed one launch");
  if (dlogits) {
    if (!dlogits->defined()) *dlogits = device_empty(ws, logits.shape(), logits.dtype());
    expect_same_layout(where, "dlogits", *dlogits, "logits", logits);
  }
  CrossEntropyStats st;
  st.values = device_empty(ws, {5}, DType::f64);
  st.vocab = V;
  st.ignore_index = options.ignore_index;
  Tensor meta = device_empty(ws, {3}, DType::i64);                 // targets, bad position, label
  Tensor row_loss = device_empty(ws, {N > 0 ? N : 1}, DType::f64);  // (N,)
  auto launch = [&](auto ltag) {
    using L = decltype(ltag);
    kernels::ce_count<L><<<1, kernels::kCeCountThreads, 0, stream()>>>(ptr<L>(labels), N, V, options.ignore_index,
                                                                       ptr<std::int64_t>(meta));
    CUMO_CUDA_LAUNCH_CHECK("ce_count");
    if (N > 0) {
      dispatch_float(logits.dtype(), where, [&](auto tag) {
        using T = decltype(tag);
        kernels::ce_rows<T, L><<<unsigned(N), kernels::kCeThreads, 0, stream()>>>(
            ptr<T>(logits), ptr<L>(labels), V, options.ignore_index, ptr<std::int64_t>(meta), options.normalizer,
            options.grad_scale, ptr<double>(row_loss), dlogits ? ptr<T>(*dlogits) : nullptr);
      });
      CUMO_CUDA_LAUNCH_CHECK("ce_rows");
    }
  };
  if (labels.dtype() == DType::i64)
    launch(std::int64_t{});
  else
    launch(std::int32_t{});
  kernels::ce_finish<><<<1, kernels::kCeCountThreads, 0, stream()>>>(ptr<double>(row_loss), N,
                                                                     ptr<std::int64_t>(meta), options.normalizer,
                                                                     ptr<double>(st.values));
  CUMO_CUDA_LAUNCH_CHECK("ce_finish");
  return st;
}

// The loss on the host (a sync); throws when a label was outside the vocabulary, naming it, as the CPU does.
inline CrossEntropyHostResult read_result(const CrossEntropyStats& st) {
  double v[5] = {};
  context().read_back(v, st.values.raw(), sizeof v);
  CUMO_CHECK(v[3] < 0, "gpu::cross_entropy: label ", std::int64_t(v[4]), " at position ", std::int64_t(v[3]),
             " is outside the vocabulary [0, ", st.vocab, ") and is not the ignore index ", st.ignore_index);
  return {v[0], v[1], std::int64_t(v[2])};
}

}  // namespace cumo::gpu
