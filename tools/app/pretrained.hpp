#pragma once
// Stage starts from checkpoints cumo_train did not write (`cumo_train --from DIR`, DIR a Hugging Face directory:
// config.json + model.safetensors or a sharded model.safetensors.index.json, no trainer_state.json):
//   llava-hf LLaVA-1.5    config.json model_type "llava" (LlavaConfig: vision_config, text_config, image_token_index)
//   a CuMo release        model_type "llava_mistral" / "llava_mixtral" (models/cumo_release.hpp; dense or sparse)
//   a plain LLM + a CLIP  model_type "mistral" / "mixtral" / "qwen2" / "llama", with --vision-from CLIP_DIR (openai's
//                         CLIPModel or a CLIPVisionModel): the connector starts fresh (LLaVA's mlp2x_gelu), which
//                         is what stage 1 trains
// The model's sizes come from the checkpoint; the run config's "model" block keeps only what a dense checkpoint
// cannot say: the MoE shape stage 3 upcycles to (experts, top_k, balance_coef, z_coef; a release's own values win).
// The run stores the whole model config (run config "pretrained": {from, vision_from, kind, pad_to_square,
// model_config}), so --resume and cumo_eval rebuild the model without the original directory.
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/models/cumo.hpp"
#include "cumo/models/cumo_release.hpp"

namespace cumo::app {

// A directory holding an HF checkpoint rather than one of cumo_train's.
inline bool is_pretrained_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  return fs::is_directory(dir, ec) && fs::exists(fs::path(dir) / "config.json", ec) &&
         !fs::exists(fs::path(dir) / "trainer_state.json", ec);
}

struct PretrainedStart {
  std::string from, vision_from;  // the directories
  std::string kind;               // "llava-hf", "cumo-release" or "decoder+clip"
  bool pad_to_square = false;     // a release's image_aspect_ratio "pad"
  models::CuMoConfig model;       // the sizes of the checkpoint(s); image_token_id is the tokenizer's, set later
  std::vector<std::string> notes;

  nlohmann::json to_json() const {
    return {{"from", from}, {"vision_from", vision_from}, {"kind", kind}, {"pad_to_square", pad_to_square},
            {"model_config", model.to_json()}};
  }
  static PretrainedStart from_json(const nlohmann::json& j, const std::string& where) {
    CUMO_CHECK(j.is_object() && j.contains("model_config") && j["model_config"].is_object(), where,
               ": \"pretrained\" must be an object with a \"model_config\" object");
    PretrainedStart p;
    p.from = j.value("from", std::string());
    p.vision_from = j.value("vision_from", std::string());
    p.kind = j.value("kind", std::string());
    p.pad_to_square = j.value("pad_to_square", false);
    p.model = models::CuMoConfig::from_json(j["model_config"]);
    return p;
  }
};

namespace detail {
inline nlohmann::json read_config_json(const std::string& dir, const char* what) {
  return models::detail::read_json_file((std::filesystem::path(dir) / "config.json").string(), what);
}
}  // namespace detail

// The model configuration of a pretrained start. `run_model` is the run config's model block: its MoE shape
// (experts, top_k, coefficients) is kept unless the checkpoint gives its own (a release).
inline PretrainedStart pretrained_config(const std::string& from, const std::string& vision_from,
                                         const models::CuMoConfig& run_model) {
  PretrainedStart p;
  p.from = from;
  p.vision_from = vision_from;
  const nlohmann::json j = detail::read_config_json(from, "config.json");
  CUMO_CHECK(j.is_object(), "--from '", from, "': config.json is not a JSON object");
  const std::string type = j.value("model_type", std::string());
  auto moe_shape_from_run = [&](models::CuMoConfig& c) {
    c.experts = run_model.experts;
    c.connector_experts = run_model.connector_experts;
    c.top_k = run_model.top_k;
    c.balance_coef = run_model.balance_coef;
    c.z_coef = run_model.z_coef;
  };
  if (type == "llava") {
    CUMO_CHECK(vision_from.empty(), "--vision-from is for a plain language model; '", from,
               "' is a LLaVA checkpoint with its own vision tower");
    p.kind = "llava-hf";
    p.model = models::CuMoConfig::from_json(j);
    moe_shape_from_run(p.model);
    p.notes.push_back("LLaVA checkpoint (llava-hf): vision tower, connector and language model from '" + from + "'");
  } else if (type == "llava_mistral" || type == "llava_mixtral") {
    CUMO_CHECK(vision_from.empty(), "--vision-from is for a plain language model; '", from,
               "' is a CuMo checkpoint with its own vision tower");
    p.kind = "cumo-release";
    const models::ReleaseConfig rc = models::load_release_config(from);
    p.model = rc.model;
    p.pad_to_square = rc.pad_to_square;
    p.notes = rc.notes;
    p.notes.insert(p.notes.begin(), "CuMo checkpoint (" + type + ", " +
                                        (rc.sparse_vision || rc.sparse_connector ? "sparse" : "dense") + ") from '" +
                                        from + "'");
  } else if (type == "mistral" || type == "mixtral" || type == "qwen2" || type == "llama") {
    CUMO_CHECK(!vision_from.empty(), "--from '", from, "' is a plain language model (", type, "): give the vision "
               "tower with --vision-from CLIP_DIR (a CLIP checkpoint: config.json + safetensors)");
    p.kind = "decoder+clip";
    const nlohmann::json clip = detail::read_config_json(vision_from, "CLIP config.json");
    CUMO_CHECK(clip.is_object(), "--vision-from '", vision_from, "': config.json is not a JSON object");
    const std::string ctype = clip.value("model_type", std::string());
    CUMO_CHECK(ctype == "clip" || ctype == "clip_vision_model" || clip.contains("vision_config"), "--vision-from '",
               vision_from, "': model_type '", ctype, "' is not a CLIP (accepted: clip, clip_vision_model)");
    p.model.llava.text = nn::DecoderConfig::from_json(j);
    p.model.llava.vision = nn::VisionConfig::from_json(clip.contains("vision_config") ? clip["vision_config"] : clip);
    p.model.llava.image_token_id = p.model.llava.text.vocab;  // replaced by the tokenizer's below
    moe_shape_from_run(p.model);
    p.notes.push_back("language model (" + type + ") from '" + from + "', vision tower from '" + vision_from +
                      "'; the connector starts fresh (LLaVA's Linear-GELU-Linear)");
  } else {
    fail("--from '", from, "': config.json model_type '", type, "' is not a checkpoint cumo_train can start from "
         "(accepted: llava (llava-hf LLaVA-1.5), llava_mistral / llava_mixtral (CuMo), mistral / mixtral / qwen2 / "
         "llama with --vision-from CLIP_DIR)");
  }
  p.model.validate("--from '" + from + "'");
  return p;
}

// Loads a pretrained start's weights into `model` (built from p.model): every tensor of a LLaVA / CuMo checkpoint,
// or the language model and the vision tower from their two checkpoints (the connector keeps its fresh values).
// Missing or misshapen tensors are listed together, both shapes named (io::load_hf).
template <class Model>
void load_pretrained(Model& model, const PretrainedStart& p) {
  if (p.kind != "decoder+clip") {
    model.load(p.from);
    return;
  }
  io::LoadOptions lang;
  lang.release_pages = true;
  io::load_hf(model.language_parameters(), io::HFCheckpoint::open(p.from), lang);
  io::LoadOptions vis;
  vis.release_pages = true;
  vis.optional_suffixes = Model::optional_tensors();
  io::load_hf(model.vision_parameters(), io::HFCheckpoint::open(p.vision_from), vis);
}

}  // namespace cumo::app
