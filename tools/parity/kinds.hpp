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

template <class B>
std::map<std::string, Runner> runners() {
  return {
      {"moe_mlp", run_moe_mlp<B>},
      {"moe_swiglu", run_moe_swiglu<B>},
      {"clip_vision", run_clip_vision<B>},
      {"mistral", run_mistral<B>},
      {"qwen2", run_qwen2<B>},
      {"mixtral", run_mixtral<B>},
      {"llava", run_llava<B>},
      {"cumo", run_cumo<B>},
      // on a device the LLaVA-MoD losses run on host copies of the logits, the models on the device
      {"llava_mod_distill", run_llava_mod_distill<B>},
  };
}

}  // namespace cumo::parity
