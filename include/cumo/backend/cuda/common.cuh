#pragma once
// The pieces every CUDA file of the backend shares: error checks that throw cumo::Error with the CUDA (or cuBLAS)
// error string, the per-process context (stream, cuBLAS handle and its workspace, pinned staging buffers), the
// backend's run-time options, element types and the dtype switch, and small warp/launch helpers.
//
// The namespace is cumo::gpu, not cumo::cuda: libcu++ owns the global namespace ::cuda, and with a user's
// `using namespace cumo;` the stubs nvcc generates for CUB kernels (which name cuda::std:: unqualified) would
// become ambiguous.
//
// Threading: the context is one per process and bound to the device that was current at first use. Setting the
// stream is not synchronised with work in flight: change it only between layers, from one host thread.
#if !defined(__CUDACC__)
#error "cumo/backend/cuda/*.cuh is CUDA code: include <cumo/backend/cuda.cuh> from a .cu file compiled by nvcc"
#endif

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

// ---- error checks --------------------------------------------------------------------------------------------
#define CUMO_CUDA_CHECK(expr)                                                            \
  do {                                                                                   \
    const cudaError_t cumo_err_ = (expr);                                                \
    if (cumo_err_ != cudaSuccess) ::cumo::gpu::detail::throw_cuda(cumo_err_, #expr, __FILE__, __LINE__); \
  } while (0)

#define CUMO_CUBLAS_CHECK(expr)                                                          \
  do {                                                                                   \
    const cublasStatus_t cumo_st_ = (expr);                                              \
    if (cumo_st_ != CUBLAS_STATUS_SUCCESS) ::cumo::gpu::detail::throw_cublas(cumo_st_, #expr, __FILE__, __LINE__); \
  } while (0)

// After every kernel launch: launch-configuration errors at once; with CUMO_CUDA_SYNC=1 in the environment also
// the kernel's own faults, at the launch that caused them (slow; for debugging and compute-sanitizer runs).
#define CUMO_CUDA_LAUNCH_CHECK(what) ::cumo::gpu::detail::after_launch(what, __FILE__, __LINE__)

namespace cumo::gpu {

namespace detail {
[[noreturn]] inline void throw_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  fail("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") in ", expr, " at ", file, ":", line);
}
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* expr, const char* file, int line) {
  fail("cuBLAS error ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ") in ", expr, " at ", file, ":",
       line);
}
inline bool sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("CUMO_CUDA_SYNC");
    return v && *v && std::strcmp(v, "0") != 0;
  }();
  return on;
}
}  // namespace detail

// ---- options -------------------------------------------------------------------------------------------------
// How the expert GEMMs run (see docs/cuda.md for the trade-offs; the benchmark measures each one).
enum class GroupedGemm {
  automatic,        // per_expert when the plan has host offsets, device_offsets otherwise
  per_expert,       // one cublasGemmEx per non-empty expert (needs plan.host_offsets)
  grouped_batched,  // one cublasGemmGroupedBatchedEx for all experts (needs plan.host_offsets; C dtype = A dtype)
  device_offsets,   // our own grouped kernel that reads the device offset table: no host sync, SIMT fp32 math
};

// The CUDA backend's run-time choices. They are state of a backend::Cuda instance (backend/cuda.cuh), which the
// caller owns and hands to the model it builds — never a process-wide setting — so two differently configured
// models can live in one process. The gpu:: functions take what they need of them as arguments.
struct Options {
  GroupedGemm grouped_gemm = GroupedGemm::automatic;
  // make_plan copies the (E+1) offsets to plan.host_offsets — one stream sync per forward. Off: no sync at all,
  // plan.host_offsets stays empty and the expert GEMMs take the device_offsets kernel.
  bool plan_host_offsets = true;
  // fp32 GEMMs on TF32 tensor cores: much faster, ~1e-3 relative error (the fp32 tests need it off).
  bool allow_tf32 = false;
  // The model layers' dense GEMMs (nn::Linear, patch embedding, LM head) on bf16 copies of their f32 operands:
  // tensor cores with fp32 accumulation and output (model.cuh). Off: fp32 (or TF32 with allow_tf32).
  bool dense_bf16 = false;
};

// ---- context ---------------------------------------------------------------------------------------------------
class Context {
 public:
  static constexpr std::size_t kBlasWorkspaceBytes = std::size_t(32) << 20;  // NVIDIA's advice for Hopper
  static constexpr int kStagingSlots = 8;
  static constexpr std::size_t kStagingSlotBytes = std::size_t(64) << 10;
  static constexpr std::size_t kReadbackBytes = std::size_t(64) << 10;

  Context() {
    CUMO_CUDA_CHECK(cudaGetDevice(&device_));
    int pools = 0;
    CUMO_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device_));
    pools_ = pools != 0;
    if (pools_) {
      // Keep freed blocks in the pool across synchronisations: the steady state then allocates nothing.
      cudaMemPool_t pool;
      CUMO_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device_));
      std::uint64_t keep = UINT64_MAX;
      CUMO_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    }
    CUMO_CUBLAS_CHECK(cublasCreate(&blas_));
    CUMO_CUDA_CHECK(cudaMalloc(&blas_workspace_, kBlasWorkspaceBytes));
    CUMO_CUDA_CHECK(cudaMallocHost(&staging_host_, kStagingSlots * kStagingSlotBytes));
    CUMO_CUDA_CHECK(cudaMalloc(&staging_dev_, kStagingSlots * kStagingSlotBytes));
    for (auto& ev : staging_done_) CUMO_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    CUMO_CUDA_CHECK(cudaMallocHost(&readback_, kReadbackBytes));
    bind_stream(nullptr);
  }
  // Never destroyed: tensors may be freed during static destruction, after which the CUDA runtime is gone; the
  // driver reclaims everything at exit (PyTorch does the same with its handles).
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t blas() const { return blas_; }
  int device() const { return device_; }
  bool pools() const { return pools_; }

  // All kernels, copies, allocations and cuBLAS calls of the backend go to this stream.
  void set_stream(cudaStream_t s) { bind_stream(s); }

  // Copies a small host table (≤ kStagingSlotBytes) to device memory, stream-ordered, without a host sync: the
  // bytes go through a pinned slot whose previous copy is known finished (an event per slot). The returned device
  // pointer stays valid for kStagingSlots further calls — the caller uses it in the kernel or cuBLAS call it
  // issues next on the same stream.
  void* stage_to_device(const void* host, std::size_t bytes) {
    CUMO_CHECK(bytes <= kStagingSlotBytes, "gpu::Context::stage_to_device: ", bytes, " bytes exceed the slot size ",
               kStagingSlotBytes);
    std::lock_guard<std::mutex> lock(mu_);
    const int slot = next_slot_;
    next_slot_ = (next_slot_ + 1) % kStagingSlots;
    CUMO_CUDA_CHECK(cudaEventSynchronize(staging_done_[slot]));  // the slot's previous copy has run
    char* h = static_cast<char*>(staging_host_) + slot * kStagingSlotBytes;
    char* d = static_cast<char*>(staging_dev_) + slot * kStagingSlotBytes;
    std::memcpy(h, host, bytes);
    CUMO_CUDA_CHECK(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream_));
    CUMO_CUDA_CHECK(cudaEventRecord(staging_done_[slot], stream_));
    return d;
  }

  // Copies `bytes` of device memory to `host` through a pinned buffer and waits for it (a host sync).
  void read_back(void* host, const void* dev, std::size_t bytes) {
    if (bytes == 0) return;
    if (bytes > kReadbackBytes) {
      CUMO_CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, stream_));
      CUMO_CUDA_CHECK(cudaStreamSynchronize(stream_));
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    CUMO_CUDA_CHECK(cudaMemcpyAsync(readback_, dev, bytes, cudaMemcpyDeviceToHost, stream_));
    CUMO_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::memcpy(host, readback_, bytes);
  }

 private:
  void bind_stream(cudaStream_t s) {
    stream_ = s;
    CUMO_CUBLAS_CHECK(cublasSetStream(blas_, s));
    // cublasSetStream resets the workspace to cuBLAS's own pool; a fixed user workspace keeps results bitwise
    // reproducible across streams (cuBLAS's reproducibility note).
    CUMO_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_workspace_, kBlasWorkspaceBytes));
  }

  int device_ = 0;
  bool pools_ = false;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  void* blas_workspace_ = nullptr;
  void* staging_host_ = nullptr;
  void* staging_dev_ = nullptr;
  cudaEvent_t staging_done_[kStagingSlots] = {};
  int next_slot_ = 0;
  void* readback_ = nullptr;
  std::mutex mu_;
};

// The process's context, created (with the cuBLAS handle) at first use on the then-current device.
inline Context& context() {
  static Context* ctx = new Context();
  return *ctx;
}
inline cudaStream_t stream() { return context().stream(); }
inline void set_stream(cudaStream_t s) { context().set_stream(s); }
inline void synchronize() { CUMO_CUDA_CHECK(cudaStreamSynchronize(stream())); }

namespace detail {
inline void after_launch(const char* what, const char* file, int line) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess && sync_after_launch()) e = cudaStreamSynchronize(stream());
  if (e != cudaSuccess) throw_cuda(e, what, file, line);
}
}  // namespace detail

// Whether a CUDA device can be used; `why` gets the runtime's message when not. Never throws.
inline bool device_available(std::string* why = nullptr) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();  // a failed query is not sticky: reset the last-error slot so later checks start clean
    return false;
  }
  if (n == 0) {
    if (why) *why = "cudaGetDeviceCount returned 0 devices";
    return false;
  }
  return true;
}

// ---- element types ---------------------------------------------------------------------------------------------
// Storage types on the device: float, __nv_bfloat16, __half. Arithmetic is always fp32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

template <class T>
struct device_dtype;
template <> struct device_dtype<float> { static constexpr DType value = DType::f32; };
template <> struct device_dtype<__nv_bfloat16> { static constexpr DType value = DType::bf16; };
template <> struct device_dtype<__half> { static constexpr DType value = DType::f16; };
template <> struct device_dtype<double> { static constexpr DType value = DType::f64; };
template <> struct device_dtype<std::int32_t> { static constexpr DType value = DType::i32; };
template <> struct device_dtype<std::int64_t> { static constexpr DType value = DType::i64; };

// Typed device pointer of a tensor (which must be on the GPU and of T's dtype).
template <class T>
T* ptr(const Tensor& t) {
  CUMO_CHECK(t.defined(), "cuda: tensor is undefined");
  CUMO_CHECK(t.dtype() == device_dtype<T>::value, "cuda: tensor has dtype ", name_of(t.dtype()), " but ",
             name_of(device_dtype<T>::value), " was expected");
  return static_cast<T*>(t.raw());
}
template <class T>
T* ptr_or_null(const Tensor* t) {
  return t && t->defined() ? ptr<T>(*t) : nullptr;
}

inline cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: fail("cuda: dtype ", name_of(t), " has no cuBLAS type here (f32, bf16, f16)");
  }
}

// Calls f(T{}) with T the storage type of a floating dtype: f32 → float, bf16 → __nv_bfloat16, f16 → __half.
template <class F>
void dispatch_float(DType t, const char* where, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); return;
    case DType::bf16: f(__nv_bfloat16{}); return;
    case DType::f16: f(__half{}); return;
    default: fail(where, ": dtype ", name_of(t), " is not supported on cuda (f32, bf16, f16)");
  }
}

// Entry-point checks: on the GPU, row-major (unit inner stride), of an allowed dtype.
inline void expect_cuda(const char* where, const char* name, const Tensor& t) {
  CUMO_CHECK(t.defined(), where, ": ", name, " is undefined");
  check_device(where, name, t, Device::cuda);
}
inline void expect_contiguous(const char* where, const char* name, const Tensor& t) {
  expect_cuda(where, name, t);
  CUMO_CHECK(t.is_contiguous(), where, ": ", name, " (shape ", t.shape(), ") must be contiguous");
}
inline void expect_rows(const char* where, const char* name, const Tensor& t) {
  expect_cuda(where, name, t);
  CUMO_CHECK(t.dim() == 2 && (t.strides()[1] == 1 || t.size(1) <= 1), where, ": ", name, " (shape ", t.shape(),
             ") must be a 2-D tensor with unit column stride");
}

// An f32 vector of n elements (norm parameters, saved row statistics).
inline void expect_f32_vector(const char* where, const char* name, const Tensor& t, std::int64_t n) {
  expect_contiguous(where, name, t);
  check_dtype(where, name, t, DType::f32);
  CUMO_CHECK(t.numel() == n, where, ": ", name, " has shape ", t.shape(), " but expected (", n, ",)");
}
// A same-shaped, same-dtype partner (y, dy, dx) on the GPU, contiguous.
inline void expect_same_layout(const char* where, const char* name, const Tensor& t, const char* ref_name,
                               const Tensor& ref) {
  expect_contiguous(where, name, t);
  check_same_shape(where, name, t, ref_name, ref);
  CUMO_CHECK(t.dtype() == ref.dtype(), where, ": ", name, " has dtype ", name_of(t.dtype()), " but ", ref_name,
             " has dtype ", name_of(ref.dtype()));
}
// A contiguous (rows, features) tensor on the GPU; returns rows.
inline std::int64_t expect_matrix(const char* where, const char* name, const Tensor& x) {
  expect_contiguous(where, name, x);
  CUMO_CHECK(x.dim() == 2, where, ": ", name, " has shape ", x.shape(), " but expected (rows, features)");
  return x.size(0);
}

// ---- launch helpers --------------------------------------------------------------------------------------------
// Kernels are templates (with a dummy parameter where none is natural): a header-only library defines them in
// every translation unit, and only templates may be defined more than once without duplicate device stubs.
constexpr int kWarp = 32;
// Grid for a grid-stride loop over n items; capped so huge n loops instead of overflowing the grid.
inline unsigned grid_for(std::int64_t n, int threads) {
  const std::int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > (std::int64_t(1) << 20) ? (std::int64_t(1) << 20) : b));
}
inline int to_int(std::int64_t v, const char* where, const char* what) {
  CUMO_CHECK(v >= 0 && v <= INT_MAX, where, ": ", what, " = ", v, " does not fit in int");
  return int(v);
}

template <class T>  // float or double
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over a block of blockDim.x (a multiple of 32, ≤ 1024) threads in a fixed order: a butterfly inside each
// warp, then every warp over the warp totals. Every thread gets the result. `scratch` holds ≥ 32 T; the call
// begins with a barrier, so it can be called again with the same scratch. T: float, or double for row statistics,
// loss and norm partials.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const T t = lane < warps ? scratch[lane] : T(0);
  return warp_sum(t);  // every warp reduces the same values in the same order: the same result everywhere
}
// Maximum over a block (same contract as block_sum; NaN-ignoring like fmaxf).
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(t);
}

}  // namespace cumo::gpu
