#pragma once
// backend::Cuda — the GPU policy for SparseMoE and the model layers, with exactly the static functions (and
// semantics) of backend::Cpu, which is its reference: every operation here is tested against its CPU twin.
//   SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cuda>
// Layers: the public call (SparseMoE::forward) builds a plan (dispatch.cuh: CUB radix sort, offsets on the
// device) and calls these functions; they check their arguments, pick kernels and launch shapes and call cuBLAS
// (gemm.cuh, grouped_gemm.cuh) or the kernels of router.cuh, losses.cuh, dispatch.cuh and elementwise.cuh.
// Everything runs on gpu::stream() (default: the legacy default stream; gpu::set_stream to change it), and device
// tensors come from CUDA's stream-ordered pool or from a caller-owned gpu::Workspace (memory.cuh).
// The dense model layers (nn/: Linear, LayerNorm, RMSNorm, Embedding, Attention, the MLPs, ClipVision, DecoderLM,
// Llava, models::CuMo — each a template on this policy) call the second group of functions below, which wrap the
// kernels of layers.cuh, attention.cuh, embedding.cuh and model.cuh; optim.cuh holds AdamW and gradient clipping
// for the training loop.
//
// Including this header (from a .cu file) registers the CUDA allocator with cumo::Tensor at static
// initialisation; nothing touches the GPU until the first device tensor or kernel, so a program built with it
// still starts on a machine without one (gpu::device_available() says whether one is there).
#if !defined(__CUDACC__)
#error "<cumo/backend/cuda.cuh> is CUDA code: include it from a .cu file compiled by nvcc (a CPU-only build includes <cumo/moe.hpp> alone)"
#endif

#include <cstdint>
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
#include "cumo/core/rng.hpp"
#include "cumo/moe/types.hpp"

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

struct Cuda {
  static constexpr Device device = Device::cuda;
  static constexpr const char* name = "cuda";
  // Caller-owned memory for a whole step (see cuda/memory.cuh): device tensors allocated on this thread while a
  // WorkspaceScope is alive come from the Workspace's one buffer.
  using Workspace = gpu::Workspace;
  using WorkspaceScope = gpu::WorkspaceScope;

  // ---- dense pieces (router) --------------------------------------------------------------------------------
  // y (M, N) = x (M, K) · w (N, K)^T
  static void linear(const Tensor& x, const Tensor& w, Tensor& y) { gpu::linear(x, w, y); }
  // dx (M, K) (+)= dy (M, N) · w (N, K)
  static void linear_dinput(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) {
    gpu::linear_dinput(dy, w, dx, accumulate);
  }
  // dw (N, K) += dy (M, N)^T · x (M, K)
  static void linear_dweight(const Tensor& dy, const Tensor& x, Tensor& dw) { gpu::linear_dweight(dy, x, dw); }
  static void multiply(const Tensor& a, const Tensor& b, Tensor& out) { gpu::multiply(a, b, out); }
  static void add(const Tensor& a, const Tensor& b, Tensor& out) { gpu::add(a, b, out); }
  // Bitwise the CPU's numbers (same Philox stream), and the generator advances as on the CPU.
  static void fill_uniform(Tensor& t, Rng& rng, float lo, float hi) { gpu::fill_uniform(t, rng, lo, hi); }
  static bool all_finite(const Tensor& t) { return gpu::all_finite(t); }  // host sync
  static float item(const Tensor& t) { return gpu::item(t); }              // host sync

  // ---- router -----------------------------------------------------------------------------------------------
  static void softmax_topk(const Tensor& logits, Tensor& probs, Tensor& idx, Tensor& w, bool renormalize) {
    gpu::softmax_topk(logits, probs, idx, w, renormalize);
  }
  static void topk_weights_backward(const Tensor& probs, const Tensor& idx, const Tensor& w, const Tensor& dw,
                                    bool renormalize, Tensor& dprobs) {
    gpu::topk_weights_backward(probs, idx, w, dw, renormalize, dprobs);
  }
  static void softmax_backward(const Tensor& probs, const Tensor& dprobs, Tensor& dlogits) {
    gpu::softmax_backward(probs, dprobs, dlogits);
  }
  static void aux_losses(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                         AuxLosses& out) {
    gpu::aux_losses(logits, probs, idx, segments, out);
  }
  static void aux_losses_backward(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                                  BalanceCounts counting, AuxLossWeights coef, Tensor& dprobs, Tensor& dlogits) {
    gpu::aux_losses_backward(logits, probs, idx, segments, counting, coef, dprobs, dlogits);
  }

  // ---- dispatch ---------------------------------------------------------------------------------------------
  // Fills plan.host_offsets too unless gpu::options().plan_host_offsets is off (the forward's one host sync).
  static void make_plan(const Tensor& idx, DispatchPlan& plan) { gpu::make_plan(idx, plan); }
  static void gather_rows(const Tensor& x, const DispatchPlan& plan, Tensor& xs) { gpu::gather_rows(x, plan, xs); }
  static void combine(const Tensor& out, const Tensor& w, const DispatchPlan& plan, Tensor& y) {
    gpu::combine(out, w, plan, y);
  }
  static void combine_backward(const Tensor& dy, const Tensor& out, const Tensor& w, const DispatchPlan& plan,
                               Tensor& dout, Tensor& dw) {
    gpu::combine_backward(dy, out, w, plan, dout, dw);
  }
  static void scatter_add_rows(const Tensor& dxs, const DispatchPlan& plan, Tensor& dx) {
    gpu::scatter_add_rows(dxs, plan, dx);
  }

  // ---- experts ----------------------------------------------------------------------------------------------
  static void grouped_linear(const Tensor& a, const Tensor& w, const Tensor* bias, const DispatchPlan& plan,
                             Tensor& c) {
    gpu::grouped_linear(a, w, bias, plan, c);
  }
  static void grouped_linear_dinput(const Tensor& dc, const Tensor& w, const DispatchPlan& plan, Tensor& da) {
    gpu::grouped_linear_dinput(dc, w, plan, da);
  }
  static void grouped_linear_dweight(const Tensor& dc, const Tensor& a, const DispatchPlan& plan, Tensor& dw,
                                     Tensor* dbias) {
    gpu::grouped_linear_dweight(dc, a, plan, dw, dbias);
  }
  template <class Act>
  static void activation_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
    gpu::activation_forward<Act>(h, rows, a);
  }
  template <class Act>
  static void activation_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
    gpu::activation_backward<Act>(h, da, rows, dh);
  }
  template <class Act>
  static void glu_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
    gpu::glu_forward<Act>(h, rows, a);
  }
  template <class Act>
  static void glu_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
    gpu::glu_backward<Act>(h, da, rows, dh);
  }

  // ---- model layers (nn/; the CPU twin of each is inline in the layer) -------------------------------------------
  static void dense_linear(const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y) {
    gpu::dense_linear(x, w, b, y);
  }
  static void dense_linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dw, Tensor* db,
                                    Tensor& dx) {
    gpu::dense_linear_backward(dy, x, w, dw, db, dx);
  }
  static void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y,
                                Tensor& mean, Tensor& rstd) {
    gpu::layernorm_forward(x, w, b, eps, y, mean, rstd);
  }
  static void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                                 const Tensor& rstd, Tensor& dx, Tensor& dw, Tensor& db) {
    gpu::layernorm_backward(dy, x, w, mean, rstd, dx, dw, db);
  }
  static void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rrms) {
    gpu::rmsnorm_forward(x, w, eps, y, rrms);
  }
  static void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rrms, Tensor& dx,
                               Tensor& dw) {
    gpu::rmsnorm_backward(dy, x, w, rrms, dx, dw);
  }
  static void embedding_forward(const Tensor& table, const std::vector<std::int64_t>& ids, Tensor& y) {
    gpu::embedding_forward(table, ids, y);
  }
  static void embedding_backward(const Tensor& dy, const std::vector<std::int64_t>& ids, Tensor& dtable,
                                 const std::vector<bool>* skip) {
    gpu::embedding_backward(dy, ids, dtable, skip);
  }
  static void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, std::int64_t heads,
                   bool inverse, Tensor& out) {
    gpu::rope(x, positions, inv_freq, heads, inverse, out);
  }
  static void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                                std::int64_t B, std::int64_t T, std::int64_t heads, std::int64_t kv_heads,
                                std::int64_t head_dim, bool causal, Tensor& out, Tensor& lse) {
    gpu::attention_forward(q, k, v, key_valid, {B, T, T, heads, kv_heads, head_dim, causal}, out, lse);
  }
  static void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                                 const Tensor& out, const Tensor& lse, const Tensor& dout, std::int64_t B,
                                 std::int64_t T, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                                 bool causal, Tensor& dq, Tensor& dk, Tensor& dv) {
    gpu::attention_backward(q, k, v, key_valid, out, lse, dout, {B, T, T, heads, kv_heads, head_dim, causal}, dq, dk,
                            dv);
  }
  template <class Act>
  static void gated_forward(const Tensor& gate, const Tensor& up, Tensor& a) {
    gpu::gated_forward<Act>(gate, up, a);
  }
  template <class Act>
  static void gated_backward(const Tensor& gate, const Tensor& up, const Tensor& da, Tensor& dgate, Tensor& dup) {
    gpu::gated_backward<Act>(gate, up, da, dgate, dup);
  }
  static void vit_embeddings(const Tensor& patch, const Tensor& cls, const Tensor& pos, std::int64_t B, Tensor& emb) {
    gpu::vit_embeddings(patch, cls, pos, B, emb);
  }
  static void vit_embeddings_backward(const Tensor& demb, std::int64_t B, Tensor& dpatch, Tensor& dcls,
                                      Tensor& dpos) {
    gpu::vit_embeddings_backward(demb, B, dpatch, dcls, dpos);
  }
  static void copy_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                          std::int64_t dpitch, std::int64_t width, std::int64_t height) {
    gpu::copy_blocks(src, src0, spitch, dst, dst0, dpitch, width, height);
  }
  static void add_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                         std::int64_t dpitch, std::int64_t width, std::int64_t height) {
    gpu::add_blocks(src, src0, spitch, dst, dst0, dpitch, width, height);
  }
  static void scale(Tensor& t, float alpha) { gpu::scale(t, alpha); }
  static Tensor upload_i32(const std::vector<std::int32_t>& v) { return gpu::upload_i32(v); }
  static gpu::CrossEntropyHostResult causal_lm_loss(const Tensor& logits, const std::vector<std::int64_t>& labels,
                                                    std::int64_t B, std::int64_t T, Tensor& dlogits) {
    return gpu::causal_lm_loss(logits, labels, B, T, dlogits);
  }
};

}  // namespace cumo::backend
