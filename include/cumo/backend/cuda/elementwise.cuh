#pragma once
// CUDA elementwise pieces, the twin of backend/cpu/elementwise.hpp plus the small helpers of backend::Cpu:
// activation and GLU forward/backward over the first `rows` rows (the same Act::f / Act::df that the CPU calls,
// compiled for the device through CUMO_HD), products, sums, the router's jitter noise, finiteness and dtype casts.
// Storage may be f32, bf16 or f16; arithmetic is fp32.
#include <cstdint>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/core/rng.hpp"

namespace cumo::gpu {

namespace kernels {

#define CUMO_GRID_STRIDE(i, n)                                                                \
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += std::int64_t(gridDim.x) * blockDim.x)

template <class Act, class T>
__global__ void activation_forward(const T* __restrict__ h, std::int64_t n, T* __restrict__ a) {
  CUMO_GRID_STRIDE(i, n) a[i] = from_f32<T>(Act::f(to_f32(h[i])));
}
// dh = da ⊙ Act'(h); dh may alias da.
template <class Act, class T>
__global__ void activation_backward(const T* __restrict__ h, const T* da, std::int64_t n, T* dh) {
  CUMO_GRID_STRIDE(i, n) dh[i] = from_f32<T>(to_f32(da[i]) * Act::df(to_f32(h[i])));
}
// h (rows, 2F) = [gate | up]; a (rows, F) = Act(gate) ⊙ up
template <class Act, class T>
__global__ void glu_forward(const T* __restrict__ h, std::int64_t rows, std::int64_t F, T* __restrict__ a) {
  CUMO_GRID_STRIDE(i, rows * F) {
    const std::int64_t r = i / F, j = i % F;
    const float g = to_f32(h[r * 2 * F + j]), u = to_f32(h[r * 2 * F + F + j]);
    a[i] = from_f32<T>(Act::f(g) * u);
  }
}
// dh = [da ⊙ up ⊙ Act'(gate) | da ⊙ Act(gate)]
template <class Act, class T>
__global__ void glu_backward(const T* __restrict__ h, const T* __restrict__ da, std::int64_t rows, std::int64_t F,
                             T* __restrict__ dh) {
  CUMO_GRID_STRIDE(i, rows * F) {
    const std::int64_t r = i / F, j = i % F;
    const float g = to_f32(h[r * 2 * F + j]), u = to_f32(h[r * 2 * F + F + j]), d = to_f32(da[i]);
    dh[r * 2 * F + j] = from_f32<T>(d * u * Act::df(g));
    dh[r * 2 * F + F + j] = from_f32<T>(d * Act::f(g));
  }
}

// out = a ⊙ b, out = a + b (out may alias either input)
template <class T>
__global__ void multiply(const T* a, const T* b, std::int64_t n, T* out) {
  CUMO_GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(a[i]) * to_f32(b[i]));
}
template <class T>
__global__ void add(const T* a, const T* b, std::int64_t n, T* out) {
  CUMO_GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

// Element i draws Philox block (seed, counter + i), word 0 — exactly what Rng::fill_uniform does on the CPU, one
// element after another — and rounds lo + (hi − lo)·u without contraction, so the noise is bitwise the CPU's.
template <int = 0>
__global__ void fill_uniform(float* __restrict__ out, std::int64_t n, std::uint64_t seed, std::uint64_t counter,
                             float lo, float hi) {
  CUMO_GRID_STRIDE(i, n) {
    std::uint32_t r[4];
    Philox4x32::block(seed, counter + std::uint64_t(i), r);
    const float u = float(r[0] >> 8) * (1.0f / 16777216.0f);
    out[i] = __fadd_rn(lo, __fmul_rn(__fsub_rn(hi, lo), u));
  }
}

template <class T>
__global__ void find_nonfinite(const T* __restrict__ x, std::int64_t n, int* __restrict__ flag) {
  CUMO_GRID_STRIDE(i, n) if (!isfinite(to_f32(x[i]))) *flag = 1;  // every writer stores the same 1
}

template <class S, class D>
__global__ void cast(const S* __restrict__ src, std::int64_t n, D* __restrict__ dst) {
  CUMO_GRID_STRIDE(i, n) dst[i] = from_f32<D>(to_f32(src[i]));
}

#undef CUMO_GRID_STRIDE

}  // namespace kernels

constexpr int kElementwiseThreads = 256;

template <class Act>
void activation_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
  constexpr const char* where = "gpu::activation_forward";
  expect_contiguous(where, "h", h);
  expect_contiguous(where, "a", a);
  CUMO_CHECK(h.dtype() == a.dtype(), where, ": h and a must share a dtype");
  const std::int64_t n = rows * h.size(1);
  if (n == 0) return;
  dispatch_float(h.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::activation_forward<Act, T><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(
        ptr<T>(h), n, ptr<T>(a));
  });
  CUMO_CUDA_LAUNCH_CHECK("activation_forward");
}

template <class Act>
void activation_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
  constexpr const char* where = "gpu::activation_backward";
  expect_contiguous(where, "h", h);
  expect_contiguous(where, "da", da);
  expect_contiguous(where, "dh", dh);
  CUMO_CHECK(h.dtype() == da.dtype() && h.dtype() == dh.dtype(), where, ": h, da and dh must share a dtype");
  const std::int64_t n = rows * h.size(1);
  if (n == 0) return;
  dispatch_float(h.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::activation_backward<Act, T><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(
        ptr<T>(h), ptr<T>(da), n, ptr<T>(dh));
  });
  CUMO_CUDA_LAUNCH_CHECK("activation_backward");
}

template <class Act>
void glu_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
  constexpr const char* where = "gpu::glu_forward";
  expect_contiguous(where, "h", h);
  expect_contiguous(where, "a", a);
  CUMO_CHECK(h.dtype() == a.dtype(), where, ": h and a must share a dtype");
  const std::int64_t F = a.size(1);
  CUMO_CHECK(h.size(1) == 2 * F, where, ": h has shape ", h.shape(), " but a has shape ", a.shape(),
             " (h must be [gate | up], twice as wide)");
  if (rows * F == 0) return;
  dispatch_float(h.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::glu_forward<Act, T><<<grid_for(rows * F, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(
        ptr<T>(h), rows, F, ptr<T>(a));
  });
  CUMO_CUDA_LAUNCH_CHECK("glu_forward");
}

template <class Act>
void glu_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
  constexpr const char* where = "gpu::glu_backward";
  expect_contiguous(where, "h", h);
  expect_contiguous(where, "da", da);
  expect_contiguous(where, "dh", dh);
  CUMO_CHECK(h.dtype() == da.dtype() && h.dtype() == dh.dtype(), where, ": h, da and dh must share a dtype");
  const std::int64_t F = da.size(1);
  CUMO_CHECK(h.size(1) == 2 * F && dh.size(1) == 2 * F, where, ": h ", h.shape(), " and dh ", dh.shape(),
             " must be twice as wide as da ", da.shape());
  if (rows * F == 0) return;
  dispatch_float(h.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::glu_backward<Act, T><<<grid_for(rows * F, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(
        ptr<T>(h), ptr<T>(da), rows, F, ptr<T>(dh));
  });
  CUMO_CUDA_LAUNCH_CHECK("glu_backward");
}

inline void multiply(const Tensor& a, const Tensor& b, Tensor& out) {
  constexpr const char* where = "gpu::multiply";
  expect_contiguous(where, "a", a);
  expect_contiguous(where, "b", b);
  expect_contiguous(where, "out", out);
  check_same_shape(where, "a", a, "b", b);
  check_same_shape(where, "a", a, "out", out);
  CUMO_CHECK(a.dtype() == b.dtype() && a.dtype() == out.dtype(), where, ": a, b and out must share a dtype");
  const std::int64_t n = a.numel();
  if (n == 0) return;
  dispatch_float(a.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::multiply<T><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(ptr<T>(a), ptr<T>(b),
                                                                                                 n, ptr<T>(out));
  });
  CUMO_CUDA_LAUNCH_CHECK("multiply");
}

inline void add(const Tensor& a, const Tensor& b, Tensor& out) {
  constexpr const char* where = "gpu::add";
  expect_contiguous(where, "a", a);
  expect_contiguous(where, "b", b);
  expect_contiguous(where, "out", out);
  check_same_shape(where, "a", a, "b", b);
  check_same_shape(where, "a", a, "out", out);
  CUMO_CHECK(a.dtype() == b.dtype() && a.dtype() == out.dtype(), where, ": a, b and out must share a dtype");
  const std::int64_t n = a.numel();
  if (n == 0) return;
  dispatch_float(a.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::add<T><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(ptr<T>(a), ptr<T>(b), n,
                                                                                            ptr<T>(out));
  });
  CUMO_CUDA_LAUNCH_CHECK("add");
}

// The same numbers as Rng::fill_uniform on the CPU, and the generator advances by the same amount.
inline void fill_uniform(Tensor& t, Rng& rng, float lo, float hi) {
  constexpr const char* where = "gpu::fill_uniform";
  expect_contiguous(where, "t", t);
  check_dtype(where, "t", t, DType::f32);
  const std::int64_t n = t.numel();
  const Rng::State s = rng.state();
  if (n > 0) {
    kernels::fill_uniform<><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(
        ptr<float>(t), n, s.seed, s.counter, lo, hi);
    CUMO_CUDA_LAUNCH_CHECK("fill_uniform");
  }
  rng.set_state({s.seed, s.counter + std::uint64_t(n)});
}

// Whether every element is finite (a host sync: the answer is needed on the host).
inline bool all_finite(const Tensor& t, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::all_finite";
  expect_contiguous(where, "t", t);
  const std::int64_t n = t.numel();
  if (n == 0) return true;
  Tensor flag = device_zeros(ws, {1}, DType::i32);
  dispatch_float(t.dtype(), where, [&](auto tag) {
    using T = decltype(tag);
    kernels::find_nonfinite<T><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(
        ptr<T>(t), n, ptr<std::int32_t>(flag));
  });
  CUMO_CUDA_LAUNCH_CHECK("find_nonfinite");
  int bad = 0;
  context().read_back(&bad, flag.raw(), sizeof(int));
  return bad == 0;
}

// The first element as float (a host sync).
inline float item(const Tensor& t) {
  constexpr const char* where = "gpu::item";
  expect_cuda(where, "t", t);
  check_dtype(where, "t", t, DType::f32);
  CUMO_CHECK(t.numel() >= 1, where, ": tensor is empty");
  float v = 0.f;
  context().read_back(&v, t.raw(), sizeof(float));
  return v;
}

// dst = src converted (f32, bf16, f16 in any combination), rounding to nearest even.
inline void cast(const Tensor& src, Tensor& dst) {
  constexpr const char* where = "gpu::cast";
  expect_contiguous(where, "src", src);
  expect_contiguous(where, "dst", dst);
  CUMO_CHECK(src.numel() == dst.numel(), where, ": src has shape ", src.shape(), " but dst has shape ", dst.shape());
  const std::int64_t n = src.numel();
  if (n == 0) return;
  dispatch_float(src.dtype(), where, [&](auto stag) {
    dispatch_float(dst.dtype(), where, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      kernels::cast<S, D><<<grid_for(n, kElementwiseThreads), kElementwiseThreads, 0, stream()>>>(ptr<S>(src), n,
                                                                                                   ptr<D>(dst));
    });
  });
  CUMO_CUDA_LAUNCH_CHECK("cast");
}

// A copy of `t` in `dtype` (rounded to nearest even when narrower), from `ws` (null: the pool).
inline Tensor cast_copy(const Tensor& t, DType dtype, Workspace* ws) {
  Tensor c = device_empty(ws, t.shape(), dtype);
  cast(t, c);
  return c;
}

}  // namespace cumo::gpu
