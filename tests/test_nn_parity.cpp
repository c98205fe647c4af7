// Parity with the PyTorch / Hugging Face fixtures of kinds clip_vision, mistral, qwen2, mixtral, llava: the same
// runners cumo_parity uses (tools/parity/models.hpp), over every shipped fixture of those kinds, each model built
// from the fixture's metadata config. Tolerances from tests/fixtures/README.md: outputs 1e-4, gradients 1e-3.
#include <doctest/doctest.h>

#include <string>

#include "fixture_runs.hpp"

namespace {

void run_kind(const std::string& kind) { CHECK(cumo::test::run_fixture_kinds<cumo::backend::Cpu>({kind}, 11) >= 1); }

}  // namespace

TEST_CASE("nn parity: clip_vision fixtures (hidden states, features, every grad, grad of pixel_values)") { run_kind("clip_vision"); }
TEST_CASE("nn parity: mistral fixtures (logits, loss, every grad)") { run_kind("mistral"); }
TEST_CASE("nn parity: qwen2 fixtures (q/k/v biases, tied embeddings)") { run_kind("qwen2"); }
TEST_CASE("nn parity: mixtral fixtures (router logits, HF aux loss over all layers, every grad)") { run_kind("mixtral"); }
TEST_CASE("nn parity: llava fixtures (CLIP layer -2 -> projector -> image-token rows -> Mistral)") { run_kind("llava"); }
