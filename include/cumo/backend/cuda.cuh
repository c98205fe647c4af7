#pragma once
// backend::Cuda — the GPU backend: every operation of the backend contract (backend/contract.hpp) with
// backend::Cpu's semantics, which is its reference — each operation is tested against its CPU twin
// (tests/cuda/test_backend_ops.cu) and the whole model against the CPU model (tests/cuda/test_cuda_model.cu).
//   SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cuda>      models::CuMo<backend::Cuda>
// Each operation checks its arguments, picks kernels and launch shapes and calls cuBLAS (gemm.cuh,
// grouped_gemm.cuh) or the kernels of router.cuh, losses.cuh, dispatch.cuh, elementwise.cuh, layers.cuh,
// attention.cuh, embedding.cuh, model.cuh and optim.cuh. Everything runs on gpu::stream().
//
// An instance is a handle to the backend's state, which the caller owns and hands to the model it builds:
//   gpu::Options   precision (TF32, bf16 dense GEMMs), the expert GEMM algorithm, whether the dispatch plan syncs
//                  for host offsets;
//   gpu::Workspace optional caller-owned memory every device tensor of the operations is carved from (CUB's
//                  two-phase temp storage; memory.cuh), the stream-ordered pool otherwise.
// Copies share the state (the layers of one model hold copies of the model's backend), so two models built with
// two instances are configured independently in one process.
//
// Including this header (from a .cu file) registers the CUDA allocator with cumo::Tensor at static
// initialisation; nothing touches the GPU until the first device tensor or kernel, so a program built with it
// still starts on a machine without one (gpu::device_available() says whether one is there).
#if !defined(__CUDACC__)
#error "<cumo/backend/cuda.cuh> is CUDA code: include it from a .cu file compiled by nvcc (a CPU-only build includes <cumo/moe.hpp> alone)"
#endif

#include <cstdint>
#include <memory>
#include <vector>

#include "cumo/backend/cuda/attention.cuh"
#include "cumo/backend/cuda/common.cuh"
#include "cumo/backend/cuda/dispatch.cuh"
#include "cumo/backend/cuda/elementwise.cuh"
#include "cumo/backend/cuda/embedding.cuh"
#include "cumo/backend/cuda/gemm.cuh"
#include "cumo/backend/cuda/grouped_gemm.cuh"
#include "cumo/backend/cuda/layers.cuh"
#include "cumo/backend/cuda/losses.cuh"
#include "cumo/backend/cuda/memory.cuh"
#include "cumo/backend/cuda/model.cuh"
#include "cumo/backend/cuda/optim.cuh"
#include "cumo/backend/cuda/router.cuh"
#include "cumo/backend/contract.hpp"
#include "cumo/backend/ops.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/routing.hpp"

namespace cumo::gpu {
namespace detail {
inline bool register_device_ops() {
  auto& ops = ::cumo::detail::cuda_ops();
  ops.alloc = &device_alloc;
  ops.free = &device_free;
  ops.copy = &device_copy;
  ops.memset0 = &device_memset0;
  return true;
}
// An inline variable: initialised once per program, whichever translation units include this header.
inline const bool device_ops_registered = register_device_ops();
}  // namespace detail
}  // namespace cumo::gpu

namespace cumo::backend {

class Cuda {
 public:
  static constexpr Device device = Device::cuda;
  static constexpr const char* name = "cuda";
  // bf16 / f16 weights (inference): nn::Linear, nn::Embedding and the expert stacks' forwards take them (activations
  // rounded to the weight's dtype for the tensor cores, fp32 accumulation). Unverified: never run on a GPU yet.
  static constexpr Capabilities capabilities{/*max_head_dim=*/8 * gpu::kWarp, /*bf16_weights=*/true,
                                             /*f16_weights=*/true};

  Cuda() : state_(std::make_shared<State>()) {}
  explicit Cuda(gpu::Options options, gpu::Workspace* workspace = nullptr)
      : state_(std::make_shared<State>(State{options, workspace})) {}

  // The state every copy of this backend shares (so: every layer of a model built with it).
  const gpu::Options& options() const { return state_->options; }
  void set_options(const gpu::Options& o) const { state_->options = o; }
  gpu::Workspace* workspace() const { return state_->workspace; }
  // Device tensors of later operations come from `ws` (null: the pool). Tensors already made keep their memory.
  void set_workspace(gpu::Workspace* ws) const { state_->workspace = ws; }

  // ---- memory ---------------------------------------------------------------------------------------------------
  Tensor empty(const Shape& shape, DType dtype = DType::f32) const { return gpu::device_empty(ws(), shape, dtype); }
  Tensor zeros(const Shape& shape, DType dtype = DType::f32) const { return gpu::device_zeros(ws(), shape, dtype); }
  Tensor upload(const Tensor& host) const {
    const Tensor c = host.contiguous();
    Tensor t = empty(c.shape(), c.dtype());
    t.copy_from(c);
    return t;
  }
  // Stream-ordered, without a host sync (through the pinned staging ring).
  Tensor upload_i32(const std::vector<std::int32_t>& v) const { return gpu::upload_i32(v, ws()); }
  Tensor to_host(const Tensor& t) const { return t.device() == Device::cpu ? t : t.to(Device::cpu); }  // host sync
  // t (on the device) in `dtype` (f32, bf16 or f16; rounded to nearest even when narrower), contiguous: t itself
  // when it is both. A conversion kernel on the stream (no host sync), into this instance's memory (its workspace,
  // else the pool), like every other tensor its operations make.
  Tensor convert(const Tensor& t, DType dtype) const {
    check_device("Cuda::convert", "t", t, Device::cuda);
    CUMO_CHECK(t.is_contiguous(), "Cuda::convert: t with shape ", t.shape(), " must be contiguous on cuda");
    return t.dtype() == dtype ? t : gpu::cast_copy(t, dtype, ws());
  }
  float item(const Tensor& t) const { return gpu::item(t); }                                         // host sync
  bool all_finite(const Tensor& t) const { return gpu::all_finite(t, ws()); }                        // host sync

  // ---- elementwise and row blocks -----------------------------------------------------------------------------
  void add(const Tensor& a, const Tensor& b, Tensor& out) const { gpu::add(a, b, out); }
  void multiply(const Tensor& a, const Tensor& b, Tensor& out) const { gpu::multiply(a, b, out); }
  void scale(Tensor& t, float alpha) const { gpu::scale(t, alpha); }
  // Bitwise the CPU's numbers (same Philox stream), and the generator advances as on the CPU.
  void fill_uniform(Tensor& t, Rng& rng, float lo, float hi) const { gpu::fill_uniform(t, rng, lo, hi); }
  void copy_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                   std::int64_t dpitch, std::int64_t width, std::int64_t height) const {
    gpu::copy_blocks(src, src0, spitch, dst, dst0, dpitch, width, height);
  }
  void add_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                  std::int64_t dpitch, std::int64_t width, std::int64_t height) const {
    gpu::add_blocks(src, src0, spitch, dst, dst0, dpitch, width, height);
  }

  // ---- dense linear (the nn layers' GEMMs at the options' precision; the router's too) --------------------------
  void linear(const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y) const {
    gpu::dense_linear(x, w, b, y, options(), ws());
  }
  void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dw, Tensor* db, Tensor& dx) const {
    gpu::dense_linear_backward(dy, x, w, dw, db, dx, options(), ws());
  }
  // The backward GEMMs on their own — the router's backward and the patch embedding's weight gradient — stay fp32
  // (TF32 at most) with dense_bf16: both are small (E or C·P² wide), so bf16 copies of their operands would cost
  // more than they save.
  void linear_dinput(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) const {
    gpu::linear_dinput(dy, w, dx, accumulate, options().allow_tf32);
  }
  void linear_dweight(const Tensor& dy, const Tensor& x, Tensor& dw) const {
    gpu::linear_dweight(dy, x, dw, options().allow_tf32);
  }

  // ---- norms, RoPE, attention, embeddings ---------------------------------------------------------------------
  // LayerNorm stats: (2, N) f32 {mean; 1/σ}; RMSNorm stats: (N,) f32 1/rms.
  void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y,
                         Tensor& stats) const {
    stats = empty({2, x.size(0)});
    Tensor mean = stats.select(0, 0), rstd = stats.select(0, 1);
    gpu::layernorm_forward(x, w, b, eps, y, mean, rstd);
  }
  void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, Tensor& dx,
                          Tensor& dw, Tensor& db) const {
    gpu::layernorm_backward(dy, x, w, stats.select(0, 0), stats.select(0, 1), dx, dw, db, ws());
  }
  void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& stats) const {
    stats = empty({x.size(0)});
    gpu::rmsnorm_forward(x, w, eps, y, stats);
  }
  void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, Tensor& dx,
                        Tensor& dw) const {
    gpu::rmsnorm_backward(dy, x, w, stats, dx, dw, ws());
  }
  void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, std::int64_t heads, bool inverse,
            Tensor& out) const {
    gpu::rope(x, positions, inv_freq, heads, inverse, out);
  }
  // saved: the row logsumexp (B, heads, Tq) f32 — the fused kernel recomputes P in the backward. A strided KV
  // cache of several sequences is packed first (the kernels read packed keys).
  void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                         const AttentionShape& shape, Tensor& out, Tensor* saved) const {
    AttentionShape s = shape;
    const Tensor kp = packed(k, s), vp = packed(v, s);
    s.kv_stride = 0;
    Tensor lse = empty({s.batch, s.heads, s.q_len});
    gpu::attention_forward(q, kp, vp, key_valid, s, out, lse);
    if (saved) *saved = lse;
  }
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                          const Tensor& out, const Tensor& saved, const Tensor& dout, const AttentionShape& shape,
                          Tensor& dq, Tensor& dk, Tensor& dv) const {
    CUMO_CHECK(shape.kv_stride == 0 || shape.kv_stride == shape.S(),
               "backend::Cuda::attention_backward: keys must be packed (training attends within its own tokens)");
    gpu::attention_backward(q, k, v, key_valid, out, saved, dout, shape, dq, dk, dv, ws());
  }
  void embedding_forward(const Tensor& table, const std::vector<std::int64_t>& ids, Tensor& y) const {
    gpu::embedding_forward(table, ids, y, ws());
  }
  void embedding_backward(const Tensor& dy, const std::vector<std::int64_t>& ids, Tensor& dtable,
                          const std::vector<bool>* skip) const {
    gpu::embedding_backward(dy, ids, dtable, skip, ws());
  }
  void vit_embeddings(const Tensor& patch, const Tensor& cls, const Tensor& pos, std::int64_t B, Tensor& emb) const {
    gpu::vit_embeddings(patch, cls, pos, B, emb);
  }
  void vit_embeddings_backward(const Tensor& demb, std::int64_t B, Tensor& dpatch, Tensor& dcls, Tensor& dpos) const {
    gpu::vit_embeddings_backward(demb, B, dpatch, dcls, dpos);
  }
  void s2_pool_tiles(const Tensor& tiles, std::int64_t B, std::int64_t G, std::int64_t n, Tensor& out) const {
    gpu::s2_pool_tiles(tiles, B, G, n, out);
  }
  void s2_pool_tiles_backward(const Tensor& dpooled, std::int64_t B, std::int64_t G, std::int64_t n,
                              Tensor& dtiles) const {
    gpu::s2_pool_tiles_backward(dpooled, B, G, n, dtiles);
  }

  // ---- activations ----------------------------------------------------------------------------------------------
  template <class Act>
  void activation_forward(const Tensor& h, std::int64_t rows, Tensor& a) const {
    gpu::activation_forward<Act>(h, rows, a);
  }
  template <class Act>
  void activation_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) const {
    gpu::activation_backward<Act>(h, da, rows, dh);
  }
  template <class Act>
  void glu_forward(const Tensor& h, std::int64_t rows, Tensor& a) const {
    gpu::glu_forward<Act>(h, rows, a);
  }
  template <class Act>
  void glu_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) const {
    gpu::glu_backward<Act>(h, da, rows, dh);
  }
  template <class Act>
  void gated_forward(const Tensor& gate, const Tensor& up, Tensor& a) const {
    gpu::gated_forward<Act>(gate, up, a);
  }
  template <class Act>
  void gated_backward(const Tensor& gate, const Tensor& up, const Tensor& da, Tensor& dgate, Tensor& dup) const {
    gpu::gated_backward<Act>(gate, up, da, dgate, dup);
  }

  // ---- losses ---------------------------------------------------------------------------------------------------
  // The result is read on the host (one sync: the caller reports the loss).
  CrossEntropyResult cross_entropy(const Tensor& logits, const Tensor& labels, Tensor* dlogits,
                                   const CrossEntropyOptions& o = {}) const {
    return gpu::read_result(gpu::cross_entropy(logits, labels, dlogits, o, ws()));
  }

  // ---- router -----------------------------------------------------------------------------------------------
  void softmax_topk(const Tensor& logits, Tensor& probs, Tensor& idx, Tensor& w, bool renormalize) const {
    gpu::softmax_topk(logits, probs, idx, w, renormalize);
  }
  void topk_weights_backward(const Tensor& probs, const Tensor& idx, const Tensor& w, const Tensor& dw,
                             bool renormalize, Tensor& dprobs) const {
    gpu::topk_weights_backward(probs, idx, w, dw, renormalize, dprobs);
  }
  void softmax_backward(const Tensor& probs, const Tensor& dprobs, Tensor& dlogits) const {
    gpu::softmax_backward(probs, dprobs, dlogits);
  }
  void aux_losses(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                  AuxLosses& out) const {
    gpu::aux_losses(logits, probs, idx, segments, out, ws());
  }
  void aux_losses_backward(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                           BalanceCounts counting, AuxLossWeights coef, Tensor& dprobs, Tensor& dlogits) const {
    gpu::aux_losses_backward(logits, probs, idx, segments, counting, coef, dprobs, dlogits, ws());
  }

  // ---- dispatch ---------------------------------------------------------------------------------------------
  // Fills plan.host_offsets too unless options().plan_host_offsets is off (the forward's one host sync).
  void make_plan(const Tensor& idx, DispatchPlan& plan) const {
    gpu::make_plan(idx, plan, options().plan_host_offsets, ws());
  }
  void gather_rows(const Tensor& x, const DispatchPlan& plan, Tensor& xs) const { gpu::gather_rows(x, plan, xs); }
  void combine(const Tensor& out, const Tensor& w, const DispatchPlan& plan, Tensor& y) const {
    gpu::combine(out, w, plan, y);
  }
  void combine_backward(const Tensor& dy, const Tensor& out, const Tensor& w, const DispatchPlan& plan, Tensor& dout,
                        Tensor& dw) const {
    gpu::combine_backward(dy, out, w, plan, dout, dw);
  }
  void scatter_add_rows(const Tensor& dxs, const DispatchPlan& plan, Tensor& dx) const {
    gpu::scatter_add_rows(dxs, plan, dx);
  }

  // ---- experts (the options' grouped-GEMM algorithm) ----------------------------------------------------------
  void grouped_linear(const Tensor& a, const Tensor& w, const Tensor* bias, const DispatchPlan& plan,
                      Tensor& c) const {
    gpu::grouped_linear(a, w, bias, plan, c, options(), ws());
  }
  void grouped_linear_dinput(const Tensor& dc, const Tensor& w, const DispatchPlan& plan, Tensor& da) const {
    gpu::grouped_linear_dinput(dc, w, plan, da, options());
  }
  void grouped_linear_dweight(const Tensor& dc, const Tensor& a, const DispatchPlan& plan, Tensor& dw,
                              Tensor* dbias) const {
    gpu::grouped_linear_dweight(dc, a, plan, dw, dbias, options(), ws());
  }

  // ---- optimizer ------------------------------------------------------------------------------------------------
  void adamw_step(const std::vector<AdamWSlot>& slots, const AdamWHyper& hyper) const { gpu::adamw_step(slots, hyper); }
  // {norm, coefficient} (2,) f32 on the device: no host sync.
  Tensor clip_grad_norm(const std::vector<Tensor>& grads, double max_norm) const {
    return gpu::clip_grad_norm(grads, max_norm, ws());
  }
  Tensor grad_norm(const std::vector<Tensor>& grads) const { return gpu::grad_norm(grads, ws()); }

 private:
  struct State {
    gpu::Options options;
    gpu::Workspace* workspace = nullptr;
  };
  gpu::Workspace* ws() const { return state_->workspace; }
  // k or v of a strided KV cache (sequence b's S keys at rows b·stride …) as packed (B·S, W) rows.
  Tensor packed(const Tensor& kv, const AttentionShape& s) const {
    const std::int64_t S = s.S(), stride = s.stride();
    if (stride == S || s.batch <= 1) return s.batch <= 1 ? kv.slice(0, 0, S) : kv;
    const std::int64_t W = kv.size(1);
    Tensor p = empty({s.batch * S, W});
    gpu::copy_blocks(kv, 0, stride * W, p, 0, S * W, S * W, s.batch);
    return p;
  }
  std::shared_ptr<State> state_;
};

static_assert(Backend<Cuda>, "backend::Cuda must implement every operation of the backend contract "
                             "(backend/contract.hpp)");

}  // namespace cumo::backend
