#pragma once
// cumo_distill's configuration (docs/llava_mod.md): the teacher checkpoint, the student, and a pipeline of named
// stages, each of one kind:
//   ce        next-token CE (LLaVA-MoD's adapter initialisation; SFT when the student is then trained on answers)
//   d2d       dense-to-dense mimic distillation: token-level KL(p_T ‖ p_S) on response tokens   (+ ce_weight·CE)
//   d2s       dense-to-sparse: KL + CE + aux (the MoE balance loss summed over sparse layers × aux_coef)
//   dpo       preference distillation, the teacher as reference model, DPO (sigmoid) loss, β
//             (+ ce_weight·CE of the chosen answers, 0 by default: an RPO-style anchor)
//   kto_pair  the same with TRL's KTO-pair loss
// A stage with "upcycle": true makes the student sparse first (experts exact copies of each FFN, fresh routers);
// the ce / d2d / d2s kinds all add the aux loss while the student is sparse. Which parameters train is per stage
// ("train": any of "connector", "ffn" (FFNs / experts / routers), "attention" (attention, norms, embeddings, head));
// the vision tower never trains.
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "app/json_reader.hpp"
#include "cumo/core/error.hpp"
#include "cumo/io/llava_data.hpp"
#include "cumo/nn/decoder.hpp"

namespace cumo::app {

enum class DistillKind { ce, d2d, d2s, dpo, kto_pair };

inline const char* distill_kind_name(DistillKind k) {
  switch (k) {
    case DistillKind::ce: return "ce";
    case DistillKind::d2d: return "d2d";
    case DistillKind::d2s: return "d2s";
    case DistillKind::dpo: return "dpo";
    case DistillKind::kto_pair: return "kto_pair";
  }
  return "?";
}
inline DistillKind parse_distill_kind(const std::string& s) {
  if (s == "ce") return DistillKind::ce;
  if (s == "d2d") return DistillKind::d2d;
  if (s == "d2s") return DistillKind::d2s;
  if (s == "dpo") return DistillKind::dpo;
  if (s == "kto_pair") return DistillKind::kto_pair;
  fail("unknown distillation stage kind '", s, "' (known: ce, d2d, d2s, dpo, kto_pair)");
}
inline bool is_preference(DistillKind k) { return k == DistillKind::dpo || k == DistillKind::kto_pair; }

// The student: its LLM's dimensions (a DecoderConfig whose vocabulary, norm eps and RoPE base are the teacher's when
// the student is built) and how it becomes sparse.
struct StudentConfig {
  nn::DecoderConfig text = default_text();
  bool sparse = true;             // false: a dense student ("upcycle" stages leave it dense)
  int experts = 4, top_k = 2;
  std::vector<int> moe_layers;    // empty: 0, 2, 4, … (LLaVA-MoD's every other layer)
  double aux_coef = 0.01;         // × Σ over sparse layers of the balance loss (top-1 counts, DeepSpeed's l_aux)
  double capacity_factor = 0;     // > 0: DeepSpeed capacity ceil(k·tokens·cf / E); overflow passes the residual only

  static nn::DecoderConfig default_text() {
    nn::DecoderConfig t;
    t.hidden = 64, t.layers = 2, t.heads = 4, t.kv_heads = 0, t.ffn = 128;
    return t;
  }
};

struct DistillStage {
  std::string name;
  DistillKind kind = DistillKind::d2s;
  std::string data = "stage3.json";  // relative to the teacher's data directory (preference stages build pairs)
  std::string chat_template = "mistral";
  std::int64_t steps = 100, batch = 16;
  double lr = 1e-3, warmup_ratio = 0.03, max_grad_norm = 1.0, weight_decay = 0.0;
  bool upcycle = false;
  bool train_connector = true, train_ffn = true, train_attention = true;
  double kl_weight = 1.0;   // d2d / d2s: weight of KL(p_T ‖ p_S)
  double ce_weight = 0.0;   // d2d, dpo, kto_pair: 0 by default (preference: CE of the chosen answers); d2s, ce: 1
  double temperature = 1.0;
  double beta = 0.1;        // dpo / kto_pair
  std::uint64_t data_seed = 0;
};

struct DistillConfig {
  std::string name = "mod";
  std::string out = "runs/mod";
  std::uint64_t seed = 0;
  std::string teacher;              // a cumo_train checkpoint directory (the dense teacher)
  StudentConfig student;
  std::vector<DistillStage> stages; // in config order
  std::vector<std::string> pipeline;  // the default sequence of stage names (all stages when absent)
  std::int64_t eval_limit = 0, eval_max_new_tokens = 8;
  std::string eval_data;            // "" = the teacher run's eval split
  nlohmann::json raw;

  const DistillStage& stage(const std::string& name) const {
    for (const auto& s : stages)
      if (s.name == name) return s;
    std::string known;
    for (const auto& s : stages) known += (known.empty() ? "" : ", ") + s.name;
    fail("distill config: no stage named '", name, "' (known: ", known, ")");
  }
  static DistillConfig from_json(const nlohmann::json& j, const std::string& source = "<config>");
};

inline DistillConfig DistillConfig::from_json(const nlohmann::json& j, const std::string& source) {
  CUMO_CHECK(j.is_object(), source, ": the config must be a JSON object");
  DistillConfig c;
  c.raw = j;
  JsonReader r{j, source, {}};
  r.get("name", c.name);
  r.get("out", c.out);
  r.get("seed", c.seed);
  r.get("teacher", c.teacher);
  CUMO_CHECK(!c.teacher.empty(), source, ": 'teacher' (a cumo_train checkpoint directory) is required");
  if (const auto* s = r.object("student")) {
    JsonReader rs{*s, source + ": student", {}};
    StudentConfig& st = c.student;
    rs.get("hidden", st.text.hidden);
    rs.get("layers", st.text.layers);
    rs.get("heads", st.text.heads);
    rs.get("kv_heads", st.text.kv_heads);
    rs.get("ffn", st.text.ffn);
    rs.get("sparse", st.sparse);
    rs.get("experts", st.experts);
    rs.get("top_k", st.top_k);
    rs.get("moe_layers", st.moe_layers);
    rs.get("aux_coef", st.aux_coef);
    rs.get("capacity_factor", st.capacity_factor);
    rs.reject_unknown();
    CUMO_CHECK(st.text.kv_heads >= 0, source, ": student.kv_heads must be >= 0 (0 = heads), got ", st.text.kv_heads);
    CUMO_CHECK(st.text.heads > 0 && st.text.hidden % st.text.heads == 0, source, ": student hidden ", st.text.hidden,
               " is not divisible by heads ", st.text.heads);
    st.text.head_dim = 0;  // hidden / heads
    nn::DecoderConfig probe = st.text.with_defaults();
    probe.vocab = 1;  // the teacher's, once known
    probe.validate(source + ": student");
    CUMO_CHECK(st.experts >= 1 && st.top_k >= 1 && st.top_k <= st.experts, source, ": student needs 1 <= top_k (",
               st.top_k, ") <= experts (", st.experts, ")");
    CUMO_CHECK(st.aux_coef >= 0 && st.capacity_factor >= 0, source, ": aux_coef and capacity_factor must be >= 0");
    for (int l : st.moe_layers)
      CUMO_CHECK(l >= 0 && l < st.text.layers, source, ": student.moe_layers holds ", l, ", outside [0, ",
                 st.text.layers, ")");
  }
  const nlohmann::json* ss = nullptr;
  {
    r.known.insert("stages");
    auto it = j.find("stages");
    CUMO_CHECK(it != j.end() && it->is_array() && !it->empty(), source, ": 'stages' must be a non-empty array");
    ss = &*it;
  }
  nlohmann::json defaults = nlohmann::json::object();
  if (const auto* d = r.object("stage_defaults")) defaults = *d;
  for (std::size_t i = 0; i < ss->size(); ++i) {
    const nlohmann::json& sj = (*ss)[i];
    CUMO_CHECK(sj.is_object(), source, ": stages[", i, "] must be an object");
    DistillStage st;
    std::string kind;
    const nlohmann::json* blocks[] = {&defaults, &sj};
    for (const nlohmann::json* block : blocks) {
      JsonReader rs{*block, source + ": stages[" + std::to_string(i) + "]", {}};
      rs.get("name", st.name);
      rs.get("kind", kind);
      rs.get("data", st.data);
      rs.get("template", st.chat_template);
      rs.get("steps", st.steps);
      rs.get("batch", st.batch);
      rs.get("lr", st.lr);
      rs.get("warmup_ratio", st.warmup_ratio);
      rs.get("max_grad_norm", st.max_grad_norm);
      rs.get("weight_decay", st.weight_decay);
      rs.get("upcycle", st.upcycle);
      rs.get("kl_weight", st.kl_weight);
      rs.get("ce_weight", st.ce_weight);
      rs.get("temperature", st.temperature);
      rs.get("beta", st.beta);
      rs.get("data_seed", st.data_seed);
      std::vector<std::string> train;
      rs.known.insert("train");
      if (auto t = block->find("train"); t != block->end() && !t->is_null()) {
        try {
          train = t->get<std::vector<std::string>>();
        } catch (const nlohmann::json::exception&) {
          fail(rs.where, ": 'train' must be a list of part names");
        }
        st.train_connector = st.train_ffn = st.train_attention = false;
        for (const auto& p : train) {
          if (p == "connector") st.train_connector = true;
          else if (p == "ffn") st.train_ffn = true;
          else if (p == "attention") st.train_attention = true;
          else fail(rs.where, ": unknown part '", p, "' in 'train' (known: connector, ffn, attention)");
        }
      }
      rs.reject_unknown();
    }
    const std::string where = source + ": stage '" + st.name + "'";
    CUMO_CHECK(!st.name.empty(), source, ": stages[", i, "] has no name");
    CUMO_CHECK(!kind.empty(), where, ": 'kind' is required (ce, d2d, d2s, dpo, kto_pair)");
    st.kind = parse_distill_kind(kind);
    // The kinds' own default loss weights, unless the stage sets them.
    if (!sj.contains("ce_weight") && !defaults.contains("ce_weight"))
      st.ce_weight = st.kind == DistillKind::d2d || is_preference(st.kind) ? 0.0 : 1.0;
    CUMO_CHECK(st.steps >= 1 && st.batch >= 1, where, ": steps and batch must be >= 1");
    CUMO_CHECK(st.lr >= 0 && std::isfinite(st.lr) && st.max_grad_norm > 0, where, ": need lr >= 0, max_grad_norm > 0");
    CUMO_CHECK(st.temperature > 0 && st.beta > 0, where, ": temperature and beta must be > 0");
    CUMO_CHECK(st.kl_weight >= 0 && st.ce_weight >= 0, where, ": loss weights must be >= 0");
    CUMO_CHECK(st.train_connector || st.train_ffn || st.train_attention, where, ": 'train' selects no parameters");
    if (st.data_seed == 0) st.data_seed = c.seed * 1000003ull + 100 + i;
    (void)io::ChatTemplate::from_name(st.chat_template);
    for (const auto& o : c.stages) CUMO_CHECK(o.name != st.name, source, ": two stages are named '", st.name, "'");
    c.stages.push_back(std::move(st));
  }
  r.get("pipeline", c.pipeline);
  if (c.pipeline.empty())
    for (const auto& s : c.stages) c.pipeline.push_back(s.name);
  for (const auto& n : c.pipeline) (void)c.stage(n);
  if (const auto* e = r.object("eval")) {
    JsonReader re{*e, source + ": eval", {}};
    re.get("limit", c.eval_limit);
    re.get("max_new_tokens", c.eval_max_new_tokens);
    re.get("data", c.eval_data);
    re.reject_unknown();
  }
  r.reject_unknown();
  return c;
}

inline DistillConfig load_distill_config(const std::string& path) {
  return DistillConfig::from_json(read_config_file(path, "load_distill_config"), "'" + path + "'");
}

}  // namespace cumo::app
