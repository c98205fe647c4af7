#pragma once
// LLaVA-MoD's model parts on top of nn::DecoderLM (docs/llava_mod.md):
//
//   make_sparse_student(lm, E, k, rng)   upcycles the FFNs of layers 0, 2, 4, … (or any list) into top-k-of-E
//                                        SparseMoE blocks in place: every expert an exact copy of the dense FFN,
//                                        a fresh router (PyTorch Linear init), top-1 balance counting (DeepSpeed /
//                                        Switch l_aux), optional capacity factor with DeepSpeed semantics.
//   eval_logits(teacher, ids, B, T)      the teacher's forward in eval mode: on the CPU nothing is kept for a
//                                        backward (no layer input, no attention probabilities); the only buffers that
//                                        outlive one layer are the residual stream and the logits. On a device it
//                                        overwrites the layers' saved state: not between a StudentPass forward and
//                                        backward of the same model.
//   StudentPass(student)                 forward / backward of a DecoderLM under an EXTERNAL loss on its logits (the
//                                        distillation losses of train/distill.hpp), with the MoE aux loss as
//                                        LLaVA-MoD sums it: each sparse layer's own balance loss, summed over layers
//                                        (and over `segments`, the independent forwards a batch concatenates —
//                                        chosen and rejected in preference distillation).
//
// None of this re-codes the decoder: StudentPass and eval_logits call DecoderLM's own layer walk
// (forward_layers / backward_layers / infer_layers) and LM head, so the arithmetic is the DecoderLM's.
//
// Every function takes a DecoderLM on any backend. On a device backend the logits StudentPass and eval_logits return
// are device tensors; the losses of train/distill.hpp run on host copies of them (`to_host`) and their dlogits go
// back with `upload` — an (N, V) copy each way per step, the price of one loss code.
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/core/rng.hpp"
#include "cumo/moe.hpp"
#include "cumo/nn/decoder.hpp"

namespace cumo::models {

// The student's sparse blocks: renormalised top-k, balance counted on first choices (the l_aux of DeepSpeed-MoE that
// LLaVA-MoD trains with); capacity_factor > 0 gives DeepSpeed's capacity ceil(k · tokens · cf / E) per expert, the
// overflow tokens getting 0 from the block (only the residual passes them on).
inline SparseMoEOptions mod_moe_options(float capacity_factor = 0.f) {
  SparseMoEOptions o;
  o.renormalize = true;
  o.balance = BalanceCounts::top1;
  o.capacity_factor = capacity_factor;
  return o;
}

// 0, 2, 4, … below `layers` (LLaVA-MoD's "every other layer").
inline std::vector<int> every_other_layer(std::int64_t layers) {
  std::vector<int> l;
  for (std::int64_t i = 0; i < layers; i += 2) l.push_back(int(i));
  return l;
}

// Upcycles, in place, the FFN of every listed layer (default: every_other_layer) into a top_k-of-`experts` SparseMoE
// whose experts are exact copies of that FFN and whose router is fresh (drawn from `rng`). Parameter names become
// HF's "<layer>.mlp.experts.gate_up_proj" / ".experts.down_proj" / ".mlp.gate.weight" (load_hf also reads the
// per-expert "...experts.{e}.{gate,up,down}_proj.weight" form). Returns the layers it upcycled. At upcycling the
// student's logits equal the dense student's (the renormalised top-k weights sum to 1).
template <class Backend>
std::vector<int> make_sparse_student(nn::DecoderLM<Backend>& lm, int experts, int top_k, Rng& rng,
                                            std::vector<int> layers = {}, SparseMoEOptions options = mod_moe_options()) {
  constexpr const char* where = "make_sparse_student";
  if (layers.empty()) layers = every_other_layer(std::int64_t(lm.layers.size()));
  CUMO_CHECK(experts >= 1 && top_k >= 1 && top_k <= experts, where, ": need 1 <= top_k <= experts, got top_k = ",
             top_k, ", experts = ", experts);
  for (int l : layers) {
    CUMO_CHECK(l >= 0 && l < int(lm.layers.size()), where, ": layer ", l, " is outside [0, ", lm.layers.size(), ")");
    CUMO_CHECK(!lm.layers[std::size_t(l)].mlp.is_sparse(), where, ": layer ", l, "'s FFN is already sparse");
  }
  for (int l : layers) lm.layers[std::size_t(l)].mlp.upcycle(experts, top_k, rng, options);
  return layers;
}

// LLaVA-MoD's default trainable set in the distillation stages: the FFNs (experts) and routers of the LLM; attention,
// norms and embeddings frozen. Sets Parameter::trainable on every parameter of `lm`; returns how many train.
template <class Backend>
std::size_t train_only_ffn(nn::DecoderLM<Backend>& lm) {
  for (Parameter* p : lm.parameters()) p->trainable = false;
  std::size_t n = 0;
  for (auto& L : lm.layers) {
    ParameterList ps;
    L.mlp.collect(ps);
    for (Parameter* p : ps) {
      p->trainable = true;
      ++n;
    }
  }
  return n;
}

inline std::int64_t parameter_count(const ParameterList& ps) {
  std::int64_t n = 0;
  for (const Parameter* p : ps) n += p->value.numel();
  return n;
}
// Bytes of the values (and, with_grads, of the gradient buffers every Parameter carries).
inline std::int64_t parameter_bytes(const ParameterList& ps, bool with_grads = false) {
  std::int64_t n = 0;
  for (const Parameter* p : ps) n += std::int64_t(p->value.nbytes()) + (with_grads ? std::int64_t(p->grad.nbytes()) : 0);
  return n;
}

// ---- the teacher: eval-mode forward -------------------------------------------------------------------------------
// x (B·T, H) → logits (B·T, V), keeping nothing for a backward: DecoderLM::infer_layers, each layer's attention a
// prefill into a KV cache that lives for that layer only (the same scores, softmax and sums as the training
// forward), dense FFNs without their saved activations. A sparse FFN in the teacher runs its forward with training
// off (its router output and dispatch plan stay in the block until its next forward). Bitwise the logits of
// DecoderLM::forward on the same input. key_valid (B·T): 0 marks a padding key.
template <class Backend>
Tensor eval_logits_embeds(nn::DecoderLM<Backend>& m, const Tensor& x, std::int64_t B, std::int64_t T,
                          const std::vector<std::uint8_t>* key_valid = nullptr) {
  constexpr const char* where = "eval_logits";
  const Tensor h = nn::check_input(where, "inputs_embeds", x, m.config().hidden, Backend::device);
  CUMO_CHECK(h.size(0) == B * T, where, ": inputs_embeds has shape ", h.shape(), " but B = ", B, ", T = ", T);
  return m.head(m.norm.apply(m.infer_layers(h, B, T, nullptr, key_valid)));  // (B·T, V)
}
template <class Backend>
Tensor eval_logits(nn::DecoderLM<Backend>& m, const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T,
                   const std::vector<std::uint8_t>* key_valid = nullptr) {
  CUMO_CHECK(std::int64_t(ids.size()) == B * T, "eval_logits: ", ids.size(), " ids for B = ", B, ", T = ", T);
  return eval_logits_embeds(m, m.embed_tokens.apply(ids), B, T, key_valid);
}
// The teacher's logits on the host, where train/distill.hpp's losses run.
template <class Backend>
Tensor eval_logits_host(nn::DecoderLM<Backend>& m, const std::vector<std::int64_t>& ids, std::int64_t B,
                        std::int64_t T, const std::vector<std::uint8_t>* key_valid = nullptr) {
  return m.backend().to_host(eval_logits(m, ids, B, T, key_valid));
}

// ---- the student: forward / backward under an external loss -------------------------------------------------------
template <backend::Backend Backend = backend::Cpu>
class StudentPass {
 public:
  using Model = nn::DecoderLM<Backend>;
  explicit StudentPass(Model& m) : m_(&m) {}

  struct Output {
    Tensor logits;                   // (B·T, V) on the model's device
    double aux = 0;                  // Σ over sparse layers and segments of the block's balance loss (its counting)
    double z = 0;                    // Σ over sparse layers and segments of the block's z-loss
    std::vector<double> aux_layers;  // per sparse layer, in layer order (summed over segments)
  };

  Model& model() { return *m_; }

  // ids (B·T); `segments` splits the rows into that many equal consecutive parts, each a forward of its own for
  // the aux losses (LLaVA-MoD's aux_chosen + aux_rejected when chosen and rejected are concatenated).
  Output forward(const std::vector<std::int64_t>& ids, std::int64_t B, std::int64_t T, std::int64_t segments = 1,
                 const std::vector<std::uint8_t>* key_valid = nullptr) {
    CUMO_CHECK(std::int64_t(ids.size()) == B * T, "StudentPass::forward: ", ids.size(), " ids for B = ", B, ", T = ", T);
    embedded_ = true;
    return run(m_->embed_tokens.forward(ids), B, T, segments, key_valid);
  }
  // x (B·T, H): embeddings built by the caller (a multimodal model writes image features into them).
  Output forward_embeds(const Tensor& x, std::int64_t B, std::int64_t T, std::int64_t segments = 1,
                        const std::vector<std::uint8_t>* key_valid = nullptr) {
    embedded_ = false;
    return run(x, B, T, segments, key_valid);
  }

  // dlogits (B·T, V) f32 on the model's device = d objective / d logits; `aux` = the objective's coefficients of
  // Output::aux and Output::z. Accumulates every parameter gradient except the embedding table's rows and returns
  // d inputs_embeds.
  Tensor backward(const Tensor& dlogits, AuxLossWeights aux = {}) {
    constexpr const char* where = "StudentPass::backward";
    CUMO_CHECK(hn_.defined(), where, ": no saved forward (one backward per forward)");
    Model& m = *m_;
    const Tensor dl = nn::check_input(where, "dlogits", dlogits, m.config().vocab, Backend::device);
    CUMO_CHECK(dl.size(0) == hn_.size(0), where, ": dlogits has shape ", dl.shape(), " but the forward had ",
               hn_.size(0), " rows");
    const Tensor dh = m.norm.backward(m.head_backward(dl, hn_));  // (N, H)
    hn_ = Tensor();
    // the block averages its segments' losses; LLaVA-MoD adds them, so each block sees segments × the coefficient
    const AuxLossWeights per_block{float(double(aux.balance) * double(segments_)), float(double(aux.z) * double(segments_))};
    return m.backward_layers(dh, per_block);
  }
  // backward() and then the embedding table (only after forward(ids)).
  void backward_all(const Tensor& dlogits, AuxLossWeights aux = {}) {
    CUMO_CHECK(embedded_, "StudentPass::backward_all: the last forward took embeddings, not ids (call backward() "
                          "and route d inputs_embeds yourself)");
    m_->embed_tokens.backward(backward(dlogits, aux));
  }

 private:
  Output run(const Tensor& x, std::int64_t B, std::int64_t T, std::int64_t segments,
             const std::vector<std::uint8_t>* key_valid) {
    constexpr const char* where = "StudentPass::forward";
    Model& m = *m_;
    const Tensor h = nn::check_input(where, "inputs_embeds", x, m.config().hidden, Backend::device);
    CUMO_CHECK(h.size(0) == B * T, where, ": inputs_embeds has shape ", h.shape(), " but B = ", B, ", T = ", T);
    CUMO_CHECK(segments >= 1 && B % segments == 0, where, ": ", B, " sequences do not split into ", segments,
               " equal segments");
    segments_ = segments;
    hn_ = m.norm.forward(m.forward_layers(h, nn::TokenLayout::make(m.backend(), B, T, key_valid), segments));
    Output out;
    out.logits = m.head(hn_);  // (B·T, V)
    for (const auto& L : m.layers) {
      if (!L.mlp.is_sparse()) continue;
      const AuxLosses& a = L.mlp.last_aux();
      const bool top1 = L.mlp.sparse().options().balance == BalanceCounts::top1;
      // the block reduces per segment and averages; LLaVA-MoD adds the forwards' losses (one host read each)
      const double bal = double(m.backend().item(top1 ? a.balance_top1 : a.balance_allk)) * double(segments);
      out.aux_layers.push_back(bal);
      out.aux += bal;
      out.z += double(m.backend().item(a.z)) * double(segments);
    }
    return out;
  }

  Model* m_;
  Tensor hn_;  // (N, H) final-norm output, for the head's gradient
  std::int64_t segments_ = 1;
  bool embedded_ = false;
};
// StudentPass pass(lm) takes lm's backend.
template <class Backend>
StudentPass(nn::DecoderLM<Backend>&) -> StudentPass<Backend>;

}  // namespace cumo::models
