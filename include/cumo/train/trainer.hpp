#pragma once
// The CuMo training application's engine: a run configuration (JSON), the three-stage recipe, and a stage runner
// with gradient accumulation, a progress bar, a per-step metrics CSV, NaN/Inf stops, per-stage checkpoints and
// bitwise resume. `cumo_train` and `cumo_eval` (tools/) are thin command lines over this header; docs/training_app.md
// documents the config format and the CSV columns.
//
// The recipe (CuMo, Li et al. 2024, §3.3; SPEC "Three stages"):
//   stage 1  pre-training           only the connector trains (vision tower and LLM in frozen AdamW groups)
//   stage 2  pre-finetuning         everything trains, dense
//   stage 3  visual instruction     every CLIP MLP and the connector are co-upcycled into top-k-of-E MoE blocks,
//                                   everything trains with CE + 0.1·balance + 0.01·z ("bzloss")
// AdamW (weight decay 0), cosine schedule with 3% warmup, global-norm clipping at 1.0, M micro-batches per step
// (each micro-batch's loss is its own mean, the step's the mean of the M: the HF Trainer before 4.46, as LLaVA and
// CuMo were trained). Each stage starts from the previous stage's final checkpoint.
//
// Ablation variants (the paper's Table 5 in miniature) change stage 3 only:
//   dense        no upcycling: stage 3 trains the dense model
//   moe          co-upcycled CLIP-MoE + MLP-MoE with bzloss (CuMo)
//   moe_nobz     co-upcycled, aux losses off (balance_coef = z_coef = 0)
//   moe_scratch  MoE blocks whose experts are freshly initialised instead of copied from the dense MLP
//
// Resume: a stage's checkpoint (train::save_checkpoint) holds the weights, the AdamW state, the optimizer step (=
// the schedule's position), the data position (epoch, sample; the shuffle is a pure function of (seed, epoch)), and
// the run config, so `cumo_train --resume DIR` continues bitwise as if never stopped (same build, same thread count:
// see docs/training.md "Resume guarantee").
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/core/error.hpp"
#include "cumo/core/rng.hpp"
#include "cumo/data/shapes_world.hpp"
#include "cumo/io/llava_data.hpp"
#include "cumo/io/prefetch.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/train/checkpoint.hpp"
#include "cumo/train/clip.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo/train/schedule.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace cumo::train {

// ================================================================================================================
// Configuration
// ================================================================================================================
enum class Variant { dense, moe, moe_nobz, moe_scratch };

inline const char* variant_name(Variant v) {
  switch (v) {
    case Variant::dense: return "dense";
    case Variant::moe: return "moe";
    case Variant::moe_nobz: return "moe_nobz";
    case Variant::moe_scratch: return "moe_scratch";
  }
  return "?";
}
inline Variant parse_variant(const std::string& s) {
  if (s == "dense") return Variant::dense;
  if (s == "moe") return Variant::moe;
  if (s == "moe_nobz") return Variant::moe_nobz;
  if (s == "moe_scratch") return Variant::moe_scratch;
  fail("unknown variant '", s, "' (known: dense, moe, moe_nobz, moe_scratch)");
}

struct StageConfig {
  int stage = 1;
  std::string data;                   // JSON file, relative to the data directory
  std::string chat_template;          // io::ChatTemplate name
  std::int64_t steps = 100;           // optimizer steps: the schedule's N
  std::int64_t batch = 8;             // samples per micro-batch
  int accumulation = 1;               // micro-batches per optimizer step
  double lr = 1e-3;                   // peak lr of the cosine schedule
  double warmup_ratio = 0.03;         // W = ceil(N · ratio)
  double max_grad_norm = 1.0;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool train_vision = true, train_connector = true, train_language = true;
  double lr_scale_vision = 1.0, lr_scale_connector = 1.0, lr_scale_language = 1.0;  // group lr = lr · scale
  std::uint64_t data_seed = 0;        // the shuffle's seed
  int max_length = 0;                 // 0: no truncation
};

struct ModelDims {
  std::int64_t image_size = 32, patch_size = 8;
  std::int64_t v_hidden = 64, v_layers = 2, v_heads = 4, v_ffn = 256;
  int feature_layer = -2;
  bool s2 = false;  // S² multi-scale vision features (model.vision.s2; nn/s2.hpp)
  std::int64_t t_hidden = 64, t_layers = 2, t_heads = 4, t_kv_heads = 0, t_ffn = 192, t_head_dim = 0;
  int t_experts = 0, t_top_k = 2;  // t_experts > 0: a Mixtral-style LLM (every FFN a top-k MoE from stage 1)
  double t_aux_coef = 0.001;       // its router_aux_loss_coef (HF Mixtral's default)
  double rope_theta = 10000.0;
  int experts = 4, top_k = 2;
  double balance_coef = 0.1, z_coef = 0.01;
};

struct RunConfig {
  std::string name = "cumo";
  std::string out = "runs/cumo";
  std::uint64_t seed = 0;             // model initialisation and routers (stage 3); data seeds derive from it
  Variant variant = Variant::moe;
  std::string data_dir = "data/shapes";
  std::string tokenizer = "byte";
  data::ShapesConfig shapes;          // used when the data directory lacks the files
  ModelDims model;
  StageConfig stages[3];
  std::string eval_data = "eval.json";
  std::string eval_template = "mistral";
  std::int64_t eval_max_new_tokens = 8;
  std::int64_t eval_batch = 32;
  std::int64_t eval_limit = 0;        // 0: every eval record
  nlohmann::json raw;                 // the config as given (+ command-line overrides), stored in every checkpoint

  const StageConfig& stage(int s) const {
    CUMO_CHECK(s >= 1 && s <= 3, "RunConfig::stage: stage ", s, " (must be 1, 2 or 3)");
    return stages[s - 1];
  }

  // The model's configuration; the vocabulary and the image id come from the tokenizer.
  models::CuMoConfig model_config(const io::Tokenizer& tok) const {
    models::CuMoConfig c;
    nn::VisionConfig& v = c.llava.vision;
    v.hidden = model.v_hidden;
    v.layers = model.v_layers;
    v.heads = model.v_heads;
    v.ffn = model.v_ffn;
    v.image_size = model.image_size;
    v.patch_size = model.patch_size;
    v.channels = 3;
    v.feature_layer = model.feature_layer;
    v.s2 = model.s2;
    nn::DecoderConfig& t = c.llava.text;
    t.model_type = "mistral";
    t.vocab = tok.vocab_size();
    t.hidden = model.t_hidden;
    t.layers = model.t_layers;
    t.heads = model.t_heads;
    t.kv_heads = model.t_kv_heads > 0 ? model.t_kv_heads : model.t_heads;
    t.head_dim = model.t_head_dim > 0 ? model.t_head_dim : model.t_hidden / model.t_heads;
    t.ffn = model.t_ffn;
    if (model.t_experts > 0) {
      t.model_type = "mixtral";
      t.experts = model.t_experts;
      t.top_k = model.t_top_k;
      t.aux_coef = model.t_aux_coef;
    }
    t.rope_theta = model.rope_theta;
    c.llava.image_token_id = tok.image_id();
    c.experts = model.experts;
    c.top_k = model.top_k;
    const bool aux = variant != Variant::moe_nobz;
    c.balance_coef = aux ? float(model.balance_coef) : 0.f;
    c.z_coef = aux ? float(model.z_coef) : 0.f;
    return c;
  }

  // Image tokens per sample: the connector emits one feature per patch.
  int image_tokens() const { return int((model.image_size / model.patch_size) * (model.image_size / model.patch_size)); }

  io::DataOptions data_options(const std::string& chat_template, int max_length = 0) const {
    io::DataOptions o;
    o.image_tokens = image_tokens();
    o.max_length = max_length;
    o.chat = io::ChatTemplate::from_name(chat_template);
    o.preprocess.size = int(model.image_size);
    return o;
  }
  std::string data_path(const std::string& file) const {
    const std::filesystem::path p(file);
    return p.is_absolute() ? p.string() : (std::filesystem::path(data_dir) / p).string();
  }

  static RunConfig from_json(const nlohmann::json& j, const std::string& source = "<config>");
};

namespace detail {
// Reads j[key] into `v` when present, with a message naming the source and the key on a type mismatch; records
// the key as known.
struct JsonReader {
  const nlohmann::json& j;
  std::string where;
  std::set<std::string> known;

  template <class T>
  void get(const char* key, T& v) {
    known.insert(key);
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return;
    try {
      v = it->get<T>();
    } catch (const nlohmann::json::exception&) {
      fail(where, ": field '", key, "' has the wrong type (", it->dump(), ")");
    }
  }
  const nlohmann::json* object(const char* key) {
    known.insert(key);
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return nullptr;
    CUMO_CHECK(it->is_object(), where, ": field '", key, "' must be an object, got ", it->dump());
    return &*it;
  }
  // Unknown keys are mistakes (a typo would silently keep a default), except "comment" / "_..." notes.
  void reject_unknown() const {
    for (const auto& [k, v] : j.items())
      if (!known.count(k) && k != "comment" && !k.starts_with("_"))
        fail(where, ": unknown field '", k, "'");
  }
};
}  // namespace detail

inline RunConfig RunConfig::from_json(const nlohmann::json& j, const std::string& source) {
  CUMO_CHECK(j.is_object(), source, ": the config must be a JSON object");
  RunConfig c;
  c.raw = j;
  detail::JsonReader r{j, source, {}};
  r.get("name", c.name);
  r.get("out", c.out);
  r.get("seed", c.seed);
  std::string variant = variant_name(c.variant);
  r.get("variant", variant);
  c.variant = parse_variant(variant);

  if (const auto* d = r.object("data")) {
    detail::JsonReader rd{*d, source + ": data", {}};
    rd.get("dir", c.data_dir);
    rd.get("tokenizer", c.tokenizer);
    if (const auto* g = rd.object("generate")) {
      detail::JsonReader rg{*g, source + ": data.generate", {}};
      data::ShapesConfig& s = c.shapes;
      rg.get("seed", s.seed);
      rg.get("train", s.train_images);
      rg.get("eval", s.eval_images);
      rg.get("image_size", s.image_size);
      rg.get("min_objects", s.min_objects);
      rg.get("max_objects", s.max_objects);
      rg.get("colours", s.colours);
      rg.get("questions_per_image", s.questions_per_image);
      rg.get("supersample", s.supersample);
      rg.get("min_size", s.min_size);
      rg.get("max_size", s.max_size);
      rg.get("min_dx", s.min_dx);
      rg.reject_unknown();
      s.validate();
    }
    rd.reject_unknown();
  }

  if (const auto* m = r.object("model")) {
    detail::JsonReader rm{*m, source + ": model", {}};
    ModelDims& d = c.model;
    rm.get("image_size", d.image_size);
    rm.get("patch_size", d.patch_size);
    rm.get("experts", d.experts);
    rm.get("top_k", d.top_k);
    rm.get("balance_coef", d.balance_coef);
    rm.get("z_coef", d.z_coef);
    if (const auto* v = rm.object("vision")) {
      detail::JsonReader rv{*v, source + ": model.vision", {}};
      rv.get("hidden", d.v_hidden);
      rv.get("layers", d.v_layers);
      rv.get("heads", d.v_heads);
      rv.get("ffn", d.v_ffn);
      rv.get("feature_layer", d.feature_layer);
      rv.get("s2", d.s2);
      rv.reject_unknown();
    }
    if (const auto* t = rm.object("text")) {
      detail::JsonReader rt{*t, source + ": model.text", {}};
      rt.get("hidden", d.t_hidden);
      rt.get("layers", d.t_layers);
      rt.get("heads", d.t_heads);
      rt.get("kv_heads", d.t_kv_heads);
      rt.get("head_dim", d.t_head_dim);
      rt.get("ffn", d.t_ffn);
      rt.get("experts", d.t_experts);
      rt.get("top_k", d.t_top_k);
      rt.get("aux_coef", d.t_aux_coef);
      rt.get("rope_theta", d.rope_theta);
      rt.reject_unknown();
    }
    rm.reject_unknown();
  }
  const ModelDims& d = c.model;
  const std::string mw = source + ": model";
  CUMO_CHECK(d.patch_size > 0 && d.image_size > 0 && d.image_size % d.patch_size == 0, mw, ": image_size ",
             d.image_size, " must be a positive multiple of patch_size ", d.patch_size);
  CUMO_CHECK(d.v_hidden > 0 && d.v_layers > 0 && d.v_heads > 0 && d.v_ffn > 0 && d.v_hidden % d.v_heads == 0, mw,
             ": vision needs positive hidden/layers/heads/ffn with hidden divisible by heads (hidden ", d.v_hidden,
             ", heads ", d.v_heads, ")");
  CUMO_CHECK(d.feature_layer >= -d.v_layers - 1 && d.feature_layer <= d.v_layers && d.feature_layer != 0, mw,
             ": vision.feature_layer ", d.feature_layer, " is outside [", -d.v_layers - 1, ", ", d.v_layers,
             "] (0, the embeddings, is not allowed)");
  CUMO_CHECK(d.t_hidden > 0 && d.t_layers > 0 && d.t_heads > 0 && d.t_ffn > 0, mw,
             ": text needs positive hidden/layers/heads/ffn");
  CUMO_CHECK(d.t_experts == 0 || (d.t_experts >= 1 && d.t_top_k >= 1 && d.t_top_k <= d.t_experts && d.t_aux_coef >= 0),
             mw, ": text needs 1 <= top_k (", d.t_top_k, ") <= experts (", d.t_experts, ") and aux_coef >= 0");
  CUMO_CHECK(d.t_head_dim > 0 || d.t_hidden % d.t_heads == 0, mw, ": text hidden ", d.t_hidden,
             " is not divisible by heads ", d.t_heads, " (or give head_dim)");
  CUMO_CHECK(d.t_kv_heads == 0 || d.t_heads % d.t_kv_heads == 0, mw, ": text heads ", d.t_heads,
             " is not a multiple of kv_heads ", d.t_kv_heads);
  CUMO_CHECK(d.experts >= 1 && d.top_k >= 1 && d.top_k <= d.experts, mw, ": need 1 <= top_k (", d.top_k,
             ") <= experts (", d.experts, ")");
  CUMO_CHECK(d.balance_coef >= 0 && d.z_coef >= 0, mw, ": balance_coef and z_coef must be >= 0");

  // Stage defaults: the paper's recipe.
  for (int s = 1; s <= 3; ++s) {
    StageConfig& st = c.stages[s - 1];
    st.stage = s;
    st.data = "stage" + std::to_string(s) + ".json";
    st.chat_template = s == 1 ? "plain" : "mistral";
    st.lr = s == 1 ? 1e-3 : 2e-5;
    st.train_vision = s != 1;
    st.train_language = s != 1;
    st.data_seed = c.seed * 1000003ull + std::uint64_t(s);
  }
  if (const auto* ss = r.object("stages")) {
    // "defaults" applies to every stage before its own block.
    std::vector<std::pair<std::string, const nlohmann::json*>> blocks;
    for (const auto& [k, v] : ss->items()) {
      CUMO_CHECK(k == "defaults" || k == "1" || k == "2" || k == "3", source, ": stages: unknown key '", k,
                 "' (use \"defaults\", \"1\", \"2\", \"3\")");
      CUMO_CHECK(v.is_object(), source, ": stages.", k, " must be an object");
    }
    for (int s = 1; s <= 3; ++s) {
      StageConfig& st = c.stages[s - 1];
      for (const char* key : {"defaults", s == 1 ? "1" : s == 2 ? "2" : "3"}) {
        auto it = ss->find(key);
        if (it == ss->end()) continue;
        detail::JsonReader rs{*it, source + ": stages." + key, {}};
        rs.get("data", st.data);
        rs.get("template", st.chat_template);
        rs.get("steps", st.steps);
        rs.get("batch", st.batch);
        rs.get("accumulation", st.accumulation);
        rs.get("lr", st.lr);
        rs.get("warmup_ratio", st.warmup_ratio);
        rs.get("max_grad_norm", st.max_grad_norm);
        rs.get("weight_decay", st.weight_decay);
        rs.get("beta1", st.beta1);
        rs.get("beta2", st.beta2);
        rs.get("eps", st.eps);
        rs.get("train_vision", st.train_vision);
        rs.get("train_connector", st.train_connector);
        rs.get("train_language", st.train_language);
        if (const auto* ls = rs.object("lr_scale")) {
          detail::JsonReader rl{*ls, source + ": stages." + key + ".lr_scale", {}};
          rl.get("vision", st.lr_scale_vision);
          rl.get("connector", st.lr_scale_connector);
          rl.get("language", st.lr_scale_language);
          rl.reject_unknown();
        }
        rs.get("data_seed", st.data_seed);
        rs.get("max_length", st.max_length);
        rs.reject_unknown();
      }
      const std::string sw = source + ": stages." + std::to_string(s);
      CUMO_CHECK(st.steps >= 1, sw, ": steps must be >= 1, got ", st.steps);
      CUMO_CHECK(st.batch >= 1, sw, ": batch must be >= 1, got ", st.batch);
      CUMO_CHECK(st.accumulation >= 1, sw, ": accumulation must be >= 1, got ", st.accumulation);
      CUMO_CHECK(st.lr >= 0 && std::isfinite(st.lr), sw, ": lr must be finite and >= 0, got ", st.lr);
      CUMO_CHECK(st.max_grad_norm > 0, sw, ": max_grad_norm must be > 0, got ", st.max_grad_norm);
      CUMO_CHECK(st.lr_scale_vision >= 0 && st.lr_scale_connector >= 0 && st.lr_scale_language >= 0, sw,
                 ": lr_scale values must be >= 0");
      (void)io::ChatTemplate::from_name(st.chat_template);  // validates the name
    }
  }
  if (const auto* e = r.object("eval")) {
    detail::JsonReader re{*e, source + ": eval", {}};
    re.get("data", c.eval_data);
    re.get("template", c.eval_template);
    re.get("max_new_tokens", c.eval_max_new_tokens);
    re.get("batch", c.eval_batch);
    re.get("limit", c.eval_limit);
    re.reject_unknown();
    (void)io::ChatTemplate::from_name(c.eval_template);
  }
  r.reject_unknown();
  return c;
}

namespace detail {
// A JSON config file (// and /* */ comments allowed); errors name `who` and the path.
inline nlohmann::json read_config_file(const std::string& path, const char* who) {
  std::ifstream f(path);
  CUMO_CHECK(f, who, ": cannot open '", path, "'");
  try {
    return nlohmann::json::parse(f, nullptr, true, /*ignore_comments=*/true);
  } catch (const nlohmann::json::exception& e) {
    fail(who, ": '", path, "' is not valid JSON: ", e.what());
  }
}
}  // namespace detail

inline RunConfig load_run_config(const std::string& path) {
  return RunConfig::from_json(detail::read_config_file(path, "load_run_config"), "'" + path + "'");
}

// Generates the shapes world into the data directory when any file the run reads is missing.
// Returns true when it generated.
inline bool ensure_data(const RunConfig& c, std::ostream* log = &std::cerr) {
  namespace fs = std::filesystem;
  std::vector<std::string> files = {c.stages[0].data, c.stages[1].data, c.stages[2].data, c.eval_data};
  bool missing = false;
  for (const auto& f : files) missing = missing || !fs::exists(c.data_path(f));
  if (!missing) {
    // Files from another generator setting would silently change the experiment: say so.
    const fs::path meta = fs::path(c.data_dir) / "shapes_world.json";
    if (log && fs::exists(meta) && c.raw.contains("data") && c.raw["data"].contains("generate")) {
      try {
        std::ifstream f(meta);
        const auto m = nlohmann::json::parse(f);
        if (m.value("seed", std::uint64_t(0)) != c.shapes.seed || m.value("train_images", 0) != c.shapes.train_images ||
            m.value("eval_images", 0) != c.shapes.eval_images || m.value("image_size", 0) != c.shapes.image_size)
          *log << "note: " << c.data_dir << " was generated with other settings than data.generate asks for (seed "
               << m.value("seed", std::uint64_t(0)) << ", " << m.value("train_images", 0) << " train, "
               << m.value("eval_images", 0) << " eval, " << m.value("image_size", 0)
               << " px); using it as is — delete the directory to regenerate\n";
      } catch (const std::exception&) {
      }
    }
    return false;
  }
  if (log)
    *log << "generating the shapes world in " << c.data_dir << " (seed " << c.shapes.seed << ", "
         << c.shapes.train_images << " train + " << c.shapes.eval_images << " eval images)\n";
  data::write_shapes_world(c.data_dir, c.shapes);
  for (const auto& f : files)
    CUMO_CHECK(fs::exists(c.data_path(f)), "ensure_data: '", c.data_path(f),
               "' is still missing after generating the shapes world (a custom data file name?)");
  return true;
}

// A generated or reference answer without surrounding white space (what exact match compares).
inline std::string trim_answer(std::string s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return {};
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// Record i of `data` asked of `m`: its prompt (the turns up to the last answer, in `chat`'s template) and image,
// answered greedily (at most max_new tokens, stopping at EOS) — the prediction and the reference answer, both
// trimmed, as exact match compares them. `where` names the record in tokenizer errors.
struct GreedyAnswer {
  std::string prediction, answer;
};
inline GreedyAnswer greedy_answer(models::CuMo<>& m, const io::Tokenizer& tok, const io::LlavaDataset& data,
                                  std::size_t i, const io::ChatTemplate& chat, int image_tokens, std::int64_t max_new,
                                  const std::string& where) {
  const auto p = io::tokenize_prompt(data.record(i), tok, chat, image_tokens, where);
  Tensor pixels;
  if (data.has_image(i)) {
    const Tensor px = data.pixels(i);  // (3, S, S)
    pixels = px.contiguous().view({1, px.size(0), px.size(1), px.size(2)});
  }
  const std::vector<std::int64_t> ids(p.ids.begin(), p.ids.end());
  return {trim_answer(tok.decode(m.generate(ids, pixels, max_new, tok.eos_id()), /*skip_special=*/true)),
          trim_answer(p.answer)};
}

// ================================================================================================================
// Checkpoint metadata
// ================================================================================================================
// trainer_state.json's "metadata" strings this app writes: stage, stage_finished, variant, vision_sparse,
// connector_sparse, run_config (the whole config JSON), model_config (CuMoConfig::to_json).
inline nlohmann::json read_trainer_state(const std::string& dir) {
  const auto path = std::filesystem::path(dir) / "trainer_state.json";
  std::ifstream f(path);
  CUMO_CHECK(f, "read_trainer_state: '", dir, "' has no readable trainer_state.json (not a checkpoint?)");
  try {
    return nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("read_trainer_state: '", path.string(), "' is not valid JSON: ", e.what());
  }
}
inline std::string metadata_of(const nlohmann::json& state, const std::string& key, const std::string& dir) {
  auto m = state.find("metadata");
  CUMO_CHECK(m != state.end() && m->is_object() && m->contains(key) && (*m)[key].is_string(),
             "checkpoint '", dir, "': trainer_state.json metadata lacks '", key,
             "' (not written by cumo_train?)");
  return (*m)[key].get<std::string>();
}

// The run config a checkpoint written by cumo_train carries in its metadata.
inline RunConfig run_config_of_checkpoint(const std::string& dir) {
  const nlohmann::json st = read_trainer_state(dir);
  nlohmann::json raw;
  try {
    raw = nlohmann::json::parse(metadata_of(st, "run_config", dir));
  } catch (const nlohmann::json::exception& e) {
    fail("checkpoint '", dir, "': metadata run_config is not valid JSON: ", e.what());
  }
  return RunConfig::from_json(raw, "checkpoint '" + dir + "' run_config");
}

// Builds the model a checkpoint holds (dense or upcycled, as its metadata says) and loads its weights.
// `config` receives the run config stored in the checkpoint.
inline models::CuMo<> load_model_from_checkpoint(const std::string& dir, const io::Tokenizer& tok, RunConfig* config,
                                               nlohmann::json* state_out = nullptr) {
  const nlohmann::json st = read_trainer_state(dir);
  RunConfig c = run_config_of_checkpoint(dir);
  models::CuMo<> model(c.model_config(tok));
  Rng rng(c.seed);
  model.reset_parameters(rng);
  const bool vs = metadata_of(st, "vision_sparse", dir) == "1", cs = metadata_of(st, "connector_sparse", dir) == "1";
  if (vs || cs) model.upcycle(rng, vs, cs);
  (void)load_checkpoint(dir, model.parameters(), nullptr);
  if (config) *config = std::move(c);
  if (state_out) *state_out = st;
  return model;
}

// ================================================================================================================
// Metrics CSV
// ================================================================================================================
struct StepMetrics {
  int stage = 0;
  std::int64_t step = 0;
  double lr = 0, loss = 0, ce = 0, vision_balance = 0, vision_z = 0, projector_balance = 0, projector_z = 0;
  double grad_norm = 0, tokens_per_s = 0, elapsed_s = 0;
  std::int64_t tokens = 0;
  std::vector<double> vision_balance_l, vision_z_l, vision_load_l;  // per sparse CLIP layer (empty while dense)
  double projector_load = -1;                                       // max/mean; < 0 while dense
};

// One file for all stages. Columns: step, stage, lr, loss, ce, vision_balance, vision_z, projector_balance,
// projector_z, grad_norm, tokens, tokens_per_s, elapsed_s, projector_load_max_mean, then per CLIP layer l
// vision_balance_l<l>, vision_z_l<l>, vision_load_max_mean_l<l>. MoE columns are empty while the model is dense.
class MetricsCsv {
 public:
  MetricsCsv() = default;
  // Keeps the rows of earlier stages and of this stage up to `keep_step` (a resumed run continues its file), drops
  // the rest; starts a new file when the columns differ.
  MetricsCsv(const std::string& path, std::int64_t vision_layers, int stage, std::int64_t keep_step)
      : path_(path), layers_(vision_layers) {
    const std::string head = header();
    std::vector<std::string> keep;
    {
      std::ifstream in(path);
      std::string line;
      if (in && std::getline(in, line) && line == head) {
        while (std::getline(in, line)) {
          if (line.empty()) continue;
          std::int64_t st = 0, sg = 0;
          char comma = 0;
          std::istringstream ls(line);
          if (!(ls >> st >> comma >> sg)) continue;
          if (sg < stage || (sg == stage && st <= keep_step)) keep.push_back(line);
        }
      }
    }
    if (std::filesystem::path(path).has_parent_path())
      std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    out_.open(path, std::ios::trunc);
    CUMO_CHECK(out_, "MetricsCsv: cannot write '", path, "'");
    out_ << head << "\n";
    for (const auto& l : keep) out_ << l << "\n";
    out_.flush();
  }

  std::string header() const {
    std::string h = "step,stage,lr,loss,ce,vision_balance,vision_z,projector_balance,projector_z,grad_norm,tokens,"
                    "tokens_per_s,elapsed_s,projector_load_max_mean";
    for (std::int64_t l = 0; l < layers_; ++l) h += ",vision_balance_l" + std::to_string(l);
    for (std::int64_t l = 0; l < layers_; ++l) h += ",vision_z_l" + std::to_string(l);
    for (std::int64_t l = 0; l < layers_; ++l) h += ",vision_load_max_mean_l" + std::to_string(l);
    return h;
  }

  void write(const StepMetrics& m) {
    if (!out_.is_open()) return;
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
    out_ << o.str() << "\n";
    out_.flush();
  }

 private:
  std::string path_;
  std::int64_t layers_ = 0;
  std::ofstream out_;
};

// ================================================================================================================
// Progress bar
// ================================================================================================================
inline bool stderr_is_tty() {
#if defined(__unix__) || defined(__APPLE__)
  return ::isatty(STDERR_FILENO) == 1;
#else
  return false;
#endif
}

inline std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const long t = long(s + 0.5);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

// A single \r-rewritten line on stderr: stage, bar, step, loss, tokens/s, elapsed and ETA. Off when stderr is not
// a terminal (logs stay clean) or when disabled.
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled && stderr_is_tty()) {}
  void update(int stage, std::int64_t step, std::int64_t total, double loss, double ce, double tok_s, double elapsed,
              double eta) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (step != total && drawn_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    constexpr int W = 24;
    const int fill = total > 0 ? int(double(W) * double(step) / double(total)) : 0;
    std::string bar(std::size_t(fill), '#');
    bar.resize(W, '.');
    char buf[256];
    std::snprintf(buf, sizeof buf, "\rstage %d [%s] %lld/%lld  loss %.4f  ce %.4f  %.0f tok/s  %s < %s ", stage,
                  bar.c_str(), (long long)step, (long long)total, loss, ce, tok_s, format_duration(elapsed).c_str(),
                  format_duration(eta).c_str());
    std::fputs(buf, stderr);
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_ && drawn_) {
      std::fputs("\n", stderr);
      std::fflush(stderr);
    }
    drawn_ = false;
  }

 private:
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

// ================================================================================================================
// The stage runner
// ================================================================================================================
struct StageRunOptions {
  std::string final_dir;                  // the end-of-stage checkpoint
  std::string partial_dir;                // a stopped stage's checkpoint (--max-steps, SIGINT)
  std::string csv_path;                   // per-step metrics ("" = none)
  std::string resume_dir;                 // continue this stage from a partial checkpoint ("" = fresh stage)
  std::int64_t max_steps = -1;            // stop once the stage has taken this many steps (>= 0), saving partial_dir
  std::int64_t log_every = 0;             // > 0: a plain log line every so many steps (for non-TTY logs)
  bool progress = true;                   // the progress bar (only drawn on a terminal)
  bool quiet = false;                     // no log lines, no bar
  const std::atomic<bool>* stop = nullptr;  // set asynchronously (SIGINT): save partial_dir and return
  std::map<std::string, std::string> metadata;  // written into the checkpoints (stage/finished/sparsity are added)
  std::map<std::string, Rng::State> rngs;       // generators to record (e.g. "init")
};

struct StageResult {
  bool finished = false;       // the stage reached its step count (final_dir written)
  std::int64_t step = 0;       // steps taken so far in this stage
  std::string checkpoint;      // the directory written
  double last_loss = 0, last_ce = 0;
  double seconds = 0;          // wall time of this call
  double tokens_per_s = 0;     // mean over this call
};


namespace detail {
// The first non-finite term of a forward's loss, in words ("the balance loss of CLIP layer 2", ...).
template <class Out>
std::string nonfinite_term(const Out& o) {
  auto bad = [](double x) { return !std::isfinite(x); };
  if (bad(o.ce)) {
    if (o.logits.defined()) {
      const Tensor logits = o.logits.device() == Device::cpu ? o.logits : o.logits.to(Device::cpu);
      const float* z = logits.template data<float>();
      for (std::int64_t i = 0; i < logits.numel(); ++i)
        if (!std::isfinite(z[i]))
          return "the cross-entropy (the LM's logits hold " + std::to_string(z[i]) + " at token " +
                 std::to_string(i / logits.size(-1)) + ")";
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
}  // namespace detail

// Runs (or continues) one stage of training on `model`. The model must already have the stage's structure (dense,
// or upcycled for stage 3) and, for a fresh stage, its starting weights. Writes final_dir when the stage completes,
// partial_dir when it stops early (max_steps / stop flag); both are complete checkpoints with optimizer state.
// The model's backend picks the optimizer (OptimizerFor): a models::CuMo<backend::Cuda> trains entirely on the GPU,
// its checkpoints the CPU run's format.
template <class Model>
StageResult run_stage(Model& model, const io::LlavaDataset& data, const StageConfig& sc, const StageRunOptions& ro) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  const std::string tag = "stage " + std::to_string(sc.stage);

  // Parameter groups: vision tower, connector, language model; frozen ones get no update and no state.
  std::vector<ParamGroup> groups;
  groups.push_back(ParamGroup{"vision", model.vision_parameters(), sc.lr_scale_vision, sc.weight_decay, !sc.train_vision});
  groups.push_back(
      ParamGroup{"connector", model.connector_parameters(), sc.lr_scale_connector, sc.weight_decay, !sc.train_connector});
  groups.push_back(
      ParamGroup{"language", model.language_parameters(), sc.lr_scale_language, sc.weight_decay, !sc.train_language});
  std::size_t grouped = 0;
  for (const auto& g : groups) grouped += g.params.size();
  const ParameterList all = model.parameters();
  CUMO_CHECK(grouped == all.size(), tag, ": the vision/connector/language groups hold ", grouped,
             " parameters but the model has ", all.size());
  using Optimizer = typename OptimizerFor<typename Model::backend_type>::type;
  Optimizer opt(std::move(groups), AdamWOptions{sc.lr, sc.beta1, sc.beta2, sc.eps, sc.weight_decay});
  CUMO_CHECK(!opt.trainable_parameters().empty(), tag, ": every parameter group is frozen; nothing to train");
  const auto sched = CosineWithWarmup::with_warmup_ratio(sc.lr, sc.steps, sc.warmup_ratio);
  io::BatchIterator order(data, sc.batch, sc.data_seed);

  TrainerState st;
  if (!ro.resume_dir.empty()) {
    st = load_checkpoint(ro.resume_dir, all, &opt);
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

  std::int64_t vision_layers = 0;
  vision_layers = model.config().llava.vision.layers;
  MetricsCsv csv;
  if (!ro.csv_path.empty()) csv = MetricsCsv(ro.csv_path, vision_layers, sc.stage, st.step);

  const std::int64_t stop_at = ro.max_steps >= 0 ? std::min(sc.steps, ro.max_steps) : sc.steps;
  ProgressBar bar(ro.progress && !ro.quiet);
  const int M = sc.accumulation;
  const std::int64_t first_step = st.step;
  std::int64_t tokens_total = 0;
  StageResult res;
  double train_seconds = 0;

  while (st.step < stop_at) {
    if (ro.stop && ro.stop->load()) break;
    const auto t0 = clock::now();
    opt.zero_grad();
    StepMetrics m;
    m.stage = sc.stage;
    std::vector<std::int64_t> load_v;  // per sparse CLIP layer × expert, summed over micro-batches
    std::vector<std::int64_t> load_p;
    std::size_t n_sparse = 0;
    for (int mb = 0; mb < M; ++mb) {
      const io::Batch b = it.next();
      const auto out = model.forward(b.input_ids, b.B, b.T, b.pixels, &b.labels, &b.key_valid, true);
      if (!std::isfinite(out.total))
        fail("training stopped at ", tag, " step ", st.step + 1, " (micro-batch ", mb, "): the loss is ", out.total,
             "; first non-finite term: ", detail::nonfinite_term(out));
      model.backward(1.0 / double(M));
      m.loss += out.total / M;
      m.ce += out.ce / M;
      m.vision_balance += out.vision_balance / M;
      m.vision_z += out.vision_z / M;
      m.projector_balance += out.projector_balance / M;
      m.projector_z += out.projector_z / M;
      m.tokens += b.tokens();
      n_sparse = out.vision_load.size();
      m.vision_balance_l.resize(n_sparse, 0.0);
      m.vision_z_l.resize(n_sparse, 0.0);
      for (std::size_t l = 0; l < n_sparse && l < out.vision_balance_per_layer.size(); ++l) {
        m.vision_balance_l[l] += out.vision_balance_per_layer[l] / M;
        m.vision_z_l[l] += out.vision_z_per_layer[l] / M;
      }
      for (std::size_t l = 0; l < n_sparse; ++l) {
        const auto& t = out.vision_load[l].tokens;
        if (load_v.size() < n_sparse * t.size()) load_v.resize(n_sparse * t.size(), 0);
        for (std::size_t e = 0; e < t.size(); ++e) load_v[l * t.size() + e] += t[e];
      }
      const auto& pt = out.projector_load.tokens;
      if (load_p.size() < pt.size()) load_p.resize(pt.size(), 0);
      for (std::size_t e = 0; e < pt.size(); ++e) load_p[e] += pt[e];
    }
    // A NaN/Inf gradient stops training naming the parameter (and so the layer) and the step.
    const float gn = clip_gradients(opt, sc.max_grad_norm, st.step + 1);
    const double lr = sched.lr(st.step);
    opt.step(lr);
    ++st.step;
    const io::DataPosition pos = it.position();
    st.epoch = std::int64_t(pos.epoch);
    st.sample = std::int64_t(pos.offset);

    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    train_seconds += dt;
    tokens_total += m.tokens;
    m.step = st.step;
    m.lr = lr;
    m.grad_norm = gn;
    m.tokens_per_s = dt > 0 ? double(m.tokens) / dt : 0;
    m.elapsed_s = train_seconds;
    if (n_sparse && !load_v.empty()) {
      const std::size_t E = load_v.size() / n_sparse;
      for (std::size_t l = 0; l < n_sparse; ++l) {
        ExpertLoad el;
        el.tokens.assign(load_v.begin() + std::ptrdiff_t(l * E), load_v.begin() + std::ptrdiff_t((l + 1) * E));
        m.vision_load_l.push_back(el.max_over_mean());
      }
    }
    if (!load_p.empty()) {
      ExpertLoad el;
      el.tokens = load_p;
      m.projector_load = el.max_over_mean();
    }
    csv.write(m);
    res.last_loss = m.loss;
    res.last_ce = m.ce;

    const double per_step = train_seconds / double(st.step - first_step);
    const double eta = per_step * double(stop_at - st.step);
    const double mean_tps = train_seconds > 0 ? double(tokens_total) / train_seconds : 0;
    bar.update(sc.stage, st.step, sc.steps, m.loss, m.ce, mean_tps, train_seconds, eta);
    if (!ro.quiet && ro.log_every > 0 && (st.step % ro.log_every == 0 || st.step == stop_at)) {
      bar.finish();
      std::fprintf(stderr, "%s step %lld/%lld  lr %.3g  loss %.4f  ce %.4f  grad %.3f  %.0f tok/s  ETA %s\n",
                   tag.c_str(), (long long)st.step, (long long)sc.steps, lr, m.loss, m.ce, double(gn), mean_tps,
                   format_duration(eta).c_str());
    }
  }
  bar.finish();

  res.step = st.step;
  res.finished = st.step >= sc.steps;
  st.metadata["stage_finished"] = res.finished ? "1" : "0";
  res.checkpoint = res.finished ? ro.final_dir : ro.partial_dir;
  if (!res.checkpoint.empty() && (st.step > first_step || ro.resume_dir.empty() || res.checkpoint != ro.resume_dir))
    save_checkpoint(res.checkpoint, all, &opt, st);
  res.seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  res.tokens_per_s = train_seconds > 0 ? double(tokens_total) / train_seconds : 0;
  return res;
}

}  // namespace cumo::train
