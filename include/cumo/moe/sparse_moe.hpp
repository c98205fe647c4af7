#pragma once
// SparseMoE<Router, Expert, Backend>: the sparse block y_t = Σ_k w_tk · Expert_{e_tk}(x_t), with its auxiliary
// losses and an explicit backward. The forward saves what the backward needs; one backward per forward.
//
//   x (T, H) ─ router ─→ logits (T, E) → probs → top-k idx, w (T, K)
//            ─ plan (counting sort of the T·K choices by expert) → gather → xs (rows, H)
//            ─ experts (grouped GEMMs over expert-contiguous rows) → out (rows, H)
//            ─ combine (each token sums its k weighted rows, slot order) → y (T, H)
// Every step is one operation of the block's backend (backend/contract.hpp), held as an instance: a backend with
// state (backend::Cuda's precision, GEMM algorithm, sync policy and workspace) configures this block alone.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "cumo/backend/contract.hpp"
#include "cumo/backend/cpu.hpp"
#include "cumo/core/parameter.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/core/routing.hpp"
#include "cumo/dist/expert_parallel.hpp"
#include "cumo/moe/expert.hpp"
#include "cumo/moe/router.hpp"

namespace cumo {

struct SparseMoEOptions {
  bool renormalize = true;                      // w / Σ w over the chosen k (Mixtral, CuMo)
  BalanceCounts balance = BalanceCounts::top1;  // which counts the balance loss's gradient uses
  float capacity_factor = 0.f;                  // 0 = dropless; else capacity = ceil(k · T · cf / E) per expert
  std::int64_t min_capacity = 0;                // lower bound on the capacity when one is set
  float jitter = 0.f;                           // router input jitter while training
  bool check_finite = true;                     // reject NaN/Inf in x (costs one pass over x)
};

struct ForwardArgs {
  std::int64_t segments = 1;  // images in the batch: aux losses are reduced per image, then averaged (CuMo)
  bool training = true;
};

namespace detail {
// The dtype of an activation at the block's door: f32, bf16 or f16, widened to fp32 on entry (the block computes in
// fp32; Backend::convert, on the backend's device) and the result narrowed back to it.
inline DType activation_dtype(std::string_view where, std::string_view name, const Tensor& t) {
  const DType d = t.dtype();
  CUMO_CHECK(d == DType::f32 || d == DType::bf16 || d == DType::f16, where, ": ", name, " has dtype ", name_of(d),
             " but expected f32, bf16 or f16");
  return d;
}
}  // namespace detail

template <class RouterT, class ExpertT, class Backend = backend::Cpu>
class SparseMoE {
  static_assert(is_router<RouterT>::value,
                "SparseMoE<Router, Expert, Backend>: the first argument must be a Router<TopK<K>>");
  static_assert(is_expert<ExpertT>::value,
                "SparseMoE<Router, Expert, Backend>: the second argument must be Expert<MLP<Act>> or "
                "Expert<GatedMLP<Act>>");
  static_assert(backend::Backend<Backend>,
                "SparseMoE<Router, Expert, Backend>: the third argument must implement the backend contract "
                "(backend/contract.hpp), e.g. backend::Cpu or backend::Cuda");

 public:
  using router_type = RouterT;
  using expert_type = ExpertT;
  using backend_type = Backend;
  using topk_type = typename RouterT::topk_type;

  struct Output {
    Tensor y;        // (T, O), O = out_features (= H unless set)
    AuxLosses aux;   // balance (both countings) and z-loss of this forward
  };

  // out_features = 0: the block maps hidden → hidden; else hidden → out_features (a connector). `backend` runs
  // every operation of the block (a copy of a stateful backend shares its state).
  SparseMoE(std::int64_t hidden, std::int64_t ffn, int experts, SparseMoEOptions options = {},
            topk_type topk = {}, std::int64_t out_features = 0, Backend backend = {})
      : router_(hidden, experts, topk, RouterOptions{options.renormalize, options.jitter}, Backend::device),
        experts_(experts, hidden, ffn, Backend::device, out_features),
        options_(options),
        be_(std::move(backend)) {
    const DType wt = parameter_storage().weights;  // the experts' weights were made in it
    if (wt != DType::f32)
      backend::require<Backend>(wt == DType::bf16 ? Backend::capabilities.bf16_weights
                                                  : Backend::capabilities.f16_weights,
                                "SparseMoE", std::string(name_of(wt)) + " expert weights");
    CUMO_CHECK(ffn >= 1, "SparseMoE: ffn must be positive, got ", ffn);
    CUMO_CHECK(options.capacity_factor >= 0.f, "SparseMoE: capacity_factor must be >= 0, got ",
               options.capacity_factor);
  }

  // Fresh weights: PyTorch nn.Linear default init for every expert and the router.
  void reset_parameters(Rng& rng) {
    experts_.reset_parameters(rng);
    router_.reset_parameters(rng);
  }

  RouterT& router() { return router_; }
  const RouterT& router() const { return router_; }
  ExpertT& experts() { return experts_; }
  const ExpertT& experts() const { return experts_; }
  const SparseMoEOptions& options() const { return options_; }
  const Backend& backend() const { return be_; }
  std::int64_t hidden() const { return router_.hidden(); }
  std::int64_t out_features() const { return experts_.out_features(); }
  int num_experts() const { return router_.experts(); }
  int top_k() const { return router_.k(); }

  ParameterList parameters() {
    ParameterList p = experts_.parameters();
    p.push_back(&router_.weight);
    return p;
  }
  void zero_grad() { cumo::zero_grad(parameters()); }

  // ---- expert parallelism (dist/expert_parallel.hpp) --------------------------------------------------------
  // Keeps only this rank's E/K experts of an expert-parallel group of K ranks (rank r: experts [r·E/K, (r+1)·E/K),
  // their current weights) and from now on sends every routed row to the rank holding its expert and back. The
  // router stays whole. Every rank of `group` calls it, on the same weights; dropless. A GPU block needs a group
  // whose engine moves device memory (NCCL; unverified: never run on a GPU). After it the experts' parameters are
  // the local slice: their gradients are this rank's experts' over the whole group's tokens.
  void shard_experts(dist::Communicator& group) {
    dist::check_engine_moves(group, "SparseMoE::shard_experts", Backend::device);
    CUMO_CHECK(options_.capacity_factor <= 0.f, "SparseMoE::shard_experts: expert parallelism is dropless; this "
               "block has capacity_factor ", options_.capacity_factor);
    CUMO_CHECK(!ep_, "SparseMoE::shard_experts: the experts are sharded already");
    dist::ExpertExchange ep(group, num_experts());
    ExpertT local(ep.local_experts(), hidden(), experts_.ffn(), Backend::device, out_features());
    const ParameterList whole = experts_.parameters(), mine = local.parameters();
    for (std::size_t i = 0; i < whole.size(); ++i)
      mine[i]->value.copy_from(whole[i]->value.slice(0, ep.first_expert(), ep.first_expert() + ep.local_experts()));
    replace_experts(std::move(local));
    ep_.emplace(std::move(ep));
  }
  // The reverse of shard_experts: every rank of the group gets every expert's current weights (an all-gather of
  // the slices, in rank order) and the block runs alone again. Every rank of the group calls it. The gradients
  // start over at zero.
  void unshard_experts() {
    CUMO_CHECK(ep_, "SparseMoE::unshard_experts: the experts are not sharded");
    ExpertT whole(num_experts(), hidden(), experts_.ffn(), Backend::device, out_features());
    const ParameterList mine = experts_.parameters(), all = whole.parameters();
    for (std::size_t i = 0; i < mine.size(); ++i) dist::allgather_rows(ep_->group(), mine[i]->value, all[i]->value);
    replace_experts(std::move(whole));
    ep_.reset();
  }
  bool experts_sharded() const { return ep_.has_value(); }

  // ---- inference: the experts' weights packed once (backend/cpu/packed_weights.hpp) --------------------------
  // Lays the experts' fp32 weights out once the way oneDNN's matmul reads them best (here: transposed) for the
  // forward's grouped GEMMs, whose per-call packing from PyTorch's layout is slow at an expert's few rows
  // (docs/benchmarks.md: the Mixtral-like forward 0.81 → 0.98 of the best dense). For inference: a weight changed
  // afterwards (an optimizer step, a load) is noticed by a sampled check and read unpacked again — call it again
  // after an update. The backward reads the weights themselves.
  // Returns how many weights were packed: 0 in a build without oneDNN, or for bf16/f16 weights (their products
  // convert a block at a time instead). CPU backend.
  int prepack_experts() {
    CUMO_CHECK(Backend::device == Device::cpu, "SparseMoE::prepack_experts: packed weights are the CPU backend's "
               "(oneDNN); on the GPU, cuBLAS reads the weights as they are");
    int packed = 0;
    for (Parameter* p : experts_.parameters())
      if (p->value.dim() == 3 && p->value.dtype() == DType::f32) packed += cpu::prepack_weight(p->value) ? 1 : 0;
    return packed;
  }
  void release_packed_experts() {
    for (Parameter* p : experts_.parameters()) cpu::release_packed_weight(p->value);
  }
  const dist::ExpertExchange* expert_exchange() const { return ep_ ? &*ep_ : nullptr; }

  // ---- forward ----------------------------------------------------------------------------------------------
  Output forward(const Tensor& x, ForwardArgs args = {}, Rng* rng = nullptr) {
    const auto [xc, io] = route("SparseMoE::forward", x, args, rng);
    const std::int64_t T = xc.size(0);
    const int K = top_k();
    Output out;
    out.aux = saved_.aux;
    const DispatchPlan& plan = saved_.plan;
    saved_.xs = be_.empty({T * K, hidden()});
    saved_.out = be_.empty({T * K, out_features()});
    be_.gather_rows(xc, plan, saved_.xs);                                  // (rows, H)
    if (ep_) {
      // rows → their experts' ranks, the local experts, and back (dist/expert_parallel.hpp)
      ep_->dispatch(saved_.xs, plan, saved_.ep);                                           // (rows_local, H)
      Tensor out_local = be_.empty({saved_.ep.local.rows(), out_features()});
      experts_.forward(be_, saved_.ep.xs_local, saved_.ep.local, saved_.experts, out_local);  // (rows_local, O)
      saved_.out = ep_->to_senders(out_local, saved_.ep);                                  // (rows, O)
    } else {
      experts_.forward(be_, saved_.xs, plan, saved_.experts, saved_.out);  // (rows, O)
    }
    out.y = be_.empty({T, out_features()});
    be_.combine(saved_.out, saved_.router.topk_w, plan, out.y);            // (T, O)
    saved_.valid = true;
    if (io != DType::f32) out.y = be_.convert(out.y, io);
    return out;
  }

  // ---- routing only ----------------------------------------------------------------------------------------
  // The router, its aux losses and the dispatch plan (for load()) of x, without the experts: for a block whose
  // output nobody reads but whose aux losses count (CuMo's CLIP layer above the feature layer, which HF runs).
  // backward_routing() then gives d x of the aux losses: what backward() of a zero dy gives, bit for bit, without
  // the experts' products (on zero rows) or the exchange of rows (no expert runs, so no rank sends any).
  AuxLosses forward_routing(const Tensor& x, ForwardArgs args = {}, Rng* rng = nullptr) {
    route("SparseMoE::forward_routing", x, args, rng);
    saved_.routing_only = true;
    saved_.valid = true;
    return saved_.aux;
  }
  Tensor backward_routing(AuxLossWeights aux = {}) {
    constexpr const char* where = "SparseMoE::backward_routing";
    CUMO_CHECK(saved_.valid && saved_.routing_only, where, ": no saved forward_routing (one backward per forward)");
    Tensor dx = be_.zeros({saved_.plan.tokens, hidden()});  // (T, H)
    router_backward(nullptr, aux, nullptr, dx);
    return saved_.io == DType::f32 ? dx : be_.convert(dx, saved_.io);
  }

  // ---- backward ---------------------------------------------------------------------------------------------
  // dy (T, O) = d objective / d y; `aux` = the coefficients of the balance and z losses in the objective.
  // router_dlogits (T, E), optional: d objective / d router logits of a loss the caller computed from
  // router_output() (HF Mixtral's balance loss over all layers), added before the router's own backward.
  // Accumulates every parameter gradient and returns d objective / d x (T, H).
  Tensor backward(const Tensor& dy, AuxLossWeights aux = {}, const Tensor* router_dlogits = nullptr) {
    constexpr const char* where = "SparseMoE::backward";
    CUMO_CHECK(saved_.valid && !saved_.routing_only, where, ": no saved forward (call forward first; one backward "
               "per forward; after forward_routing, backward_routing)");
    check_device(where, "dy", dy, Backend::device);
    const DType io = detail::activation_dtype(where, "dy", dy);  // dx comes back in dy's dtype
    CUMO_CHECK(dy.dim() == 2 && dy.size(0) == saved_.plan.tokens && dy.size(1) == out_features(), where,
               ": dy has shape ", dy.shape(), " but y has shape ", Shape{saved_.plan.tokens, out_features()});
    const Tensor dyc = be_.convert(dy, DType::f32);
    const DispatchPlan& plan = saved_.plan;
    const RouterOutput& r = saved_.router;
    const std::int64_t T = plan.tokens, H = hidden();
    const int E = num_experts(), K = top_k();

    if (router_dlogits) {
      check_device(where, "router_dlogits", *router_dlogits, Backend::device);
      check_shape(where, "router_dlogits", *router_dlogits, {T, E});
    }

    // combine: d out rows and d topk weights
    Tensor dout = be_.empty({T * K, out_features()});
    Tensor dw = be_.empty({T, K});
    be_.combine_backward(dyc, saved_.out, r.topk_w, plan, dout, dw);  // (rows, O), (T, K)

    // experts, then the gather's transpose: every token sums its k row gradients
    Tensor dxs = be_.empty({T * K, H});
    if (ep_) {
      const Tensor dout_local = ep_->to_local(dout, saved_.ep);  // (rows_local, O)
      Tensor dxs_local = be_.empty({saved_.ep.local.rows(), H});
      experts_.backward(be_, saved_.ep.xs_local, dout_local, saved_.ep.local, saved_.experts, dxs_local);
      dxs = ep_->to_senders(dxs_local, saved_.ep);  // (rows, H)
    } else {
      experts_.backward(be_, saved_.xs, dout, plan, saved_.experts, dxs);  // (rows, H)
    }
    Tensor dx = be_.zeros({T, H});
    be_.scatter_add_rows(dxs, plan, dx);  // (T, H)

    router_backward(&dw, aux, router_dlogits, dx);
    return io == DType::f32 ? dx : be_.convert(dx, io);
  }

  // ---- what the last forward did ----------------------------------------------------------------------------
  const RouterOutput& router_output() const { return saved_.router; }
  const DispatchPlan& plan() const { return saved_.plan; }
  ExpertLoad load() const {
    ExpertLoad l;
    if (!saved_.plan.counts.defined()) return l;
    const Tensor counts = be_.to_host(saved_.plan.counts);
    const Tensor demand = be_.to_host(saved_.plan.demand);
    for (int e = 0; e < num_experts(); ++e) {
      l.tokens.push_back(counts.data<std::int32_t>()[e]);
      l.dropped += demand.data<std::int32_t>()[e] - counts.data<std::int32_t>()[e];
    }
    return l;
  }
  // Capacity per expert for T tokens (-1 = dropless): ceil(k · T · cf / E), at least min_capacity.
  std::int64_t capacity(std::int64_t T) const {
    if (options_.capacity_factor <= 0.f) return -1;
    const auto c = std::int64_t(std::ceil(double(top_k()) * double(T) * options_.capacity_factor / num_experts()));
    return c > options_.min_capacity ? c : options_.min_capacity;
  }

  // Frees the activations: after a backward rather than at the next forward, or after an inference forward that
  // no backward follows. The plan and router output stay for load().
  void release_activations() {
    saved_.valid = false;
    saved_.x = Tensor();
    saved_.xs = Tensor();
    saved_.out = Tensor();
    saved_.experts = {};
    saved_.ep = {};
  }

 private:
  AuxLosses new_aux() const { return {be_.zeros({1}), be_.zeros({1}), be_.zeros({1})}; }

  // The routing both forwards share: checks x, the router (logits, probs, top-k), this call's aux losses and the
  // dispatch plan, all kept in saved_ (reset first). Returns x in fp32, contiguous, and x's dtype.
  std::pair<Tensor, DType> route(const char* where, const Tensor& x, ForwardArgs args, Rng* rng) {
    check_device(where, "x", x, Backend::device);
    const DType io = detail::activation_dtype(where, "x", x);  // y comes back in x's dtype
    CUMO_CHECK(x.dim() == 2, where, ": x has shape ", x.shape(), " but expected (tokens, ", hidden(), ")");
    CUMO_CHECK(x.size(1) == hidden(), where, ": x has shape ", x.shape(), " but the block was built for hidden = ",
               hidden());
    const std::int64_t T = x.size(0);
    // Sharded experts: a rank with no tokens (a data-parallel rank's empty share) still serves its experts to the
    // others, so it must take part in the exchange.
    CUMO_CHECK(T > 0 || ep_, where, ": x has shape ", x.shape(), " — zero tokens");
    CUMO_CHECK(args.segments >= 1 && T % args.segments == 0, where, ": x has ", T, " tokens, which do not split into ",
               args.segments, " equal segments (images)");
    const Tensor xc = be_.convert(x, DType::f32);  // the block computes in fp32
    if (options_.check_finite)
      CUMO_CHECK(be_.all_finite(xc), where, ": x (shape ", x.shape(), ") contains NaN or Inf");

    const int E = num_experts(), K = top_k();
    saved_ = {};
    saved_.segments = args.segments;
    saved_.io = io;
    saved_.x = xc;
    router_.forward(be_, xc, args.training, rng, saved_.router);  // (T, E), (T, K)
    saved_.aux = new_aux();
    if (T > 0)  // (no tokens, no loss: the aux losses stay 0)
      be_.aux_losses(saved_.router.logits, saved_.router.probs, saved_.router.topk_idx, args.segments, saved_.aux);

    DispatchPlan& plan = saved_.plan;
    plan.tokens = T;
    plan.experts = E;
    plan.top_k = K;
    plan.capacity = capacity(T);
    plan.demand = be_.empty({E}, DType::i32);
    plan.counts = be_.empty({E}, DType::i32);
    plan.offsets = be_.empty({E + 1}, DType::i32);
    plan.row_of_slot = be_.empty({T * K}, DType::i32);
    plan.slot_of_row = be_.empty({T * K}, DType::i32);
    be_.make_plan(saved_.router.topk_idx, plan);
    return {xc, io};  // saved_.valid: set by the caller once its part has run
  }

  // The router's part of the backward, into dx (T, H): d top-k weights (dw (T, K); null when the experts' outputs
  // were not read: its gradient is then zero) → probs (+ balance) → logits (+ z, + the caller's router_dlogits) →
  // the router weight's gradient and dx +=. Releases the activations.
  void router_backward(const Tensor* dw, AuxLossWeights aux, const Tensor* router_dlogits, Tensor& dx) {
    const RouterOutput& r = saved_.router;
    const std::int64_t T = saved_.plan.tokens;
    const int E = num_experts();
    Tensor dprobs = be_.zeros({T, E});
    Tensor dlogits = be_.zeros({T, E});
    if (T == 0) {  // a sharded block's rank without tokens: nothing of its own to differentiate
      release_activations();
      return;
    }
    if (dw) be_.topk_weights_backward(r.probs, r.topk_idx, r.topk_w, *dw, options_.renormalize, dprobs);
    be_.aux_losses_backward(r.logits, r.probs, r.topk_idx, saved_.segments, options_.balance,
                            AuxLossWeights{aux.balance, 0.f}, dprobs, dlogits);
    be_.softmax_backward(r.probs, dprobs, dlogits);  // (T, E)
    be_.aux_losses_backward(r.logits, r.probs, r.topk_idx, saved_.segments, options_.balance,
                            AuxLossWeights{0.f, aux.z}, dprobs, dlogits);
    if (router_dlogits) be_.add(dlogits, *router_dlogits, dlogits);
    router_.backward(be_, r, dlogits, dx);  // (E, H), (T, H)
    release_activations();
  }
  // The experts' parameters are members: their addresses (which optimizers and parameter lists hold) stay, and so
  // do the names and trainable flags an owner gave them (FeedForward prefixes its name).
  void replace_experts(ExpertT other) {
    const ParameterList before = experts_.parameters(), after = other.parameters();
    for (std::size_t i = 0; i < before.size(); ++i) {
      after[i]->name = before[i]->name;
      after[i]->trainable = before[i]->trainable;
    }
    experts_ = std::move(other);
  }

  struct Saved {
    bool valid = false;
    bool routing_only = false;  // forward_routing: no expert ran
    std::int64_t segments = 1;
    DType io = DType::f32;      // x's dtype
    AuxLosses aux;              // of this forward
    Tensor x;
    RouterOutput router;
    DispatchPlan plan;
    Tensor xs, out;  // (T*K, H) permuted inputs and unweighted expert outputs
    typename ExpertT::Saved experts;
    dist::ExpertExchange::Saved ep;  // expert parallel only
  };

  RouterT router_;
  ExpertT experts_;
  SparseMoEOptions options_;
  [[no_unique_address]] Backend be_;
  std::optional<dist::ExpertExchange> ep_;  // set by shard_experts()
  Saved saved_;
};

}  // namespace cumo
