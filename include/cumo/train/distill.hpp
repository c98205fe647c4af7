#pragma once
// LLaVA-MoD's losses (Shu et al. 2024, "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation") on logits,
// each with its exact gradient w.r.t. the student / policy logits. Teacher and reference logits are constants.
//
// Response positions. labels (B, T) are the unshifted labels (input ids with prompt / padding set to -100, as HF
// builds them); row r = b·T + t of a (B·T, V) logits matrix is counted when t < T − 1 and labels[b, t + 1] is not
// the ignore index, and its target is labels[b, t + 1]. M = number of counted rows.
//
// Mimic distillation (D2D, D2S), temperature τ (LLaVA-MoD: τ = 1), p_T = softmax(z_T / τ), p_S = softmax(z_S / τ):
//   kl    = τ² / M · Σ_r Σ_v p_T (log p_T − log p_S)           forward KL(p_T ‖ p_S), token level
//   align = τ² / M · Σ_r −Σ_v p_T log p_S                       LLaVA-MoD's L_align = kl + τ²·H(p_T)
//   ce    = 1 / M · Σ_r −log softmax(z_S)[target]               HF's causal-LM loss on the same rows (τ-free)
//   ∂kl/∂z_S = ∂align/∂z_S = τ / M · (p_S − p_T),  ∂ce/∂z_S = 1 / M · (softmax(z_S) − onehot)
// The MoE aux loss (balance summed over the student's MoE layers × 0.01) lives in the model's backward
// (models/llava_mod.hpp, StudentPass), not here: it is a function of the router, not of the logits.
//
// Preference distillation, the frozen teacher as reference model, TRL semantics:
//   sequence log-prob  π(y|x) = Σ_{counted rows r of sequence b} log softmax(z_r)[target_r]
//                      ∂π_b/∂z_r = onehot(target_r) − softmax(z_r)
//   dw = π_w − ref_w, dl = π_l − ref_l (chosen w, rejected l), σ the logistic function
//   DPO "sigmoid":     L = mean_b [ −(1−ε) log σ(β(dw−dl)) − ε log σ(−β(dw−dl)) ]      (ε = label smoothing, 0)
//   KTO-pair:          KL_w = max(0, mean_b dw), KL_l = max(0, mean_b dl)   (NOT detached, as TRL's kto_pair)
//                      L = mean over 2B of cat(1 − σ(β(dw_b − KL_l)), 1 − σ(β(KL_w − dl_b)))
//   rewards as TRL logs them: chosen β·dw, rejected β·dl, accuracy mean(β dw > β dl), margin mean(β(dw − dl)).
//
// Every row reduces in double; rows are independent and their sums are added in row order, so values and gradients
// are bitwise the same for any thread count. Logits may be f32 or f64 (f64 serves the finite-difference tests).
// Gradients are ADDED to `dlogits` (allocated as zeros when undefined), so the terms of one objective compose.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cumo/backend/cpu/parallel.hpp"
#include "cumo/core/error.hpp"
#include "cumo/core/tensor.hpp"
#include "cumo/train/loss.hpp"

namespace cumo::train {

// ---- response positions ------------------------------------------------------------------------------------------
struct ResponseTargets {
  std::int64_t B = 0, T = 0;
  std::vector<std::int64_t> target;       // (B·T) the target of row r, or -1 when r is not counted
  std::vector<std::int64_t> per_sequence;  // (B) counted rows of each sequence
  std::int64_t count = 0;                  // M
};

// labels (B, T) i64 / i32, unshifted; every counted target must lie in [0, V).
inline ResponseTargets response_targets(const Tensor& labels, std::int64_t V, std::int64_t ignore_index = kIgnoreIndex) {
  constexpr const char* where = "response_targets";
  detail::check_labels(where, labels);
  CUMO_CHECK(labels.dim() == 2, where, ": labels has shape ", labels.shape(), " but expected (batch, seq)");
  const Tensor y = labels.contiguous();
  ResponseTargets r;
  r.B = y.size(0);
  r.T = y.size(1);
  r.target.assign(std::size_t(r.B * r.T), -1);
  r.per_sequence.assign(std::size_t(r.B), 0);
  for (std::int64_t b = 0; b < r.B; ++b)
    for (std::int64_t t = 0; t + 1 < r.T; ++t) {
      const std::int64_t v = detail::label_at(y, b * r.T + t + 1);
      if (v == ignore_index) continue;
      CUMO_CHECK(v >= 0 && v < V, where, ": label ", v, " at (", b, ", ", t + 1, ") is outside the vocabulary [0, ",
                 V, ") and is not the ignore index ", ignore_index);
      r.target[std::size_t(b * r.T + t)] = v;
      ++r.per_sequence[std::size_t(b)];
      ++r.count;
    }
  return r;
}

namespace detail {

inline void check_logits(const char* where, const char* name, const Tensor& z, std::int64_t rows) {
  CUMO_CHECK(z.defined() && z.dim() == 2, where, ": ", name, " has shape ", z.defined() ? z.shape() : Shape{},
             " but expected (batch·seq, vocab)");
  CUMO_CHECK(z.dtype() == DType::f32 || z.dtype() == DType::f64, where, ": ", name, " has dtype ", name_of(z.dtype()),
             " but expected f32 or f64");
  check_device(where, name, z, Device::cpu);
  CUMO_CHECK(z.size(0) == rows, where, ": ", name, " has shape ", z.shape(), " but the labels give ", rows,
             " rows (batch·seq)");
}

// dlogits: zeros of logits' shape and dtype when undefined, else checked (contiguous, same shape and dtype).
inline void prepare_grad(const char* where, const Tensor& logits, Tensor& dlogits) {
  if (!dlogits.defined()) {
    dlogits = Tensor::zeros(logits.shape(), logits.dtype());
    return;
  }
  check_same_shape(where, "dlogits", dlogits, "logits", logits);
  check_dtype(where, "dlogits", dlogits, logits.dtype());
  check_device(where, "dlogits", dlogits, Device::cpu);
  CUMO_CHECK(dlogits.is_contiguous(), where, ": dlogits must be contiguous");
}

// log Σ_v exp(z_v / tau), in double.
template <class T>
inline double row_lse(const T* z, std::int64_t V, double inv_tau = 1.0) {
  double mx = -INFINITY;
  for (std::int64_t v = 0; v < V; ++v) mx = double(z[v]) * inv_tau > mx ? double(z[v]) * inv_tau : mx;
  double s = 0;
  for (std::int64_t v = 0; v < V; ++v) s += std::exp(double(z[v]) * inv_tau - mx);
  return mx + std::log(s);
}

// log σ(x) and σ(x) without overflow.
inline double log_sigmoid(double x) { return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x)); }
inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

}  // namespace detail

// ---- mimic distillation ------------------------------------------------------------------------------------------
struct MimicWeights {
  double align = 1.0;  // LLaVA-MoD's L_align (cross-entropy of the student under the teacher)
  double kl = 0.0;     // the same without the teacher entropy (same gradient)
  double ce = 1.0;     // next-token CE on the labels (0 for D2D)
};

struct KDOptions {
  double temperature = 1.0;
  std::int64_t ignore_index = kIgnoreIndex;
  double grad_scale = 1.0;  // d outer objective / d (this objective), e.g. 1 / accumulation steps
};

struct MimicResult {
  double kl = 0, align = 0, ce = 0, teacher_entropy = 0;
  double objective = 0;  // align·w.align + kl·w.kl + ce·w.ce (what the gradient is of, before grad_scale)
  std::int64_t targets = 0;
};

// student, teacher (B·T, V) logits; labels (B, T). Adds d(grad_scale · objective)/d student to *dstudent.
// With no counted row the losses are 0 and no gradient is added (PyTorch would give NaN).
inline MimicResult mimic_distill_loss(const Tensor& student, const Tensor& teacher, const Tensor& labels,
                                      Tensor* dstudent = nullptr, MimicWeights w = {}, const KDOptions& opt = {}) {
  constexpr const char* where = "mimic_distill_loss";
  CUMO_CHECK(opt.temperature > 0, where, ": temperature must be > 0, got ", opt.temperature);
  CUMO_CHECK(labels.defined() && labels.dim() == 2, where, ": labels must be (batch, seq)");
  const std::int64_t N = labels.size(0) * labels.size(1);
  detail::check_logits(where, "student logits", student, N);
  detail::check_logits(where, "teacher logits", teacher, N);
  CUMO_CHECK(teacher.size(1) == student.size(1), where, ": teacher logits have ", teacher.size(1),
             " classes but the student's have ", student.size(1), " (the vocabularies must be shared)");
  const std::int64_t V = student.size(1);
  const ResponseTargets rt = response_targets(labels, V, opt.ignore_index);
  const Tensor zs = student.contiguous(), zt = teacher.to(student.dtype()).contiguous();
  if (dstudent) detail::prepare_grad(where, student, *dstudent);
  MimicResult res;
  res.targets = rt.count;
  if (rt.count == 0) return res;
  const double tau = opt.temperature, inv_tau = 1.0 / tau, M = double(rt.count);
  const double g_kd = (w.align + w.kl) * tau / M * opt.grad_scale, g_ce = w.ce / M * opt.grad_scale;
  std::vector<double> row_kl(std::size_t(N), 0.0), row_x(std::size_t(N), 0.0), row_ce(std::size_t(N), 0.0);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* S = zs.data<T>();
    const T* Tt = zt.data<T>();
    T* D = dstudent ? dstudent->data<T>() : nullptr;
    cpu::parallel_for(N, [&](std::int64_t r) {
      const std::int64_t y = rt.target[std::size_t(r)];
      if (y < 0) return;
      const T* s = S + r * V;
      const T* t = Tt + r * V;
      const double lse_s = detail::row_lse(s, V, inv_tau), lse_t = detail::row_lse(t, V, inv_tau);
      const double lse_s1 = tau == 1.0 ? lse_s : detail::row_lse(s, V);
      double kl = 0, x = 0;
      for (std::int64_t v = 0; v < V; ++v) {
        const double lpt = double(t[v]) * inv_tau - lse_t, lps = double(s[v]) * inv_tau - lse_s;
        const double pt = std::exp(lpt);
        if (pt > 0) kl += pt * (lpt - lps);
        x -= pt * lps;
      }
      row_kl[std::size_t(r)] = kl;
      row_x[std::size_t(r)] = x;
      row_ce[std::size_t(r)] = lse_s1 - double(s[y]);
      if (!D) return;
      T* d = D + r * V;
      for (std::int64_t v = 0; v < V; ++v) {
        const double ps = std::exp(double(s[v]) * inv_tau - lse_s), pt = std::exp(double(t[v]) * inv_tau - lse_t);
        const double p1 = tau == 1.0 ? ps : std::exp(double(s[v]) - lse_s1);
        d[v] = T(double(d[v]) + g_kd * (ps - pt) + g_ce * (p1 - (v == y)));
      }
    }, 12 * V);
  };
  if (zs.dtype() == DType::f32)
    run(float{});
  else
    run(double{});
  for (std::int64_t r = 0; r < N; ++r) {
    res.kl += row_kl[std::size_t(r)];
    res.align += row_x[std::size_t(r)];
    res.ce += row_ce[std::size_t(r)];
  }
  res.kl *= tau * tau / M;
  res.align *= tau * tau / M;
  res.ce /= M;
  res.teacher_entropy = (res.align - res.kl) / (tau * tau);
  res.objective = w.align * res.align + w.kl * res.kl + w.ce * res.ce;
  return res;
}

// ---- sequence log-probs ------------------------------------------------------------------------------------------
// logits (B·T, V), labels (B, T): π_b = Σ over the counted rows of b of log softmax(z_r)[target_r] (TRL's
// get_batch_logps with average_log_prob = False).
inline std::vector<double> sequence_logps(const Tensor& logits, const Tensor& labels,
                                          std::int64_t ignore_index = kIgnoreIndex) {
  constexpr const char* where = "sequence_logps";
  CUMO_CHECK(labels.defined() && labels.dim() == 2, where, ": labels must be (batch, seq)");
  const std::int64_t B = labels.size(0), T = labels.size(1), N = B * T;
  detail::check_logits(where, "logits", logits, N);
  const std::int64_t V = logits.size(1);
  const ResponseTargets rt = response_targets(labels, V, ignore_index);
  const Tensor z = logits.contiguous();
  std::vector<double> row(std::size_t(N), 0.0);
  auto run = [&](auto tag) {
    using Tp = decltype(tag);
    const Tp* Z = z.data<Tp>();
    cpu::parallel_for(N, [&](std::int64_t r) {
      const std::int64_t y = rt.target[std::size_t(r)];
      if (y >= 0) row[std::size_t(r)] = double(Z[r * V + y]) - detail::row_lse(Z + r * V, V);
    }, 4 * V);
  };
  if (z.dtype() == DType::f32)
    run(float{});
  else
    run(double{});
  std::vector<double> out(std::size_t(B), 0.0);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) out[std::size_t(b)] += row[std::size_t(b * T + t)];
  return out;
}

// Adds Σ_b dlogp[b] · ∂π_b/∂z to *dlogits: row r of sequence b gets dlogp[b] · (onehot(target) − softmax(z_r)).
inline void sequence_logps_backward(const Tensor& logits, const Tensor& labels, const std::vector<double>& dlogp,
                                    Tensor& dlogits, std::int64_t ignore_index = kIgnoreIndex) {
  constexpr const char* where = "sequence_logps_backward";
  CUMO_CHECK(labels.defined() && labels.dim() == 2, where, ": labels must be (batch, seq)");
  const std::int64_t B = labels.size(0), T = labels.size(1), N = B * T;
  detail::check_logits(where, "logits", logits, N);
  CUMO_CHECK(std::int64_t(dlogp.size()) == B, where, ": ", dlogp.size(), " gradients for ", B, " sequences");
  const std::int64_t V = logits.size(1);
  const ResponseTargets rt = response_targets(labels, V, ignore_index);
  const Tensor z = logits.contiguous();
  detail::prepare_grad(where, logits, dlogits);
  auto run = [&](auto tag) {
    using Tp = decltype(tag);
    const Tp* Z = z.data<Tp>();
    Tp* D = dlogits.data<Tp>();
    cpu::parallel_for(N, [&](std::int64_t r) {
      const std::int64_t y = rt.target[std::size_t(r)];
      const double g = dlogp[std::size_t(r / T)];
      if (y < 0 || g == 0.0) return;
      const Tp* zr = Z + r * V;
      Tp* d = D + r * V;
      const double lse = detail::row_lse(zr, V);
      for (std::int64_t v = 0; v < V; ++v) d[v] = Tp(double(d[v]) + g * ((v == y) - std::exp(double(zr[v]) - lse)));
    }, 4 * V);
  };
  if (z.dtype() == DType::f32)
    run(float{});
  else
    run(double{});
}

// ---- preference losses on sequence log-probs ---------------------------------------------------------------------
enum class PreferenceLoss { sigmoid, kto_pair };

inline PreferenceLoss preference_loss_from_string(const std::string& s) {
  if (s == "sigmoid" || s == "dpo") return PreferenceLoss::sigmoid;
  if (s == "kto_pair" || s == "kto") return PreferenceLoss::kto_pair;
  fail("preference loss '", s, "' is unknown (known: sigmoid (DPO), kto_pair)");
}

struct PreferenceOptions {
  PreferenceLoss loss = PreferenceLoss::sigmoid;
  double beta = 0.1;
  double label_smoothing = 0.0;  // DPO only (cDPO); TRL's default 0
};

struct PreferenceResult {
  double loss = 0;
  std::vector<double> d_chosen, d_rejected;                // ∂loss/∂π_w, ∂loss/∂π_l per pair
  std::vector<double> chosen_rewards, rejected_rewards;    // β·dw, β·dl
  double reward_accuracy = 0, reward_margin = 0;           // mean(β dw > β dl), mean(β (dw − dl))
  double kl_chosen = 0, kl_rejected = 0;                   // KTO-pair's clamped KL estimates (0 for DPO)
};

namespace detail {
inline void check_pref(const char* where, const std::vector<double>& pw, const std::vector<double>& pl,
                       const std::vector<double>& rw, const std::vector<double>& rl) {
  CUMO_CHECK(!pw.empty(), where, ": no pairs");
  CUMO_CHECK(pl.size() == pw.size() && rw.size() == pw.size() && rl.size() == pw.size(), where,
             ": log-prob vectors differ in length (policy chosen ", pw.size(), ", policy rejected ", pl.size(),
             ", reference chosen ", rw.size(), ", reference rejected ", rl.size(), ")");
}
inline void rewards(PreferenceResult& r, const std::vector<double>& dw, const std::vector<double>& dl, double beta) {
  const std::size_t B = dw.size();
  r.chosen_rewards.resize(B);
  r.rejected_rewards.resize(B);
  for (std::size_t b = 0; b < B; ++b) {
    r.chosen_rewards[b] = beta * dw[b];
    r.rejected_rewards[b] = beta * dl[b];
    r.reward_accuracy += (r.chosen_rewards[b] > r.rejected_rewards[b]) / double(B);
    r.reward_margin += (r.chosen_rewards[b] - r.rejected_rewards[b]) / double(B);
  }
}
}  // namespace detail

// DPO, TRL loss_type="sigmoid": mean_b −(1−ε) log σ(β h_b) − ε log σ(−β h_b), h = (π_w − ref_w) − (π_l − ref_l).
inline PreferenceResult dpo_loss(const std::vector<double>& policy_chosen, const std::vector<double>& policy_rejected,
                                 const std::vector<double>& ref_chosen, const std::vector<double>& ref_rejected,
                                 double beta, double label_smoothing = 0.0) {
  detail::check_pref("dpo_loss", policy_chosen, policy_rejected, ref_chosen, ref_rejected);
  const std::size_t B = policy_chosen.size();
  PreferenceResult r;
  r.d_chosen.resize(B);
  r.d_rejected.resize(B);
  std::vector<double> dw(B), dl(B);
  const double eps = label_smoothing;
  for (std::size_t b = 0; b < B; ++b) {
    dw[b] = policy_chosen[b] - ref_chosen[b];
    dl[b] = policy_rejected[b] - ref_rejected[b];
    const double x = beta * (dw[b] - dl[b]);
    r.loss += (-(1 - eps) * detail::log_sigmoid(x) - eps * detail::log_sigmoid(-x)) / double(B);
    // d/dx [−(1−ε) log σ(x) − ε log σ(−x)] = −(1−ε) σ(−x) + ε σ(x)
    const double g = beta * (-(1 - eps) * detail::sigmoid(-x) + eps * detail::sigmoid(x)) / double(B);
    r.d_chosen[b] = g;
    r.d_rejected[b] = -g;
  }
  detail::rewards(r, dw, dl, beta);
  return r;
}

// TRL's kto_pair: KL_w = max(0, mean dw), KL_l = max(0, mean dl), both NOT detached;
// loss = mean over 2B of cat(1 − σ(β(dw_b − KL_l)), 1 − σ(β(KL_w − dl_b))). The clamp passes the gradient where
// its input is >= 0 (PyTorch's clamp backward).
inline PreferenceResult kto_pair_loss(const std::vector<double>& policy_chosen,
                                      const std::vector<double>& policy_rejected, const std::vector<double>& ref_chosen,
                                      const std::vector<double>& ref_rejected, double beta) {
  detail::check_pref("kto_pair_loss", policy_chosen, policy_rejected, ref_chosen, ref_rejected);
  const std::size_t B = policy_chosen.size();
  const double nB = double(B);
  PreferenceResult r;
  std::vector<double> dw(B), dl(B);
  double mw = 0, ml = 0;
  for (std::size_t b = 0; b < B; ++b) {
    dw[b] = policy_chosen[b] - ref_chosen[b];
    dl[b] = policy_rejected[b] - ref_rejected[b];
    mw += dw[b] / nB;
    ml += dl[b] / nB;
  }
  const double klw = mw > 0 ? mw : 0.0, kll = ml > 0 ? ml : 0.0;
  const bool pass_w = mw >= 0, pass_l = ml >= 0;
  r.kl_chosen = klw;
  r.kl_rejected = kll;
  // s'(x) = σ(x)(1 − σ(x)); u_b = β(dw_b − KL_l), v_b = β(KL_w − dl_b)
  std::vector<double> su(B), sv(B);
  double sum_su = 0, sum_sv = 0;
  for (std::size_t b = 0; b < B; ++b) {
    const double u = beta * (dw[b] - kll), v = beta * (klw - dl[b]);
    const double s_u = detail::sigmoid(u), s_v = detail::sigmoid(v);
    r.loss += ((1 - s_u) + (1 - s_v)) / (2 * nB);
    su[b] = s_u * (1 - s_u);
    sv[b] = s_v * (1 - s_v);
    sum_su += su[b];
    sum_sv += sv[b];
  }
  // ∂L/∂KL_w = −β/(2B) Σ_c s'(v_c);  ∂L/∂KL_l = +β/(2B) Σ_c s'(u_c)
  const double dKLw = -beta / (2 * nB) * sum_sv, dKLl = beta / (2 * nB) * sum_su;
  r.d_chosen.resize(B);
  r.d_rejected.resize(B);
  for (std::size_t b = 0; b < B; ++b) {
    r.d_chosen[b] = -beta / (2 * nB) * su[b] + (pass_w ? dKLw / nB : 0.0);
    r.d_rejected[b] = beta / (2 * nB) * sv[b] + (pass_l ? dKLl / nB : 0.0);
  }
  detail::rewards(r, dw, dl, beta);
  return r;
}

inline PreferenceResult preference_loss(const std::vector<double>& policy_chosen,
                                        const std::vector<double>& policy_rejected,
                                        const std::vector<double>& ref_chosen, const std::vector<double>& ref_rejected,
                                        const PreferenceOptions& opt) {
  CUMO_CHECK(opt.beta > 0, "preference_loss: beta must be > 0, got ", opt.beta);
  if (opt.loss == PreferenceLoss::kto_pair)
    return kto_pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, opt.beta);
  return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, opt.beta, opt.label_smoothing);
}

// The whole preference step on logits. policy (2B·T, V): the policy's logits on the chosen sequences (first B) and
// the rejected ones (last B), concatenated as TRL's concatenated_forward does; labels (2B, T) likewise;
// ref_chosen / ref_rejected (B): the reference's sequence log-probs (computed once, no gradient). Adds
// d(grad_scale · loss)/d policy to *dpolicy.
struct PreferenceBatchResult {
  PreferenceResult pref;
  std::vector<double> policy_chosen, policy_rejected;
};
inline PreferenceBatchResult preference_distill_loss(const Tensor& policy, const Tensor& labels,
                                                     const std::vector<double>& ref_chosen,
                                                     const std::vector<double>& ref_rejected, Tensor* dpolicy = nullptr,
                                                     const PreferenceOptions& opt = {}, double grad_scale = 1.0,
                                                     std::int64_t ignore_index = kIgnoreIndex) {
  constexpr const char* where = "preference_distill_loss";
  CUMO_CHECK(labels.defined() && labels.dim() == 2 && labels.size(0) % 2 == 0, where,
             ": labels must be (2·pairs, seq): chosen rows then rejected rows");
  const std::int64_t B = labels.size(0) / 2;
  const auto logp = sequence_logps(policy, labels, ignore_index);
  PreferenceBatchResult out;
  out.policy_chosen.assign(logp.begin(), logp.begin() + B);
  out.policy_rejected.assign(logp.begin() + B, logp.end());
  out.pref = preference_loss(out.policy_chosen, out.policy_rejected, ref_chosen, ref_rejected, opt);
  if (dpolicy) {
    std::vector<double> g(std::size_t(2 * B));
    for (std::int64_t b = 0; b < B; ++b) {
      g[std::size_t(b)] = grad_scale * out.pref.d_chosen[std::size_t(b)];
      g[std::size_t(B + b)] = grad_scale * out.pref.d_rejected[std::size_t(b)];
    }
    sequence_logps_backward(policy, labels, g, *dpolicy, ignore_index);
  }
  return out;
}

}  // namespace cumo::train
