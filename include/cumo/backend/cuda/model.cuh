#pragma once
// The model layers' remaining device pieces beyond the kernels of layers.cuh, attention.cuh and embedding.cuh, each
// the twin of a backend::Cpu operation, its reference in tests/cuda/test_backend_ops.cu:
//   dense_linear / dense_linear_backward   cpu/linear.hpp    y = x Wᵀ + b; dW += dyᵀ x, db += Σ_rows dy, dx = dy W
//   vit_embeddings / _backward             cpu/embedding.hpp [CLS; patches] + positions, and its column sums
//   copy_blocks / add_blocks               cpu/blocks.hpp    CLS rows, image rows into the prompt, a KV cache
//   scale                                  cpu/blocks.hpp    t *= alpha
//   s2_pool_tiles / _backward              cpu/s2.hpp        S²: the tiles' grids merged and area-pooled
//
// Precision: activations and parameters are f32. With Options::dense_bf16 the dense GEMMs (every nn::Linear, the
// patch embedding and the LM head) read bf16 copies of their operands on tensor cores, accumulating and writing
// f32 — mixed precision with fp32 master weights, as PyTorch autocast does for matmuls. Sums over rows (bias and
// embedding gradients) run in a fixed order: deterministic, no atomics.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/backend/ops.hpp"
#include "cumo/backend/cuda/elementwise.cuh"
#include "cumo/backend/cuda/gemm.cuh"
#include "cumo/backend/cuda/layers.cuh"

namespace cumo::gpu {

namespace kernels {

// y (rows, n) += b (n,) on every row.
template <int = 0>
__global__ void add_bias_rows(float* __restrict__ y, const float* __restrict__ b, std::int64_t rows, std::int64_t n) {
  const std::int64_t total = rows * n;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x)
    y[i] += b[i % n];
}

// db[j] += dy[0][j] + dy[1][j] + … in row order, one thread per column (adjacent threads read adjacent columns).
template <int = 0>
__global__ void column_sums(const float* __restrict__ dy, std::int64_t rows, std::int64_t n, float* __restrict__ db) {
  const std::int64_t j = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  float acc = db[j];
  for (std::int64_t r = 0; r < rows; ++r) acc = __fadd_rn(acc, dy[r * n + j]);
  db[j] = acc;
}

// emb[b][t][h] = (t == 0 ? cls[h] : patch[b][t − 1][h]) + pos[t][h]
template <int = 0>
__global__ void vit_embeddings(const float* __restrict__ patch, const float* __restrict__ cls,
                               const float* __restrict__ pos, std::int64_t B, std::int64_t T, std::int64_t H,
                               float* __restrict__ emb) {
  const std::int64_t total = B * T * H;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t h = i % H, t = (i / H) % T, b = i / (T * H);
    const float v = t == 0 ? cls[h] : patch[(b * (T - 1) + t - 1) * H + h];
    emb[i] = __fadd_rn(v, pos[t * H + h]);
  }
}

// One thread per (t, h): dpos[t][h] += demb[0][t][h] + demb[1][t][h] + … (batch order, as the CPU adds them),
// the same into dcls[h] for t = 0, and dpatch[b][t − 1][h] = demb[b][t][h] for t > 0.
template <int = 0>
__global__ void vit_embeddings_backward(const float* __restrict__ demb, std::int64_t B, std::int64_t T,
                                        std::int64_t H, float* __restrict__ dpatch, float* __restrict__ dcls,
                                        float* __restrict__ dpos) {
  const std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (i >= T * H) return;
  const std::int64_t t = i / H, h = i % H;
  float p = dpos[i];
  float c = t == 0 ? dcls[h] : 0.f;
  for (std::int64_t b = 0; b < B; ++b) {
    const float g = demb[(b * T + t) * H + h];
    p = __fadd_rn(p, g);
    if (t == 0)
      c = __fadd_rn(c, g);
    else
      dpatch[(b * (T - 1) + t - 1) * H + h] = g;
  }
  dpos[i] = p;
  if (t == 0) dcls[h] = c;
}

// dst[dst0 + r·dpitch + c] += src[src0 + r·spitch + c], r < height, c < width
template <int = 0>
__global__ void add_blocks(const float* __restrict__ src, std::int64_t spitch, float* __restrict__ dst,
                           std::int64_t dpitch, std::int64_t width, std::int64_t height) {
  const std::int64_t total = width * height;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < total;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = i / width, c = i % width;
    dst[r * dpitch + c] = __fadd_rn(dst[r * dpitch + c], src[r * spitch + c]);
  }
}

// S² pooling: pooled row (b, gy, gx) = mean over its n×n window of the merged grid, whose row (b, Y, X) is the tile
// features' row ((Y/G)·n + X/G)·B + b, (Y mod G)·G + X mod G (cpu/s2.hpp). One thread per output element; the
// window is summed in (i, j) order, then scaled by 1/n², as the CPU does.
template <int = 0>
__global__ void s2_pool_tiles(const float* __restrict__ tiles, std::int64_t B, std::int64_t G, std::int64_t n,
                              std::int64_t H, float* __restrict__ out) {
  const std::int64_t total = B * G * G * H;
  const float inv = 1.f / float(n * n);
  for (std::int64_t idx = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t h = idx % H, gx = (idx / H) % G, gy = (idx / (H * G)) % G, b = idx / (H * G * G);
    float acc = 0.f;
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        const std::int64_t Y = gy * n + i, X = gx * n + j;
        const std::int64_t crop = ((Y / G) * n + X / G) * B + b;
        acc = __fadd_rn(acc, tiles[(crop * G * G + (Y % G) * G + X % G) * H + h]);
      }
    out[idx] = __fmul_rn(acc, inv);
  }
}
// The adjoint: every element of a window gets dpooled / n².
template <int = 0>
__global__ void s2_pool_tiles_backward(const float* __restrict__ dpooled, std::int64_t B, std::int64_t G,
                                       std::int64_t n, std::int64_t H, float* __restrict__ dtiles) {
  const std::int64_t total = n * n * B * G * G * H;
  const float inv = 1.f / float(n * n);
  for (std::int64_t idx = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t h = idx % H, r = idx / H;                     // r: row of dtiles (crop, y, x)
    const std::int64_t crop = r / (G * G), y = (r / G) % G, x = r % G;
    const std::int64_t tile = crop / B, b = crop % B, ty = tile / n, tx = tile % n;
    const std::int64_t Y = ty * G + y, X = tx * G + x;               // in the merged (nG)² grid
    dtiles[idx] = __fmul_rn(dpooled[((b * G + Y / n) * G + X / n) * H + h], inv);
  }
}

template <int = 0>
__global__ void scale(float* __restrict__ x, std::int64_t n, float alpha) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = __fmul_rn(x[i], alpha);
}

}  // namespace kernels

namespace detail {
// One dense row-major GEMM of f32 operands, through bf16 copies with Options::dense_bf16 (or on TF32 tensor cores
// with allow_tf32).
inline void dense_gemm(Op op_a, Op op_b, std::int64_t m, std::int64_t n, std::int64_t k, const Tensor& a,
                       const Tensor& b, float beta, Tensor& c, const Options& o, Workspace* ws) {
  const bool half = o.dense_bf16;
  const Tensor a_ = half ? cast_copy(a, DType::bf16, ws) : a;
  const Tensor b_ = half ? cast_copy(b, DType::bf16, ws) : b;
  gemm({op_a, op_b, m, n, k, 1.f, a_.raw(), a.strides()[0], b_.raw(), b.strides()[0], beta, c.raw(), c.strides()[0],
        o.allow_tf32},
       half ? DType::bf16 : DType::f32, DType::f32);
}
inline void expect_f32_matrix(const char* where, const char* name, const Tensor& t) {
  expect_matrix(where, name, t);
  check_dtype(where, name, t, DType::f32);
}
}  // namespace detail

// ---- nn::Linear -----------------------------------------------------------------------------------------------------
// x (N, in), w (out, in), b (out,) or null → y (N, out), all f32 — or w in bf16/f16, a weight held in its checkpoint
// dtype for inference (ParameterStorage): then x is rounded to w's dtype in a workspace copy and the product runs on
// the tensor cores with fp32 accumulation and an fp32 y, as the CPU's products with bf16 weights do from 32 rows
// (with fewer rows, f16 weights, or experts run one per thread, the CPU widens w and keeps x in fp32, so the two
// backends differ by x's rounding: within bf16's tolerance; f16 can also overflow x beyond 65504, as PyTorch's
// fp16 does, where the CPU would not). Training
// keeps fp32 weights: the backward refuses these.
inline void dense_linear(const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y, const Options& o = {},
                         Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::dense_linear";
  detail::expect_f32_matrix(where, "x", x);
  expect_matrix(where, "w", w);
  detail::expect_f32_matrix(where, "y", y);
  const std::int64_t N = x.size(0), in = x.size(1), out = w.size(0);
  CUMO_CHECK(w.size(1) == in && y.size(0) == N && y.size(1) == out, where, ": x ", x.shape(), ", w ", w.shape(),
             " and y ", y.shape(), " do not fit y = x wᵀ");
  if (w.dtype() == DType::f32) {
    detail::dense_gemm(Op::N, Op::T, N, out, in, x, w, 0.f, y, o, ws);
  } else {
    CUMO_CHECK(w.dtype() == DType::bf16 || w.dtype() == DType::f16, where, ": w has dtype ", name_of(w.dtype()),
               " (f32, or bf16 / f16 weights for inference)");
    const Tensor xh = cast_copy(x, w.dtype(), ws);  // (N, in) x rounded to w's dtype
    gemm({Op::N, Op::T, N, out, in, 1.f, xh.raw(), in, w.raw(), w.strides()[0], 0.f, y.raw(), y.strides()[0], false},
         w.dtype(), DType::f32);
  }
  if (b && N * out > 0) {
    expect_f32_vector(where, "b", *b, out);
    kernels::add_bias_rows<><<<grid_for(N * out, 256), 256, 0, stream()>>>(ptr<float>(y), ptr<float>(*b), N, out);
    CUMO_CUDA_LAUNCH_CHECK("add_bias_rows");
  }
}

// dy (N, out), the forward's x (N, in), w (out, in) → dw (out, in) +=, db (out,) += (when given), dx (N, in) =.
inline void dense_linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dw, Tensor* db,
                                  Tensor& dx, const Options& o = {}, Workspace* ws = nullptr) {
  constexpr const char* where = "gpu::dense_linear_backward";
  detail::expect_f32_matrix(where, "dy", dy);
  detail::expect_f32_matrix(where, "x", x);
  detail::expect_f32_matrix(where, "w", w);
  detail::expect_f32_matrix(where, "dx", dx);
  const std::int64_t N = dy.size(0), out = dy.size(1), in = x.size(1);
  CUMO_CHECK(x.size(0) == N && w.size(0) == out && w.size(1) == in && dx.size(0) == N && dx.size(1) == in, where,
             ": dy ", dy.shape(), ", x ", x.shape(), ", w ", w.shape(), " and dx ", dx.shape(), " do not fit");
  detail::expect_f32_matrix(where, "dw", dw);
  check_same_shape(where, "dw", dw, "w", w);
  detail::dense_gemm(Op::T, Op::N, out, in, N, dy, x, 1.f, dw, o, ws);  // (out, in)
  if (db && out > 0) {
    expect_f32_vector(where, "db", *db, out);
    kernels::column_sums<><<<unsigned((out + 255) / 256), 256, 0, stream()>>>(ptr<float>(dy), N, out,
                                                                             ptr<float>(*db));
    CUMO_CUDA_LAUNCH_CHECK("column_sums");
  }
  detail::dense_gemm(Op::N, Op::N, N, in, out, dy, w, 0.f, dx, o, ws);  // (N, in)
}

// ---- nn::ClipVision embeddings ------------------------------------------------------------------------------------
// patch (B·(T−1), H), cls (H,), pos (T, H) → emb (B·T, H)
inline void vit_embeddings(const Tensor& patch, const Tensor& cls, const Tensor& pos, std::int64_t B, Tensor& emb) {
  constexpr const char* where = "gpu::vit_embeddings";
  detail::expect_f32_matrix(where, "pos", pos);
  const std::int64_t T = pos.size(0), H = pos.size(1);
  detail::expect_f32_matrix(where, "patch", patch);
  detail::expect_f32_matrix(where, "emb", emb);
  expect_f32_vector(where, "cls", cls, H);
  check_shape(where, "patch", patch, {B * (T - 1), H});
  check_shape(where, "emb", emb, {B * T, H});
  if (B * T * H == 0) return;
  kernels::vit_embeddings<><<<grid_for(B * T * H, 256), 256, 0, stream()>>>(ptr<float>(patch), ptr<float>(cls),
                                                                          ptr<float>(pos), B, T, H, ptr<float>(emb));
  CUMO_CUDA_LAUNCH_CHECK("vit_embeddings");
}
// demb (B·T, H) → dpatch (B·(T−1), H) =, dcls (H,) +=, dpos (T, H) +=
inline void vit_embeddings_backward(const Tensor& demb, std::int64_t B, Tensor& dpatch, Tensor& dcls, Tensor& dpos) {
  constexpr const char* where = "gpu::vit_embeddings_backward";
  detail::expect_f32_matrix(where, "dpos", dpos);
  const std::int64_t T = dpos.size(0), H = dpos.size(1);
  detail::expect_f32_matrix(where, "demb", demb);
  detail::expect_f32_matrix(where, "dpatch", dpatch);
  expect_f32_vector(where, "dcls", dcls, H);
  check_shape(where, "demb", demb, {B * T, H});
  check_shape(where, "dpatch", dpatch, {B * (T - 1), H});
  if (T * H == 0) return;
  kernels::vit_embeddings_backward<><<<unsigned((T * H + 255) / 256), 256, 0, stream()>>>(
      ptr<float>(demb), B, T, H, ptr<float>(dpatch), ptr<float>(dcls), ptr<float>(dpos));
  CUMO_CUDA_LAUNCH_CHECK("vit_embeddings_backward");
}

// ---- row blocks ---------------------------------------------------------------------------------------------------
// `height` blocks of `width` f32 elements: block r starts at src0 + r·spitch in src and dst0 + r·dpitch in dst
// (elements; a pitch is ignored when height is 1). copy_blocks overwrites, add_blocks adds.
inline void check_blocks(const char* where, const Tensor& src, std::int64_t src0, std::int64_t spitch,
                         const Tensor& dst, std::int64_t dst0, std::int64_t dpitch, std::int64_t width,
                         std::int64_t height) {
  expect_cuda(where, "src", src);
  expect_cuda(where, "dst", dst);
  backend::check_blocks(where, src, src0, spitch, dst, dst0, dpitch, width, height);
}
inline void copy_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                        std::int64_t dpitch, std::int64_t width, std::int64_t height) {
  constexpr const char* where = "gpu::copy_blocks";
  check_blocks(where, src, src0, spitch, dst, dst0, dpitch, width, height);
  if (width == 0 || height == 0) return;
  const float* s = ptr<float>(src) + src0;
  float* d = ptr<float>(dst) + dst0;
  constexpr std::size_t f = sizeof(float);
  if (height == 1)
    CUMO_CUDA_CHECK(cudaMemcpyAsync(d, s, std::size_t(width) * f, cudaMemcpyDeviceToDevice, stream()));
  else
    CUMO_CUDA_CHECK(cudaMemcpy2DAsync(d, std::size_t(dpitch) * f, s, std::size_t(spitch) * f, std::size_t(width) * f,
                                      std::size_t(height), cudaMemcpyDeviceToDevice, stream()));
}
inline void add_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                       std::int64_t dpitch, std::int64_t width, std::int64_t height) {
  constexpr const char* where = "gpu::add_blocks";
  check_blocks(where, src, src0, spitch, dst, dst0, dpitch, width, height);
  if (width == 0 || height == 0) return;
  kernels::add_blocks<><<<grid_for(width * height, 256), 256, 0, stream()>>>(
      ptr<float>(src) + src0, spitch, ptr<float>(dst) + dst0, dpitch, width, height);
  CUMO_CUDA_LAUNCH_CHECK("add_blocks");
}

// A host int32 vector (attention's positions and key mask) as a device tensor, stream-ordered and without a host
// sync: slot-sized chunks through the context's pinned staging ring, each copied on into the tensor at once (a
// plain copy from pageable memory would wait for every kernel queued before it, once per attention layer).
inline Tensor upload_i32(const std::vector<std::int32_t>& v, Workspace* ws = nullptr) {
  const std::int64_t n = std::int64_t(v.size());
  Tensor t = device_empty(ws, {n}, DType::i32);
  constexpr std::int64_t chunk = std::int64_t(Context::kStagingSlotBytes / sizeof(std::int32_t));
  for (std::int64_t i = 0; i < n; i += chunk) {
    const std::size_t bytes = std::size_t(std::min(chunk, n - i)) * sizeof(std::int32_t);
    const void* staged = context().stage_to_device(v.data() + i, bytes);
    CUMO_CUDA_CHECK(cudaMemcpyAsync(static_cast<std::int32_t*>(t.raw()) + i, staged, bytes, cudaMemcpyDeviceToDevice,
                                    stream()));
  }
  return t;
}

// t (f32, contiguous) *= alpha
inline void scale(Tensor& t, float alpha) {
  expect_contiguous("gpu::scale", "t", t);
  check_dtype("gpu::scale", "t", t, DType::f32);
  if (t.numel() == 0) return;
  kernels::scale<><<<grid_for(t.numel(), 256), 256, 0, stream()>>>(ptr<float>(t), t.numel(), alpha);
  CUMO_CUDA_LAUNCH_CHECK("scale");
}

// ---- S² pooling ---------------------------------------------------------------------------------------------------
// tiles (n²·B·G², H) rows (crop, gy, gx) → out (B·G², H): the merged (nG)² grids, area-pooled by n.
inline void s2_pool_tiles(const Tensor& tiles, std::int64_t B, std::int64_t G, std::int64_t n, Tensor& out) {
  constexpr const char* where = "gpu::s2_pool_tiles";
  detail::expect_f32_matrix(where, "tiles", tiles);
  detail::expect_f32_matrix(where, "out", out);
  const std::int64_t H = tiles.size(1);
  check_shape(where, "tiles", tiles, {n * n * B * G * G, H});
  check_shape(where, "out", out, {B * G * G, H});
  if (out.numel() == 0) return;
  kernels::s2_pool_tiles<><<<grid_for(out.numel(), 256), 256, 0, stream()>>>(ptr<float>(tiles), B, G, n, H,
                                                                           ptr<float>(out));
  CUMO_CUDA_LAUNCH_CHECK("s2_pool_tiles");
}
// dpooled (B·G², H) → dtiles (n²·B·G², H) (overwritten)
inline void s2_pool_tiles_backward(const Tensor& dpooled, std::int64_t B, std::int64_t G, std::int64_t n,
                                   Tensor& dtiles) {
  constexpr const char* where = "gpu::s2_pool_tiles_backward";
  detail::expect_f32_matrix(where, "dpooled", dpooled);
  detail::expect_f32_matrix(where, "dtiles", dtiles);
  const std::int64_t H = dpooled.size(1);
  check_shape(where, "dpooled", dpooled, {B * G * G, H});
  check_shape(where, "dtiles", dtiles, {n * n * B * G * G, H});
  if (dtiles.numel() == 0) return;
  kernels::s2_pool_tiles_backward<><<<grid_for(dtiles.numel(), 256), 256, 0, stream()>>>(ptr<float>(dpooled), B, G,
                                                                                       n, H, ptr<float>(dtiles));
  CUMO_CUDA_LAUNCH_CHECK("s2_pool_tiles_backward");
}

}  // namespace cumo::gpu
