#pragma once
// Parity kinds `moe_mlp` (CuMo's block of CLIP MLPs) and `moe_swiglu` (HF MixtralSparseMoeBlock): the block is
// built from the fixture's metadata config alone, run forward and backward on the fixture's x and dy with the
// fixture's objective, and every output and gradient is compared.
//
// With expert parallelism (cumo_parity --expert-parallel K under mpirun -np K) the block's experts are sharded over
// the K ranks (SparseMoE::shard_experts). Rank 0 holds the fixture's tokens. The other ranks have none, and they
// only serve their experts. Rank 0 checks every output, dx and the router's gradient, and each rank checks its own
// experts' slice of the gradients. The tolerances are those of one process.
#include <string>

#include <nlohmann/json.hpp>

#include "cumo/dist/communicator.hpp"
#include "cumo/io/safetensors.hpp"
#include "cumo/moe.hpp"
#include "parity/report.hpp"

namespace cumo::parity {

namespace detail {

template <class Backend>
Tensor on(const Tensor& t) {
  return Backend::device == Device::cpu ? t : t.to(Backend::device);
}

// Runs one block against the fixture; `param_of` maps our parameter names to the fixture's.
template <class Expert, class Backend, class ParamName>
void run_block(const io::SafeTensors& f, const nlohmann::json& cfg, BalanceCounts counting, AuxLossWeights coef,
               ParamName param_of, Report& r, dist::Communicator* ep) {
  const auto H = cfg.at("hidden").get<std::int64_t>(), F = cfg.at("ffn").get<std::int64_t>();
  const int E = cfg.at("experts").get<int>(), K = cfg.at("top_k").get<int>();
  SparseMoEOptions options;
  options.balance = counting;
  ParameterStorageScope storage(r.storage());
  SparseMoE<Router<TopKDynamic>, Expert, Backend> moe(H, F, E, options, TopKDynamic{K});
  for (Parameter* p : moe.parameters()) copy_converted(p->value, f.get_f32("param." + param_of(p->name)));
  // this rank's experts [first, first + local) under expert parallelism, all of them otherwise
  int first = 0, local = E;
  const bool holder = !ep || ep->rank() == 0;  // the rank with the fixture's tokens
  if (ep) {
    moe.shard_experts(*ep);
    first = moe.expert_exchange()->first_expert();
    local = moe.expert_exchange()->local_experts();
  }

  const Tensor x0 = on<Backend>(f.get_f32("input.x")), dy0 = on<Backend>(f.get_f32("input.dy"));
  const Tensor x = holder ? x0 : x0.slice(0, 0, 0).contiguous(), dy = holder ? dy0 : dy0.slice(0, 0, 0).contiguous();
  const double grad = 1e-3;
  // fp32: 1e-4 for every output; bf16/f16 (Report::tol): y is two products from the rounded x, the router none
  const double fwd = r.tol(1e-4, 2), router_tol = r.tol(1e-4, 0);
  // bf16/f16 activations go in and come out in that dtype; inference weights have no backward
  auto out = moe.forward(r.inference() ? x.to(r.weights) : x);
  Tensor dx;
  if (!r.inference()) {
    dx = moe.backward(dy, coef);
    // the experts' gradients: this rank's slice of the fixture's
    for (Parameter* p : moe.parameters()) {
      const std::string name = "grad." + param_of(p->name);
      if (p != moe.parameters().back()) r.check(name, p->grad, f.get_f32(name).slice(0, first, first + local).contiguous(), grad);
    }
  }
  if (!holder) return;
  const RouterOutput& ro = moe.router_output();
  r.check("output.y", out.y, f.get_f32("output.y"), fwd);
  r.check("output.router_logits", ro.logits, f.get_f32("output.router_logits"), router_tol);
  if (f.contains("output.topk_index")) {
    r.check_exact("output.topk_index", ro.topk_idx, f.get_f32("output.topk_index"));
    r.check("output.topk_weight", ro.topk_w, f.get_f32("output.topk_weight"), router_tol);
  }
  const Tensor& bal = counting == BalanceCounts::top1 ? out.aux.balance_top1 : out.aux.balance_allk;
  r.check("output.balance_loss", bal, f.get_f32("output.balance_loss"), router_tol);
  if (f.contains("output.balance_loss_allk"))
    r.check("output.balance_loss_allk", out.aux.balance_allk, f.get_f32("output.balance_loss_allk"), router_tol);
  r.check("output.z_loss", out.aux.z, f.get_f32("output.z_loss"), router_tol);
  if (r.inference()) return r.no_gradients();

  // objective = Σ y·dy + coef_b · balance + coef_z · z, evaluated in double on the host
  const Tensor y = out.y.to(Device::cpu), g = dy.to(Device::cpu);
  double obj = 0;
  for (std::int64_t i = 0; i < y.numel(); ++i) obj += double(y.data<float>()[i]) * g.data<float>()[i];
  obj += coef.balance * moe.backend().item(bal) + coef.z * moe.backend().item(out.aux.z);
  r.check("output.objective", Tensor::full<double>({1}, obj), f.get_f32("output.objective"), fwd);

  if (f.contains("output.dense_y")) {  // the upcycling invariant: identical copies of dense.* give dense_y
    DenseMLPWeights d{f.get_f32("param.dense.fc1.weight"), f.get_f32("param.dense.fc1.bias"),
                      f.get_f32("param.dense.fc2.weight"), f.get_f32("param.dense.fc2.bias")};
    if constexpr (!Expert::gated) {
      Rng rng(7);
      auto up = upcycle_from_dense<SparseMoE<Router<TopKDynamic>, Expert, Backend>>(d, E, rng, options,
                                                                                     TopKDynamic{K});
      r.check("output.dense_y (upcycled)", up.forward(x).y, f.get_f32("output.dense_y"), fwd);
    }
  }

  r.check("grad.input.x", dx, f.get_f32("grad.input.x"), grad);
  Parameter& router = *moe.parameters().back();
  r.check("grad." + param_of(router.name), router.grad, f.get_f32("grad." + param_of(router.name)), grad);
}

}  // namespace detail

template <class Backend>
void run_moe_mlp(const io::SafeTensors& f, const nlohmann::json& cfg, Report& r, dist::Communicator* ep = nullptr) {
  const auto act = cfg.at("activation").get<std::string>();
  // CuMo fixture names: experts.* as ours, the router is "router.weight"
  auto name = [](const std::string& ours) { return ours == "gate.weight" ? std::string("router.weight") : ours; };
  const AuxLossWeights coef{0.1f, 0.01f};  // CuMo's objective
  if (act == "quick_gelu")
    detail::run_block<Expert<MLP<QuickGELU>>, Backend>(f, cfg, BalanceCounts::top1, coef, name, r, ep);
  else if (act == "gelu")
    detail::run_block<Expert<MLP<GELU>>, Backend>(f, cfg, BalanceCounts::top1, coef, name, r, ep);
  else if (act == "gelu_tanh")
    detail::run_block<Expert<MLP<GELUTanh>>, Backend>(f, cfg, BalanceCounts::top1, coef, name, r, ep);
  else
    fail("moe_mlp: unsupported activation '", act, "'");
}

template <class Backend>
void run_moe_swiglu(const io::SafeTensors& f, const nlohmann::json& cfg, Report& r, dist::Communicator* ep = nullptr) {
  const auto act = cfg.at("activation").get<std::string>();
  CUMO_CHECK(act == "silu", "moe_swiglu: unsupported activation '", act, "'");
  auto name = [](const std::string& ours) { return ours; };  // HF Mixtral names are ours
  detail::run_block<Expert<GatedMLP<SiLU>>, Backend>(f, cfg, BalanceCounts::all_k, AuxLossWeights{0.01f, 0.001f},
                                                     name, r, ep);
}

}  // namespace cumo::parity
