#pragma once
// Dense MLPs and the slot that holds either one or a SparseMoE of the same expert type.
//   DenseMLP<Act, B>:      fc2(Act(fc1 x)), biases (CLIP: fc1/fc2, quick_gelu; LLaVA connector: linear_1/linear_2, GELU)
//   DenseGatedMLP<Act, B>: down(Act(gate x) ⊙ up x), no biases (Mistral / Qwen2 SwiGLU)
//   FeedForward<Dense, Sparse>: a std::variant of the two — how CuMo swaps every CLIP MLP and the connector for a
//   top-k MoE (`upcycle()`), and how a Mixtral layer is built directly sparse.
#include <cstdint>
#include <string>
#include <utility>
#include <utility>
#include <variant>

#include "cumo/moe.hpp"
#include "cumo/nn/linear.hpp"

namespace cumo::nn {

template <Activation Act, backend::Backend Backend = backend::Cpu>
class DenseMLP {
 public:
  using activation = Act;
  using expert_kind = cumo::MLP<Act>;
  using backend_type = Backend;

  DenseMLP() = default;
  // names of the two linears inside `name`: CLIP "fc1"/"fc2", llava-hf's projector "linear_1"/"linear_2"
  DenseMLP(const std::string& name, std::int64_t hidden, std::int64_t ffn, std::int64_t out = 0,
           const std::string& n1 = "fc1", const std::string& n2 = "fc2", Backend backend = {})
      : fc1(name + "." + n1, hidden, ffn, true, backend),
        fc2(name + "." + n2, ffn, out ? out : hidden, true, backend),
        be_(std::move(backend)) {}

  Linear<Backend> fc1, fc2;

  std::int64_t hidden() const { return fc1.in_features(); }
  std::int64_t ffn() const { return fc1.out_features(); }
  const Backend& backend() const { return be_; }
  void collect(ParameterList& out) {
    fc1.collect(out);
    fc2.collect(out);
  }
  DenseMLPWeights weights() const { return {fc1.weight.value, fc1.bias.value, fc2.weight.value, fc2.bias.value}; }

  Tensor forward(const Tensor& x) {
    h_ = fc1.forward(x);  // (N, F)
    Tensor a = be_.empty(h_.shape());
    be_.template activation_forward<Act>(h_, h_.size(0), a);  // (N, F)
    return fc2.forward(a);                                    // (N, out)
  }
  Tensor apply(const Tensor& x) const {
    const Tensor h = fc1.apply(x);  // (N, F)
    Tensor a = be_.empty(h.shape());
    be_.template activation_forward<Act>(h, h.size(0), a);  // (N, F)
    return fc2.apply(a);                                    // (N, out)
  }
  void release_activations() {  // drops what forward() saved
    h_ = Tensor();
    fc1.release_activations();
    fc2.release_activations();
  }
  Tensor backward(const Tensor& dy) {
    Tensor da = fc2.backward(dy);                                      // (N, F)
    be_.template activation_backward<Act>(h_, da, da.size(0), da);     // in place: dh = da ⊙ Act'(h)
    return fc1.backward(da);                                           // (N, H)
  }

 private:
  [[no_unique_address]] Backend be_;
  Tensor h_;  // (N, F) pre-activation
};

template <Activation Act, backend::Backend Backend = backend::Cpu>
class DenseGatedMLP {
 public:
  using activation = Act;
  using expert_kind = cumo::GatedMLP<Act>;
  using backend_type = Backend;

  DenseGatedMLP() = default;
  DenseGatedMLP(const std::string& name, std::int64_t hidden, std::int64_t ffn, Backend backend = {})
      : gate_proj(name + ".gate_proj", hidden, ffn, false, backend),
        up_proj(name + ".up_proj", hidden, ffn, false, backend),
        down_proj(name + ".down_proj", ffn, hidden, false, backend),
        be_(std::move(backend)) {}

  Linear<Backend> gate_proj, up_proj, down_proj;

  std::int64_t hidden() const { return gate_proj.in_features(); }
  std::int64_t ffn() const { return gate_proj.out_features(); }
  const Backend& backend() const { return be_; }
  void collect(ParameterList& out) {
    gate_proj.collect(out);
    up_proj.collect(out);
    down_proj.collect(out);
  }
  DenseGatedWeights weights() const { return {gate_proj.weight.value, up_proj.weight.value, down_proj.weight.value}; }

  Tensor forward(const Tensor& x) {
    g_ = gate_proj.forward(x);  // (N, F)
    u_ = up_proj.forward(x);    // (N, F)
    Tensor a = be_.empty(g_.shape());
    be_.template gated_forward<Act>(g_, u_, a);  // (N, F)
    return down_proj.forward(a);                 // (N, H)
  }
  Tensor apply(const Tensor& x) const {
    const Tensor g = gate_proj.apply(x), u = up_proj.apply(x);  // (N, F) ×2
    Tensor a = be_.empty(g.shape());
    be_.template gated_forward<Act>(g, u, a);  // (N, F)
    return down_proj.apply(a);                 // (N, H)
  }
  void release_activations() {  // drops what forward() saved
    g_ = u_ = Tensor();
    for (auto* l : {&gate_proj, &up_proj, &down_proj}) l->release_activations();
  }
  Tensor backward(const Tensor& dy) {
    const Tensor da = down_proj.backward(dy);  // (N, F)
    Tensor dg = be_.empty(da.shape()), du = be_.empty(da.shape());
    be_.template gated_backward<Act>(g_, u_, da, dg, du);  // (N, F) ×2
    Tensor dx = gate_proj.backward(dg);
    add_(be_, dx, up_proj.backward(du));
    return dx;  // (N, H)
  }

 private:
  [[no_unique_address]] Backend be_;
  Tensor g_, u_;  // (N, F) gate and up pre-activations
};

// A dense MLP or a SparseMoE whose experts are that MLP's kind. Parameter names: the dense MLP's own, or
// "<name>.gate.weight" / "<name>.experts.<...>" for the sparse block (HF's Mixtral naming, fused experts).
template <class Dense, class Sparse>
class FeedForward {
  static_assert(std::is_same_v<typename Sparse::expert_type, Expert<typename Dense::expert_kind>>,
                "FeedForward<Dense, Sparse>: the sparse block's experts must be of the dense MLP's kind "
                "(DenseMLP<A> pairs with Expert<MLP<A>>, DenseGatedMLP<A> with Expert<GatedMLP<A>>)");
  static_assert(std::is_same_v<typename Sparse::backend_type, typename Dense::backend_type>,
                "FeedForward<Dense, Sparse>: the dense MLP and the sparse block must share a backend");

 public:
  using dense_type = Dense;
  using sparse_type = Sparse;

  FeedForward() = default;
  FeedForward(std::string name, Dense dense) : name_(std::move(name)), impl_(std::move(dense)) {}
  FeedForward(std::string name, Sparse sparse) : name_(std::move(name)), impl_(std::move(sparse)) { rename(); }

  bool is_sparse() const { return std::holds_alternative<Sparse>(impl_); }
  Dense& dense() { return std::get<Dense>(impl_); }
  Sparse& sparse() { return std::get<Sparse>(impl_); }
  const Sparse& sparse() const { return std::get<Sparse>(impl_); }
  const std::string& name() const { return name_; }

  // Replace the dense MLP by a top-k MoE whose every expert is a copy of it (CuMo stage 3), fresh seeded router.
  void upcycle(int experts, int k, Rng& rng, SparseMoEOptions options = {}) {
    CUMO_CHECK(!is_sparse(), "FeedForward::upcycle (", name_, "): already sparse");
    impl_ = upcycle_from_dense<Sparse>(dense().weights(), experts, rng, options,
                                       typename Sparse::topk_type{make_topk(k)}, dense().backend());
    rename();
  }

  void collect(ParameterList& out) {
    if (is_sparse())
      for (Parameter* p : sparse().parameters()) out.push_back(p);
    else
      dense().collect(out);
  }

  // x (N, H) → (N, H). For a sparse block the aux losses of this call are kept in last_aux(). With
  // args.training false a dense MLP keeps nothing for a backward (a sparse block keeps its routing, for load()).
  Tensor forward(const Tensor& x, ForwardArgs args = {}) {
    if (!is_sparse()) return args.training ? dense().forward(x) : dense().apply(x);
    auto out = sparse().forward(x, args);
    aux_ = out.aux;
    return out.y;
  }
  // router_dlogits: an extra gradient on a sparse block's router logits (SparseMoE::backward).
  Tensor backward(const Tensor& dy, AuxLossWeights aux = {}, const Tensor* router_dlogits = nullptr) {
    if (is_sparse()) return sparse().backward(dy, aux, router_dlogits);
    CUMO_CHECK(!router_dlogits, "FeedForward::backward (", name_, "): router gradients for a dense MLP");
    return dense().backward(dy);
  }
  const AuxLosses& last_aux() const { return aux_; }
  // A sparse block whose output nobody reads: its routing and aux losses only (SparseMoE::forward_routing), and
  // their gradient to x (backward_routing).
  void forward_routing(const Tensor& x, ForwardArgs args = {}) {
    CUMO_CHECK(is_sparse(), "FeedForward::forward_routing (", name_, "): a dense MLP has no routing");
    aux_ = sparse().forward_routing(x, args);
  }
  Tensor backward_routing(AuxLossWeights aux = {}) { return sparse().backward_routing(aux); }

  // ---- expert parallelism of a sparse block (SparseMoE::shard_experts); a dense MLP has nothing to shard ------
  // Shards the experts over `group` and appends their parameters (now the local slices) to `sharded`.
  void shard_experts(dist::Communicator& group, ParameterList& sharded) {
    if (!is_sparse()) return;
    sparse().shard_experts(group);
    for (Parameter* p : sparse().experts().parameters()) sharded.push_back(p);
  }
  void unshard_experts() {
    if (experts_sharded()) sparse().unshard_experts();
  }
  bool experts_sharded() const { return is_sparse() && sparse().experts_sharded(); }
  // A rank with no token for this block (no image in its rows) still serves its experts to the group's others: the
  // block's forward and backward on zero rows, called where a rank with tokens calls forward and backward.
  void serve_experts_forward(bool training = true) {
    if (!experts_sharded()) return;
    forward(sparse().backend().empty({0, sparse().hidden()}), ForwardArgs{1, training});
  }
  void serve_experts_backward(AuxLossWeights aux = {}) {
    if (experts_sharded()) backward(sparse().backend().zeros({0, sparse().out_features()}), aux);
  }

  // Drops what forward() saved for a backward (a sparse block keeps its routing plan, for load()).
  void release_activations() {
    if (is_sparse())
      sparse().release_activations();
    else
      dense().release_activations();
  }

 private:
  static auto make_topk(int k) {
    using P = typename Sparse::topk_type;
    if constexpr (P::compile_time_k == 0) {
      return P{k};
    } else {
      CUMO_CHECK(k == P::compile_time_k, "FeedForward::upcycle: this block is TopK<", P::compile_time_k,
                 ">, asked for k = ", k);
      return P{};
    }
  }
  void rename() {
    for (Parameter* p : sparse().parameters())
      if (!p->name.starts_with(name_ + ".")) p->name = name_ + "." + p->name;
  }

  std::string name_;
  std::variant<Dense, Sparse> impl_;
  AuxLosses aux_;
};

// Expert parallelism over a stack of layers that each hold a FeedForward `mlp` (ClipVision, DecoderLM): every
// sparse layer's experts over `group`; returns the sharded parameters (the local slices).
template <class Layers>
ParameterList shard_layer_experts(Layers& layers, dist::Communicator& group) {
  ParameterList sharded;
  for (auto& l : layers) l.mlp.shard_experts(group, sharded);
  return sharded;
}
template <class Layers>
void unshard_layer_experts(Layers& layers) {
  for (auto& l : layers) l.mlp.unshard_experts();
}
template <class Layers>
bool layer_experts_sharded(const Layers& layers) {
  for (const auto& l : layers)
    if (l.mlp.experts_sharded()) return true;
  return false;
}

}  // namespace cumo::nn
