#pragma once
// Parity kind `llava_mod_distill`: LLaVA-MoD's losses between a dense Qwen2 teacher and a Qwen2 student whose FFNs on
// the listed layers are top-k MoE blocks (tests/fixtures/make_fixtures_mod.py). Both models are built from the
// fixture's metadata config alone (teacher / student HF configs, moe_layers, experts, top_k, beta, aux_coef), their
// weights loaded through io::load_hf (the student's experts from per-expert tensors), and checked:
//   outputs  teacher / student logits, kl, align_loss, ce_loss, aux_loss, kd_objective, the four sequence
//            log-probs, dpo_loss, kto_pair_loss                                                       (rel 1e-4)
//   grads    grad.kd.* = d(align + ce + aux_coef·aux), grad.dpo.* = d(dpo + aux_coef·(aux_w + aux_l)),
//            grad.kto_pair.* likewise — every student parameter, fused experts compared per expert    (rel 1e-3)
//   and the upcycling invariant: the dense student (param.dense_student.*) upcycled with exact copies gives the
//   dense student's logits.
// Preference distillation runs chosen and rejected as one concatenated batch with two aux segments, which is the
// fixture's two forwards (aux_w + aux_l) in one. The runner is a template on the models' backend: on a device the
// losses (train/distill.hpp) take host copies of the logits and their dlogits are sent back, as a trainer would.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/io/safetensors.hpp"
#include "cumo/models/llava_mod.hpp"
#include "cumo/nn.hpp"
#include "cumo/train/distill.hpp"
#include "parity/models.hpp"
#include "parity/report.hpp"

namespace cumo::parity {

namespace mod_detail {
using detail::abs_error;
using detail::kGradTol;
using detail::kNoiseAbsTol;
using detail::kNoiseNorm;
using detail::norm;

inline void load_prefixed(const ParameterList& params, const io::SafeTensors& f, const std::string& prefix) {
  io::LoadOptions opt;
  opt.prefix = prefix;
  io::load_hf(params, io::HFCheckpoint::from(f), opt);
}

inline Tensor scalar(double v) { return Tensor::full<double>({1}, v); }
inline Tensor vec(const std::vector<double>& v) {
  Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::f64);
  for (std::size_t i = 0; i < v.size(); ++i) t.data<double>()[i] = v[i];
  return t;
}

// One gradient against the fixture, with models.hpp's rule for tensors that are zero in exact arithmetic.
inline void check_grad(const std::string& name, const Tensor& got, const io::SafeTensors& f, Report& r) {
  if (!f.contains(name)) {
    r.check(name + " (none in PyTorch: must be 0)", got, Tensor::zeros(got.shape()), 0.0);
    return;
  }
  const Tensor want = f.get_f32(name);
  if (norm(want) < kNoiseNorm)
    r.record(name + " (zero in exact math)", abs_error(got.contiguous(), want), kNoiseAbsTol, "abs");
  else
    r.check(name, got, want, kGradTol);
}

// Our fused experts (E, 2F, H) gate_up_proj / (E, H, F) down_proj are compared expert by expert with the fixture's
// "<module>.experts.{e}.{gate,up,down}_proj.weight". expert_offset: the global index of a sharded slice's first
// expert (expert parallelism: this rank holds experts expert_offset … expert_offset + E − 1).
inline void check_student_grads(const ParameterList& params, const io::SafeTensors& f, const std::string& set,
                                Report& r, std::int64_t expert_offset = 0) {
  const std::string gu = ".experts.gate_up_proj", dn = ".experts.down_proj";
  for (Parameter* p : params) {
    const std::string& n = p->name;
    if (n.ends_with(gu) || n.ends_with(dn)) {
      const bool is_gu = n.ends_with(gu);
      const std::string module = n.substr(0, n.size() - (is_gu ? gu.size() : dn.size()));
      const Tensor grad = p->grad.to(Device::cpu);  // the per-expert views are taken on the host
      const std::int64_t E = grad.size(0), F = is_gu ? grad.size(1) / 2 : 0;
      for (std::int64_t e = 0; e < E; ++e) {
        const std::string base = "grad." + set + "." + module + ".experts." + std::to_string(expert_offset + e) + ".";
        const Tensor g = grad.select(0, e);
        if (is_gu) {
          check_grad(base + "gate_proj.weight", g.slice(0, 0, F), f, r);
          check_grad(base + "up_proj.weight", g.slice(0, F, 2 * F), f, r);
        } else {
          check_grad(base + "down_proj.weight", g, f, r);
        }
      }
      continue;
    }
    check_grad("grad." + set + "." + n, p->grad, f, r);
  }
}

inline Tensor labels_tensor(const std::vector<std::int64_t>& v, std::int64_t B, std::int64_t T) {
  Tensor t = Tensor::empty({B, T}, DType::i64);
  std::copy(v.begin(), v.end(), t.data<std::int64_t>());
  return t;
}

}  // namespace mod_detail

// `ep` (cumo_parity --expert-parallel K): the student's sparse layers' experts sharded over the group. Rank 0 runs
// every check on the fixture's batch with its slice of the experts; the other ranks serve their experts through
// rank 0's three student forwards and backwards (mimic, DPO, KTO-pair), in that order, and check their slices of the
// expert gradients.
template <class Backend>
void run_llava_mod_distill(const io::SafeTensors& f, const nlohmann::json& config, Report& r,
                           dist::Communicator* ep = nullptr) {
  using detail::kOutputTol;
  const nn::DecoderConfig tc = nn::DecoderConfig::from_json(config.at("teacher"));
  const nn::DecoderConfig sc = nn::DecoderConfig::from_json(config.at("student"));
  CUMO_CHECK(tc.vocab == sc.vocab, "llava_mod_distill: teacher and student vocabularies differ (", tc.vocab, " vs ",
             sc.vocab, ")");
  const auto moe_layers = config.at("moe_layers").get<std::vector<int>>();
  const int E = config.at("experts").get<int>(), K = config.at("top_k").get<int>();
  const double beta = config.at("beta").get<double>(), aux_coef = config.at("aux_coef").get<double>();
  const AuxLossWeights aux_w{float(aux_coef), 0.f};

  using LM = nn::DecoderLM<Backend>;
  ParameterStorageScope storage(r.storage());
  LM teacher(tc);
  mod_detail::load_prefixed(teacher.parameters(), f, "param.teacher.");
  LM student(sc);
  Rng rng(0);  // the router is overwritten by the fixture's
  models::make_sparse_student(student, E, K, rng, moe_layers);
  mod_detail::load_prefixed(student.parameters(), f, "param.student.");
  ParameterList sharded;  // this rank's slices of the student's experts (expert parallelism)
  std::int64_t expert_offset = 0;
  if (ep) {
    sharded = student.shard_experts(*ep);
    expert_offset = std::int64_t(ep->rank()) * (E / ep->size());
  }
  if (ep && ep->rank() != 0) {  // rank 0's student passes, served in its order; this rank's expert slices checked
    student.serve_experts_forward();
    if (r.inference()) return r.no_gradients();
    for (const char* set : {"kd", "dpo", "kto_pair"}) {
      if (std::string(set) != "kd") student.serve_experts_forward();
      zero_grad(sharded);
      student.serve_experts_backward();
      mod_detail::check_student_grads(sharded, f, set, r, expert_offset);
    }
    return;
  }

  const Tensor ids_t = f.get("input.input_ids");
  const std::int64_t B = ids_t.size(0), T = ids_t.size(1);
  const auto ids = detail::int_vector(f, "input.input_ids"), labels = detail::int_vector(f, "input.labels");
  const auto rej = detail::int_vector(f, "input.rejected_ids"), rlabels = detail::int_vector(f, "input.rejected_labels");
  const Tensor lab_t = mod_detail::labels_tensor(labels, B, T), rlab_t = mod_detail::labels_tensor(rlabels, B, T);

  // the upcycling invariant on the dense student
  {
    LM dense(sc), up(sc);
    mod_detail::load_prefixed(dense.parameters(), f, "param.dense_student.");
    mod_detail::load_prefixed(up.parameters(), f, "param.dense_student.");
    Rng r2(1);
    models::make_sparse_student(up, E, K, r2, moe_layers);
    r.check("dense_student logits == upcycled (invariant)", models::eval_logits(up, ids, B, T),
            models::eval_logits(dense, ids, B, T), kOutputTol);
  }

  // ---- mimic distillation: align + ce + aux_coef · aux
  // tolerances: fp32's, or from the bf16/f16 rounding over each decoder's products (Report::tol)
  const double t_tol = r.tol(kOutputTol, int(4 * tc.layers + 2)), s_tol = r.tol(kOutputTol, int(4 * sc.layers + 2));
  const double both_tol = std::max(t_tol, s_tol);
  const Tensor zt = models::eval_logits_host(teacher, ids, B, T);
  r.check("output.teacher_logits", zt, f.get_f32("output.teacher_logits"), t_tol);
  models::StudentPass<Backend> pass(student);
  const auto out = pass.forward(ids, B, T);
  const Tensor zs = out.logits.to(Device::cpu);
  r.check("output.student_logits", zs, f.get_f32("output.student_logits"), s_tol);
  Tensor dl;
  const auto kd = train::mimic_distill_loss(zs, zt, lab_t, &dl, train::MimicWeights{1.0, 0.0, 1.0});
  r.check("output.kl", mod_detail::scalar(kd.kl), f.get_f32("output.kl"), both_tol);
  r.check("output.align_loss", mod_detail::scalar(kd.align), f.get_f32("output.align_loss"), both_tol);
  r.check("output.ce_loss", mod_detail::scalar(kd.ce), f.get_f32("output.ce_loss"), s_tol);
  r.check("output.aux_loss", mod_detail::scalar(out.aux), f.get_f32("output.aux_loss"), s_tol);
  r.check("output.kd_objective", mod_detail::scalar(kd.objective + aux_coef * out.aux), f.get_f32("output.kd_objective"),
          both_tol);
  if (r.inference()) return r.no_gradients();  // (the preference losses below are compared with their gradients)
  zero_grad(student.parameters());
  pass.backward_all(dl.to(Backend::device), aux_w);
  mod_detail::check_student_grads(student.parameters(), f, "kd", r, expert_offset);

  // ---- preference distillation, the teacher as reference
  const auto ref_w = train::sequence_logps(zt, lab_t);
  const auto ref_l = train::sequence_logps(models::eval_logits_host(teacher, rej, B, T), rlab_t);
  r.check("output.reference_chosen_logp", mod_detail::vec(ref_w), f.get_f32("output.reference_chosen_logp"), kOutputTol);
  r.check("output.reference_rejected_logp", mod_detail::vec(ref_l), f.get_f32("output.reference_rejected_logp"),
          kOutputTol);
  std::vector<std::int64_t> cat_ids(ids), cat_labels(labels);
  cat_ids.insert(cat_ids.end(), rej.begin(), rej.end());
  cat_labels.insert(cat_labels.end(), rlabels.begin(), rlabels.end());
  const Tensor cat_lab_t = mod_detail::labels_tensor(cat_labels, 2 * B, T);
  struct Case {
    train::PreferenceLoss loss;
    const char* set;
    const char* output;
  };
  for (const Case c : {Case{train::PreferenceLoss::sigmoid, "dpo", "output.dpo_loss"},
                       Case{train::PreferenceLoss::kto_pair, "kto_pair", "output.kto_pair_loss"}}) {
    const auto po = pass.forward(cat_ids, 2 * B, T, /*segments=*/2);
    Tensor dp;
    train::PreferenceOptions opt;
    opt.loss = c.loss;
    opt.beta = beta;
    const auto pb = train::preference_distill_loss(po.logits.to(Device::cpu), cat_lab_t, ref_w, ref_l, &dp, opt);
    if (c.loss == train::PreferenceLoss::sigmoid) {
      r.check("output.policy_chosen_logp", mod_detail::vec(pb.policy_chosen), f.get_f32("output.policy_chosen_logp"),
              kOutputTol);
      r.check("output.policy_rejected_logp", mod_detail::vec(pb.policy_rejected),
              f.get_f32("output.policy_rejected_logp"), kOutputTol);
    }
    r.check(c.output, mod_detail::scalar(pb.pref.loss), f.get_f32(c.output), kOutputTol);
    zero_grad(student.parameters());
    pass.backward_all(dp.to(Backend::device), aux_w);
    mod_detail::check_student_grads(student.parameters(), f, c.set, r, expert_offset);
  }
}

}  // namespace cumo::parity
