// The layers' device code paths, run on the host: nn::*<backend::Emulated> (tests/emulated_backend.hpp: the CUDA
// backend's functions, written on the host from their contracts) against nn::*<backend::Cpu>, the reference. What
// this checks without a GPU is everything of the GPU path except the kernels themselves (which
// tests/cuda/test_cuda_layers.cu compares with the same contracts on a GPU): what each layer saves for its backward,
// the order of the calls, the row-block offsets (CLS rows, image rows in the prompt), the shifted LM labels, the
// per-layer aux losses and gradients of the whole upcycled CuMo, and optimizer steps over device-branch layers.
//
// Tolerance: relative 1e-5 (the emulation accumulates in double where the CPU layers use fp32 GEMMs: differences of
// a few 1e-7); a gradient that is zero in exact arithmetic (CLIP's key bias) is compared in absolute terms, 1e-5.
#include <doctest/doctest.h>

#include <string>
#include <type_traits>
#include <utility>

#include "backend_compare.hpp"
#include "emulated_backend.hpp"
#include "fixture_runs.hpp"

using namespace cumo;
using Emu = backend::Emulated;
using namespace cumo::backend_test;
using cumo::test::run_fixture_kinds;

namespace {

constexpr double kTol = 1e-5;

}  // namespace

TEST_CASE("nn device paths: Linear<Emulated> matches Linear<Cpu> (bias; backward twice accumulates)") {
  Rng rng(1);
  compare_linear<Emu>(rng, kTol);
}
TEST_CASE("nn device paths: ClipVision<Emulated> matches the CPU (hidden states, features, every gradient)") {
  Rng rng(2);
  compare_clip_vision<Emu>(rng, kTol);
}
TEST_CASE("nn device paths: DecoderLM<Emulated> matches the CPU (GQA, RoPE, a padding key, loss, gradients)") {
  Rng rng(3);
  compare_decoder<Emu>(rng, kTol, /*mixtral=*/false);
}
TEST_CASE("nn device paths: a Mixtral DecoderLM<Emulated> matches the CPU (sparse FFNs, HF's cross-layer aux loss)") {
  Rng rng(5);
  compare_decoder<Emu>(rng, kTol, /*mixtral=*/true);
}
TEST_CASE("nn device paths: the whole upcycled CuMo<Emulated> matches CuMo<Cpu>, then through clipped AdamW steps") {
  Rng rng(4);
  compare_cumo<Emu>(rng, kTol, 1e-4);
}

// StudentPass pass(lm) takes lm's backend (a deduction guide: the constructor's parameter alone cannot deduce it).
static_assert(std::is_same_v<decltype(models::StudentPass(std::declval<nn::DecoderLM<Emu>&>())), models::StudentPass<Emu>>);
static_assert(std::is_same_v<decltype(models::StudentPass(std::declval<nn::DecoderLM<>&>())), models::StudentPass<>>);

TEST_CASE("nn device paths: the PyTorch fixtures through the device branches (cumo_parity's runners on Emulated)") {
  // What `cumo_parity --device cuda` runs, with the kernels replaced by their contracts: clip_vision, mistral,
  // qwen2, mixtral, llava, cumo and llava_mod_distill (outputs 1e-4, gradients 1e-3 against PyTorch, as on the CPU;
  // the cumo fixture's AdamW steps and the distillation losses' host round trip included).
  const int files = run_fixture_kinds<Emu>({"clip_vision", "mistral", "qwen2", "mixtral", "llava", "cumo",
                                           "llava_mod_distill"},
                                          11);
  CHECK(files >= 7);  // one fixture each of clip_vision, mistral, qwen2, mixtral, llava, cumo, llava_mod_distill ship today
}
