#pragma once
// The one contract between the layers and a backend: every operation cumo's MoE parts, model layers and optimizer
// call, as a C++20 concept. A layer holds an instance of its backend and runs each forward or backward as a short
// sequence of these calls — it never asks which backend it is on — so the CPU tests run exactly the wiring the GPU
// runs, and a new backend is a new implementation of this list (tested op by op against backend::Cpu, the
// reference, as ggml's test-backend-ops does).
//
// Conventions every operation keeps:
//   - tensors live on B::device, fp32 unless said otherwise, row-major and contiguous;
//   - outputs are passed in allocated (`B::empty`), except `stats` / `saved`, which the forward fills in a layout
//     of the backend's choosing and the matching backward reads;
//   - parameter gradients accumulate (+=), activation gradients are overwritten unless an `accumulate` flag says;
//   - results are deterministic: the same inputs give the same bits, run after run, for any thread count.
// What a backend cannot do is declared once in B::capabilities (backend/ops.hpp) and refused with backend::require.
// A layer or model instantiated on a type that misses an operation fails to compile, the compiler naming each
// missing operation ("the required expression ... is invalid").
#include <concepts>
#include <cstdint>
#include <vector>

#include "cumo/backend/ops.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/routing.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/core/activation.hpp"

namespace cumo::backend {

template <class B>
concept Backend = requires(const B& b, const Tensor& in, Tensor& out, const Tensor* opt_in, Tensor* opt_out,
                           const Shape& shape, Rng& rng, std::int64_t n, double d, float f, bool flag,
                           const std::vector<std::int64_t>& ids, const std::vector<std::int32_t>& i32s,
                           const std::vector<bool>* skip, const AttentionShape& attn, const CrossEntropyOptions& ce,
                           DispatchPlan& plan, const DispatchPlan& cplan, AuxLosses& aux, BalanceCounts counting,
                           AuxLossWeights coef, const std::vector<AdamWSlot>& slots, const AdamWHyper& hyper,
                           const std::vector<Tensor>& grads) {
  // identity
  { B::device } -> std::convertible_to<Device>;
  { B::name } -> std::convertible_to<const char*>;
  { B::capabilities } -> std::convertible_to<Capabilities>;

  // memory: tensors of this backend, host ↔ backend, scalar reads (a host sync on a device)
  { b.empty(shape, DType::f32) } -> std::same_as<Tensor>;
  { b.zeros(shape, DType::f32) } -> std::same_as<Tensor>;
  { b.upload(in) } -> std::same_as<Tensor>;
  { b.upload_i32(i32s) } -> std::same_as<Tensor>;
  { b.to_host(in) } -> std::same_as<Tensor>;
  { b.convert(in, DType::f32) } -> std::same_as<Tensor>;  // f32 / bf16 / f16, contiguous, on the backend's device
  { b.item(in) } -> std::convertible_to<float>;
  { b.all_finite(in) } -> std::convertible_to<bool>;

  // elementwise and row-block copies
  b.add(in, in, out);
  b.multiply(in, in, out);
  b.scale(out, f);
  b.fill_uniform(out, rng, f, f);
  b.copy_blocks(in, n, n, out, n, n, n, n);
  b.add_blocks(in, n, n, out, n, n, n, n);

  // dense linear (forward, backward, and the two backward GEMMs alone)
  b.linear(in, in, opt_in, out);
  b.linear_backward(in, in, in, out, opt_out, out);
  b.linear_dinput(in, in, out, flag);
  b.linear_dweight(in, in, out);

  // norms, RoPE, attention (causal and bidirectional, GQA, padding mask, KV-cache decode), embeddings, S² pooling
  b.layernorm_forward(in, in, in, d, out, out);
  b.layernorm_backward(in, in, in, in, out, out, out);
  b.rmsnorm_forward(in, in, d, out, out);
  b.rmsnorm_backward(in, in, in, in, out, out);
  b.rope(in, in, in, n, flag, out);
  b.attention_forward(in, in, in, opt_in, attn, out, opt_out);
  b.attention_backward(in, in, in, opt_in, in, in, in, attn, out, out, out);
  b.embedding_forward(in, ids, out);
  b.embedding_backward(in, ids, out, skip);
  b.vit_embeddings(in, in, in, n, out);
  b.vit_embeddings_backward(in, n, out, out, out);
  b.s2_pool_tiles(in, n, n, n, out);
  b.s2_pool_tiles_backward(in, n, n, n, out);

  // activations: elementwise, fused [gate | up] (experts), gate and up apart (dense FFN)
  b.template activation_forward<QuickGELU>(in, n, out);
  b.template activation_backward<QuickGELU>(in, in, n, out);
  b.template glu_forward<SiLU>(in, n, out);
  b.template glu_backward<SiLU>(in, in, n, out);
  b.template gated_forward<SiLU>(in, in, out);
  b.template gated_backward<SiLU>(in, in, in, out, out);

  // the one cross-entropy (the causal-LM loss is it on shifted labels)
  { b.cross_entropy(in, in, opt_out, ce) } -> std::same_as<CrossEntropyResult>;

  // router: softmax + top-k, its backward, softmax backward, balance and z losses
  b.softmax_topk(in, out, out, out, flag);
  b.topk_weights_backward(in, in, in, in, flag, out);
  b.softmax_backward(in, in, out);
  b.aux_losses(in, in, in, n, aux);
  b.aux_losses_backward(in, in, in, n, counting, coef, out, out);

  // dispatch and experts
  b.make_plan(in, plan);
  b.gather_rows(in, cplan, out);
  b.combine(in, in, cplan, out);
  b.combine_backward(in, in, in, cplan, out, out);
  b.scatter_add_rows(in, cplan, out);
  b.grouped_linear(in, in, opt_in, cplan, out);
  b.grouped_linear_dinput(in, in, cplan, out);
  b.grouped_linear_dweight(in, in, cplan, out, opt_out);

  // optimizer: AdamW, global gradient norm and clipping (results stay on the backend's device)
  b.adamw_step(slots, hyper);
  { b.clip_grad_norm(grads, d) } -> std::same_as<Tensor>;
  { b.grad_norm(grads) } -> std::same_as<Tensor>;
};

}  // namespace cumo::backend
