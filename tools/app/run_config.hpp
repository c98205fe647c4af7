#pragma once
// cumo_train's run configuration: the JSON schema of docs/training_app.md, read into one RunConfig whose model is a
// models::CuMoConfig (the one representation of a CuMo model; its vocabulary and image token come from the
// tokenizer). Every field is type- and range-checked when the file is read, the model through CuMoConfig::validate.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "app/json_reader.hpp"
#include "app/pretrained.hpp"
#include "cumo/core/error.hpp"
#include "cumo/data/shapes_world.hpp"
#include "cumo/io/llava_data.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/models/cumo.hpp"

namespace cumo::app {

// Ablation variants (the paper's Tables 3-5 in miniature) change stage 3 only:
//   dense        no upcycling: stage 3 trains the dense model
//   moe          co-upcycled CLIP-MoE + MLP-MoE with bzloss (CuMo)
//   moe_nobz     co-upcycled, aux losses off (balance_coef = z_coef = 0)
//   moe_scratch  MoE blocks whose experts are freshly initialised instead of copied from the dense MLP
//   moe_mlponly  only the connector upcycled (MLP-MoE; the CLIP MLPs stay dense, CuMo's clip_smoe = false)
//   moe_conn8    as moe, with the connector top-k of 8 experts (kConnector8) instead of `experts`
enum class Variant { dense, moe, moe_nobz, moe_scratch, moe_mlponly, moe_conn8 };
inline constexpr int kConnector8 = 8;

inline const char* variant_name(Variant v) {
  switch (v) {
    case Variant::dense: return "dense";
    case Variant::moe: return "moe";
    case Variant::moe_nobz: return "moe_nobz";
    case Variant::moe_scratch: return "moe_scratch";
    case Variant::moe_mlponly: return "moe_mlponly";
    case Variant::moe_conn8: return "moe_conn8";
  }
  return "?";
}
inline Variant parse_variant(const std::string& s) {
  for (Variant v : {Variant::dense, Variant::moe, Variant::moe_nobz, Variant::moe_scratch, Variant::moe_mlponly,
                    Variant::moe_conn8})
    if (s == variant_name(v)) return v;
  fail("unknown variant '", s, "' (known: dense, moe, moe_nobz, moe_scratch, moe_mlponly, moe_conn8)");
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

struct RunConfig {
  std::string name = "cumo";
  std::string out = "runs/cumo";
  std::uint64_t seed = 0;             // model initialisation and routers (stage 3); data seeds derive from it
  Variant variant = Variant::moe;
  std::string data_dir = "data/shapes";
  std::string tokenizer = "byte";
  bool generate_data = false;         // data.generate present: the shapes world may be written into data_dir
  data::ShapesConfig shapes;          // what the generator writes
  models::CuMoConfig model;           // vocab and image_token_id are the tokenizer's (model_config())
  // A run that started from an HF checkpoint (cumo_train --from a LLaVA / CuMo / LLM directory; app/pretrained.hpp):
  // `model` is then that checkpoint's configuration, its vocabulary included.
  std::optional<PretrainedStart> pretrained;
  models::CuMoInit init;              // model.vision.position_init ("normal" | "sincos"): from-scratch init only
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

  // The model's configuration: the vocabulary and the image id come from the tokenizer; moe_nobz turns bzloss off,
  // moe_conn8 gives the connector 8 experts.
  models::CuMoConfig model_config(const io::Tokenizer& tok) const {
    models::CuMoConfig c = model;
    if (pretrained) {  // the checkpoint's vocabulary: the tokenizer must fit in it
      CUMO_CHECK(tok.vocab_size() <= c.llava.text.vocab, "the tokenizer '", tokenizer, "' has ", tok.vocab_size(),
                 " tokens, more than the ", c.llava.text.vocab, " rows of the embedding of '", pretrained->from,
                 "' (set data.tokenizer to the checkpoint's tokenizer.model)");
    } else {
      c.llava.text.vocab = tok.vocab_size();
    }
    c.llava.image_token_id = tok.image_id();
    if (variant == Variant::moe_nobz) c.balance_coef = c.z_coef = 0.f;
    if (variant == Variant::moe_conn8) c.connector_experts = kConnector8;
    return c;
  }

  // Image tokens per sample: the connector emits one feature per patch.
  int image_tokens() const { return int(model.llava.vision.patches()); }
  std::int64_t image_size() const { return model.llava.vision.image_size; }

  io::DataOptions data_options(const std::string& chat_template, int max_length = 0) const {
    io::DataOptions o;
    o.image_tokens = image_tokens();
    o.max_length = max_length;
    o.chat = io::ChatTemplate::from_name(chat_template);
    o.preprocess.size = int(image_size());
    if (pretrained && pretrained->pad_to_square) o.preprocess.aspect = io::AspectMode::pad;
    return o;
  }
  std::string data_path(const std::string& file) const {
    const std::filesystem::path p(file);
    return p.is_absolute() ? p.string() : (std::filesystem::path(data_dir) / p).string();
  }

  static RunConfig from_json(const nlohmann::json& j, const std::string& source = "<config>");
};

namespace detail {
// The "model" block: the app's compact schema, read straight into a CuMoConfig (defaults: the demo's small model).
inline void read_model(const nlohmann::json* m, const std::string& source, models::CuMoConfig& c,
                       models::CuMoInit& init) {
  nn::VisionConfig& v = c.llava.vision;
  nn::DecoderConfig& t = c.llava.text;
  v.hidden = 64, v.layers = 2, v.heads = 4, v.ffn = 256, v.image_size = 32, v.patch_size = 8, v.channels = 3;
  t.model_type = "mistral";
  t.hidden = 64, t.layers = 2, t.heads = 4, t.kv_heads = 0, t.head_dim = 0, t.ffn = 192;
  t.experts = 0, t.top_k = 2, t.aux_coef = 0.001, t.rope_theta = 10000.0;
  c.experts = 4, c.top_k = 2, c.balance_coef = 0.1f, c.z_coef = 0.01f;
  if (m) {
    JsonReader rm{*m, source + ": model", {}};
    rm.get("image_size", v.image_size);
    rm.get("patch_size", v.patch_size);
    rm.get("experts", c.experts);
    rm.get("top_k", c.top_k);
    rm.get("balance_coef", c.balance_coef);
    rm.get("z_coef", c.z_coef);
    if (const auto* vj = rm.object("vision")) {
      JsonReader rv{*vj, source + ": model.vision", {}};
      rv.get("hidden", v.hidden);
      rv.get("layers", v.layers);
      rv.get("heads", v.heads);
      rv.get("ffn", v.ffn);
      rv.get("feature_layer", v.feature_layer);
      rv.get("s2", v.s2);
      std::string position_init = "normal";
      rv.get("position_init", position_init);
      CUMO_CHECK(position_init == "normal" || position_init == "sincos", source,
                 ": model.vision.position_init must be \"normal\" (HF's N(0, 0.02^2)) or \"sincos\", got \"",
                 position_init, "\"");
      init.sincos_vision_positions = position_init == "sincos";
      rv.reject_unknown();
    }
    if (const auto* tj = rm.object("text")) {
      JsonReader rt{*tj, source + ": model.text", {}};
      rt.get("hidden", t.hidden);
      rt.get("layers", t.layers);
      rt.get("heads", t.heads);
      rt.get("kv_heads", t.kv_heads);
      rt.get("head_dim", t.head_dim);
      rt.get("ffn", t.ffn);
      rt.get("experts", t.experts);
      rt.get("top_k", t.top_k);
      rt.get("aux_coef", t.aux_coef);
      rt.get("rope_theta", t.rope_theta);
      rt.reject_unknown();
    }
    rm.reject_unknown();
  }
  if (t.experts > 0) t.model_type = "mixtral";
  // kv_heads / head_dim 0 mean "heads" / "hidden / heads"; a negative one is a mistake, not a default.
  CUMO_CHECK(t.kv_heads >= 0 && t.head_dim >= 0, source, ": model.text kv_heads (", t.kv_heads, ") and head_dim (",
             t.head_dim, ") must be >= 0 (0 = the default)");
  t = t.with_defaults();
  // Validated here, once, with a placeholder vocabulary (the tokenizer's is only known when the run starts).
  models::CuMoConfig probe = c;
  probe.llava.text.vocab = 1;
  probe.llava.image_token_id = 0;
  probe.validate(source + ": model");
}
}  // namespace detail

inline RunConfig RunConfig::from_json(const nlohmann::json& j, const std::string& source) {
  CUMO_CHECK(j.is_object(), source, ": the config must be a JSON object");
  RunConfig c;
  c.raw = j;
  JsonReader r{j, source, {}};
  r.get("name", c.name);
  r.get("out", c.out);
  r.get("seed", c.seed);
  std::string variant = variant_name(c.variant);
  r.get("variant", variant);
  c.variant = parse_variant(variant);

  if (const auto* d = r.object("data")) {
    JsonReader rd{*d, source + ": data", {}};
    rd.get("dir", c.data_dir);
    rd.get("tokenizer", c.tokenizer);
    if (const auto* g = rd.object("generate")) {
      JsonReader rg{*g, source + ": data.generate", {}};
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
      c.generate_data = true;
    }
    rd.reject_unknown();
  }
  detail::read_model(r.object("model"), source, c.model, c.init);
  if (const auto* pj = r.object("pretrained")) {  // written by cumo_train --from HF_DIR, not by hand
    c.pretrained = PretrainedStart::from_json(*pj, source);
    c.model = c.pretrained->model;
  }

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
    for (const auto& [k, v] : ss->items()) {
      CUMO_CHECK(k == "defaults" || k == "1" || k == "2" || k == "3", source, ": stages: unknown key '", k,
                 "' (use \"defaults\", \"1\", \"2\", \"3\")");
      CUMO_CHECK(v.is_object(), source, ": stages.", k, " must be an object");
    }
    // "defaults" applies to every stage before its own block.
    for (int s = 1; s <= 3; ++s) {
      StageConfig& st = c.stages[s - 1];
      for (const char* key : {"defaults", s == 1 ? "1" : s == 2 ? "2" : "3"}) {
        auto it = ss->find(key);
        if (it == ss->end()) continue;
        JsonReader rs{*it, source + ": stages." + key, {}};
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
          JsonReader rl{*ls, source + ": stages." + key + ".lr_scale", {}};
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
      CUMO_CHECK(st.lr >= 0, sw, ": lr must be >= 0, got ", st.lr);
      CUMO_CHECK(st.warmup_ratio >= 0 && st.warmup_ratio <= 1, sw, ": warmup_ratio must be in [0, 1], got ",
                 st.warmup_ratio);
      CUMO_CHECK(st.max_grad_norm > 0, sw, ": max_grad_norm must be > 0, got ", st.max_grad_norm);
      CUMO_CHECK(st.weight_decay >= 0, sw, ": weight_decay must be >= 0, got ", st.weight_decay);
      CUMO_CHECK(st.beta1 >= 0 && st.beta1 < 1 && st.beta2 >= 0 && st.beta2 < 1 && st.eps >= 0, sw,
                 ": need beta1, beta2 in [0, 1) and eps >= 0 (got ", st.beta1, ", ", st.beta2, ", ", st.eps, ")");
      CUMO_CHECK(st.lr_scale_vision >= 0 && st.lr_scale_connector >= 0 && st.lr_scale_language >= 0, sw,
                 ": lr_scale values must be >= 0");
      CUMO_CHECK(st.max_length >= 0, sw, ": max_length must be >= 0 (0 = no truncation), got ", st.max_length);
      (void)io::ChatTemplate::from_name(st.chat_template);  // validates the name
    }
  }
  if (const auto* e = r.object("eval")) {
    JsonReader re{*e, source + ": eval", {}};
    re.get("data", c.eval_data);
    re.get("template", c.eval_template);
    re.get("max_new_tokens", c.eval_max_new_tokens);
    re.get("batch", c.eval_batch);
    re.get("limit", c.eval_limit);
    re.reject_unknown();
    (void)io::ChatTemplate::from_name(c.eval_template);
  }
  CUMO_CHECK(c.eval_max_new_tokens >= 1, source, ": eval.max_new_tokens must be >= 1, got ", c.eval_max_new_tokens);
  CUMO_CHECK(c.eval_batch >= 1, source, ": eval.batch must be >= 1, got ", c.eval_batch);
  CUMO_CHECK(c.eval_limit >= 0, source, ": eval.limit must be >= 0 (0 = every record), got ", c.eval_limit);
  r.reject_unknown();
  return c;
}

inline RunConfig load_run_config(const std::string& path) {
  return RunConfig::from_json(read_config_file(path, "load_run_config"), "'" + path + "'");
}

}  // namespace cumo::app
