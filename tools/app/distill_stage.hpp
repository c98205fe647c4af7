#pragma once
// The LLaVA-MoD training application's stage runner (`cumo_distill`, docs/llava_mod.md): a small CuMo-style student
// whose LLM FFNs on every other layer become top-k-of-E sparse MoE blocks, distilled from a larger dense CuMo teacher
// trained by `cumo_train` (Shu et al. 2024, "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation").
//
// The student shares the teacher's vision tower (copied, frozen for the whole pipeline, as LLaVA-MoD freezes its
// encoder) and tokenizer; its connector and LLM are its own. Each batch runs the frozen vision tower ONCE: its
// features feed the teacher's connector and LLM (eval mode, models::eval_logits_embeds: no activation is kept for a
// backward) and the student's connector and LLM (models::StudentPass, whose backward takes d logits from the losses
// of train/distill.hpp). Each step is the shared loop of app/loop.hpp.
//
// Each stage writes OUT/<stage>/ (a train::save_checkpoint directory: weights, AdamW state, data position, and in
// its metadata the distill config, the student's sparse layers and whether the stage finished); OUT/metrics.csv
// gets one row per step. A finished stage's directory is skipped on a rerun (stage-level resume); --from DIR starts
// a pipeline from any stage checkpoint (the ablations share their first stages this way).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "app/checkpoints.hpp"
#include "app/distill_config.hpp"
#include "app/loop.hpp"
#include "app/metrics.hpp"
#include "app/run_config.hpp"
#include "cumo/data/preference.hpp"
#include "cumo/io/prefetch.hpp"
#include "cumo/models/llava_mod.hpp"
#include "cumo/train/checkpoint.hpp"
#include "cumo/train/distill.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo/train/schedule.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#endif

namespace cumo::app {

// ---- teacher and student -----------------------------------------------------------------------------------------
inline std::vector<int> student_moe_layers(const StudentConfig& s) {
  return s.moe_layers.empty() ? models::every_other_layer(s.text.layers) : s.moe_layers;
}

// The student's CuMo configuration: the teacher's vision tower and image token, the student's LLM.
inline models::CuMoConfig student_model_config(const models::CuMoConfig& teacher, const StudentConfig& s) {
  models::CuMoConfig c = teacher;
  nn::DecoderConfig& t = c.llava.text;
  t.hidden = s.text.hidden;
  t.layers = s.text.layers;
  t.heads = s.text.heads;
  t.kv_heads = s.text.kv_heads;
  t.head_dim = 0;
  t.ffn = s.text.ffn;
  t.experts = 0;
  t = t.with_defaults();
  c.experts = s.experts;
  c.top_k = s.top_k;
  return c;
}

// Fresh student (seeded init), the teacher's vision weights copied in.
inline models::CuMo<> make_student(models::CuMo<>& teacher, const StudentConfig& s, std::uint64_t seed) {
  models::CuMo<> student(student_model_config(teacher.config(), s));
  Rng rng(seed);
  student.reset_parameters(rng);
  if (teacher.vision_is_sparse()) student.upcycle(rng, true, false);
  const ParameterList tv = teacher.vision_parameters(), sv = student.vision_parameters();
  CUMO_CHECK(tv.size() == sv.size(), "make_student: teacher and student vision towers differ in structure");
  for (std::size_t i = 0; i < tv.size(); ++i) {
    CUMO_CHECK(tv[i]->value.shape() == sv[i]->value.shape() && tv[i]->name == sv[i]->name,
               "make_student: vision parameter ", tv[i]->name, " has shape ", tv[i]->value.shape(),
               " in the teacher but ", sv[i]->name, " ", sv[i]->value.shape(), " in the student");
    std::copy_n(tv[i]->value.data<float>(), tv[i]->value.numel(), sv[i]->value.data<float>());
  }
  return student;
}

inline bool student_is_sparse(models::CuMo<>& m) {
  for (auto& L : m.llava().language_model.layers)
    if (L.mlp.is_sparse()) return true;
  return false;
}

// Upcycles the student's MoE layers (a no-op for a dense student or one already sparse). Routers from `rng`.
inline void upcycle_student(models::CuMo<>& m, const StudentConfig& s, Rng& rng) {
  if (!s.sparse || student_is_sparse(m)) return;
  models::make_sparse_student(m.llava().language_model, s.experts, s.top_k, rng, student_moe_layers(s),
                              models::mod_moe_options(float(s.capacity_factor)));
}

// ---- memory report -------------------------------------------------------------------------------------------------
inline double peak_rss_mib() {
#if defined(__unix__) || defined(__APPLE__)
  rusage u{};
  if (getrusage(RUSAGE_SELF, &u) != 0) return -1;
#if defined(__APPLE__)
  return double(u.ru_maxrss) / (1024.0 * 1024.0);
#else
  return double(u.ru_maxrss) / 1024.0;
#endif
#else
  return -1;
#endif
}

struct MemoryReport {
  double teacher_mib = 0;        // teacher parameter values (its gradient buffers are never touched)
  double student_mib = 0;        // student values + gradients
  double optimizer_mib = 0;      // AdamW exp_avg + exp_avg_sq of the trainable student parameters
  double peak_rss_mib = 0;       // the process's peak resident set so far
  std::int64_t teacher_params = 0, student_params = 0, student_trainable = 0, student_active = 0;
  nlohmann::json to_json() const {
    return {{"teacher_params", teacher_params},         {"student_params", student_params},
            {"student_active_params", student_active},   {"student_trainable_params", student_trainable},
            {"teacher_weights_mib", teacher_mib},        {"student_weights_and_grads_mib", student_mib},
            {"optimizer_state_mib", optimizer_mib},      {"peak_rss_mib", peak_rss_mib}};
  }
};

// Parameters a token passes through in the LLM (embedding table and head excluded): a sparse layer counts its
// router and top_k of its E experts.
inline std::int64_t active_language_params(models::CuMo<>& m) {
  std::int64_t n = 0;
  for (auto& L : m.llava().language_model.layers) {
    ParameterList ps;
    L.mlp.collect(ps);
    std::int64_t ffn = 0, router = 0;
    for (Parameter* p : ps) (p->name.ends_with(".gate.weight") && L.mlp.is_sparse() ? router : ffn) += p->value.numel();
    n += L.mlp.is_sparse() ? router + ffn / L.mlp.sparse().num_experts() * L.mlp.sparse().top_k() : ffn;
    ParameterList all;
    L.collect(all);
    for (Parameter* p : all) n += p->value.numel();
    n -= router + ffn;
  }
  return n;
}

// ---- batches -------------------------------------------------------------------------------------------------------
// The (B, T) i64 label tensor of a batch, for the losses of distill.hpp.
inline Tensor labels_tensor(const io::Batch& b) {
  Tensor t = Tensor::empty({b.B, b.T}, DType::i64);
  std::copy(b.labels.begin(), b.labels.end(), t.data<std::int64_t>());
  return t;
}

// Chosen rows then rejected rows, padded to one length; pixels of the chosen rows only (the same images).
inline io::Batch concat_pair_batches(const io::Batch& w, const io::Batch& l, std::int32_t pad_id) {
  CUMO_CHECK(w.B == l.B, "concat_pair_batches: ", w.B, " chosen rows but ", l.B, " rejected rows");
  io::Batch b;
  b.B = 2 * w.B;
  b.T = std::max(w.T, l.T);
  b.input_ids.assign(std::size_t(b.B * b.T), pad_id);
  b.labels.assign(std::size_t(b.B * b.T), io::kIgnoreLabel);
  b.key_valid.assign(std::size_t(b.B * b.T), 0);
  auto put = [&](const io::Batch& s, std::int64_t row0) {
    for (std::int64_t r = 0; r < s.B; ++r) {
      const auto src = std::size_t(r * s.T), dst = std::size_t((row0 + r) * b.T);
      std::copy_n(s.input_ids.begin() + std::ptrdiff_t(src), s.T, b.input_ids.begin() + std::ptrdiff_t(dst));
      std::copy_n(s.labels.begin() + std::ptrdiff_t(src), s.T, b.labels.begin() + std::ptrdiff_t(dst));
      std::copy_n(s.key_valid.begin() + std::ptrdiff_t(src), s.T, b.key_valid.begin() + std::ptrdiff_t(dst));
      b.lengths.push_back(s.lengths[std::size_t(r)]);
      b.has_image.push_back(s.has_image[std::size_t(r)]);
      b.indices.push_back(s.indices[std::size_t(r)]);
    }
  };
  put(w, 0);
  put(l, w.B);
  b.pixels = w.pixels;
  return b;
}

// ---- one forward of teacher and student on a batch -----------------------------------------------------------------
// Writes `proj` (rows of image features, in order) into the embeddings of the image positions. pairs: the rows
// are chosen then rejected, both halves reading the same features (their shared images).
inline void scatter_image_rows(Tensor& emb, const std::vector<std::int64_t>& ids, std::int64_t image_id,
                               const Tensor& proj, std::int64_t H, bool pairs = false) {
  std::int64_t k = 0;
  const std::int64_t n = proj.size(0);
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (ids[i] == image_id) {
      const std::int64_t src = pairs ? k % n : k;
      std::copy_n(proj.data<float>() + src * H, H, emb.data<float>() + std::int64_t(i) * H);
      ++k;
    }
  CUMO_CHECK(pairs ? k == 2 * n : k == n, "distill: the batch has ", k, " image tokens but the images give ",
             n, " features");
}

class DistillStep {
 public:
  DistillStep(models::CuMo<>& teacher, models::CuMo<>& student) : t_(&teacher), s_(&student), pass_(student.llava().language_model) {}

  struct Forward {
    Tensor teacher_logits, student_logits;  // (B·T, V)
    models::StudentPass<>::Output out;        // student's aux terms
  };

  // pairs = true: the rows are chosen then rejected and the pixels cover only the first half (shared images).
  Forward forward(const io::Batch& b, bool pairs) {
    const std::int64_t image_id = s_->config().llava.image_token_id;
    const std::int64_t segments = pairs ? 2 : 1;
    // The frozen vision tower is the teacher's (the student holds a copy): its features serve both.
    Tensor features;  // (images·N, Hv), or (images·N, 2·Hv) with S²
    if (b.images() > 0) features = s_->llava().encode_images(b.pixels, /*all_layers=*/false);
    std::vector<std::int64_t> safe_ids = b.input_ids;  // image positions embed id 0; their rows are replaced
    is_image_.assign(b.input_ids.size(), false);
    for (std::size_t i = 0; i < safe_ids.size(); ++i)
      if (safe_ids[i] == image_id) {
        is_image_[i] = true;
        safe_ids[i] = 0;
      }
    Forward f;
    {  // teacher, eval mode
      auto& tl = t_->llava();
      Tensor emb = tl.language_model.embed_tokens.apply(safe_ids);  // (B·T, Ht)
      if (features.defined()) {
        const Tensor proj = tl.projector.forward(features, b.images());  // (images·N, Ht)
        scatter_image_rows(emb, b.input_ids, image_id, proj, tl.config().text.hidden, pairs);
      }
      f.teacher_logits = models::eval_logits_embeds(tl.language_model, emb, b.B, b.T, &b.key_valid);
    }
    {  // student, training mode
      auto& sl = s_->llava();
      Tensor emb = sl.language_model.embed(safe_ids);  // (B·T, Hs)
      images_ = b.images();
      if (features.defined()) {
        const Tensor proj = sl.projector.forward(features, b.images());  // (images·N, Hs)
        scatter_image_rows(emb, b.input_ids, image_id, proj, sl.config().text.hidden, pairs);
      }
      pairs_ = pairs;
      f.out = pass_.forward_embeds(emb, b.B, b.T, segments, &b.key_valid);
      f.student_logits = f.out.logits;
    }
    return f;
  }

  // dlogits → every student gradient below the vision tower (connector, embeddings, LLM).
  void backward(const Tensor& dlogits, double aux_coef) {
    auto& sl = s_->llava();
    const Tensor demb = pass_.backward(dlogits, AuxLossWeights{float(aux_coef), 0.f});  // (B·T, Hs)
    sl.language_model.backward_embeddings(demb, &is_image_);
    if (images_ == 0) return;
    const std::int64_t H = sl.config().text.hidden;
    const std::int64_t N = s_->config().llava.vision.patches(), rows = images_ * N;
    Tensor dproj = Tensor::zeros({rows, H});  // (images·N, Hs); pair rows fold onto the shared images
    float* dp = dproj.data<float>();
    std::int64_t k = 0;
    for (std::size_t i = 0; i < is_image_.size(); ++i)
      if (is_image_[i]) {
        const std::int64_t r = pairs_ ? k % rows : k;
        const float* src = demb.data<float>() + std::int64_t(i) * H;
        for (std::int64_t h = 0; h < H; ++h) dp[r * H + h] += src[h];
        ++k;
      }
    (void)sl.projector.backward(dproj);
  }

 private:
  models::CuMo<>* t_;
  models::CuMo<>* s_;
  models::StudentPass<> pass_;
  std::vector<bool> is_image_;
  std::int64_t images_ = 0;
  bool pairs_ = false;
};

// ---- the stage runner ----------------------------------------------------------------------------------------------
struct DistillRun {
  const DistillConfig* cfg = nullptr;
  const RunConfig* teacher_run = nullptr;  // the teacher checkpoint's run config (data directory, shapes world, dims)
  const io::Tokenizer* tok = nullptr;
  models::CuMo<>* teacher = nullptr;
  models::CuMo<>* student = nullptr;
  std::vector<data::PreferencePair> pairs;  // preference stages (built on first use)
};

struct DistillStepMetrics {
  std::string stage;
  std::int64_t step = 0;
  double lr = 0, loss = 0, kl = 0, ce = 0, aux = 0, pref = 0, reward_acc = 0, reward_margin = 0, grad_norm = 0;
  double tokens_per_s = 0, elapsed_s = 0, seconds = 0;
  std::int64_t tokens = 0;
};

// OUT/metrics.csv: one row per step of every stage; a rerun keeps the rows of the stages it does not run again.
class DistillCsv {
 public:
  static constexpr const char* kHeader =
      "stage,step,lr,loss,kl,ce,aux,pref_loss,reward_accuracy,reward_margin,grad_norm,tokens_per_s,elapsed_s";
  DistillCsv(const std::string& path, const std::vector<std::string>& rerun_stages, bool fresh = false)
      : log_(path, kHeader,
             [&](const std::string& row) {
               const std::string st = row.substr(0, row.find(','));
               return std::find(rerun_stages.begin(), rerun_stages.end(), st) == rerun_stages.end();
             },
             fresh) {}
  void write(const DistillStepMetrics& m) {
    std::ostringstream o;
    o << std::setprecision(9) << m.stage << ',' << m.step << ',' << m.lr << ',' << m.loss << ',' << m.kl << ','
      << m.ce << ',' << m.aux << ',' << m.pref << ',' << m.reward_acc << ',' << m.reward_margin << ',' << m.grad_norm
      << ',' << std::setprecision(6) << m.tokens_per_s << ',' << m.elapsed_s;
    log_.append(o.str());
  }

 private:
  CsvLog log_;
};

struct DistillStageResult {
  double seconds = 0, last_loss = 0, tokens_per_s = 0;
  MemoryReport memory;
};

namespace detail {
inline io::LlavaRecord answer_record(const data::PreferencePair& p, const std::string& answer) {
  io::LlavaRecord r;
  r.id = p.id;
  r.image = p.image;
  r.type = p.type;
  r.conversations = {{io::Role::user, "human", "<image>\n" + p.prompt}, {io::Role::assistant, "gpt", answer}};
  return r;
}
}  // namespace detail

// Runs one stage on run.student (upcycling it first when the stage asks) and writes its checkpoint to `dir`.
// stage_index seeds the upcycled routers (the same stage upcycles the same way in every pipeline of a seed).
inline DistillStageResult run_distill_stage(DistillRun& run, const DistillStage& st, std::size_t stage_index,
                                            const std::string& dir, DistillCsv* csv, bool quiet,
                                            std::int64_t log_every) {
  const auto t_start = std::chrono::steady_clock::now();
  const DistillConfig& cfg = *run.cfg;
  const RunConfig& trun = *run.teacher_run;
  models::CuMo<>& student = *run.student;
  const std::string tag = "stage '" + st.name + "' (" + distill_kind_name(st.kind) + ")";

  if (st.upcycle) {
    Rng rng(cfg.seed * 7919ull + 1000ull + stage_index);
    upcycle_student(student, cfg.student, rng);
  }
  const bool sparse = student_is_sparse(student);

  // Parameter groups: the vision tower never trains; connector / FFNs (experts, routers) / the rest of the LLM.
  ParameterList ffn, rest;
  for (auto& L : student.llava().language_model.layers) L.mlp.collect(ffn);
  for (Parameter* p : student.language_parameters())
    if (std::find(ffn.begin(), ffn.end(), p) == ffn.end()) rest.push_back(p);
  std::vector<train::ParamGroup> groups;
  groups.push_back({"vision", student.vision_parameters(), 1.0, st.weight_decay, true});
  groups.push_back({"connector", student.connector_parameters(), 1.0, st.weight_decay, !st.train_connector});
  groups.push_back({"ffn", ffn, 1.0, st.weight_decay, !st.train_ffn});
  groups.push_back({"attention", rest, 1.0, st.weight_decay, !st.train_attention});
  train::AdamW opt(std::move(groups), train::AdamWOptions{st.lr, 0.9, 0.999, 1e-8, st.weight_decay});
  const auto sched = train::CosineWithWarmup::with_warmup_ratio(st.lr, st.steps, st.warmup_ratio);

  // Data.
  io::DataOptions dopt = trun.data_options(st.chat_template);
  dopt.image_root = trun.data_dir;
  const bool pref = is_preference(st.kind);
  std::optional<io::LlavaDataset> data, rejected;
  if (pref) {
    if (run.pairs.empty()) {
      const data::ShapesWorld w = data::generate_shapes_world(trun.shapes);
      run.pairs = data::preference_pairs(w, trun.shapes, /*captions=*/false);
    }
    std::vector<io::LlavaRecord> cw, cl;
    for (const auto& p : run.pairs) {
      cw.push_back(detail::answer_record(p, p.chosen));
      cl.push_back(detail::answer_record(p, p.rejected));
    }
    data.emplace(std::move(cw), *run.tok, dopt, "preference pairs (chosen)");
    rejected.emplace(std::move(cl), *run.tok, dopt, "preference pairs (rejected)");
  } else {
    data.emplace(io::LlavaDataset::load(trun.data_path(st.data), *run.tok, dopt));
  }
  io::PrefetchedBatches it(io::BatchIterator(*data, st.batch, st.data_seed));  // the next batches load meanwhile

  MemoryReport mem;
  {
    const ParameterList tp = run.teacher->parameters(), sp = student.parameters();
    mem.teacher_params = models::parameter_count(tp);
    mem.student_params = models::parameter_count(sp);
    mem.teacher_mib = double(models::parameter_bytes(tp)) / (1 << 20);
    mem.student_mib = double(models::parameter_bytes(sp, true)) / (1 << 20);
    for (const Parameter* p : opt.trainable_parameters()) mem.student_trainable += p->value.numel();
    mem.optimizer_mib = double(2 * 4 * mem.student_trainable) / (1 << 20);
    mem.student_active = active_language_params(student);
  }
  if (!quiet)
    std::fprintf(stderr,
                 "%s: %zu samples, %lld steps of %lld, lr %g, student %s (%lld params, %lld trainable), teacher %lld "
                 "params\n",
                 tag.c_str(), data->size(), (long long)st.steps, (long long)st.batch, st.lr,
                 sparse ? "sparse" : "dense", (long long)mem.student_params, (long long)mem.student_trainable,
                 (long long)mem.teacher_params);

  DistillStep step(*run.teacher, student);
  const double aux_coef = sparse ? cfg.student.aux_coef : 0.0;
  DistillStageResult res;
  double train_s = 0;
  std::int64_t tokens = 0;
  // next batch, teacher and student forwards, the stage's loss, backward
  auto forward_backward = [&](std::int64_t s) {
    io::Batch b = it.next();
    if (pref) b = concat_pair_batches(b, io::collate(*rejected, b.indices), data->pad_id());
    const Tensor labels = labels_tensor(b);
    auto f = step.forward(b, pref);
    Tensor dl;
    DistillStepMetrics m;
    m.stage = st.name;
    if (pref) {
      const auto ref = train::sequence_logps(f.teacher_logits, labels);
      const std::size_t P = std::size_t(b.B / 2);
      const std::vector<double> ref_w(ref.begin(), ref.begin() + std::ptrdiff_t(P)), ref_l(ref.begin() + std::ptrdiff_t(P), ref.end());
      train::PreferenceOptions po;
      po.loss = st.kind == DistillKind::dpo ? train::PreferenceLoss::sigmoid : train::PreferenceLoss::kto_pair;
      po.beta = st.beta;
      const auto r = train::preference_distill_loss(f.student_logits, labels, ref_w, ref_l, &dl, po);
      m.pref = r.pref.loss;
      m.reward_acc = r.pref.reward_accuracy;
      m.reward_margin = r.pref.reward_margin;
      m.loss = r.pref.loss;
      if (st.ce_weight > 0) {
        // + ce_weight · CE of the chosen answers (RPO-style anchor: keeps the chosen answers likely while the
        // preference term pushes the rejected ones down); the rejected rows are masked out.
        Tensor chosen = labels.clone();  // (2P, T)
        std::int64_t* lp = chosen.data<std::int64_t>();
        std::fill(lp + std::int64_t(P) * b.T, lp + chosen.numel(), std::int64_t(train::kIgnoreIndex));
        train::MimicWeights w;
        w.align = 0;
        w.kl = 0;
        w.ce = st.ce_weight;
        const auto c = train::mimic_distill_loss(f.student_logits, f.teacher_logits, chosen, &dl, w);
        m.ce = c.ce;
        m.loss += c.objective;
      }
    } else {
      train::MimicWeights w;
      w.align = 0;
      w.kl = st.kind == DistillKind::ce ? 0.0 : st.kl_weight;
      w.ce = st.ce_weight;
      train::KDOptions ko;
      ko.temperature = st.temperature;
      const auto r = train::mimic_distill_loss(f.student_logits, f.teacher_logits, labels, &dl, w, ko);
      m.kl = r.kl;
      m.ce = r.ce;
      m.loss = r.objective;
    }
    m.aux = f.out.aux;
    m.loss += aux_coef * f.out.aux;
    if (!std::isfinite(m.loss))
      fail("distillation stopped at ", tag, " step ", s + 1, ": the loss is ", m.loss, " (kl ", m.kl, ", ce ", m.ce,
           ", aux ", m.aux, ", preference ", m.pref, ")");
    step.backward(dl, aux_coef);
    m.tokens = b.tokens();
    return m;
  };
  // after the update: the CSV row and the log line
  auto log = [&](DistillStepMetrics& m) {
    train_s += m.seconds;
    tokens += m.tokens;
    m.tokens_per_s = m.seconds > 0 ? double(m.tokens) / m.seconds : 0;
    m.elapsed_s = train_s;
    if (csv) csv->write(m);
    res.last_loss = m.loss;
    if (!quiet && log_every > 0 && (m.step % log_every == 0 || m.step == st.steps))
      std::fprintf(stderr, "%s step %lld/%lld  loss %.4f  kl %.4f  ce %.4f  aux %.4f%s  %.0f tok/s\n", tag.c_str(),
                   (long long)m.step, (long long)st.steps, m.loss, m.kl, m.ce, m.aux,
                   pref ? (std::string("  pref ") + std::to_string(m.pref) + "  reward acc " +
                           std::to_string(m.reward_acc)).c_str()
                        : "",
                   train_s > 0 ? double(tokens) / train_s : 0.0);
  };
  train_steps(opt, sched, StepLoop{0, st.steps, st.max_grad_norm, nullptr, nullptr, {}}, forward_backward, log);

  train::TrainerState ts;
  ts.step = st.steps;
  ts.metadata["distill_config"] = cfg.raw.dump();
  ts.metadata["stage"] = st.name;
  ts.metadata["stage_kind"] = distill_kind_name(st.kind);
  ts.metadata["stage_finished"] = "1";
  std::string layers;
  const auto& L = student.llava().language_model.layers;
  for (std::size_t l = 0; l < L.size(); ++l)
    if (L[l].mlp.is_sparse()) layers += (layers.empty() ? "" : ",") + std::to_string(l);
  ts.metadata["student_sparse_layers"] = layers;
  train::save_checkpoint(dir, student.parameters(), &opt, ts);
  mem.peak_rss_mib = peak_rss_mib();
  res.memory = mem;
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  res.tokens_per_s = train_s > 0 ? double(tokens) / train_s : 0;
  return res;
}

// Loads a student checkpoint written by run_distill_stage into a freshly built student of the same config
// (upcycling the layers its metadata lists first).
inline void load_student_checkpoint(models::CuMo<>& student, const StudentConfig& sc, const std::string& dir) {
  const nlohmann::json st = read_trainer_state(dir);
  const auto meta = st.find("metadata");
  CUMO_CHECK(meta != st.end() && meta->is_object() && meta->contains("student_sparse_layers"),
             "load_student_checkpoint: '", dir, "' is not a cumo_distill stage checkpoint (its metadata has no "
             "'student_sparse_layers'; a cumo_train checkpoint is a teacher, not a student)");
  const std::string layers = metadata_of(st, "student_sparse_layers", dir);
  if (!layers.empty()) {
    std::vector<int> ls;
    std::stringstream ss(layers);
    for (std::string x; std::getline(ss, x, ',');) ls.push_back(std::stoi(x));
    Rng dummy(0);  // shapes only: load_checkpoint overwrites every value
    if (!student_is_sparse(student))
      models::make_sparse_student(student.llava().language_model, sc.experts, sc.top_k, dummy, ls,
                                  models::mod_moe_options(float(sc.capacity_factor)));
  }
  (void)train::load_checkpoint(dir, student.parameters(), nullptr);
}

}  // namespace cumo::app
