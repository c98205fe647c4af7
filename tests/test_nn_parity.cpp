// Parity with the PyTorch / Hugging Face fixtures of kinds clip_vision, mistral, qwen2, mixtral, llava: the same
// runners cumo_parity uses (tools/parity/models.hpp), over every shipped fixture of those kinds, each model built
// from the fixture's metadata config. Tolerances from tests/fixtures/README.md: outputs 1e-4, gradients 1e-3.
#include <doctest/doctest.h>

#include <filesystem>
#include <string>

#include "../tools/parity/models.hpp"

namespace {

void run_kind(const std::string& kind) {
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(CUMO_FIXTURE_DIR)) {
    if (entry.path().extension() != ".safetensors") continue;
    const auto f = cumo::io::SafeTensors::open(entry.path().string());
    const auto it = f.metadata().find("kind");
    if (it == f.metadata().end() || it->second != kind) continue;
    ++files;
    CAPTURE(entry.path().filename().string());
    const auto config = nlohmann::json::parse(f.metadata().at("config"));
    cumo::parity::Report r;
    if (kind == "clip_vision") cumo::parity::run_clip_vision(f, config, r);
    if (kind == "mistral") cumo::parity::run_mistral(f, config, r);
    if (kind == "qwen2") cumo::parity::run_qwen2(f, config, r);
    if (kind == "mixtral") cumo::parity::run_mixtral(f, config, r);
    if (kind == "llava") cumo::parity::run_llava(f, config, r);
    CHECK(r.failed == 0);
    CHECK(r.passed > 10);
  }
  CHECK(files >= 1);
}

}  // namespace

TEST_CASE("nn parity: clip_vision fixtures (hidden states, features, every grad, grad of pixel_values)") { run_kind("clip_vision"); }
TEST_CASE("nn parity: mistral fixtures (logits, loss, every grad)") { run_kind("mistral"); }
TEST_CASE("nn parity: qwen2 fixtures (q/k/v biases, tied embeddings)") { run_kind("qwen2"); }
TEST_CASE("nn parity: mixtral fixtures (router logits, HF aux loss over all layers, every grad)") { run_kind("mixtral"); }
TEST_CASE("nn parity: llava fixtures (CLIP layer -2 -> projector -> image-token rows -> Mistral)") { run_kind("llava"); }
