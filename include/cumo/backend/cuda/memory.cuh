#pragma once
// Device memory for cumo::Tensor on the GPU, and the caller-owned workspace.
//
// Every device tensor is allocated through the allocator table of core/tensor.hpp, which this file fills in. By
// default an allocation comes from CUDA's stream-ordered pool (cudaMallocAsync on the backend's stream, the pool
// told to keep what is freed), so a training loop that repeats the same shapes allocates nothing from the driver
// after its first step, and freeing never synchronises the device.
//
// A Workspace lets a caller own the memory instead (the two-phase "ask, then run" of CUB): a backend::Cuda given a
// workspace allocates every device tensor of its operations — the layers' activations and the operations' own
// temporaries — from the workspace's one buffer, by a first-fit allocator. Nothing is thread-local: the workspace
// is passed, as part of the backend instance the model was built with. The layout is recorded even when there is
// no buffer yet, so:
//
//   gpu::Workspace ws;                                   // no buffer yet: measuring
//   backend::Cuda be(gpu::Options{}, &ws);
//   models::CuMo<backend::Cuda> m(cfg, be);
//   for (int i = 0; i < 2; ++i) step(m);                 // overflow to the pool, layout recorded
//   ws.reserve(ws.required_bytes());                     // one allocation (or ws.borrow(ptr, bytes): your memory)
//   for (;;) step(m);                                    // ws.overflow_count() stays 0: nothing else is allocated
//
// First-fit depends only on the sequence of requests and frees, so a step that starts from the same layout and
// repeats the same requests lands every block where the measured step did, and required_bytes() is enough for it.
// Measure two steps when tensors outlive a step: SparseMoE keeps its saved activations until the next forward,
// so step 1 starts from an empty arena and later steps from their predecessor's leftovers (which its forward
// frees before allocating anything large, so step 2 is already the steady state). Nothing ever fails for lack of
// room: a block that does not fit comes from the pool and is counted in overflow_count().
// Blocks are reused only after their tensor is freed, and all work runs on one stream, so reuse is ordered after
// the last kernel that touched them. Every tensor drawn from a workspace must be gone before the workspace is.
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cumo/backend/cuda/common.cuh"

namespace cumo::gpu {

// First-fit placement of blocks in [0, capacity), as byte offsets: pure host bookkeeping, no device memory.
class ArenaLayout {
 public:
  static constexpr std::size_t kAlign = 256;  // what cudaMalloc guarantees, enough for any vector load
  static constexpr std::size_t npos = SIZE_MAX;

  explicit ArenaLayout(std::size_t capacity = SIZE_MAX) { free_[0] = capacity; }

  // Offset of a new block of at least `bytes` (rounded up to kAlign; zero-byte requests get kAlign), or npos.
  std::size_t allocate(std::size_t bytes) {
    const std::size_t need = round_up(bytes == 0 ? 1 : bytes);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < need) continue;
      const std::size_t off = it->first, size = it->second;
      free_.erase(it);
      if (size > need) free_[off + need] = size - need;
      used_[off] = need;
      live_ += need;
      if (off + need > high_water_) high_water_ = off + need;
      return off;
    }
    return npos;
  }
  // Returns a block to the free list, merging it with free neighbours.
  void release(std::size_t off) {
    auto u = used_.find(off);
    CUMO_CHECK(u != used_.end(), "ArenaLayout::release: offset ", off, " is not an allocated block");
    std::size_t start = off, size = u->second;
    live_ -= size;
    used_.erase(u);
    auto next = free_.lower_bound(start);
    if (next != free_.end() && next->first == start + size) {
      size += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == start) {
        start = prev->first;
        size += prev->second;
        free_.erase(prev);
      }
    }
    free_[start] = size;
  }

  std::size_t high_water() const { return high_water_; }  // the largest block end ever handed out
  std::size_t live_bytes() const { return live_; }
  std::size_t live_blocks() const { return used_.size(); }
  std::size_t free_blocks() const { return free_.size(); }
  static std::size_t round_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

 private:
  std::map<std::size_t, std::size_t> free_;  // offset → size, address order, never two adjacent
  std::map<std::size_t, std::size_t> used_;  // offset → size
  std::size_t live_ = 0, high_water_ = 0;
};

// ---- the pool -------------------------------------------------------------------------------------------------
namespace detail {
inline void* pool_alloc(std::size_t bytes) {
  Context& ctx = context();
  void* p = nullptr;
  if (ctx.pools())
    CUMO_CUDA_CHECK(cudaMallocAsync(&p, bytes, ctx.stream()));
  else
    CUMO_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}
// Never throws (it runs in destructors); errors during process teardown are expected and ignored.
inline void pool_free(void* p) noexcept {
  Context& ctx = context();
  const cudaError_t e = ctx.pools() ? cudaFreeAsync(p, ctx.stream()) : cudaFree(p);
  if (e != cudaSuccess) cudaGetLastError();
}
}  // namespace detail

// ---- the workspace -----------------------------------------------------------------------------------------------
inline void* device_alloc(std::size_t bytes);
inline void device_free(void* p) noexcept;

class Workspace {
 public:
  Workspace() = default;
  explicit Workspace(std::size_t bytes) { reserve(bytes); }
  // Tensors still in the buffer must be gone by now (their memory goes with it).
  ~Workspace() {
    if (owned_ && base_) detail::pool_free(base_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // Gives the workspace a buffer of `bytes` that it allocates and owns (one cudaMallocAsync).
  void reserve(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    check_idle_("reserve");
    if (owned_ && base_) detail::pool_free(base_);
    base_ = bytes ? detail::pool_alloc(bytes) : nullptr;
    capacity_ = bytes;
    owned_ = true;
  }
  // Uses the caller's device buffer [ptr, ptr + bytes) (256-byte aligned, as cudaMalloc returns), which must
  // outlive every tensor drawn from it.
  void borrow(void* ptr, std::size_t bytes) {
    CUMO_CHECK(reinterpret_cast<std::uintptr_t>(ptr) % ArenaLayout::kAlign == 0,
               "gpu::Workspace::borrow: the buffer must be ", ArenaLayout::kAlign, "-byte aligned");
    std::lock_guard<std::mutex> lock(mu_);
    check_idle_("borrow");
    if (owned_ && base_) detail::pool_free(base_);
    base_ = ptr;
    capacity_ = bytes;
    owned_ = false;
  }

  std::size_t capacity() const { return capacity_; }
  // Bytes a buffer needs for a replay of everything allocated from this workspace so far without overflow.
  std::size_t required_bytes() const { return layout_.high_water(); }
  std::size_t overflow_count() const { return overflows_; }  // allocations that did not fit (went to the pool)

  // A device tensor carved from this workspace (from the pool when it does not fit); its memory returns here when
  // the last view of it goes.
  Tensor empty(const Shape& shape, DType dtype) {
    const std::size_t bytes = std::size_t(shape.numel()) * size_of(dtype);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      p = allocate_(bytes);
    }
    auto storage = std::make_shared<Storage>();
    storage->ptr = p;
    storage->bytes = bytes;
    storage->device = Device::cuda;
    storage->deleter = [this](void* q) { release(q); };
    return Tensor::from_storage(std::move(storage), shape, dtype);
  }
  std::size_t live_blocks() const { return layout_.live_blocks(); }
  std::size_t live_bytes() const { return layout_.live_bytes(); }
  void reset_counters() { overflows_ = 0; }

 private:
  struct Block {
    std::size_t offset;
    bool in_buffer;
  };

  // The buffer can be replaced only when no live tensor sits in it (overflowed ones live in the pool).
  void check_idle_(const char* what) const {
    CUMO_CHECK(in_buffer_live_ == 0, "gpu::Workspace::", what, ": ", in_buffer_live_,
               " tensors in this workspace's buffer are still alive");
  }
  // Called with the lock held.
  void* allocate_(std::size_t bytes) {
    const std::size_t off = layout_.allocate(bytes);
    CUMO_CHECK(off != ArenaLayout::npos, "gpu::Workspace: layout exhausted");
    void* p;
    bool in_buffer = base_ && off + ArenaLayout::round_up(bytes == 0 ? 1 : bytes) <= capacity_;
    if (in_buffer) {
      p = static_cast<char*>(base_) + off;
    } else {
      ++overflows_;
      try {
        p = detail::pool_alloc(bytes);
      } catch (...) {
        layout_.release(off);
        throw;
      }
    }
    blocks_[p] = Block{off, in_buffer};
    in_buffer_live_ += in_buffer;
    return p;
  }
  void release(void* p) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = blocks_.find(p);
    if (it == blocks_.end()) return;
    const Block b = it->second;
    blocks_.erase(it);
    layout_.release(b.offset);
    in_buffer_live_ -= b.in_buffer;
    if (!b.in_buffer) detail::pool_free(p);
  }

  void* base_ = nullptr;
  std::size_t capacity_ = 0;
  bool owned_ = false;
  ArenaLayout layout_;  // unbounded: the layout is the same whether or not a block fits the buffer
  std::unordered_map<void*, Block> blocks_;
  std::size_t overflows_ = 0;
  std::size_t in_buffer_live_ = 0;
  std::mutex mu_;  // a tensor may be freed on another thread
};

// A device tensor from `ws`, or from the stream-ordered pool when there is none: how every gpu:: function that
// needs a temporary allocates it.
inline Tensor device_empty(Workspace* ws, const Shape& shape, DType dtype = DType::f32) {
  return ws ? ws->empty(shape, dtype) : Tensor::empty(shape, dtype, Device::cuda);
}
inline Tensor device_zeros(Workspace* ws, const Shape& shape, DType dtype = DType::f32) {
  Tensor t = device_empty(ws, shape, dtype);
  t.zero_();
  return t;
}

// ---- the allocator table entries -----------------------------------------------------------------------------------
inline void* device_alloc(std::size_t bytes) { return detail::pool_alloc(bytes); }
inline void device_free(void* p) noexcept { detail::pool_free(p); }

// Byte copies between host and device. Copies that touch host memory wait for completion, so the host buffer may
// be reused or freed at once (a pinned source would otherwise still be read after return); device-to-device copies
// stay asynchronous on the backend's stream.
inline void device_copy(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) {
  const cudaStream_t s = stream();
  CUMO_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
  if (dst_dev == Device::cpu || src_dev == Device::cpu) CUMO_CUDA_CHECK(cudaStreamSynchronize(s));
}

inline void device_memset0(void* p, std::size_t bytes) { CUMO_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream())); }

}  // namespace cumo::gpu
