#pragma once
// cpu::prepack_weight: fp32 Linear weights reordered once into the layout oneDNN's matmul picks, for inference.
//
// dnnl_sgemm packs its weight operand into panels on every call, and from PyTorch's (N, K) layout (the product is
// x·Wᵀ) that packing is slow: at an expert's few rows (64 at the SPEC's Mixtral-like shape, T = 256) the product
// reaches 70–84 GFLOP/s per core against 103–107 at 512 rows (docs/benchmarks.md). A weight that stays fixed —
// inference — can be laid out once the way the GEMM reads it best:
//
//   prepack_weight(w)      w (N, K), or stacked experts (E, N, K): each (N, K) slice reordered once into the layout
//                          oneDNN's matmul with a runtime row count picks for it (format `any`), and that matmul
//                          then multiplies by the copy, the same copy for every M. With oneDNN 2.6 on AVX-512 the
//                          layout it picks is the plain transposed weight, Wᵀ (K, N) row-major (kernel `gemm:jit`):
//                          the gain is that orientation, whose per-call panel packing is cheap (sgemm 'N','N' on a
//                          transposed copy measures the same: 92 against 69 GFLOP/s at 64 × 1024 → 7168, one
//                          core), not a blocked layout. An ISA or version where oneDNN picks a blocked one uses it.
//   cpu::linear, cpu::grouped_linear
//                          look the weight up (one hash lookup; none at all while nothing is packed) and multiply by
//                          its packed copy when there is one, else call the GEMM as before
//   release_packed_weight(w), release_packed_weights()
//                          drop one copy, or all of them
//
// Staleness: a packed copy is a snapshot of w's bytes. Every lookup checks that w's allocation still exists and has
// the same address, shape and a sample of 16 elements per slice, spread over it: a weight changed since (an optimizer
// step, a checkpoint loaded in place) no longer matches, its copy is dropped and the products read w again. A change
// that touches none of the sampled elements (a hand edit of a few values) is not seen: call prepack_weight again
// after one. Copies whose weights were freed are dropped at the next prepack or release.
//
// Results: another kernel call than the unpacked path's (another operand layout, its own order of sums), so outputs
// differ from the unpacked path's by fp32 rounding; for a given thread count they are deterministic. The products
// run serially inside an OpenMP parallel region (the experts' one-per-thread schedule) and threaded outside one, as
// dnnl_sgemm does.
// Memory: one more copy of every packed weight. Builds without oneDNN (Eigen, BLAS): prepack_weight returns false and
// nothing changes. prepack and release must not run while another thread multiplies by a packed weight.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"

namespace cumo::cpu {

#if defined(CUMO_CPU_DNNL)
namespace detail {

// A oneDNN call that returned an error: the message names the call.
inline void dnnl_check(dnnl_status_t st, const char* what) {
  CUMO_CHECK(st == dnnl_success, "cpu::prepack_weight: oneDNN's ", what, " failed with status ", int(st));
}

// One fp32 weight w (E, N, K) (E = 1 for a 2-D weight), every slice reordered into the matmul's layout.
class PackedWeight {
 public:
  explicit PackedWeight(const Tensor& w)
      : storage_(w.storage_ref()), data_(w.raw()), shape_(w.shape()) {
    for_each_sample(w, [&](std::size_t, std::uint32_t bits) { samples_.push_back(bits); });
    E_ = w.dim() == 3 ? w.size(0) : 1;
    N_ = w.size(w.dim() - 2);
    K_ = w.size(w.dim() - 1);
    engine_ = dnnl_cpu_engine();
    CUMO_CHECK(engine_, "cpu::prepack_weight: oneDNN has no CPU engine");
    plain_ = make_primitive(0.f);
    accumulate_ = make_primitive(1.f);
    CUMO_CHECK(dnnl_memory_desc_equal(&plain_.weights, &accumulate_.weights), "cpu::prepack_weight: oneDNN chose "
               "two weight layouts for one shape (with and without accumulation); not packed");
    slice_bytes_ = (dnnl_memory_desc_get_size(&plain_.weights) + 63) / 64 * 64;  // every slice on a cache line
    packed_.reset(static_cast<char*>(std::aligned_alloc(64, slice_bytes_ * std::size_t(E_))));
    CUMO_CHECK(packed_ || slice_bytes_ == 0, "cpu::prepack_weight: cannot allocate ", slice_bytes_ * std::size_t(E_),
               " bytes for the packed copy");
    reorder_slices(static_cast<const float*>(w.raw()));
  }
  PackedWeight(const PackedWeight&) = delete;
  PackedWeight& operator=(const PackedWeight&) = delete;

  // Whether w is still the weight this copy was packed from (see the header: address, shape, sampled bytes).
  bool matches(const Tensor& w) const {
    if (storage_.expired() || w.raw() != data_ || w.shape() != shape_ || !w.is_contiguous()) return false;
    bool same = true;
    for_each_sample(w, [&](std::size_t i, std::uint32_t bits) { same = same && samples_[i] == bits; });
    return same;
  }
  bool expired() const { return storage_.expired(); }
  // The same weight at the same address whose sampled values changed: the copy is stale.
  bool stale_for(const Tensor& w) const {
    return storage_.expired() || (w.raw() == data_ && w.shape() == shape_ && !matches(w));
  }
  // oneDNN's name for the kernel the products run (e.g. "gemm:jit"), for logs and tests.
  const char* implementation() const {
    const char* name = nullptr;
    dnnl_primitive_desc_query(plain_.pd, dnnl_query_impl_info_str, 0, &name);
    return name ? name : "?";
  }

  // C (m, N) = A (m, K) · W[e]ᵀ (+ C when accumulate); row strides lda, ldc.
  void product(std::int64_t e, std::int64_t m, const float* a, std::int64_t lda, bool accumulate, float* c,
               std::int64_t ldc) const {
    if (m == 0) return;
    const Primitive& p = accumulate ? accumulate_ : plain_;
    dnnl_memory_desc_t src_md, dst_md;
    const dnnl_dims_t src_dims{m, K_}, src_strides{lda, 1}, dst_dims{m, N_}, dst_strides{ldc, 1};
    dnnl_check(dnnl_memory_desc_init_by_strides(&src_md, 2, src_dims, dnnl_f32, src_strides), "memory_desc_init");
    dnnl_check(dnnl_memory_desc_init_by_strides(&dst_md, 2, dst_dims, dnnl_f32, dst_strides), "memory_desc_init");
    // The scratchpad and the stream are this thread's (the primitive may run on several threads at once: the
    // experts' one-per-thread schedule); every memory handle is released on every path.
    struct ThreadStream {
      dnnl_stream_t stream = nullptr;
      ~ThreadStream() {
        if (stream) dnnl_stream_destroy(stream);
      }
    };
    thread_local ThreadStream mine;
    thread_local std::vector<char> scratch;
    if (!mine.stream) dnnl_check(dnnl_stream_create(&mine.stream, engine_, dnnl_stream_default_flags), "stream_create");
    if (scratch.size() < p.scratch_bytes) scratch.resize(p.scratch_bytes);
    const dnnl_stream_t stream = mine.stream;
    dnnl_memory_t src = nullptr, wei = nullptr, dst = nullptr, pad = nullptr;
    dnnl_status_t st = dnnl_memory_create(&src, &src_md, engine_, const_cast<float*>(a));
    if (st == dnnl_success)
      st = dnnl_memory_create(&wei, &p.weights, engine_, packed_.get() + slice_bytes_ * std::size_t(e));
    if (st == dnnl_success) st = dnnl_memory_create(&dst, &dst_md, engine_, c);
    if (st == dnnl_success) st = dnnl_memory_create(&pad, &p.scratchpad, engine_, scratch.data());
    if (st == dnnl_success) {
      const dnnl_exec_arg_t args[4] = {
          {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, pad}};
      st = dnnl_primitive_execute(p.prim, stream, 4, args);
      if (st == dnnl_success) st = dnnl_stream_wait(stream);
    }
    for (dnnl_memory_t mem : {src, wei, dst, pad})
      if (mem) dnnl_memory_destroy(mem);
    CUMO_CHECK(st == dnnl_success, "cpu: the matmul on a packed weight (", m, ", ", N_, ", ", K_,
               ") failed with status ", int(st));
  }

 private:
  // The matmul's handles, released with it (also when the constructor throws after making one).
  struct Primitive {
    dnnl_primitive_desc_t pd = nullptr;
    dnnl_primitive_t prim = nullptr;
    dnnl_memory_desc_t weights{}, scratchpad{};
    std::size_t scratch_bytes = 0;

    Primitive() = default;
    Primitive(Primitive&& o) noexcept { *this = std::move(o); }
    Primitive& operator=(Primitive&& o) noexcept {
      std::swap(pd, o.pd);
      std::swap(prim, o.prim);
      weights = o.weights;
      scratchpad = o.scratchpad;
      scratch_bytes = o.scratch_bytes;
      return *this;
    }
    ~Primitive() {
      if (prim) dnnl_primitive_destroy(prim);
      if (pd) dnnl_primitive_desc_destroy(pd);
    }
  };

  // f(i, bits) for 16 elements of every slice, the middle of each sixteenth, as raw bits (a NaN equals itself).
  template <class F>
  static void for_each_sample(const Tensor& w, F&& f) {
    constexpr std::int64_t kPerSlice = 16;
    const std::int64_t E = w.dim() == 3 ? w.size(0) : 1, slice = w.numel() / E;
    const auto* bits = static_cast<const std::uint32_t*>(w.raw());
    std::size_t i = 0;
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t j = 0; j < kPerSlice; ++j) f(i++, bits[e * slice + (2 * j + 1) * slice / (2 * kPerSlice)]);
  }

  // The matmul x (M, K) · wᵀ with a runtime M and runtime row strides, the weights in the layout oneDNN picks
  // (format `any`); `beta` 1 adds to the destination (a sum post-op: the bias written there first, as cpu::linear
  // does).
  Primitive make_primitive(float beta) const {
    Primitive p;
    dnnl_memory_desc_t src_md, wei_md, dst_md;
    const dnnl_dims_t src_dims{DNNL_RUNTIME_DIM_VAL, K_}, src_strides{DNNL_RUNTIME_DIM_VAL, 1};
    const dnnl_dims_t wei_dims{K_, N_};
    const dnnl_dims_t dst_dims{DNNL_RUNTIME_DIM_VAL, N_}, dst_strides{DNNL_RUNTIME_DIM_VAL, 1};
    dnnl_check(dnnl_memory_desc_init_by_strides(&src_md, 2, src_dims, dnnl_f32, src_strides), "memory_desc_init");
    dnnl_check(dnnl_memory_desc_init_by_tag(&wei_md, 2, wei_dims, dnnl_f32, dnnl_format_tag_any), "memory_desc_init");
    dnnl_check(dnnl_memory_desc_init_by_strides(&dst_md, 2, dst_dims, dnnl_f32, dst_strides), "memory_desc_init");
    dnnl_matmul_desc_t desc;
    dnnl_check(dnnl_matmul_desc_init(&desc, &src_md, &wei_md, nullptr, &dst_md), "matmul_desc_init");
    dnnl_primitive_attr_t attr = nullptr;
    dnnl_post_ops_t post_ops = nullptr;
    dnnl_status_t st = dnnl_primitive_attr_create(&attr);
    if (st == dnnl_success) st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (st == dnnl_success && beta != 0.f) {
      st = dnnl_post_ops_create(&post_ops);
      if (st == dnnl_success) st = dnnl_post_ops_append_sum(post_ops, beta);
      if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(attr, post_ops);
    }
    if (st == dnnl_success) st = dnnl_primitive_desc_create(&p.pd, &desc, attr, engine_, nullptr);
    if (st == dnnl_success) st = dnnl_primitive_create(&p.prim, p.pd);
    if (post_ops) dnnl_post_ops_destroy(post_ops);
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_check(st, "matmul primitive creation");  // (p releases what was made)
    p.weights = *dnnl_primitive_desc_query_md(p.pd, dnnl_query_weights_md, 0);
    p.scratchpad = *dnnl_primitive_desc_query_md(p.pd, dnnl_query_scratchpad_md, 0);
    p.scratch_bytes = dnnl_memory_desc_get_size(&p.scratchpad);
    return p;
  }

  // Each slice W[e] (N, K), row-major — the matmul's (K, N) weights with strides (1, K) — into its packed place.
  void reorder_slices(const float* w) {
    dnnl_memory_desc_t plain_md;
    const dnnl_dims_t dims{K_, N_}, strides{1, K_};
    dnnl_check(dnnl_memory_desc_init_by_strides(&plain_md, 2, dims, dnnl_f32, strides), "memory_desc_init");
    dnnl_primitive_desc_t rpd = nullptr;
    dnnl_primitive_t reorder = nullptr;
    dnnl_stream_t stream = nullptr;
    dnnl_status_t st = dnnl_reorder_primitive_desc_create(&rpd, &plain_md, engine_, &plain_.weights, engine_, nullptr);
    if (st == dnnl_success) st = dnnl_primitive_create(&reorder, rpd);
    if (st == dnnl_success) st = dnnl_stream_create(&stream, engine_, dnnl_stream_default_flags);
    for (std::int64_t e = 0; e < E_ && st == dnnl_success; ++e) {
      dnnl_memory_t from = nullptr, to = nullptr;
      st = dnnl_memory_create(&from, &plain_md, engine_, const_cast<float*>(w + e * N_ * K_));
      if (st == dnnl_success)
        st = dnnl_memory_create(&to, &plain_.weights, engine_, packed_.get() + slice_bytes_ * std::size_t(e));
      if (st == dnnl_success) {
        const dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
        st = dnnl_primitive_execute(reorder, stream, 2, args);
        if (st == dnnl_success) st = dnnl_stream_wait(stream);
      }
      for (dnnl_memory_t mem : {from, to})
        if (mem) dnnl_memory_destroy(mem);
    }
    if (stream) dnnl_stream_destroy(stream);
    if (reorder) dnnl_primitive_destroy(reorder);
    if (rpd) dnnl_primitive_desc_destroy(rpd);
    dnnl_check(st, "reorder of the weights");
  }

  struct Free {
    void operator()(char* p) const { std::free(p); }
  };

  std::weak_ptr<const Storage> storage_;
  const void* data_;
  Shape shape_;
  std::vector<std::uint32_t> samples_;
  std::int64_t E_ = 1, N_ = 0, K_ = 0;
  dnnl_engine_t engine_ = nullptr;
  Primitive plain_, accumulate_;
  std::size_t slice_bytes_ = 0;
  std::unique_ptr<char, Free> packed_;
};

// The packed copies, by the address of their weight's first element.
struct PackedRegistry {
  std::mutex mutex;
  std::unordered_map<const void*, std::shared_ptr<const PackedWeight>> copies;
  std::atomic<std::size_t> size{0};  // read without the lock: the products' fast path while nothing is packed

  void prune() {  // under the lock: copies whose weights were freed
    for (auto it = copies.begin(); it != copies.end();) it = it->second->expired() ? copies.erase(it) : std::next(it);
    size = copies.size();
  }
};
inline PackedRegistry& packed_registry() {
  static PackedRegistry r;
  return r;
}

}  // namespace detail
#endif

// Packs w — fp32, contiguous, on the CPU, 2-D (N, K) or stacked (E, N, K) — for the products of cpu::linear and
// cpu::grouped_linear (see the header). Packing it again replaces the copy (after a change of its values). Returns
// false when the build has no oneDNN (nothing packed: the products stay as they were).
inline bool prepack_weight(const Tensor& w) {
  constexpr const char* where = "cpu::prepack_weight";
  check_device(where, "w", w, Device::cpu);
  check_dtype(where, "w", w, DType::f32);
  CUMO_CHECK((w.dim() == 2 || w.dim() == 3) && w.is_contiguous(), where, ": w has shape ", w.shape(),
             " (expected a contiguous (N, K) or (E, N, K) weight)");
#if defined(CUMO_CPU_DNNL)
  if (w.numel() == 0) return false;
  auto copy = std::make_shared<const detail::PackedWeight>(w);
  auto& reg = detail::packed_registry();
  std::lock_guard lock(reg.mutex);
  reg.copies[w.raw()] = std::move(copy);
  reg.prune();
  return true;
#else
  return false;
#endif
}

// Drops w's packed copy; returns whether there was one.
inline bool release_packed_weight(const Tensor& w) {
#if defined(CUMO_CPU_DNNL)
  auto& reg = detail::packed_registry();
  std::lock_guard lock(reg.mutex);
  const bool had = w.defined() && reg.copies.erase(w.raw()) > 0;
  reg.prune();
  return had;
#else
  (void)w;
  return false;
#endif
}

// Drops every packed copy.
inline void release_packed_weights() {
#if defined(CUMO_CPU_DNNL)
  auto& reg = detail::packed_registry();
  std::lock_guard lock(reg.mutex);
  reg.copies.clear();
  reg.size = 0;
#endif
}

// How many weights have a packed copy (those freed since are counted until the next prepack or release).
inline std::size_t packed_weight_count() {
#if defined(CUMO_CPU_DNNL)
  return detail::packed_registry().size;
#else
  return 0;
#endif
}

namespace detail {
// w's packed copy when it has a current one, else null. A copy whose weight changed (same allocation, address and
// shape, other sampled values) or was freed is dropped here; another tensor at the same address (a view of the
// weight with another shape) only misses. The copy stays alive while the caller holds it, whatever other threads
// release meanwhile. Called by the products.
#if defined(CUMO_CPU_DNNL)
inline std::shared_ptr<const PackedWeight> find_packed(const Tensor& w) {
  auto& reg = packed_registry();
  if (reg.size == 0 || w.dtype() != DType::f32 || w.device() != Device::cpu) return nullptr;
  std::lock_guard lock(reg.mutex);
  const auto it = reg.copies.find(w.raw());
  if (it == reg.copies.end()) return nullptr;
  if (it->second->matches(w)) return it->second;
  if (it->second->stale_for(w)) {
    reg.copies.erase(it);
    reg.size = reg.copies.size();
  }
  return nullptr;
}
#endif
}  // namespace detail

}  // namespace cumo::cpu
