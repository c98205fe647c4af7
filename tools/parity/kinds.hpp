#pragma once
// Every fixture kind cumo_parity knows, each with its runner on backend B: the one table the tool and the tests
// dispatch through, so a new kind is registered once.
#include <functional>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "cumo/io/safetensors.hpp"
#include "parity/cumo.hpp"
#include "parity/llava_mod.hpp"
#include "parity/models.hpp"
#include "parity/moe.hpp"
#include "parity/report.hpp"

namespace cumo::parity {

using Runner = std::function<void(const io::SafeTensors&, const nlohmann::json&, Report&)>;

// `expert_parallel`: the group the sparse blocks' experts are sharded over (cumo_parity --expert-parallel K); the
// block kinds, the CuMo model, the Mixtral decoder and LLaVA-MoD's sparse student run sharded; the dense model kinds
// (no experts) are skipped, visibly.
template <class B>
std::map<std::string, Runner> runners(dist::Communicator* expert_parallel = nullptr) {
  std::map<std::string, Runner> t{
      {"moe_mlp", [=](const io::SafeTensors& f, const nlohmann::json& c, Report& r) { run_moe_mlp<B>(f, c, r, expert_parallel); }},
      {"moe_swiglu", [=](const io::SafeTensors& f, const nlohmann::json& c, Report& r) { run_moe_swiglu<B>(f, c, r, expert_parallel); }},
      {"clip_vision", run_clip_vision<B>},
      {"mistral", run_mistral<B>},
      {"qwen2", run_qwen2<B>},
      {"mixtral", [=](const io::SafeTensors& f, const nlohmann::json& c, Report& r) { run_mixtral<B>(f, c, r, expert_parallel); }},
      {"llava", run_llava<B>},
      {"cumo", [=](const io::SafeTensors& f, const nlohmann::json& c, Report& r) { run_cumo<B>(f, c, r, expert_parallel); }},
      // on a device the LLaVA-MoD losses run on host copies of the logits, the models on the device
      {"llava_mod_distill",
       [=](const io::SafeTensors& f, const nlohmann::json& c, Report& r) { run_llava_mod_distill<B>(f, c, r, expert_parallel); }},
  };
  if (expert_parallel)
    for (auto& [kind, run] : t)
      if (kind != "moe_mlp" && kind != "moe_swiglu" && kind != "cumo" && kind != "mixtral" && kind != "llava_mod_distill")
        run = [](const io::SafeTensors&, const nlohmann::json&, Report& r) {
          if (r.prefix.empty())  // rank 0 says it once
            std::printf("  SKIPPED: --expert-parallel runs the kinds with experts (moe_mlp, moe_swiglu, cumo, mixtral, "
                        "llava_mod_distill); this dense kind has none to shard\n");
          ++r.skipped;
        };
  return t;
}

// A lower bound of the parameters the model a fixture's metadata config describes would have, from the sizes
// alone. The fixture holds every one of them (and the reference outputs), so a config claiming more than the file's
// elements is corrupt or hostile: refused before anything is built (a claimed hidden of 10^6 would otherwise allocate
// terabytes of weights before the first tensor is compared). -1: a kind without an estimate.
inline double claimed_parameters(const std::string& kind, const nlohmann::json& config) {
  if (kind == "moe_mlp" || kind == "moe_swiglu") {
    const double H = config.at("hidden").get<double>(), F = config.at("ffn").get<double>();
    const double E = config.at("experts").get<double>();
    return E * (kind == "moe_mlp" ? 2 : 3) * H * F + H * E;
  }
  if (kind == "clip_vision") return nn::VisionConfig::from_json(config).parameter_count();
  if (kind == "mistral" || kind == "qwen2" || kind == "mixtral")
    return nn::DecoderConfig::from_json(config).parameter_count();
  if (kind == "llava") {
    const auto c = nn::LlavaConfig::from_json(config);
    return c.vision.parameter_count() + c.text.parameter_count();
  }
  if (kind == "cumo") return models::CuMoConfig::from_json(config).parameter_count();
  if (kind == "llava_mod_distill")
    return nn::DecoderConfig::from_json(config.at("teacher")).parameter_count() +
           nn::DecoderConfig::from_json(config.at("student")).parameter_count();
  return -1;
}

// Refuses a fixture whose config claims more parameters than the file holds elements (see claimed_parameters).
inline void check_claimed_sizes(const io::SafeTensors& file, const std::string& kind, const nlohmann::json& config) {
  const double claimed = claimed_parameters(kind, config);
  double held = 0;
  for (const auto& n : file.names()) held += double(file.info(n).shape.numel());
  CUMO_CHECK(claimed <= held, "the metadata config describes a model of at least ", claimed,
             " parameters, but the file holds only ", held, " tensor elements in all: the config does not match the "
             "tensors (refused before building the model)");
}

}  // namespace cumo::parity
