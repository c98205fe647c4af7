// cumo_distill: LLaVA-MoD on cumo's parts — a small sparse CuMo-style student distilled from a dense teacher that
// cumo_train trained (docs/llava_mod.md).
//
//   cumo_distill --config CONFIG.json [--out DIR] [--seed S] [--stages a,b,...] [--from DIR] [--eval]
//                [--teacher DIR] [--student-ffn N] [--dense-student] [--quiet] [--log-every N]
//       runs the config's pipeline (or the named stages, in that order) on a fresh student, or on the student of a
//       stage checkpoint (--from); each stage writes OUT/<stage>/, a finished one is skipped on a rerun. --eval then
//       scores the final student on the eval split: exact match and hallucination rate per question type
//       (OUT/eval_results.json, OUT/eval_predictions.jsonl).
//   cumo_distill --config CONFIG.json --eval-teacher [--out DIR]
//       the same evaluation of the teacher checkpoint.
#include <cstdio>
#include <new>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <string_view>

#include "cli.hpp"
#include "app/checkpoints.hpp"
#include "app/data.hpp"
#include "app/distill_config.hpp"
#include "app/distill_eval.hpp"
#include "app/distill_stage.hpp"
#include "app/footprint.hpp"
#include "app/run_config.hpp"

namespace {
constexpr const char* kTool = "cumo_distill";
namespace fs = std::filesystem;
using namespace cumo;

void usage(std::ostream& os) {
  os << "usage: cumo_distill --config CONFIG.json [--out DIR] [--seed S] [--stages a,b,...] [--from DIR] [--eval]\n"
        "                    [--teacher DIR]\n"
        "                    [--student-ffn N] [--dense-student] [--quiet] [--log-every N]\n"
        "       cumo_distill --config CONFIG.json --eval-teacher [--out DIR]\n"
        "  --stages         stage names to run, in order (default: the config's pipeline)\n"
        "  --teacher        the teacher checkpoint (overrides the config's 'teacher')\n"
        "  --from           start from the student in this stage checkpoint instead of a fresh one\n"
        "  --eval           evaluate the final student (exact match + hallucination rate per question type)\n"
        "  --student-ffn    override student.ffn (e.g. a dense student with the sparse one's active parameters)\n"
        "  --dense-student  student.sparse = false: 'upcycle' stages leave the student dense\n"
        "  --eval-teacher   evaluate the teacher checkpoint and exit\n";
}

struct Args {
  std::string config, out, stages, from, teacher;
  long long seed = -1, student_ffn = -1, log_every = 50;
  bool eval = false, eval_teacher = false, dense_student = false, quiet = false;
};

void print_eval(const app::DistillEval& ev, const std::string& who) {
  std::printf("%s on the eval split (%lld questions):\n%-10s %9s %14s\n", who.c_str(), (long long)ev.records, "type",
              "accuracy", "hallucination");
  for (const auto& [t, v] : ev.per_type) std::printf("%-10s %9.3f %14.3f\n", t.c_str(), v.first, v.second);
  std::printf("%-10s %9.3f %14.3f\n", "overall", ev.accuracy, ev.hallucination);
}

int run(const Args& a) {
  app::DistillConfig cfg = app::load_distill_config(a.config);
  if (!a.out.empty()) cfg.out = a.out;
  if (!a.teacher.empty()) cfg.teacher = a.teacher;
  if (a.seed >= 0) {
    cfg.seed = std::uint64_t(a.seed);
    for (std::size_t i = 0; i < cfg.stages.size(); ++i)
      if (!cfg.raw["stages"][i].contains("data_seed")) cfg.stages[i].data_seed = cfg.seed * 1000003ull + 100 + i;
  }
  if (a.student_ffn > 0) cfg.student.text.ffn = a.student_ffn;
  if (a.dense_student) cfg.student.sparse = false;
  cfg.raw["out"] = cfg.out;
  cfg.raw["teacher"] = cfg.teacher;
  cfg.raw["seed"] = cfg.seed;
  cfg.raw["student"]["ffn"] = cfg.student.text.ffn;
  cfg.raw["student"]["sparse"] = cfg.student.sparse;

  // Teacher: a cumo_train checkpoint, with its tokenizer and data.
  app::RunConfig trun = app::run_config_of_checkpoint(cfg.teacher);
  const auto tok = io::load_tokenizer(trun.tokenizer);
  models::CuMo<> teacher = app::load_model_from_checkpoint(cfg.teacher, *tok, &trun);
  app::ensure_data(trun, app::run_files(trun));
  fs::create_directories(cfg.out);

  auto evaluate = [&](models::CuMo<>& m, const std::string& who) {
    const std::string path = trun.data_path(cfg.eval_data.empty() ? trun.eval_data : cfg.eval_data);
    const auto data = io::LlavaDataset::load(path, *tok, trun.data_options(trun.eval_template));
    const data::ShapesWorld w = data::generate_shapes_world(trun.shapes);
    std::ofstream preds(fs::path(cfg.out) / "eval_predictions.jsonl", std::ios::trunc);
    const auto t0 = std::chrono::steady_clock::now();
    const auto ev = app::evaluate_student(m, *tok, data, w.eval, io::ChatTemplate::from_name(trun.eval_template), trun.image_tokens(), cfg.eval_max_new_tokens,
                                            cfg.eval_limit, &preds);
    nlohmann::json j = ev.to_json();
    j["model"] = who;
    j["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::ofstream(fs::path(cfg.out) / "eval_results.json", std::ios::trunc) << j.dump(2) << "\n";
    print_eval(ev, who);
  };

  if (a.eval_teacher) {
    evaluate(teacher, "teacher " + cfg.teacher);
    return 0;
  }

  models::CuMo<> student = app::make_student(teacher, cfg.student, cfg.seed);
  if (!a.from.empty()) app::load_student_checkpoint(student, cfg.student, a.from);

  std::vector<std::string> names;
  if (a.stages.empty()) {
    names = cfg.pipeline;
  } else {
    std::stringstream ss(a.stages);
    for (std::string x; std::getline(ss, x, ',');)
      if (!x.empty()) names.push_back(x);
  }
  app::DistillRun run;
  run.cfg = &cfg;
  run.teacher_run = &trun;
  run.tok = tok.get();
  run.teacher = &teacher;
  run.student = &student;
  // A stage whose checkpoint exists is loaded, not rerun: its rows in metrics.csv stay.
  std::vector<std::string> rerun;
  for (const auto& n : names)
    if (!fs::exists(fs::path(cfg.out) / n / "trainer_state.json")) rerun.push_back(n);
  app::DistillCsv csv((fs::path(cfg.out) / "metrics.csv").string(), rerun);
  nlohmann::json summary;
  {
    std::ifstream f(fs::path(cfg.out) / "distill_summary.json");
    if (f) summary = nlohmann::json::parse(f, nullptr, false);
    if (summary.is_discarded() || !summary.is_object()) summary = nlohmann::json::object();
  }
  for (const auto& n : names) {
    const app::DistillStage& st = cfg.stage(n);
    std::size_t index = 0;
    while (cfg.stages[index].name != n) ++index;
    const std::string dir = (fs::path(cfg.out) / n).string();
    if (fs::exists(fs::path(dir) / "trainer_state.json")) {
      if (!a.quiet) std::fprintf(stderr, "stage '%s': %s exists, loading it\n", n.c_str(), dir.c_str());
      app::load_student_checkpoint(student, cfg.student, dir);
      continue;
    }
    const auto r = app::run_distill_stage(run, st, index, dir, &csv, a.quiet, a.quiet ? 0 : a.log_every);
    summary["stages"][n] = {{"seconds", r.seconds}, {"last_loss", r.last_loss}, {"tokens_per_s", r.tokens_per_s},
                            {"memory", r.memory.to_json()}};
    if (!a.quiet) {
      const auto& m = r.memory;
      std::fprintf(stderr,
                   "stage '%s' done in %.1f s -> %s\n  memory: teacher weights %.2f MiB (%lld params), student "
                   "weights+grads %.2f MiB (%lld params, %lld active in the LLM), AdamW state %.2f MiB, peak RSS "
                   "%.0f MiB\n",
                   n.c_str(), r.seconds, dir.c_str(), m.teacher_mib, (long long)m.teacher_params, m.student_mib,
                   (long long)m.student_params, (long long)m.student_active, m.optimizer_mib, m.peak_rss_mib);
    }
    std::ofstream(fs::path(cfg.out) / "distill_summary.json", std::ios::trunc) << summary.dump(2) << "\n";
  }
  if (a.eval) evaluate(student, "student " + cfg.out);
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  cumo::app::retain_freed_memory();
  Args a;
  auto on_switch = [&](std::string_view f) {
    if (f == "--eval") return a.eval = true;
    if (f == "--eval-teacher") return a.eval_teacher = true;
    if (f == "--dense-student") return a.dense_student = true;
    if (f == "--quiet" || f == "-q") return a.quiet = true;
    return false;
  };
  auto on_value = [&](std::string_view f, const char* v) {
    if (f == "--config") a.config = v;
    else if (f == "--out") a.out = v;
    else if (f == "--stages") a.stages = v;
    else if (f == "--from") a.from = v;
    else if (f == "--teacher") a.teacher = v;
    else if (f == "--seed") a.seed = cli::to_int(kTool, f, v, 0);
    else if (f == "--student-ffn") a.student_ffn = cli::to_int(kTool, f, v, 1, cumo::kMaxDim);
    else if (f == "--log-every") a.log_every = cli::to_int(kTool, f, v, 1);
    else return false;
    return true;
  };
  if (const auto status = cli::parse_args(kTool, argc, argv, usage, on_switch, on_value)) return *status;

  if (a.config.empty()) {
    std::cerr << "cumo_distill: --config CONFIG.json is required\n";
    usage(std::cerr);
    return 2;
  }
  try {
    return run(a);
  } catch (const std::bad_alloc&) {
    std::cerr << "cumo_distill: out of memory (std::bad_alloc): the teacher, the student or a batch does not fit in "
                 "this machine's memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "cumo_distill: " << e.what() << "\n";
    return 1;
  }
}
