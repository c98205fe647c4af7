#pragma once
// One stage of the CuMo recipe (tools/app/recipe.hpp), run or continued on a model: its parameter groups and
// optimizer, the data order, M micro-batches per step (each micro-batch's loss its own mean, the step's the mean
// of the M: the HF Trainer before 4.46, as LLaVA and CuMo were trained), the shared step loop (app/loop.hpp), the
// per-step metrics CSV and progress line, NaN/Inf stops naming the term, and a complete checkpoint at the end or
// on a stop — which --resume continues bitwise (same build, same thread count: docs/training.md).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "app/loop.hpp"
#include "app/metrics.hpp"
#include "app/run_config.hpp"
#include "cumo/core/error.hpp"
#include "cumo/dist/data_parallel.hpp"
#include "cumo/dist/expert_data_parallel.hpp"
#include "cumo/dist/overlap.hpp"
#include "cumo/dist/zero.hpp"
#include "cumo/io/llava_data.hpp"
#include "cumo/io/prefetch.hpp"
#include "cumo/train/checkpoint.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo/train/schedule.hpp"

namespace cumo::app {

struct StepMetrics {
  int stage = 0;
  std::int64_t step = 0;
  double lr = 0, loss = 0, ce = 0, vision_balance = 0, vision_z = 0, projector_balance = 0, projector_z = 0;
  double grad_norm = 0, tokens_per_s = 0, elapsed_s = 0, seconds = 0;
  double comm_seconds = 0;  // data parallel: the gradient and metric reductions of this step
  std::int64_t tokens = 0;
  std::vector<double> vision_balance_l, vision_z_l, vision_load_l;  // per sparse CLIP layer (empty while dense)
  double projector_load = -1;                                       // max/mean; < 0 while dense
};

// One file for all stages. Columns: step, stage, lr, loss, ce, vision_balance, vision_z, projector_balance,
// projector_z, grad_norm, tokens, tokens_per_s, elapsed_s, projector_load_max_mean, then per CLIP layer l
// vision_balance_l<l>, vision_z_l<l>, vision_load_max_mean_l<l>. MoE columns are empty while the model is dense.
// A resumed stage keeps the rows of earlier stages and of itself up to its checkpoint's step.
class MetricsCsv {
 public:
  MetricsCsv() = default;
  MetricsCsv(const std::string& path, std::int64_t vision_layers, int stage, std::int64_t keep_step, bool fresh)
      : layers_(vision_layers),
        log_(path, header(vision_layers),
             [&](const std::string& row) {
               std::int64_t st = 0, sg = 0;
               char comma = 0;
               std::istringstream ls(row);
               if (!(ls >> st >> comma >> sg)) return false;
               return sg < stage || (sg == stage && st <= keep_step);
             },
             fresh) {}

  static std::string header(std::int64_t layers) {
    std::string h = "step,stage,lr,loss,ce,vision_balance,vision_z,projector_balance,projector_z,grad_norm,tokens,"
                    "tokens_per_s,elapsed_s,projector_load_max_mean";
    for (std::int64_t l = 0; l < layers; ++l) h += ",vision_balance_l" + std::to_string(l);
    for (std::int64_t l = 0; l < layers; ++l) h += ",vision_z_l" + std::to_string(l);
    for (std::int64_t l = 0; l < layers; ++l) h += ",vision_load_max_mean_l" + std::to_string(l);
    return h;
  }
  const CsvLog& log() const { return log_; }

  void write(const StepMetrics& m) {
    std::ostringstream o;
    o << std::setprecision(9);
    o << m.step << ',' << m.stage << ',' << m.lr << ',' << m.loss << ',' << m.ce << ',' << m.vision_balance << ','
      << m.vision_z << ',' << m.projector_balance << ',' << m.projector_z << ',' << m.grad_norm << ',' << m.tokens
      << ',' << std::setprecision(6) << m.tokens_per_s << ',' << m.elapsed_s << ',' << std::setprecision(9);
    if (m.projector_load >= 0) o << m.projector_load;
    auto cols = [&](const std::vector<double>& v) {
      for (std::int64_t l = 0; l < layers_; ++l) {
        o << ',';
        if (std::size_t(l) < v.size()) o << v[std::size_t(l)];
      }
    };
    cols(m.vision_balance_l);
    cols(m.vision_z_l);
    cols(m.vision_load_l);
    log_.append(o.str());
  }

 private:
  std::int64_t layers_ = 0;
  CsvLog log_;
};

struct StageRunOptions {
  std::string final_dir;                  // the end-of-stage checkpoint
  std::string partial_dir;                // a stopped stage's checkpoint (--max-steps, SIGINT)
  std::string csv_path;                   // per-step metrics ("" = none)
  bool csv_fresh = false;                 // start the CSV anew (an overwritten run)
  std::string resume_dir;                 // continue this stage from a partial checkpoint ("" = fresh stage)
  std::int64_t max_steps = -1;            // stop once the stage has taken this many steps (>= 0), saving partial_dir
  std::int64_t log_every = 0;             // > 0: a plain log line every so many steps (for non-TTY logs)
  bool progress = true;                   // the progress bar (only drawn on a terminal)
  bool quiet = false;                     // no log lines, no bar
  const std::atomic<bool>* stop = nullptr;  // set asynchronously (SIGINT): save partial_dir and return
  std::map<std::string, std::string> metadata;  // written into the checkpoints (stage/finished/sparsity are added)
  std::map<std::string, Rng::State> rngs;       // generators to record (e.g. "init")
  // Data parallel (docs/distributed.md): every rank runs run_stage on its share of each global micro-batch; rank 0
  // alone writes the checkpoints (the others pass empty csv_path and quiet). nullptr = one process.
  dist::Communicator* comm = nullptr;
  bool zero1 = false;  // data parallel: the AdamW moments sharded over the ranks (dist/zero.hpp); same weights
  // Data parallel: sum the gradients on a background thread while the backward goes on (dist/overlap.hpp); the same
  // bits as the sum after the backward.
  bool overlap_grad_sum = false;
  // Data parallel: > 1 splits the sparse blocks' experts over groups of this many ranks for the stage
  // (dist/expert_data_parallel.hpp); the model is whole again when run_stage returns, and so are its checkpoints.
  int expert_parallel = 1;
};

struct StageResult {
  bool finished = false;       // the stage reached its step count (final_dir written)
  std::int64_t step = 0;       // steps taken so far in this stage
  std::string checkpoint;      // the directory written
  double last_loss = 0, last_ce = 0;
  double seconds = 0;          // wall time of this call
  double tokens_per_s = 0;     // mean over this call
  double comm_seconds = 0;     // data parallel: time in the step's reductions (of `seconds`' training part)
  double train_seconds = 0;    // the steps alone (no loading, no checkpoint)
};

namespace detail {
// The first non-finite term of a forward's loss, in words ("the balance loss of CLIP layer 2", ...).
template <class Model, class Out>
std::string nonfinite_term(const Model& model, const Out& o) {
  auto bad = [](double x) { return !std::isfinite(x); };
  if (bad(o.ce)) {
    if (o.logits.defined()) {
      const Tensor logits = model.backend().to_host(o.logits);
      const float* z = logits.template data<float>();
      for (std::int64_t i = 0; i < logits.numel(); ++i)
        if (!std::isfinite(z[i]))
          return "the cross-entropy (the LM's logits hold " + std::to_string(z[i]) + " at logit row " +
                 std::to_string(i / logits.size(-1)) +
                 (o.logits_from > 0 ? " of the rows t >= " + std::to_string(o.logits_from) + " of each sequence"
                                    : std::string()) + ")";
    }
    return "the cross-entropy";
  }
  for (std::size_t l = 0; l < o.vision_balance_per_layer.size(); ++l)
    if (bad(o.vision_balance_per_layer[l])) return "the balance loss of CLIP layer " + std::to_string(l);
  for (std::size_t l = 0; l < o.vision_z_per_layer.size(); ++l)
    if (bad(o.vision_z_per_layer[l])) return "the z-loss of CLIP layer " + std::to_string(l);
  if (bad(o.projector_balance)) return "the connector's balance loss";
  if (bad(o.projector_z)) return "the connector's z-loss";
  return "the total";
}

// Tokens per expert of each sparse layer, summed over a step's micro-batches, as max/mean.
struct LoadSum {
  std::vector<std::vector<std::int64_t>> vision;  // [sparse CLIP layer][expert]
  std::vector<std::int64_t> projector;
  static void add(std::vector<std::int64_t>& sum, const std::vector<std::int64_t>& t) {
    if (sum.size() < t.size()) sum.resize(t.size(), 0);
    for (std::size_t e = 0; e < t.size(); ++e) sum[e] += t[e];
  }
  static double max_over_mean(const std::vector<std::int64_t>& t) {
    ExpertLoad el;
    el.tokens = t;
    return el.max_over_mean();
  }
};
}  // namespace detail

// Whether a run can split its experts over groups of K of its `ranks` ranks (cumo_train --expert-parallel K).
inline void check_expert_parallel(const models::CuMoConfig& c, int K, int ranks) {
  CUMO_CHECK(K >= 1, "--expert-parallel must be >= 1, got ", K);
  if (K == 1) return;
  CUMO_CHECK(ranks % K == 0, "--expert-parallel ", K, " with ", ranks, " ranks: the ranks must form whole "
             "expert-parallel groups (run mpirun -np N with N a multiple of ", K, ")");
  CUMO_CHECK(c.experts % K == 0 && c.connector_E() % K == 0, "--expert-parallel ", K, ": the ", c.experts,
             " experts", c.connector_E() != c.experts ? " (" + std::to_string(c.connector_E()) + " in the connector)"
                                                         : std::string(),
             " do not split evenly over groups of ", K, " ranks (K must divide the number of experts)");
  CUMO_CHECK(c.llava.text.experts % K == 0, "--expert-parallel ", K, ": the language model's ", c.llava.text.experts,
             " experts do not split evenly over groups of ", K, " ranks (K must divide the number of experts)");
}

// The stage's parameter groups: vision tower, connector, language model; a frozen group gets no update and no state.
template <class Model>
std::vector<train::ParamGroup> stage_groups(Model& model, const StageConfig& sc) {
  std::vector<train::ParamGroup> g;
  g.push_back({"vision", model.vision_parameters(), sc.lr_scale_vision, sc.weight_decay, !sc.train_vision});
  g.push_back({"connector", model.connector_parameters(), sc.lr_scale_connector, sc.weight_decay, !sc.train_connector});
  g.push_back({"language", model.language_parameters(), sc.lr_scale_language, sc.weight_decay, !sc.train_language});
  return g;
}

// Runs (or continues) one stage of training on `model`. The model must already have the stage's structure (dense,
// or upcycled for stage 3) and, for a fresh stage, its starting weights. Writes final_dir when the stage completes,
// partial_dir when it stops early (max_steps / stop flag); both are complete checkpoints with optimizer state.
// The optimizer runs on the model's backend: a models::CuMo<backend::Cuda> trains entirely on the GPU, its
// checkpoints the CPU run's format.
template <class Model>
StageResult run_stage(Model& model, const io::LlavaDataset& data, const StageConfig& sc, const StageRunOptions& ro) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  const std::string tag = "stage " + std::to_string(sc.stage);
  // The loss needs the language model's last layer and head on the rows from the first answer token on only
  // (CuMo::set_logit_rows); the model gives every row's logits again when the stage returns.
  struct LogitRowsScope {
    Model& m;
    typename Model::LogitRows was = m.logit_rows();
    ~LogitRowsScope() { m.set_logit_rows(was); }
  } logit_rows_scope{model};
  model.set_logit_rows(Model::LogitRows::loss);

  std::vector<train::ParamGroup> groups = stage_groups(model, sc);
  std::size_t grouped = 0;
  for (const auto& g : groups) grouped += g.params.size();
  const ParameterList all = model.parameters();
  CUMO_CHECK(grouped == all.size(), tag, ": the vision/connector/language groups hold ", grouped,
             " parameters but the model has ", all.size());
  train::AdamW<typename Model::backend_type> opt(std::move(groups),
                                                 {sc.lr, sc.beta1, sc.beta2, sc.eps, sc.weight_decay}, model.backend());
  CUMO_CHECK(!opt.trainable_parameters().empty(), tag, ": every parameter group is frozen; nothing to train");
  CUMO_CHECK(data.supervised_tokens() > 0, tag, ": '", data.source(), "' (", data.size(), " records) has no "
             "supervised token: no record has an assistant answer left after truncation, so there is nothing to train "
             "on (the loss would be 0)");
  const auto sched = train::CosineWithWarmup::with_warmup_ratio(sc.lr, sc.steps, sc.warmup_ratio);
  io::BatchIterator order(data, sc.batch, sc.data_seed);
  dist::SelfCommunicator self;
  dist::Communicator& comm = ro.comm ? *ro.comm : self;
  const bool parallel = comm.size() > 1;
  if (parallel) {
    const auto& text = model.config().llava.text;
    CUMO_CHECK(text.experts == 0 || text.aux_coef == 0.0, tag, ": data parallel with a Mixtral decoder's "
               "router_aux_loss_coef (", text.aux_coef, ") is not supported: that balance loss is "
               "over all tokens of the batch at once, not a mean over samples, so the ranks' shares do not add up to it");
    order.set_shard(comm.rank(), comm.size());
  }

  train::TrainerState st;
  if (!ro.resume_dir.empty()) {
    st = train::load_checkpoint(ro.resume_dir, all, &opt);
    const auto meta_stage = st.metadata.find("stage");
    CUMO_CHECK(meta_stage != st.metadata.end() && meta_stage->second == std::to_string(sc.stage), tag,
               ": checkpoint '", ro.resume_dir, "' is of stage ",
               meta_stage == st.metadata.end() ? std::string("?") : meta_stage->second);
    CUMO_CHECK(st.step <= sc.steps, tag, ": checkpoint '", ro.resume_dir, "' is at step ", st.step,
               " but the stage has only ", sc.steps, " steps");
    CUMO_CHECK(opt.steps() == st.step, tag, ": checkpoint '", ro.resume_dir, "': optimizer steps ", opt.steps(),
               " != trainer step ", st.step);
    order.set_position(io::DataPosition{sc.data_seed, std::uint64_t(st.epoch), std::uint64_t(st.sample), data.size()});
  }
  // The gradient sum overlapped with the backward, on an engine that lets a second thread run collectives; with
  // expert parallelism while the backward's own exchanges run (two threads in the engine at once: MPI_THREAD_MULTIPLE
  // on CPU ranks; NCCL never allows it). GPU ranks: the sum's duplicate runs on a stream of its own, ordered after
  // the backward's kernels by events (dist/overlap.hpp; unverified, no GPU has run it). One answer on every rank,
  // before any expert sharding.
  std::unique_ptr<dist::Communicator> overlap_comm, overlap_replicas;
  if (parallel && ro.overlap_grad_sum) {
    const bool gpu_ranks = comm.moves_device_memory();
    if (ro.expert_parallel > 1 && dist::any(comm, !comm.allows_concurrent_threads()))
      fail(tag, ": --overlap-grad-sum with --expert-parallel needs an engine that runs collectives on two threads at "
           "once (the backward's expert exchanges and the sum): ",
           gpu_ranks ? "NCCL forbids two threads issuing to communicators of one GPU at once; on GPU ranks use "
                       "--overlap-grad-sum without --expert-parallel"
                     : "MPI_THREAD_MULTIPLE, which this MPI does not give on some rank");
    if (dist::any(comm, !comm.allows_background_thread()))
      fail(tag, ": --overlap-grad-sum needs an MPI that runs collectives on a second thread "
           "(MPI_THREAD_SERIALIZED); this one does not on some rank");
    overlap_comm = comm.background();
  }
  // Expert parallelism after any resume too (whole weights and moments → this rank's slices of the experts)
  std::optional<dist::ExpertDataParallel> ep;
  if (ro.expert_parallel > 1) {
    // the same checks on every rank's same configuration: one error everywhere, before any exchange
    // (GPU ranks: the rows travel over NCCL on device memory; unverified, no GPU has run it)
    dist::agree_on(comm, [&] { check_expert_parallel(model.config(), ro.expert_parallel, comm.size()); });
    ep.emplace(comm, ro.expert_parallel);
    ep->set_sharded(model.shard_experts(ep->experts()));
    ep->shard_state(opt);
    if (overlap_comm) overlap_replicas = ep->replicas().background();  // the sum's expert slices
  }
  // ZeRO-1 after any resume (the checkpoint's moments are whole; this rank keeps its own)
  // (GPU ranks: the parameters and moments stay on the device, gathered over NCCL; unverified, no GPU has run it)
  using Zero1 = dist::Zero1<typename Model::backend_type>;
  std::optional<Zero1> zero;
  if (parallel && ro.zero1) {
    if (ep) {  // replicated parameters over the world, each expert slice over the ranks that hold it
      const auto parts = ep->split(opt.trainable_parameters());
      zero.emplace(opt, std::vector<typename Zero1::Partition>{{&comm, parts.replicated},
                                                               {&ep->replicas(), parts.sharded}});
    } else {
      zero.emplace(comm, opt);
    }
  }
  // A worker thread prepares the next batches (image decoding, collation) while the step computes; the batches
  // and positions are the iterator's exactly.
  io::PrefetchedBatches it(std::move(order));
  for (const auto& [k, v] : ro.rngs) st.rngs[k] = v;
  for (const auto& [k, v] : ro.metadata) st.metadata[k] = v;
  st.metadata["stage"] = std::to_string(sc.stage);
  st.metadata["stage_steps"] = std::to_string(sc.steps);
  st.metadata["data_seed"] = std::to_string(sc.data_seed);
  st.metadata["vision_sparse"] = model.vision_is_sparse() ? "1" : "0";
  st.metadata["connector_sparse"] = model.connector_is_sparse() ? "1" : "0";

  MetricsCsv csv;
  if (!ro.csv_path.empty()) {
    csv = MetricsCsv(ro.csv_path, model.config().llava.vision.layers, sc.stage, st.step, ro.csv_fresh);
    // Rows past the step this stage starts from are not backed by a checkpoint (a run stopped after them, or one
    // being redone): they go, and the log says so.
    if (csv.log().dropped() > 0)
      std::cerr << "note: " << ro.csv_path << ": kept " << csv.log().kept() << " earlier rows, dropped "
                << csv.log().dropped() << " of stage " << sc.stage << " and later past step " << st.step
                << " (no checkpoint holds them; this run writes them again)\n";
  }

  const std::int64_t stop_at = ro.max_steps >= 0 ? std::min(sc.steps, ro.max_steps) : sc.steps;
  ProgressBar bar(ro.progress && !ro.quiet);
  const int M = sc.accumulation;
  const std::int64_t first_step = st.step;
  std::int64_t tokens_total = 0;
  double train_seconds = 0;
  StageResult res;

  // next batches, forward, backward: M micro-batches, each contributing 1/M of the step's loss and gradient
  auto forward_backward = [&](std::int64_t step) {
    StepMetrics m;
    m.stage = sc.stage;
    detail::LoadSum load;
    // Data parallel: this rank's rows of each global micro-batch, its CE weighted by its share of the targets and
    // the per-image aux losses by its share of the images, so the ranks' terms sum to the whole batch's.
    const std::size_t n_sparse = model.vision_is_sparse() ? std::size_t(model.config().llava.vision.layers) : 0;
    const std::size_t experts = std::size_t(model.config().experts);
    m.vision_balance_l.assign(n_sparse, 0.0);
    m.vision_z_l.assign(n_sparse, 0.0);
    load.vision.assign(n_sparse, std::vector<std::int64_t>(experts, 0));
    if (model.connector_is_sparse()) load.projector.assign(experts, 0);
    // Overlapped: the last micro-batch's backward hands over the language model's, then the connector's finished
    // gradients, and the background thread sums them while the vision tower's backward runs (with expert
    // parallelism: as ep->reduce_gradients sums them, through the thread's duplicates of the world and the replica
    // group, while the backward exchanges rows on the expert group).
    std::optional<dist::OverlappedGradientSum> overlapped;
    if (overlap_comm) {
      std::vector<ParameterList> early{model.language_parameters(), model.connector_parameters()};
      if (ep)
        overlapped.emplace(
            opt.trainable_parameters(), std::move(early),
            [&](const ParameterList& part) { ep->reduce_gradients(part, *overlap_comm, *overlap_replicas); },
            std::vector<dist::Communicator*>{overlap_comm.get(), overlap_replicas.get()});
      else
        overlapped.emplace(*overlap_comm, opt.trainable_parameters(), std::move(early));
    }
    for (int mb = 0; mb < M; ++mb) {
      const io::Batch b = it.next();
      if (b.B == 0) {  // a short last batch left this rank nothing; its gradient share is zero
        if (ep) model.serve_experts();  // but its experts serve the group's other ranks
        continue;
      }
      const auto out = model.forward(b.input_ids, b.B, b.T, b.pixels, &b.labels, &b.key_valid, true);
      if (!std::isfinite(out.total))
        fail("training stopped at ", tag, " step ", step + 1, " (micro-batch ", mb, "): the loss is ", out.total,
             "; first non-finite term: ", detail::nonfinite_term(model, out));
      const dist::LossShare share =
          parallel ? dist::loss_share(out.targets, b.global_targets, b.images(), b.global_images) : dist::LossShare{};
      // the last micro-batch's backward reports its finished parts
      const nn::GradientsDoneHook hook =
          overlapped && mb == M - 1
              ? model.llava().report_gradients_done([&](const ParameterList& l) { overlapped->ready(l); })
              : nn::GradientsDoneHook{};
      if (parallel)
        model.backward(typename Model::LossScales{share.ce / double(M), share.aux / double(M)});
      else
        model.backward(1.0 / double(M));
      m.loss += parallel ? (out.ce * share.ce + (out.total - out.ce) * share.aux) / M : out.total / M;
      m.ce += out.ce * share.ce / M;
      m.vision_balance += out.vision_balance * share.aux / M;
      m.vision_z += out.vision_z * share.aux / M;
      m.projector_balance += out.projector_balance * share.aux / M;
      m.projector_z += out.projector_z * share.aux / M;
      m.tokens += b.tokens();
      CUMO_CHECK(out.vision_load.empty() || out.vision_load.size() == n_sparse, tag, ": ", out.vision_load.size(),
                 " sparse CLIP layers reported, ", n_sparse, " expected");
      for (std::size_t l = 0; l < out.vision_load.size() && l < out.vision_balance_per_layer.size(); ++l) {
        m.vision_balance_l[l] += out.vision_balance_per_layer[l] * share.aux / M;
        m.vision_z_l[l] += out.vision_z_per_layer[l] * share.aux / M;
      }
      for (std::size_t l = 0; l < out.vision_load.size(); ++l)
        detail::LoadSum::add(load.vision[l], out.vision_load[l].tokens);
      detail::LoadSum::add(load.projector, out.projector_load.tokens);
    }
    if (parallel) {
      // the gradient sum (deterministic: every rank the same bits), then the metrics and the loads over the ranks
      const auto t_comm = clock::now();
      if (overlapped)
        overlapped->finish();  // the parts not summed during the backward (the vision tower's), and a wait
      else if (ep)
        ep->reduce_gradients(opt.trainable_parameters());
      else
        dist::allreduce_gradients(comm, opt.trainable_parameters());
      std::vector<double> sums{m.loss, m.ce, m.vision_balance, m.vision_z, m.projector_balance, m.projector_z};
      sums.insert(sums.end(), m.vision_balance_l.begin(), m.vision_balance_l.end());
      sums.insert(sums.end(), m.vision_z_l.begin(), m.vision_z_l.end());
      dist::allreduce_sum(comm, std::span<double>(sums));
      m.loss = sums[0], m.ce = sums[1], m.vision_balance = sums[2], m.vision_z = sums[3];
      m.projector_balance = sums[4], m.projector_z = sums[5];
      std::copy_n(sums.begin() + 6, n_sparse, m.vision_balance_l.begin());
      std::copy_n(sums.begin() + 6 + std::ptrdiff_t(n_sparse), n_sparse, m.vision_z_l.begin());
      std::vector<std::int64_t> counts{m.tokens};
      for (const auto& v : load.vision) counts.insert(counts.end(), v.begin(), v.end());
      counts.insert(counts.end(), load.projector.begin(), load.projector.end());
      dist::allreduce_sum(comm, std::span<std::int64_t>(counts));
      m.tokens = counts[0];
      std::size_t at = 1;
      for (auto& v : load.vision)
        for (auto& t : v) t = counts[at++];
      for (auto& t : load.projector) t = counts[at++];
      m.comm_seconds = std::chrono::duration<double>(clock::now() - t_comm).count();
    }
    for (const auto& v : load.vision) m.vision_load_l.push_back(detail::LoadSum::max_over_mean(v));
    if (!load.projector.empty()) m.projector_load = detail::LoadSum::max_over_mean(load.projector);
    return m;
  };
  // after the update: the data position, the CSV row, the progress line
  auto log = [&](StepMetrics& m) {
    if (zero) zero->share_parameters();  // the other ranks' updated parameters
    st.step = m.step;
    const io::DataPosition pos = it.position();
    st.epoch = std::int64_t(pos.epoch);
    st.sample = std::int64_t(pos.offset);
    train_seconds += m.seconds;
    res.comm_seconds += m.comm_seconds;
    tokens_total += m.tokens;
    m.tokens_per_s = m.seconds > 0 ? double(m.tokens) / m.seconds : 0;
    m.elapsed_s = train_seconds;
    if (!ro.csv_path.empty()) csv.write(m);
    res.last_loss = m.loss;
    res.last_ce = m.ce;
    const double per_step = train_seconds / double(st.step - first_step);
    const double eta = per_step * double(stop_at - st.step);
    const double mean_tps = train_seconds > 0 ? double(tokens_total) / train_seconds : 0;
    bar.update(tag, st.step, sc.steps, m.loss, m.ce, mean_tps, train_seconds, eta);
    if (!ro.quiet && ro.log_every > 0 && (st.step % ro.log_every == 0 || st.step == stop_at)) {
      bar.finish();
      std::fprintf(stderr, "%s step %lld/%lld  lr %.3g  loss %.4f  ce %.4f  grad %.3f  %.0f tok/s  ETA %s\n",
                   tag.c_str(), (long long)st.step, (long long)sc.steps, m.lr, m.loss, m.ce, m.grad_norm, mean_tps,
                   format_duration(eta).c_str());
    }
  };
  StepLoop loop{st.step, stop_at, sc.max_grad_norm, ro.stop, parallel ? &comm : nullptr, {}};
  if (ep) loop.clip = [&](std::int64_t step) { return ep->clip_gradients(opt, sc.max_grad_norm, step); };
  train_steps(opt, sched, loop, forward_backward, log);
  bar.finish();

  res.step = st.step;
  res.finished = st.step >= sc.steps;
  st.metadata["stage_finished"] = res.finished ? "1" : "0";
  res.checkpoint = res.finished ? ro.final_dir : ro.partial_dir;
  // Rank 0 writes (every rank holds the same weights and optimizer state); the others learn whether it could.
  if (zero) zero->gather_state();  // a checkpoint holds every moment
  if (ep) {  // and every expert: the model leaves the stage whole, its checkpoint the single-process one
    model.unshard_experts();
    ep->gather_state(opt);
  }
  dist::agree_on(comm, [&] {
    if (comm.rank() == 0 && !res.checkpoint.empty() &&
        (st.step > first_step || ro.resume_dir.empty() || res.checkpoint != ro.resume_dir))
      train::save_checkpoint(res.checkpoint, all, &opt, st);
  });
  if (zero) zero->release();
  res.seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  res.tokens_per_s = train_seconds > 0 ? double(tokens_total) / train_seconds : 0;
  res.train_seconds = train_seconds;
  return res;
}

}  // namespace cumo::app
