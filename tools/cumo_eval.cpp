// cumo_eval: evaluates a CuMo checkpoint written by cumo_train.
//
//   cumo_eval --checkpoint DIR [--data EVAL.json] [--config CONFIG.json] [--out DIR] [--limit N] [--quiet]
//       greedy generation for every eval question (the prompt is everything before the answer), exact-match accuracy
//       per question type and overall (beside the majority-answer baseline of each type), the eval CE, and the expert
//       load (max/mean) of every MoE layer on the eval set. Writes <out>/eval_results.json, <out>/expert_load.csv
//       (tokens per expert per CLIP layer and connector: the plot of scripts/plot.py) and
//       <out>/eval_predictions.jsonl. <out> defaults to the checkpoint's parent directory.
//
//   cumo_eval --checkpoint DIR --generate --image PATH --question "..." [--max-new N]
//       answers one question about one image.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <string_view>

#include "cli.hpp"
#include "app/checkpoints.hpp"
#include "app/data.hpp"
#include "app/eval.hpp"
#include "app/metrics.hpp"
#include "app/run_config.hpp"
#include "cumo/io/image.hpp"

namespace {
constexpr const char* kTool = "cumo_eval";
namespace fs = std::filesystem;
using namespace cumo;

void usage(std::ostream& os) {
  os << "usage: cumo_eval --checkpoint DIR [--data EVAL.json] [--config CONFIG.json] [--out DIR] [--limit N]\n"
        "                 [--batch B] [--max-new N] [--quiet]\n"
        "       cumo_eval --checkpoint DIR --generate --image PATH --question \"...\" [--max-new N]\n"
        "  --checkpoint  a checkpoint directory written by cumo_train (e.g. runs/demo/stage3)\n"
        "  --data        LLaVA JSON with questions and reference answers (default: the run's eval split)\n"
        "  --config      take data/eval settings from this config instead of the one stored in the checkpoint\n"
        "  --out         where eval_results.json, expert_load.csv, eval_predictions.jsonl go\n"
        "                (default: the checkpoint's parent directory)\n"
        "  --limit       evaluate only the first N records\n";
}

struct Args {
  std::string checkpoint, data, config, out, image, question;
  long long limit = -1, batch = -1, max_new = -1;
  bool generate = false, quiet = false;
};

std::string answer_of(models::CuMo<>& model, const io::Tokenizer& tok, const std::vector<std::int32_t>& prompt,
                      const Tensor& pixels, std::int64_t max_new) {
  std::vector<std::int64_t> ids(prompt.begin(), prompt.end());
  const auto out = model.generate(ids, pixels, max_new, tok.eos_id());
  return app::trim_answer(tok.decode(out, /*skip_special=*/true));
}

int generate_one(const Args& a) {
  CUMO_CHECK(!a.image.empty() && !a.question.empty(), "cumo_eval --generate needs --image PATH and --question TEXT");
  const auto tok = io::load_tokenizer(app::run_config_of_checkpoint(a.checkpoint).tokenizer);
  app::RunConfig cfg;
  models::CuMo<> model = app::load_model_from_checkpoint(a.checkpoint, *tok, &cfg);
  io::LlavaRecord r;
  r.id = "generate";
  r.image = a.image;
  r.conversations = {{io::Role::user, "human", "<image>\n" + a.question}, {io::Role::assistant, "gpt", ""}};
  const auto p = io::tokenize_prompt(r, *tok, io::ChatTemplate::from_name(cfg.eval_template), cfg.image_tokens());
  const io::ClipPreprocess pre = cfg.data_options(cfg.eval_template).preprocess;  // as the run trained
  const Tensor px = io::clip_preprocess_file(a.image, pre);  // (3, S, S)
  const Tensor pixels = px.contiguous().view({1, px.size(0), px.size(1), px.size(2)});
  std::cout << answer_of(model, *tok, p.ids, pixels, a.max_new > 0 ? a.max_new : cfg.eval_max_new_tokens) << "\n";
  return 0;
}

int evaluate(const Args& a) {
  const auto tok_ptr = io::load_tokenizer(app::run_config_of_checkpoint(a.checkpoint).tokenizer);
  const io::Tokenizer& tok = *tok_ptr;
  app::RunConfig stored;
  nlohmann::json state;
  models::CuMo<> model = app::load_model_from_checkpoint(a.checkpoint, tok, &stored, &state);
  app::RunConfig cfg = a.config.empty() ? stored : app::load_run_config(a.config);
  const std::string data_path = a.data.empty() ? cfg.data_path(cfg.eval_data) : a.data;
  if (a.data.empty()) app::ensure_data(cfg, {cfg.eval_data});
  const std::int64_t max_new = a.max_new > 0 ? a.max_new : cfg.eval_max_new_tokens;
  const std::int64_t batch = a.batch > 0 ? a.batch : cfg.eval_batch;
  const std::string out_dir = !a.out.empty() ? a.out
                              : fs::path(a.checkpoint).has_parent_path()
                                  ? fs::path(a.checkpoint).parent_path().string()
                                  : std::string(".");
  fs::create_directories(out_dir);

  const auto data = io::LlavaDataset::load(data_path, tok, cfg.data_options(cfg.eval_template));
  std::size_t n = data.size();
  const long long limit = a.limit >= 0 ? a.limit : cfg.eval_limit > 0 ? cfg.eval_limit : -1;
  if (limit >= 0) n = std::min<std::size_t>(n, std::size_t(limit));
  CUMO_CHECK(n > 0, "cumo_eval: '", data_path, "' has no records to evaluate");
  const auto chat = io::ChatTemplate::from_name(cfg.eval_template);

  // ---- greedy generation, exact match -----------------------------------------------------------------------------
  struct TypeStats {
    std::int64_t correct = 0, total = 0;
    std::map<std::string, std::int64_t> answers;  // reference answers, for the majority baseline
  };
  std::map<std::string, TypeStats> by_type;
  std::int64_t correct = 0;
  std::ofstream preds(fs::path(out_dir) / "eval_predictions.jsonl", std::ios::trunc);
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < n; ++i) {
    const io::LlavaRecord& r = data.record(i);
    const auto [got, want] = app::greedy_answer(model, tok, data, i, chat, cfg.image_tokens(), max_new,
                                                  "'" + data_path + "' record " + std::to_string(i));
    const bool ok = got == want;
    const std::string type = r.type.empty() ? "all" : r.type;
    TypeStats& ts = by_type[type];
    ts.total += 1;
    ts.correct += ok;
    ts.answers[want] += 1;
    correct += ok;
    // A byte-level model can emit bytes that are not UTF-8: replace them rather than fail the JSON.
    preds << nlohmann::json{{"id", r.id}, {"type", type}, {"answer", want}, {"prediction", got}, {"correct", ok}}.dump(
                 -1, ' ', false, nlohmann::json::error_handler_t::replace)
          << "\n";
    if (!a.quiet && app::stderr_is_tty() && (i % 10 == 0 || i + 1 == n)) {
      std::fprintf(stderr, "\rgenerating %zu/%zu  accuracy so far %.3f ", i + 1, n, double(correct) / double(i + 1));
      std::fflush(stderr);
    }
  }
  if (!a.quiet && app::stderr_is_tty()) std::fputs("\n", stderr);
  const double gen_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // ---- eval CE and expert load over the full conversations -------------------------------------------------------
  const std::int64_t L = model.config().llava.vision.layers;
  std::vector<std::vector<std::int64_t>> vload;  // [sparse CLIP layer][expert]
  std::vector<std::int64_t> pload;
  double ce_sum = 0;
  std::int64_t ce_targets = 0;
  for (std::size_t s = 0; s < n; s += std::size_t(batch)) {
    std::vector<std::size_t> idx;
    for (std::size_t i = s; i < std::min(n, s + std::size_t(batch)); ++i) idx.push_back(i);
    const io::Batch b = io::collate(data, idx);
    const auto out = model.forward(b.input_ids, b.B, b.T, b.pixels, &b.labels, &b.key_valid, /*training=*/false);
    ce_sum += out.ce * double(out.targets);
    ce_targets += out.targets;
    if (vload.size() < out.vision_load.size()) vload.resize(out.vision_load.size());
    for (std::size_t l = 0; l < out.vision_load.size(); ++l) {
      const auto& t = out.vision_load[l].tokens;
      if (vload[l].size() < t.size()) vload[l].resize(t.size(), 0);
      for (std::size_t e = 0; e < t.size(); ++e) vload[l][e] += t[e];
    }
    const auto& pt = out.projector_load.tokens;
    if (pload.size() < pt.size()) pload.resize(pt.size(), 0);
    for (std::size_t e = 0; e < pt.size(); ++e) pload[e] += pt[e];
  }
  auto max_mean = [](const std::vector<std::int64_t>& t) {
    ExpertLoad el;
    el.tokens = t;
    return el.max_over_mean();
  };

  // ---- report -----------------------------------------------------------------------------------------------------
  nlohmann::ordered_json res;
  res["checkpoint"] = a.checkpoint;
  res["data"] = data_path;
  res["variant"] = app::metadata_of(state, "variant", a.checkpoint);
  res["stage"] = app::metadata_of(state, "stage", a.checkpoint);
  res["seed"] = stored.seed;
  res["records"] = n;
  res["accuracy"] = double(correct) / double(n);
  res["correct"] = correct;
  res["eval_ce"] = ce_targets ? ce_sum / double(ce_targets) : 0.0;
  res["generation_seconds"] = gen_seconds;
  // Two blind baselines per type: a uniform guess among the type's distinct reference answers ("chance"), and
  // always giving the type's most common reference answer ("majority").
  std::printf("%-10s %9s %9s %9s %9s\n", "type", "correct", "accuracy", "chance", "majority");
  for (const auto& [type, ts] : by_type) {
    std::int64_t maj = 0;
    std::string maj_answer;
    for (const auto& [ans, c] : ts.answers)
      if (c > maj) {
        maj = c;
        maj_answer = ans;
      }
    const double acc = double(ts.correct) / double(ts.total), base = double(maj) / double(ts.total);
    const double chance = 1.0 / double(ts.answers.size());
    std::printf("%-10s %4lld/%-4lld %9.3f %9.3f %9.3f\n", type.c_str(), (long long)ts.correct, (long long)ts.total,
                acc, chance, base);
    res["per_type"][type] = {{"accuracy", acc},
                             {"correct", ts.correct},
                             {"total", ts.total},
                             {"chance", chance},
                             {"majority_baseline", base},
                             {"majority_answer", maj_answer}};
  }
  std::printf("%-10s %4lld/%-4lld %9.3f\n", "overall", (long long)correct, (long long)n, double(correct) / double(n));
  std::printf("eval CE %.4f over %lld answer tokens\n", res["eval_ce"].get<double>(), (long long)ce_targets);

  std::ofstream csv(fs::path(out_dir) / "expert_load.csv", std::ios::trunc);
  csv << "layer,index,expert,tokens,share\n";
  auto write_layer = [&](const std::string& name, std::int64_t index, const std::vector<std::int64_t>& t) {
    std::int64_t sum = 0;
    for (auto x : t) sum += x;
    for (std::size_t e = 0; e < t.size(); ++e)
      csv << name << ',' << index << ',' << e << ',' << t[e] << ',' << (sum ? double(t[e]) / double(sum) : 0.0) << "\n";
  };
  if (!vload.empty() || !pload.empty()) {
    const auto& mc = model.config();
    std::printf("expert load on the eval set, max/mean tokens per expert (1 = balanced; %.3g = every token on the "
                "same %d of %d experts",
                double(mc.experts) / double(mc.top_k), mc.top_k, mc.experts);
    if (mc.connector_E() != mc.experts)
      std::printf("; %.3g for the connector's %d", double(mc.connector_E()) / double(mc.top_k), mc.connector_E());
    std::printf("):\n");
    for (std::size_t l = 0; l < vload.size(); ++l) {
      const double mm = max_mean(vload[l]);
      std::printf("  clip.%zu %6.3f  [", l, mm);
      for (std::size_t e = 0; e < vload[l].size(); ++e) std::printf("%s%lld", e ? " " : "", (long long)vload[l][e]);
      std::printf("]\n");
      res["expert_load"]["clip." + std::to_string(l)] = {{"max_over_mean", mm}, {"tokens", vload[l]}};
      write_layer("clip." + std::to_string(l), std::int64_t(l), vload[l]);
    }
    if (!pload.empty()) {
      const double mm = max_mean(pload);
      std::printf("  connector %6.3f  [", mm);
      for (std::size_t e = 0; e < pload.size(); ++e) std::printf("%s%lld", e ? " " : "", (long long)pload[e]);
      std::printf("]\n");
      res["expert_load"]["connector"] = {{"max_over_mean", mm}, {"tokens", pload}};
      write_layer("connector", L, pload);
    }
  } else {
    std::printf("expert load: the model is dense (no MoE layers)\n");
    res["expert_load"] = nlohmann::ordered_json::object();
  }
  std::ofstream(fs::path(out_dir) / "eval_results.json", std::ios::trunc)
      << res.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
  if (!a.quiet) std::fprintf(stderr, "wrote %s/{eval_results.json,expert_load.csv,eval_predictions.jsonl}\n", out_dir.c_str());
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  Args a;
  auto on_switch = [&](std::string_view f) {
    if (f == "--generate") return a.generate = true;
    if (f == "--quiet" || f == "-q") return a.quiet = true;
    return false;
  };
  auto on_value = [&](std::string_view f, const char* v) {
    if (f == "--checkpoint") a.checkpoint = v;
    else if (f == "--data") a.data = v;
    else if (f == "--config") a.config = v;
    else if (f == "--out") a.out = v;
    else if (f == "--image") a.image = v;
    else if (f == "--question") a.question = v;
    else if (f == "--limit") a.limit = cli::to_int(kTool, f, v, 0, INT_MAX);
    else if (f == "--batch") a.batch = cli::to_int(kTool, f, v, 1, INT_MAX);
    else if (f == "--max-new") a.max_new = cli::to_int(kTool, f, v, 1, INT_MAX);
    else return false;
    return true;
  };
  if (const auto status = cli::parse_args(kTool, argc, argv, usage, on_switch, on_value)) return *status;

  if (a.checkpoint.empty()) {
    std::cerr << "cumo_eval: --checkpoint DIR is required\n";
    usage(std::cerr);
    return 2;
  }
  try {
    return a.generate ? generate_one(a) : evaluate(a);
  } catch (const std::bad_alloc&) {
    std::cerr << "cumo_eval: out of memory (std::bad_alloc): the model or the data does not fit in this machine's "
                 "memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "cumo_eval: " << e.what() << "\n";
    return 1;
  }
}
