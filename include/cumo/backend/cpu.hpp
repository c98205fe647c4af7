#pragma once
// backend::Cpu — the complete reference backend: every operation the MoE parts, the model layers and the optimizer
// need (backend/contract.hpp lists them), fp32 on Eigen (or a BLAS) with OpenMP over tokens, rows, heads or
// experts. backend::Cuda implements the same list with the same semantics and is tested against this one op by op.
// The operations are static: the CPU backend has no state, and an instance (what the layers hold) is empty.
#include <cmath>
#include <cstdint>
#include <vector>

#include "cumo/backend/cpu/attention.hpp"
#include "cumo/backend/cpu/blocks.hpp"
#include "cumo/backend/cpu/dispatch.hpp"
#include "cumo/backend/cpu/elementwise.hpp"
#include "cumo/backend/cpu/embedding.hpp"
#include "cumo/backend/cpu/grouped_gemm.hpp"
#include "cumo/backend/cpu/linear.hpp"
#include "cumo/backend/cpu/loss.hpp"
#include "cumo/backend/cpu/losses.hpp"
#include "cumo/backend/cpu/norms.hpp"
#include "cumo/backend/cpu/optim.hpp"
#include "cumo/backend/cpu/rope.hpp"
#include "cumo/backend/cpu/router.hpp"
#include "cumo/backend/cpu/s2.hpp"
#include "cumo/backend/contract.hpp"
#include "cumo/backend/ops.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/routing.hpp"

namespace cumo::backend {

struct Cpu {
  static constexpr Device device = Device::cpu;
  static constexpr const char* name = "cpu";
  static constexpr Capabilities capabilities{/*max_head_dim=*/0, /*bf16_weights=*/true, /*f16_weights=*/true};

  // ---- memory ---------------------------------------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::f32) { return Tensor::empty(shape, dtype); }
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32) { return Tensor::zeros(shape, dtype); }
  // A host tensor on this backend (here: the same tensor, shared).
  static Tensor upload(const Tensor& host) { return host; }
  static Tensor upload_i32(const std::vector<std::int32_t>& v) {
    Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::i32);
    std::copy(v.begin(), v.end(), t.data<std::int32_t>());
    return t;
  }
  // A tensor of this backend on the host (here: the same tensor, shared).
  static Tensor to_host(const Tensor& t) { return t; }
  // t in `dtype` (f32, bf16 or f16; rounded to nearest even when narrower), contiguous: t itself when it is both.
  static Tensor convert(const Tensor& t, DType dtype) { return t.dtype() == dtype ? t.contiguous() : t.to(dtype); }
  static float item(const Tensor& t) { return t.data<float>()[0]; }
  // Whether every element is finite (NaN/Inf inputs are rejected at the door).
  static bool all_finite(const Tensor& t) {
    const Tensor c = t.contiguous();
    const float* p = c.data<float>();
    bool ok = true;
    for (std::int64_t i = 0; i < c.numel(); ++i) ok &= std::isfinite(p[i]);
    return ok;
  }

  // ---- elementwise and row blocks -----------------------------------------------------------------------------
  static void add(const Tensor& a, const Tensor& b, Tensor& out) { cpu::add(a, b, out); }            // out may alias
  static void multiply(const Tensor& a, const Tensor& b, Tensor& out) { cpu::multiply(a, b, out); }  // out may alias
  static void scale(Tensor& t, float alpha) { cpu::scale(t, alpha); }
  static void fill_uniform(Tensor& t, Rng& rng, float lo, float hi) { rng.fill_uniform(t, lo, hi); }
  static void copy_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                          std::int64_t dpitch, std::int64_t width, std::int64_t height) {
    cpu::copy_blocks(src, src0, spitch, dst, dst0, dpitch, width, height);
  }
  static void add_blocks(const Tensor& src, std::int64_t src0, std::int64_t spitch, Tensor& dst, std::int64_t dst0,
                         std::int64_t dpitch, std::int64_t width, std::int64_t height) {
    cpu::add_blocks(src, src0, spitch, dst, dst0, dpitch, width, height);
  }

  // ---- dense linear -------------------------------------------------------------------------------------------
  // y (M, N) = x (M, K) · w (N, K)ᵀ [+ b (N,)]
  static void linear(const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y) { cpu::linear(x, w, b, y); }
  // dw (N, K) +=, db (N,) += (when given), dx (M, K) = from dy (M, N)
  static void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor& dw, Tensor* db,
                              Tensor& dx) {
    cpu::linear_backward(dy, x, w, dw, db, dx);
  }
  // dx (M, K) (+)= dy (M, N) · w (N, K)
  static void linear_dinput(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) {
    cpu::linear_dinput(dy, w, dx, accumulate);
  }
  // dw (N, K) += dy (M, N)ᵀ · x (M, K)
  static void linear_dweight(const Tensor& dy, const Tensor& x, Tensor& dw) { cpu::linear_dweight(dy, x, dw); }

  // ---- norms, RoPE, attention, embeddings ---------------------------------------------------------------------
  // `stats` is what the forward keeps for the backward, in this backend's own layout.
  static void layernorm_forward(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y,
                                Tensor& stats) {
    cpu::layernorm_forward(x, w, b, eps, y, stats);
  }
  static void layernorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, Tensor& dx,
                                 Tensor& dw, Tensor& db) {
    cpu::layernorm_backward(dy, x, w, stats, dx, dw, db);
  }
  static void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& stats) {
    cpu::rmsnorm_forward(x, w, eps, y, stats);
  }
  static void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats, Tensor& dx,
                               Tensor& dw) {
    cpu::rmsnorm_backward(dy, x, w, stats, dx, dw);
  }
  static void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, std::int64_t heads, bool inverse,
                   Tensor& out) {
    cpu::rope(x, positions, inv_freq, heads, inverse, out);
  }
  // `saved` (null: inference) receives what the backward needs, in this backend's own layout.
  static void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                                const AttentionShape& shape, Tensor& out, Tensor* saved) {
    cpu::attention_forward(q, k, v, key_valid, shape, out, saved);
  }
  static void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* key_valid,
                                 const Tensor& out, const Tensor& saved, const Tensor& dout,
                                 const AttentionShape& shape, Tensor& dq, Tensor& dk, Tensor& dv) {
    cpu::attention_backward(q, k, v, saved, dout, shape, dq, dk, dv);
  }
  static void embedding_forward(const Tensor& table, const std::vector<std::int64_t>& ids, Tensor& y) {
    cpu::embedding_forward(table, ids, y);
  }
  static void embedding_backward(const Tensor& dy, const std::vector<std::int64_t>& ids, Tensor& dtable,
                                 const std::vector<bool>* skip) {
    cpu::embedding_backward(dy, ids, dtable, skip);
  }
  static void vit_embeddings(const Tensor& patch, const Tensor& cls, const Tensor& pos, std::int64_t B, Tensor& emb) {
    cpu::vit_embeddings(patch, cls, pos, B, emb);
  }
  static void vit_embeddings_backward(const Tensor& demb, std::int64_t B, Tensor& dpatch, Tensor& dcls,
                                      Tensor& dpos) {
    cpu::vit_embeddings_backward(demb, B, dpatch, dcls, dpos);
  }
  static void s2_pool_tiles(const Tensor& tiles, std::int64_t B, std::int64_t G, std::int64_t n, Tensor& out) {
    cpu::s2_pool_tiles(tiles, B, G, n, out);
  }
  static void s2_pool_tiles_backward(const Tensor& dpooled, std::int64_t B, std::int64_t G, std::int64_t n,
                                     Tensor& dtiles) {
    cpu::s2_pool_tiles_backward(dpooled, B, G, n, dtiles);
  }

  // ---- activations ----------------------------------------------------------------------------------------------
  template <class Act>
  static void activation_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
    cpu::activation_forward<Act>(h, rows, a);
  }
  template <class Act>
  static void activation_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
    cpu::activation_backward<Act>(h, da, rows, dh);
  }
  template <class Act>
  static void glu_forward(const Tensor& h, std::int64_t rows, Tensor& a) {
    cpu::glu_forward<Act>(h, rows, a);
  }
  template <class Act>
  static void glu_backward(const Tensor& h, const Tensor& da, std::int64_t rows, Tensor& dh) {
    cpu::glu_backward<Act>(h, da, rows, dh);
  }
  template <class Act>
  static void gated_forward(const Tensor& gate, const Tensor& up, Tensor& a) {
    cpu::gated_forward<Act>(gate, up, a);
  }
  template <class Act>
  static void gated_backward(const Tensor& gate, const Tensor& up, const Tensor& da, Tensor& dgate, Tensor& dup) {
    cpu::gated_backward<Act>(gate, up, da, dgate, dup);
  }

  // ---- losses ---------------------------------------------------------------------------------------------------
  // logits (N, V), labels (N,) i64/i32 on this backend → the loss (read on the host); dlogits (N, V) when given.
  static CrossEntropyResult cross_entropy(const Tensor& logits, const Tensor& labels, Tensor* dlogits,
                                          const CrossEntropyOptions& options = {}) {
    return cpu::cross_entropy(logits, labels, dlogits, options);
  }

  // ---- router -----------------------------------------------------------------------------------------------
  static void softmax_topk(const Tensor& logits, Tensor& probs, Tensor& idx, Tensor& w, bool renormalize) {
    cpu::softmax_topk(logits, probs, idx, w, renormalize);
  }
  static void topk_weights_backward(const Tensor& probs, const Tensor& idx, const Tensor& w, const Tensor& dw,
                                    bool renormalize, Tensor& dprobs) {
    cpu::topk_weights_backward(probs, idx, w, dw, renormalize, dprobs);
  }
  static void softmax_backward(const Tensor& probs, const Tensor& dprobs, Tensor& dlogits) {
    cpu::softmax_backward(probs, dprobs, dlogits);
  }
  static void aux_losses(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                         AuxLosses& out) {
    cpu::aux_losses(logits, probs, idx, segments, out);
  }
  static void aux_losses_backward(const Tensor& logits, const Tensor& probs, const Tensor& idx, std::int64_t segments,
                                  BalanceCounts counting, AuxLossWeights coef, Tensor& dprobs, Tensor& dlogits) {
    cpu::aux_losses_backward(logits, probs, idx, segments, counting, coef, dprobs, dlogits);
  }

  // ---- dispatch ---------------------------------------------------------------------------------------------
  static void make_plan(const Tensor& idx, DispatchPlan& plan) { cpu::make_plan(idx, plan); }
  static void gather_rows(const Tensor& x, const DispatchPlan& plan, Tensor& xs) { cpu::gather_rows(x, plan, xs); }
  static void combine(const Tensor& out, const Tensor& w, const DispatchPlan& plan, Tensor& y) {
    cpu::combine(out, w, plan, y);
  }
  static void combine_backward(const Tensor& dy, const Tensor& out, const Tensor& w, const DispatchPlan& plan,
                               Tensor& dout, Tensor& dw) {
    cpu::combine_backward(dy, out, w, plan, dout, dw);
  }
  static void scatter_add_rows(const Tensor& dxs, const DispatchPlan& plan, Tensor& dx) {
    cpu::scatter_add_rows(dxs, plan, dx);
  }

  // ---- experts ----------------------------------------------------------------------------------------------
  static void grouped_linear(const Tensor& a, const Tensor& w, const Tensor* bias, const DispatchPlan& plan,
                             Tensor& c) {
    cpu::grouped_linear(a, w, bias, plan.host_offsets, c);
  }
  static void grouped_linear_dinput(const Tensor& dc, const Tensor& w, const DispatchPlan& plan, Tensor& da) {
    cpu::grouped_linear_dinput(dc, w, plan.host_offsets, da);
  }
  static void grouped_linear_dweight(const Tensor& dc, const Tensor& a, const DispatchPlan& plan, Tensor& dw,
                                     Tensor* dbias) {
    cpu::grouped_linear_dweight(dc, a, plan.host_offsets, dw, dbias);
  }

  // ---- optimizer ------------------------------------------------------------------------------------------------
  static void adamw_step(const std::vector<AdamWSlot>& slots, const AdamWHyper& hyper) { cpu::adamw_step(slots, hyper); }
  // {norm before clipping, coefficient} (2,) f32; a non-finite norm leaves the gradients alone.
  static Tensor clip_grad_norm(const std::vector<Tensor>& grads, double max_norm) {
    return cpu::clip_grad_norm(grads, max_norm);
  }
  static Tensor grad_norm(const std::vector<Tensor>& grads) { return cpu::grad_norm(grads); }
};

static_assert(Backend<Cpu>, "backend::Cpu must implement every operation of the backend contract (backend/contract.hpp)");

}  // namespace cumo::backend
