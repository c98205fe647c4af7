#pragma once
// The configuration of a released SHI-Labs/CuMo checkpoint (CuMo-mistral-7b, CuMo-mixtral-8x7b): their config.json is
// a LlavaMistralConfig / LlavaMixtralConfig — the decoder's keys at the top level (model_type "llava_mistral" /
// "llava_mixtral") beside LLaVA's and CuMo's own:
//   mm_projector_type   "smoe_mlp" (the MLP-MoE connector: num_experts, num_selected) or "mlp2x_gelu" (dense)
//   clip_smoe           every CLIP MLP a top-num_selected-of-num_experts MoE
//   scales              S² scales: absent/[1] (off) or [1, 3]; the connector then reads 2 · mm_hidden_size
//   mm_hidden_size      the CLIP width;  mm_vision_select_layer: the hidden state taken (-2)
//   mm_vision_tower     the CLIP the tower was built from ("openai/clip-vit-large-patch14-336")
//   image_aspect_ratio  "pad": expand to a square with the CLIP mean colour before the CLIP resize
//   balance_loss_coef, router_z_loss_coef   CuMo's bzloss coefficients (0.1, 0.01)
// The release holds no CLIP config: the vision sizes come from a CLIP config.json given beside it (openai's CLIPConfig
// with "vision_config", or a CLIPVisionConfig) or, without one, are inferred from the checkpoint's tensor shapes.
// ReleaseConfig::notes says what was inferred and what was assumed (heads, eps, activation cannot be read from shapes).
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/io/files.hpp"
#include "cumo/models/cumo.hpp"

namespace cumo::models {

struct ReleaseConfig {
  CuMoConfig model;
  bool pad_to_square = false;          // image_aspect_ratio == "pad"
  bool sparse_vision = false;          // clip_smoe
  bool sparse_connector = false;       // mm_projector_type == "smoe_mlp"
  std::vector<std::string> notes;      // what was inferred from the tensors or assumed
  // What a cumo_export of a cumo_train run adds (empty in SHI-Labs' releases, which ship tokenizer.model and use
  // CuMo's mistral_instruct conversation): "cumo_tokenizer" ("byte": no tokenizer.model exists for it) and
  // "cumo_chat_template" (the template the run trained on).
  std::string tokenizer, chat_template;
};

namespace detail {

inline nlohmann::json read_json_file(const std::string& path, const char* what) {
  io::require_regular_file(path, std::string("CuMo release: ") + what);  // a FIFO in its place is refused, not waited on
  std::ifstream f(path);
  CUMO_CHECK(f, "CuMo release: cannot open ", what, " '", path, "'");
  try {
    return nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    fail("CuMo release: ", what, " '", path, "' is not valid JSON: ", e.what());
  }
}

// The vision sizes from the checkpoint's tensors (the CLIP embeddings and encoder layers).
inline nn::VisionConfig infer_vision(const io::HFCheckpoint& ck, const std::string& prefix,
                                     std::vector<std::string>& notes) {
  const std::string pre = prefix + "model.vision_tower.vision_model.";
  CUMO_CHECK(ck.contains(pre + "embeddings.patch_embedding.weight"), "CuMo release: no CLIP config given and the "
             "checkpoint has no '", pre, "embeddings.patch_embedding.weight' to infer the vision tower from");
  const Shape pe = ck.info(pre + "embeddings.patch_embedding.weight").shape;  // (H, C, P, P)
  const Shape pos = ck.info(pre + "embeddings.position_embedding.weight").shape;  // (N + 1, H)
  nn::VisionConfig v;
  v.hidden = pe[0];
  v.channels = pe[1];
  v.patch_size = pe[2];
  std::int64_t grid = 0;
  while ((grid + 1) * (grid + 1) <= pos[0] - 1) ++grid;
  CUMO_CHECK(grid * grid == pos[0] - 1, "CuMo release: position_embedding has ", pos[0],
             " rows, not a square grid of patches plus CLS");
  v.image_size = grid * v.patch_size;
  while (ck.contains(pre + "encoder.layers." + std::to_string(v.layers) + ".layer_norm1.weight")) ++v.layers;
  const std::string l0 = pre + "encoder.layers.0.";
  const std::string fc1 = ck.contains(l0 + "experts.0.fc1.weight") ? l0 + "experts.0.fc1.weight" : l0 + "mlp.fc1.weight";
  CUMO_CHECK(ck.contains(fc1), "CuMo release: cannot infer the CLIP MLP width: no '", fc1, "'");
  v.ffn = ck.info(fc1).shape[0];
  v.heads = std::max<std::int64_t>(1, v.hidden / 64);
  notes.push_back("vision tower inferred from the tensors: hidden " + std::to_string(v.hidden) + ", " +
                  std::to_string(v.layers) + " layers, MLP " + std::to_string(v.ffn) + ", patch " +
                  std::to_string(v.patch_size) + ", image " + std::to_string(v.image_size));
  notes.push_back("assumed (not in the tensors): " + std::to_string(v.heads) +
                  " heads (head width 64, as every CLIP ViT), layer_norm_eps 1e-5, quick_gelu");
  v.validate("CuMo release: inferred vision tower");
  return v;
}

}  // namespace detail

// From the parsed config.json, an optional CLIP config (nullptr: infer from `ck`, whose names start with `prefix`).
inline ReleaseConfig release_config(const nlohmann::json& j, const nlohmann::json* clip, const io::HFCheckpoint* ck,
                                    const std::string& prefix = "") {
  constexpr const char* where = "CuMo release config";
  CUMO_CHECK(j.is_object(), where, ": expected a JSON object");
  ReleaseConfig r;
  const std::string type = j.value("model_type", std::string());
  CUMO_CHECK(type == "llava_mistral" || type == "llava_mixtral", where, ": model_type '", type,
             "' is not a CuMo release (accepted: llava_mistral, llava_mixtral)");
  nlohmann::json text = j;
  text["model_type"] = type.substr(6);  // "mistral" / "mixtral"
  r.model.llava.text = nn::DecoderConfig::from_json(text);

  if (clip != nullptr) {
    r.model.llava.vision = nn::VisionConfig::from_json(clip->contains("vision_config") ? clip->at("vision_config") : *clip);
  } else {
    CUMO_CHECK(ck != nullptr, where, ": neither a CLIP config nor a checkpoint to infer the vision tower from");
    r.model.llava.vision = detail::infer_vision(*ck, prefix, r.notes);
  }
  nn::VisionConfig& v = r.model.llava.vision;
  v.feature_layer = j.value("mm_vision_select_layer", -2);
  const std::string feature = j.value("mm_vision_select_feature", std::string("patch"));
  CUMO_CHECK(feature == "patch", where, ": mm_vision_select_feature '", feature, "' is not supported (only 'patch')");
  if (j.contains("mm_hidden_size"))
    CUMO_CHECK(j["mm_hidden_size"].get<std::int64_t>() == v.hidden, where, ": mm_hidden_size ", j["mm_hidden_size"],
               " differs from the CLIP width ", v.hidden);
  std::vector<int> scales{1};
  if (j.contains("scales") && !j["scales"].is_null()) scales = j["scales"].get<std::vector<int>>();
  const bool known_scales = scales == std::vector<int>{1} || scales == std::vector<int>({1, 3});
  CUMO_CHECK(known_scales, where, ": scales ",
             nlohmann::json(scales).dump(), " are not supported (accepted: [1] and [1, 3])");
  v.s2 = scales.size() == 2;

  const std::string proj = j.value("mm_projector_type", std::string("mlp2x_gelu"));
  CUMO_CHECK(proj == "smoe_mlp" || proj == "mlp2x_gelu", where, ": mm_projector_type '", proj,
             "' is not supported (accepted: smoe_mlp, mlp2x_gelu)");
  r.sparse_connector = proj == "smoe_mlp";
  r.sparse_vision = j.value("clip_smoe", false);
  r.model.experts = j.value("num_experts", r.model.experts);
  r.model.top_k = j.value("num_selected", r.model.top_k);
  r.model.balance_coef = j.value("balance_loss_coef", r.model.balance_coef);
  r.model.z_coef = j.value("router_z_loss_coef", r.model.z_coef);
  const std::string aspect = j.value("image_aspect_ratio", std::string("square"));
  CUMO_CHECK(aspect == "pad" || aspect == "square", where, ": image_aspect_ratio '", aspect,
             "' is not supported (accepted: pad, square)");
  r.pad_to_square = aspect == "pad";
  CUMO_CHECK(!j.value("mm_use_im_start_end", false), where, ": mm_use_im_start_end is not supported");
  // The image placeholder: CuMo splices features in at id -200; here it is the first id past the vocabulary, the id
  // io::SentencePieceTokenizer gives "<image>" (embed_multimodal never looks it up) — unless the config names an id
  // inside the vocabulary ("image_token_index", written by cumo_export for a byte-level run, whose "<image>" is id
  // 259 of 260).
  const std::int64_t vocab = r.model.llava.text.vocab;
  r.model.llava.image_token_id = vocab;
  if (j.contains("image_token_index")) {
    const auto& id = j["image_token_index"];
    CUMO_CHECK(id.is_number_integer() && id.get<std::int64_t>() >= 0 && id.get<std::int64_t>() <= vocab, where,
               ": image_token_index ", id.dump(), " is not an id in [0, vocab_size ", vocab, "]");
    r.model.llava.image_token_id = id.get<std::int64_t>();
  }
  for (auto [key, field] : {std::pair{"cumo_tokenizer", &r.tokenizer}, std::pair{"cumo_chat_template", &r.chat_template}})
    if (j.contains(key)) {
      CUMO_CHECK(j[key].is_string(), where, ": ", key, " must be a string, not ", j[key].dump());
      *field = j[key].get<std::string>();
    }
  r.model.validate(where);
  return r;
}

// From a checkpoint directory: DIR/config.json, and the CLIP config at `clip_config` if given, else
// DIR/clip_config.json, else <DIR's parent>/<last part of mm_vision_tower>/config.json, else inferred.
inline ReleaseConfig load_release_config(const std::string& dir, const std::string& clip_config = "") {
  namespace fs = std::filesystem;
  const nlohmann::json j = detail::read_json_file((fs::path(dir) / "config.json").string(), "config.json");
  std::string clip_path = clip_config;
  if (clip_path.empty() && fs::exists(fs::path(dir) / "clip_config.json")) clip_path = (fs::path(dir) / "clip_config.json").string();
  if (clip_path.empty() && j.contains("mm_vision_tower") && j["mm_vision_tower"].is_string()) {
    const fs::path beside = fs::path(dir).parent_path() / fs::path(j["mm_vision_tower"].get<std::string>()).filename() /
                            "config.json";
    if (fs::exists(beside)) clip_path = beside.string();
  }
  const io::HFCheckpoint ck = io::HFCheckpoint::open(dir);
  ReleaseConfig r;
  if (clip_path.empty()) {
    r = release_config(j, nullptr, &ck);
  } else {
    const nlohmann::json clip = detail::read_json_file(clip_path, "CLIP config");
    r = release_config(j, &clip, &ck);
    r.notes.push_back("vision tower from " + clip_path);
  }
  return r;
}

// The config.json of a release-layout save (Layout::cumo_release): what release_config() reads back.
inline nlohmann::json release_config_json(const CuMoConfig& c, bool sparse_vision, bool sparse_connector,
                                          bool pad_to_square = true) {
  nlohmann::json j = c.llava.text.to_json();
  const bool mixtral = c.llava.text.experts > 0;
  j["model_type"] = mixtral ? "llava_mixtral" : "llava_mistral";
  j["architectures"] = {mixtral ? "LlavaMixtralForCausalLM" : "LlavaMistralForCausalLM"};
  j["mm_projector_type"] = sparse_connector ? "smoe_mlp" : "mlp2x_gelu";
  j["clip_smoe"] = sparse_vision;
  j["num_experts"] = c.experts;
  j["num_selected"] = c.top_k;
  j["balance_loss_coef"] = c.balance_coef;
  j["router_z_loss_coef"] = c.z_coef;
  j["scales"] = c.llava.vision.s2 ? nlohmann::json{1, 3} : nlohmann::json{1};
  j["mm_hidden_size"] = c.llava.vision.hidden;
  j["mm_vision_select_layer"] = c.llava.vision.feature_layer;
  j["mm_vision_select_feature"] = "patch";
  j["image_aspect_ratio"] = pad_to_square ? "pad" : "square";
  j["mm_use_im_start_end"] = false;
  if (c.llava.image_token_id != c.llava.text.vocab) j["image_token_index"] = c.llava.image_token_id;
  return j;
}

}  // namespace cumo::models
