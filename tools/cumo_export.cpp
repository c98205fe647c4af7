// cumo_export: writes a cumo_train checkpoint as a Hugging Face checkpoint directory (config.json + model.safetensors)
// that other tools — and cumo_train --from — read.
//
//   cumo_export --checkpoint DIR --out OUT --layout release|llava-hf|llm+clip [--overwrite]
//
//   release    the released SHI-Labs/CuMo layout (LlavaMistralForCausalLM / LlavaMixtralForCausalLM): experts one
//              tensor each, the config.json models/cumo_release.hpp reads and the CLIP's clip_config.json beside it;
//              dense or sparse. Loads back bitwise. The run's tokenizer goes with it (tokenizer.model, or
//              "cumo_tokenizer": "byte" in config.json) and its conversation template ("cumo_chat_template"), so
//              that cumo_generate --checkpoint OUT prompts it as the run was trained.
//   llava-hf   llava-hf's LlavaForConditionalGeneration layout (transformers 4.x names: vision_tower.vision_model.…,
//              multi_modal_projector.linear_{1,2}, language_model.model.…, language_model.lm_head) with its
//              LlavaConfig; a dense model only (LLaVA-1.5 has no MoE).
//   llm+clip   OUT/language (a Mistral / Mixtral checkpoint: model.layers.…, lm_head) and OUT/vision (a CLIP vision
//              tower: vision_model.…, CLIPVisionConfig); the connector is not written. Dense CLIP only.
// Every file is written atomically; OUT must be new or empty unless --overwrite.
#include <filesystem>
#include <iostream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "app/checkpoints.hpp"
#include "cumo/io/checkpoint_hf.hpp"
#include "cumo/io/files.hpp"
#include "cumo/io/safetensors_write.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/models/cumo_release.hpp"

namespace {
constexpr const char* kTool = "cumo_export";
namespace fs = std::filesystem;
using namespace cumo;

void usage(std::ostream& os) {
  os << "usage: cumo_export --checkpoint DIR --out OUT --layout release|llava-hf|llm+clip [--overwrite]\n"
        "  --checkpoint  a checkpoint written by cumo_train (e.g. runs/demo/stage3)\n"
        "  --out         the directory to write (config.json + model.safetensors; llm+clip: OUT/language, OUT/vision)\n"
        "  --layout      release: SHI-Labs/CuMo's layout (dense or sparse); llava-hf: LLaVA-1.5 (dense only);\n"
        "                llm+clip: the language model and the CLIP vision tower as two checkpoints (dense CLIP)\n"
        "  --overwrite   replace what OUT holds\n";
}

struct Args {
  std::string checkpoint, out, layout;
  bool overwrite = false;
};

using Named = std::vector<std::pair<std::string, Tensor>>;

// Canonical (transformers 5) names with one prefix swapped; names outside every listed prefix are dropped.
Named renamed(const ParameterList& params, const std::vector<std::pair<std::string, std::string>>& prefixes) {
  Named out;
  for (auto& [name, t] : io::detail::named_for_layout(params, io::Layout::transformers))
    for (const auto& [from, to] : prefixes)
      if (name.rfind(from, 0) == 0) {
        out.emplace_back(to + name.substr(from.size()), t);
        break;
      }
  return out;
}

void write_dir(const fs::path& dir, const nlohmann::json& config, const Named& tensors) {
  fs::create_directories(dir);
  io::save((dir / "model.safetensors").string(), tensors, {{"format", "pt"}});
  io::write_file_atomic((dir / "config.json").string(), config.dump(2) + "\n", "config.json");
}

int run(const Args& a) {
  CUMO_CHECK(!a.checkpoint.empty() && !a.out.empty() && !a.layout.empty(),
             "--checkpoint DIR, --out OUT and --layout are required");
  CUMO_CHECK(a.layout == "release" || a.layout == "llava-hf" || a.layout == "llm+clip", "--layout '", a.layout,
             "' is not one of release, llava-hf, llm+clip");
  std::error_code ec;
  if (fs::exists(a.out, ec)) {
    CUMO_CHECK(fs::is_directory(a.out, ec), "--out '", a.out, "' exists and is not a directory");
    CUMO_CHECK(a.overwrite || fs::is_empty(a.out, ec), "--out '", a.out,
               "' is not empty: pass --overwrite to replace what it holds");
  }
  const auto tok = io::load_tokenizer(app::run_config_of_checkpoint(a.checkpoint).tokenizer);
  app::RunConfig run;
  models::CuMo<> model = app::load_model_from_checkpoint(a.checkpoint, *tok, &run);
  const models::CuMoConfig& c = model.config();
  const bool vs = model.vision_is_sparse(), cs = model.connector_is_sparse();
  const fs::path out(a.out);
  if (a.layout == "release") {
    fs::create_directories(out);
    model.save((out / "model.safetensors").string(), io::Layout::cumo_release);
    const bool pad = run.pretrained && run.pretrained->pad_to_square;
    nlohmann::json config = models::release_config_json(c, vs, cs, pad);
    // What cumo_generate needs to prompt the release as the run was trained: its conversation template, and its
    // tokenizer — tokenizer.model beside the weights, as a release ships it, or the byte tokenizer by name.
    config["cumo_chat_template"] = run.eval_template;
    if (io::is_byte_tokenizer(run.tokenizer)) {
      config["cumo_tokenizer"] = "byte";
    } else {
      const auto bytes = io::read_file_bytes(io::tokenizer_model_file(run.tokenizer), "the run's tokenizer");
      io::write_file_atomic((out / "tokenizer.model").string(), bytes.data(), bytes.size(), "tokenizer.model");
    }
    io::write_file_atomic((out / "config.json").string(), config.dump(2) + "\n", "config.json");
    // The release's config holds no CLIP sizes (its loader would infer them and assume the heads): the vision
    // config goes beside it, where models::load_release_config looks first.
    io::write_file_atomic((out / "clip_config.json").string(), c.llava.vision.to_json().dump(2) + "\n",
                          "clip_config.json");
  } else if (a.layout == "llava-hf") {
    CUMO_CHECK(!vs && !cs && !c.llava.vision.s2, "--layout llava-hf is LLaVA-1.5's: a dense model without S² (this "
               "checkpoint has", vs ? " a CLIP-MoE" : "", cs ? " an MLP-MoE connector" : "",
               c.llava.vision.s2 ? " S²" : "", "); use --layout release");
    write_dir(out, c.llava.to_json(),
              renamed(model.parameters(), {{"model.vision_tower.", "vision_tower.vision_model."},
                                           {"model.multi_modal_projector.", "multi_modal_projector."},
                                           {"model.language_model.", "language_model.model."},
                                           {"lm_head.", "language_model.lm_head."}}));
  } else {
    CUMO_CHECK(!vs, "--layout llm+clip writes a plain CLIP: this checkpoint's CLIP MLPs are sparse");
    write_dir(out / "language", c.llava.text.to_json(),
              renamed(model.language_parameters(), {{"model.language_model.", "model."}, {"lm_head.", "lm_head."}}));
    write_dir(out / "vision", c.llava.vision.to_json(),
              renamed(model.vision_parameters(), {{"model.vision_tower.", "vision_model."}}));
  }
  std::cout << kTool << ": " << a.checkpoint << " -> " << a.out << " (" << a.layout << ")\n";
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  Args a;
  auto on_switch = [&](std::string_view f) {
    if (f == "--overwrite") return a.overwrite = true;
    return false;
  };
  auto on_value = [&](std::string_view f, const char* v) {
    if (f == "--checkpoint") a.checkpoint = v;
    else if (f == "--out") a.out = v;
    else if (f == "--layout") a.layout = v;
    else return false;
    return true;
  };
  if (const auto status = cli::parse_args(kTool, argc, argv, usage, on_switch, on_value)) return *status;
  try {
    return run(a);
  } catch (const std::exception& e) {
    std::cerr << kTool << ": " << e.what() << "\n";
    return 1;
  }
}
