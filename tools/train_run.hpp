#pragma once
// cumo_train's run, shared by its two translation units: cumo_train.cpp (g++: main, the CPU backend) and, in a
// build with the CUDA backend, cumo_train_cuda.cu (nvcc: the same run on backend::Cuda). The CPU path stays in a
// g++ translation unit because Eigen compiled through nvcc loses most of its vectorisation (measured: 6x slower).
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>

#include "cli.hpp"
#include "app/checkpoints.hpp"
#include "app/cumo_stage.hpp"
#include "app/data.hpp"
#include "app/footprint.hpp"
#include "app/run_config.hpp"
#include "app/run_dir.hpp"
#include "cumo/dist/data_parallel.hpp"
#include "cumo/io/files.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/models/cumo.hpp"

namespace cumo_train_app {
inline constexpr const char* kTool = "cumo_train";
namespace fs = std::filesystem;
using namespace cumo;  // NOLINT: this header is the tool's own

inline std::atomic<bool> g_stop{false};
inline void on_signal(int) { g_stop.store(true); }

inline void usage(std::ostream& os) {
  os << "usage: cumo_train --config CONFIG.json [--stage 1|2|3|all] [--resume DIR] [--from DIR [--vision-from DIR]]\n"
        "                  [--out DIR]\n"
        "                  [--variant dense|moe|moe_nobz|moe_scratch|moe_mlponly|moe_conn8] [--seed S] [--max-steps N]\n"
        "                  [--log-every N] [--quiet] [--overwrite] [--device auto|cpu|cuda]\n"
        "                  [--precision fp32|tf32|bf16] [--zero1] [--overlap-grad-sum] [--expert-parallel K]\n"
        "  --config     run configuration (docs/training_app.md); not needed with --resume\n"
        "  --stage      which stage(s) to run (default all)\n"
        "  --resume     continue from a checkpoint written by cumo_train (a stopped or a finished stage); the run\n"
        "               goes on in the directory holding it\n"
        "  --from       the finished checkpoint of stage s-1 a single stage s > 1 starts from (default\n"
        "               <out>/stage<s-1>); or a Hugging Face checkpoint any stage starts from: llava-hf LLaVA-1.5,\n"
        "               a CuMo release (llava_mistral / llava_mixtral), or a Mistral / Mixtral / Qwen2 / Llama LLM\n"
        "  --vision-from  with an LLM --from: the CLIP checkpoint of the vision tower (the connector starts fresh)\n"
        "  --out        output directory (overrides the config's \"out\", or --resume's directory)\n"
        "  --overwrite  replace the checkpoints of the stages this run trains if <out> already has them (without it\n"
        "               an existing stage<s> or stage<s>-partial is an error)\n"
        "  --variant    stage-3 ablation variant (overrides the config's \"variant\")\n"
        "  --seed       model / data-order seed (overrides the config's \"seed\")\n"
        "  --max-steps  stop each stage after N (>= 0) steps, saving <out>/stage<s>-partial (resume with --resume)\n"
        "  --log-every  a plain log line on stderr every N steps (default: the bar on a terminal, else none)\n"
        "  --quiet      no progress output\n"
        "  --device     where the model trains: cuda needs a build with the CUDA backend and a GPU; auto (default)\n"
        "               takes the GPU when there is one (under mpirun: one GPU per rank over NCCL, when every rank\n"
        "               has its own; unverified, docs/distributed.md)\n"
        "  --precision  GPU only: the dense GEMMs in fp32 (default), TF32, or on bf16 copies of their operands\n"
        "  --zero1      under mpirun: shard the AdamW moments over the ranks (ZeRO-1; the same weights)\n"
        "  --overlap-grad-sum  under mpirun: sum the gradients on a second thread while the backward goes on (the\n"
        "               same weights; CPU or GPU ranks; with --expert-parallel only on CPU ranks whose MPI provides\n"
        "               MPI_THREAD_MULTIPLE: NCCL forbids it)\n"
        "  --expert-parallel K  under mpirun -np N (N a multiple of K): the MoE blocks' experts split over groups of\n"
        "               K ranks, tokens sent to their experts' ranks (the same step; checkpoints stay whole)\n"
        "Under mpirun -np N (a build with MPI) the N ranks train data parallel: docs/distributed.md\n";
}

struct Args {
  std::string config, resume, from, vision_from, out, variant, stage = "all", device = "auto", precision = "fp32";
  long long seed = -1, max_steps = -1, log_every = 0;
  long long expert_parallel = 1;
  bool quiet = false, overwrite = false, zero1 = false, overlap_grad_sum = false;
};

inline void write_summary(const std::string& out_dir, int stage, const app::StageResult& r, const app::StageConfig& sc) {
  const fs::path path = fs::path(out_dir) / "train_summary.json";
  nlohmann::json j = nlohmann::json::object();
  if (fs::exists(path)) {
    try {
      std::ifstream f(path);
      j = nlohmann::json::parse(f);
    } catch (const std::exception&) {
      j = nlohmann::json::object();
    }
  }
  auto& s = j["stage" + std::to_string(stage)];
  // A resumed stage adds its seconds to the earlier part's.
  const double before = (s.is_object() && s.contains("seconds") && s.value("step", 0ll) < r.step &&
                         s.value("finished", false) == false)
                            ? s.value("seconds", 0.0)
                            : 0.0;
  s = {{"step", r.step},           {"steps", sc.steps},     {"finished", r.finished},
       {"seconds", before + r.seconds}, {"tokens_per_s", r.tokens_per_s}, {"last_loss", r.last_loss},
       {"last_ce", r.last_ce},     {"checkpoint", r.checkpoint}};
  double total = 0;
  for (const char* k : {"stage1", "stage2", "stage3"})
    if (j.contains(k)) total += j[k].value("seconds", 0.0);
  j["total_seconds"] = total;
  io::write_file_atomic(path.string(), j.dump(2) + "\n", "train_summary.json");
}

// A checkpoint a stage starts from must be the finished end of the stage before it.
inline void check_start(const std::string& dir, int stage, const char* how) {
  const nlohmann::json st = app::read_trainer_state(dir);
  const std::string s = app::metadata_of(st, "stage", dir);
  const bool finished = app::metadata_of(st, "stage_finished", dir) == "1";
  CUMO_CHECK(s == std::to_string(stage - 1) && finished, how, " '", dir, "' is ", finished ? "the end" : "a stop",
             " of stage ", s, ", but stage ", stage, " starts from the finished end of stage ", stage - 1,
             finished ? "" : " (finish that stage first: --resume it)");
}

// `backend` runs the whole model (its options — precision — are the run's). `comm`: the data-parallel world (one
// process: dist::SelfCommunicator); every rank runs this with the same arguments, rank 0 alone writes.
template <class Backend>
int run(const Args& a, dist::Communicator& comm, Backend backend = {}) {
  const bool rank0 = comm.rank() == 0;
  // ---- the configuration ---------------------------------------------------------------------------------------
  nlohmann::json resume_state;
  app::RunConfig cfg;
  if (!a.resume.empty()) {
    resume_state = app::read_trainer_state(a.resume);
    nlohmann::json raw;
    try {
      raw = nlohmann::json::parse(app::metadata_of(resume_state, "run_config", a.resume));
    } catch (const nlohmann::json::exception& e) {
      fail("checkpoint '", a.resume, "': metadata run_config is not valid JSON: ", e.what());
    }
    if (!a.config.empty())
      std::cerr << "cumo_train: note: --resume uses the configuration stored in the checkpoint; --config is ignored\n";
    CUMO_CHECK(a.variant.empty() && a.seed < 0, "--variant / --seed cannot change a resumed run");
    // The run goes on beside the checkpoint it was given — not in the directory stored when it was made, which
    // for a copied or moved run is somebody else's.
    raw["out"] = !a.out.empty() ? a.out : fs::absolute(a.resume).lexically_normal().parent_path().string();
    cfg = app::RunConfig::from_json(raw, "checkpoint '" + a.resume + "' run_config");
  } else {
    CUMO_CHECK(!a.config.empty(), "--config CONFIG.json is required (or --resume DIR)");
    cfg = app::load_run_config(a.config);
    nlohmann::json raw = cfg.raw;
    if (!a.out.empty()) raw["out"] = a.out;
    if (!a.variant.empty()) raw["variant"] = a.variant;
    if (a.seed >= 0) raw["seed"] = std::uint64_t(a.seed);
    // A Hugging Face checkpoint to start from: its configuration replaces the model block, stored with the run.
    if (!a.from.empty() && app::is_pretrained_dir(a.from)) {
      const app::PretrainedStart p = app::pretrained_config(a.from, a.vision_from, cfg.model);
      raw["pretrained"] = p.to_json();
      if (rank0 && !a.quiet)
        for (const std::string& n : p.notes) std::cerr << "cumo_train: " << n << "\n";
    }
    cfg = app::RunConfig::from_json(raw, "'" + a.config + "'");
  }
  CUMO_CHECK(a.vision_from.empty() || cfg.pretrained, "--vision-from goes with --from a language-model checkpoint");
  const bool pretrained_start = a.resume.empty() && !a.from.empty() && cfg.pretrained;
  CUMO_CHECK(!a.zero1 || comm.size() > 1, "--zero1 shards the optimizer over data-parallel ranks: run it under "
             "mpirun -np N with N > 1");
  CUMO_CHECK(!a.overlap_grad_sum || comm.size() > 1, "--overlap-grad-sum overlaps the data-parallel gradient sum: "
             "run it under mpirun -np N with N > 1");
  // Every rank must train the same thing: a rank started with other arguments or another config stops them all.
  dist::check_same(comm, "the run configuration and command line",
                   cfg.raw.dump() + "|" + a.stage + "|" + a.resume + "|" + a.from + "|" + a.vision_from + "|" +
                       std::to_string(a.max_steps) + "|" + std::to_string(a.expert_parallel) +
                       "|" + (a.overwrite ? "overwrite" : "") + (a.zero1 ? "|zero1" : "") +
                       (a.overlap_grad_sum ? "|overlap" : ""));
  // ---- which stages ---------------------------------------------------------------------------------------------
  int first = 1, last = 3;
  bool resume_partial = false;
  if (a.stage != "all") {
    CUMO_CHECK(a.stage == "1" || a.stage == "2" || a.stage == "3", "--stage must be 1, 2, 3 or all, got '",
               a.stage, "'");
    first = last = a.stage[0] - '0';
  }
  if (!a.resume.empty()) {
    const int s = std::stoi(app::metadata_of(resume_state, "stage", a.resume));
    const bool finished = app::metadata_of(resume_state, "stage_finished", a.resume) == "1";
    const int start = finished ? s + 1 : s;
    if (a.stage == "all") {
      first = start;
    } else {
      CUMO_CHECK(first == start, "--resume '", a.resume, "' is ", finished ? "the end" : "a stop",
                 " of stage ", s, ", so it continues with stage ", start, ", not --stage ", a.stage);
    }
    if (first > 3) {
      std::cout << "cumo_train: '" << a.resume << "' is the end of stage 3; nothing left to train\n";
      return 0;
    }
    resume_partial = !finished;
  }

  // ---- the output directory: one writer, stale temporaries gone, nothing replaced unless told ----------------
  // (rank 0's alone: the others never write, and learn whether it could)
  std::optional<app::RunDir> dir;
  dist::agree_on(comm, [&] {
    if (!rank0) return;
    dir.emplace(cfg.out, kTool);
    dir->clean_stale();
    dir->claim_stages(first, last, a.overwrite, resume_partial ? a.resume : "");
    io::write_file_atomic((fs::path(cfg.out) / "config.json").string(), cfg.raw.dump(2) + "\n", "config.json");
  });

  // ---- data and model ------------------------------------------------------------------------------------------
  const auto tok = io::load_tokenizer(cfg.tokenizer);
  const models::CuMoConfig model_cfg = cfg.model_config(*tok);
  app::check_model_fits(model_cfg, last == 3 && cfg.variant != app::Variant::dense, true, "model");
  dist::agree_on(comm, [&] { app::check_expert_parallel(model_cfg, int(a.expert_parallel), comm.size()); });
  dist::agree_on(comm, [&] {
    if (rank0) app::ensure_data(cfg, app::run_files(cfg));  // may write the built-in data: one writer
  });
  models::CuMo<Backend> model(model_cfg, backend);
  const bool quiet = a.quiet || !rank0;
  if (!quiet)
    std::cerr << "cumo_train: training on " << Backend::name
              << (comm.size() > 1 ? " x " + std::to_string(comm.size()) + " data-parallel ranks (" +
                                        std::string(comm.engine()) + (a.zero1 ? ", ZeRO-1" : "") +
                                        (a.overlap_grad_sum ? ", gradient sum overlapped" : "") +
                                        (a.expert_parallel > 1 ? ", experts over groups of " +
                                                                     std::to_string(a.expert_parallel) + " ranks"
                                                               : std::string()) +
                                        ")"
                                  : std::string())
              << "\n";
  Rng init_rng(cfg.seed);
  model.reset_parameters(init_rng, cfg.init);
  const Rng::State init_state = init_rng.state();

  // Where the first stage's weights come from.
  std::string start_from;  // a finished checkpoint of stage first-1 (weights only)
  if (!a.resume.empty()) {
    if (!resume_partial) start_from = a.resume;
  } else if (pretrained_start) {
    app::load_pretrained(model, *cfg.pretrained);
    if (!quiet) std::cerr << "stage " << first << " starts from " << a.from << "\n";
  } else if (first > 1) {
    start_from = a.from.empty() ? app::RunDir::stage_dir(cfg.out, first - 1) : a.from;
    check_start(start_from, first, a.from.empty() ? "the previous stage's checkpoint" : "--from");
  } else {
    CUMO_CHECK(a.from.empty(), "--from '", a.from, "' is a cumo_train checkpoint, for a stage > 1 (stage 1 starts "
               "from fresh weights, or from a Hugging Face checkpoint)");
  }
  auto structure_of = [&](const std::string& dir) { app::match_structure(model, app::read_trainer_state(dir), dir); };
  if (!start_from.empty()) {
    structure_of(start_from);
    (void)train::load_checkpoint(start_from, model.parameters(), nullptr);
    if (!quiet) std::cerr << "stage " << first << " starts from " << start_from << "\n";
  }
  if (resume_partial) structure_of(a.resume);

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);

  for (int s = first; s <= last; ++s) {
    const app::StageConfig& sc = cfg.stage(s);
    const bool resuming = resume_partial && s == first;
    const bool already_sparse = model.vision_is_sparse() || model.connector_is_sparse();  // a sparse CuMo release
    if (s == 3 && !resuming && cfg.variant != app::Variant::dense && already_sparse && !quiet)
      std::cerr << "stage 3: the model is sparse already (" << (model.vision_is_sparse() ? "CLIP-MoE" : "")
                << (model.vision_is_sparse() && model.connector_is_sparse() ? " + " : "")
                << (model.connector_is_sparse() ? "MLP-MoE" : "") << "): no upcycling\n";
    if (s == 3 && !resuming && cfg.variant != app::Variant::dense && !already_sparse) {
      // Co-upcycling: every CLIP MLP and the connector become top-k-of-E MoE blocks (routers from their own seed).
      Rng up_rng(cfg.seed * 0x9E3779B97F4A7C15ull + 3);
      model.upcycle(up_rng, /*vision=*/cfg.variant != app::Variant::moe_mlponly, /*connector=*/true,
                    cfg.variant == app::Variant::moe_scratch);
    }
    // The replicas start the same (same seeds, same checkpoint files), or the ranks would train different models.
    if (comm.size() > 1)
      dist::check_same(comm, "the model's weights at the start of stage " + std::to_string(s),
                       dist::weights_digest(model.parameters()));
    const auto data = io::LlavaDataset::load(cfg.data_path(sc.data), *tok, cfg.data_options(sc.chat_template, sc.max_length));
    {
      std::size_t longest = 0;
      for (std::size_t i = 0; i < data.size(); ++i)
        if (data.tokens(i).ids.size() > data.tokens(longest).ids.size()) longest = i;
      if (data.size() > 0)
        app::check_batch_fits(model.config(), sc.batch, std::int64_t(data.tokens(longest).ids.size()),
                              "stage " + std::to_string(s),
                              "record " + std::to_string(longest) + " of '" + cfg.data_path(sc.data) + "'");
    }

    app::StageRunOptions ro;
    ro.final_dir = app::RunDir::stage_dir(cfg.out, s);
    ro.partial_dir = app::RunDir::partial_dir(cfg.out, s);
    ro.csv_path = rank0 ? (fs::path(cfg.out) / "metrics.csv").string() : "";
    ro.comm = &comm;
    ro.zero1 = a.zero1;
    ro.overlap_grad_sum = a.overlap_grad_sum;
    ro.expert_parallel = int(a.expert_parallel);
    ro.csv_fresh = a.overwrite && s == 1 && !resuming;  // an overwritten run from stage 1 starts its log anew
    ro.resume_dir = resuming ? a.resume : "";
    ro.max_steps = a.max_steps;
    ro.log_every = a.log_every;
    ro.quiet = quiet;
    ro.stop = &g_stop;
    ro.metadata["run_config"] = cfg.raw.dump();
    ro.metadata["model_config"] = model.config().to_json().dump();
    ro.metadata["variant"] = app::variant_name(cfg.variant);
    ro.rngs["init"] = init_state;
    if (!quiet)
      std::cerr << "stage " << s << ": " << data.size() << " samples from " << cfg.data_path(sc.data) << ", "
                << sc.steps << " steps of " << sc.accumulation << " x " << sc.batch << ", lr " << sc.lr
                << (s == 3 ? std::string(", variant ") + app::variant_name(cfg.variant) : std::string())
                << (resuming ? ", resuming " + a.resume : std::string()) << "\n";

    const app::StageResult r = app::run_stage(model, data, sc, ro);
    if (!rank0) {
      if (!r.finished) return g_stop.load() ? 130 : 0;
      continue;
    }
    write_summary(cfg.out, s, r, sc);
    std::printf("stage %d: %s at step %lld/%lld in %.1f s (%.0f tok/s), loss %.4f, ce %.4f -> %s\n", s,
                r.finished ? "finished" : "stopped", (long long)r.step, (long long)sc.steps, r.seconds,
                r.tokens_per_s, r.last_loss, r.last_ce, r.checkpoint.c_str());
    if (comm.size() > 1 && r.train_seconds > 0)
      std::printf("stage %d: %d data-parallel ranks; the gradient all-reduce took %.1f%% of the step time (%.2f s%s)\n",
                  s, comm.size(), 100.0 * r.comm_seconds / r.train_seconds, r.comm_seconds,
                  a.overlap_grad_sum ? "; what the backward did not hide" : "");
    std::fflush(stdout);
    if (!r.finished) return g_stop.load() ? 130 : 0;
    std::error_code ec;
    if (fs::exists(ro.partial_dir, ec)) fs::remove_all(ro.partial_dir, ec);  // superseded by the final checkpoint
  }
  return 0;
}

#if defined(CUMO_TRAIN_CUDA)
// cumo_train_cuda.cu: runs on the GPU when there is one (or throws when --device cuda and there is none);
// nullopt when --device auto finds no GPU (with several ranks: not one for every rank). `world`: the job's ranks;
// several train data parallel over NCCL, one GPU each.
std::optional<int> run_on_gpu(const Args& a, dist::Communicator& world);
#endif

}  // namespace cumo_train_app
