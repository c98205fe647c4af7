#pragma once
// Parity kind `cumo`: the CuMo model (LLaVA with every CLIP MLP and the projector a top-2-of-4 MoE) against the
// fixture made by PyTorch + transformers (tests/fixtures/make_fixtures.py, `cumo(...)`). Built from the metadata
// config alone; `param.*` (the upcycled, noise-perturbed weights, stored per expert) loaded through io::load_hf —
// which detects the sparse blocks and assembles the fused experts. Checked:
//   forward   logits, ce_loss, total_loss, vision/projector balance and z, per-layer vision balance and z   (1e-4)
//   backward  every grad.* at step 0 (fused experts compared against the per-expert tensors)                   (1e-3)
//             NB: the fixture's README and metadata say "before clipping", but make_fixtures.py copies p.grad AFTER
//             torch.nn.utils.clip_grad_norm_(…, 1.0) — the stored gradients have global norm 1.000 (the raw norm is
//             ≈ 5.7). So ours are compared after train::clip_grad_norm with the fixture's max norm, which is the same
//             comparison up to one shared scale (the raw norm is printed).
//   training  total at each of the fixture's AdamW steps (cumo::train::AdamW + clip_grad_norm)                  (1e-3)
//   upcycling a dense model from param.dense.*, upcycled with exact copies, reproduces the dense logits        (1e-5)
// With expert parallelism (cumo_parity --expert-parallel K under mpirun -np K) every sparse block's experts are
// sharded over the K ranks (CuMo::shard_experts). Rank 0 holds the fixture's batch; the others have none and serve
// their experts (CuMo::serve_experts). The gradients are reduced and clipped as cumo_train does
// (dist::ExpertDataParallel): rank 0 checks the outputs, the replicated gradients and the step losses, every rank its
// slice of the expert gradients. The tolerances are those of one process.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/dist/expert_data_parallel.hpp"
#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/io/safetensors.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/train/clip.hpp"
#include "cumo/train/optimizer.hpp"
#include "models.hpp"
#include "report.hpp"

namespace cumo::parity {

namespace detail {

inline constexpr double kStepLossTol = 1e-3, kUpcycleTol = 1e-5;

// The fixture's gradients in the model's own layout: a twin of every parameter filled from `grad.*` by load_hf,
// so per-expert tensors are assembled into the fused (E, …) ones exactly as the weights were.
struct FixtureGrads {
  std::vector<Parameter> twins;
  FixtureGrads(const ParameterList& params, const io::HFCheckpoint& ck) {
    twins.reserve(params.size());
    for (const Parameter* p : params) twins.emplace_back(p->name, Tensor::zeros(p->value.shape()));
    ParameterList ptrs;
    for (Parameter& t : twins) ptrs.push_back(&t);
    io::LoadOptions opt;
    opt.prefix = "grad.";
    io::load_hf(ptrs, ck, opt);
  }
};

inline Tensor scalar_tensor(double v) { return Tensor::full<double>({1}, v); }
inline Tensor vector_tensor(const std::vector<double>& v) {
  Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::f64);
  for (std::size_t i = 0; i < v.size(); ++i) t.data<double>()[i] = v[i];
  return t;
}

}  // namespace detail

template <class Backend = backend::Cpu>
void run_cumo(const io::SafeTensors& f, const nlohmann::json& config, Report& r, dist::Communicator* ep = nullptr) {
  using CuMo = models::CuMo<Backend>;
  // the fixture's optimizer and clipping on the model's backend (train::AdamW<Backend>) — what cumo_train's
  // run_stage uses
  using Optimizer = typename train::OptimizerFor<Backend>::type;
  using models::CuMoConfig;
  const CuMoConfig cfg = CuMoConfig::from_json(config);
  const io::HFCheckpoint ck = io::HFCheckpoint::from(f);

  const Tensor ids_t = f.get("input.input_ids");
  const std::int64_t B = ids_t.size(0), T = ids_t.size(1);
  const auto ids = detail::int_vector(f, "input.input_ids"), labels = detail::int_vector(f, "input.labels");
  const Tensor px = f.get_f32("input.pixel_values");

  const nlohmann::json& o = config.at("optimizer");
  train::AdamWOptions ao;
  ao.lr = o.value("lr", 1e-3);
  ao.beta1 = o.at("betas").at(0).get<double>();
  ao.beta2 = o.at("betas").at(1).get<double>();
  ao.eps = o.value("eps", 1e-8);
  ao.weight_decay = o.value("weight_decay", 0.0);
  const double clip = o.value("clip_grad_norm", 1.0);
  const int steps = o.value("steps", 5);

  ParameterStorageScope storage(r.storage());
  CuMo m(cfg);
  m.load(ck, "param.");
  r.record("model is sparse (vision and connector)", (m.vision_is_sparse() && m.connector_is_sparse()) ? 0 : 1, 0,
           "mismatches");
  ParameterList params = m.parameters();
  // expert parallelism: the fixture's gradients are read while the model is whole (their shapes), then it is split
  std::optional<detail::FixtureGrads> want;
  if (!r.inference()) want.emplace(params, ck);
  std::optional<dist::ExpertDataParallel> edp;
  const bool holder = !ep || ep->rank() == 0;  // the rank with the fixture's batch
  auto shard = [&](CuMo& model) {
    if (!edp) edp.emplace(*ep, ep->size());
    edp->set_sharded(model.shard_experts(edp->experts()));
  };
  if (ep) shard(m);
  // this rank's part of a whole tensor of the fixture (its slice of a sharded parameter's)
  auto held = [&](const Parameter& p, const Tensor& whole) {
    return edp && edp->is_sharded(p) ? dist::rows_of_rank(edp->experts(), whole) : whole;
  };
  // the step's gradient norm and clipping, over every rank's experts under expert parallelism
  auto clip_step = [&](Optimizer& opt, std::int64_t step) -> double {
    if (edp) {
      edp->reduce_gradients(opt.trainable_parameters());
      return edp->clip_gradients(opt, clip, step);
    }
    return train::clip_gradients(opt, clip, step);
  };

  // ---- forward and backward at step 0
  auto check_forward = [&](const typename CuMo::Output& out) {
    // tolerances: fp32's, or from the bf16/f16 rounding over the products on each output's path (Report::tol)
    const double tol = r.tol(detail::kOutputTol, llava_depth(cfg.llava));
    const double vision_tol = r.tol(detail::kOutputTol, int(4 * (cfg.llava.vision.layers - 1)));
    r.check("output.logits", out.logits, f.get_f32("output.logits"), tol);
    r.check("output.ce_loss", detail::scalar_tensor(out.ce), f.get_f32("output.ce_loss"), tol);
    r.check("output.total_loss", detail::scalar_tensor(out.total), f.get_f32("output.total_loss"), tol);
    r.check("output.vision_balance_loss", detail::scalar_tensor(out.vision_balance),
            f.get_f32("output.vision_balance_loss"), vision_tol);
    r.check("output.vision_z_loss", detail::scalar_tensor(out.vision_z), f.get_f32("output.vision_z_loss"),
            vision_tol);
    r.check("output.projector_balance_loss", detail::scalar_tensor(out.projector_balance),
            f.get_f32("output.projector_balance_loss"), vision_tol);
    r.check("output.projector_z_loss", detail::scalar_tensor(out.projector_z), f.get_f32("output.projector_z_loss"),
            vision_tol);
    r.check("output.vision_balance_loss_per_layer", detail::vector_tensor(out.vision_balance_per_layer),
            f.get_f32("output.vision_balance_loss_per_layer"), vision_tol);
    r.check("output.vision_z_loss_per_layer", detail::vector_tensor(out.vision_z_per_layer),
            f.get_f32("output.vision_z_loss_per_layer"), vision_tol);
  };
  zero_grad(params);
  if (holder)
    check_forward(m.forward(ids, B, T, r.rounded(px), &labels));
  else
    m.serve_experts_forward();  // rank 0's batch reaches this rank's experts
  if (r.inference()) return r.no_gradients();
  if (holder)
    m.backward();
  else
    m.serve_experts_backward();
  {
    Optimizer clipper(params, ao);
    const double raw = clip_step(clipper, 0);  // the fixture stores clipped gradients (see above)
    if (holder)
      std::printf("  (step-0 gradient norm %.6g before clipping to %g; the fixture's grads are the clipped ones)\n",
                  raw, clip);
    r.record("grad norm before clipping is finite", std::isfinite(raw) ? 0 : 1, 0, "mismatches");
    for (std::size_t i = 0; i < params.size(); ++i) {
      const bool sharded = edp && edp->is_sharded(*params[i]);
      if (!holder && !sharded) continue;  // rank 0 checks the replicated gradients, every rank its slices
      const std::string name = "grad." + params[i]->name;
      const Tensor w = held(*params[i], want->twins[i].value);
      if (detail::norm(w) < detail::kNoiseNorm)  // no gradient reaches it in PyTorch (or rounding noise only)
        r.record(name + " (zero in PyTorch)", detail::abs_error(params[i]->grad, w), detail::kNoiseAbsTol, "abs");
      else
        r.check(name, params[i]->grad, w, detail::kGradTol);
    }
  }

  // ---- the fixture's AdamW steps: total at each step, before the update
  {
    CuMo t(cfg);
    t.load(ck, "param.");
    if (ep) shard(t);
    ParameterList tp = t.parameters();
    Optimizer opt(tp, ao);
    std::vector<double> losses;
    for (int s = 0; s < steps; ++s) {
      zero_grad(tp);
      if (holder) {
        losses.push_back(t.forward(ids, B, T, px, &labels).total);
        t.backward();
      } else {
        t.serve_experts();
      }
      clip_step(opt, s);
      opt.step();
    }
    if (holder)
      r.check("output.step_losses", detail::vector_tensor(losses), f.get_f32("output.step_losses"),
              detail::kStepLossTol);
  }

  // ---- upcycling invariant: dense (param.dense.*) logits == the same model upcycled with exact copies
  if (holder) {
    CuMo d(cfg);
    d.load(ck, "param.dense.");
    r.record("dense model from param.dense.* is dense", (d.vision_is_sparse() || d.connector_is_sparse()) ? 1 : 0, 0,
             "mismatches");
    const Tensor dense_logits = d.forward(ids, B, T, px, &labels).logits.clone();
    Rng rng(2024);
    d.upcycle(rng);
    const auto up = d.forward(ids, B, T, px, &labels);
    r.check("upcycled(param.dense.*) logits == dense logits", up.logits, dense_logits, detail::kUpcycleTol);
  }
}

}  // namespace cumo::parity
