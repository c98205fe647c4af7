// The whole-model backend comparisons of tests/backend_compare.hpp, which tests/cuda/test_cuda_model.cu runs with
// B = backend::Cuda against the CPU, here with B = backend::Cpu at tolerance 0: two layers or models built from one
// config, with the same parameters, on the same backend must give bitwise the same outputs, losses, loads,
// gradients and optimizer steps (every backend's determinism promise; a race or an uninitialised buffer fails
// it). The same wiring runs on every backend — the layers call only contract operations — so these CPU runs
// exercise exactly the code paths the GPU suite runs, kernels aside.
#include <doctest/doctest.h>

#include <string>
#include <type_traits>
#include <utility>

#include "backend_compare.hpp"
#include "test_tmp.hpp"
#include "cumo/models/llava_mod.hpp"

using namespace cumo;
using Cpu = backend::Cpu;
using namespace cumo::backend_test;

TEST_CASE("backend generic: Linear on the same backend twice is bitwise identical (bias; backward twice accumulates)") {
  Rng rng(1);
  compare_linear<Cpu>(rng, 0.0);
}
TEST_CASE("backend generic: ClipVision is deterministic (hidden states, features, d pixels, every gradient)") {
  Rng rng(2);
  compare_clip_vision<Cpu>(rng, 0.0);
}
TEST_CASE("backend generic: DecoderLM is deterministic (GQA, RoPE, a padding key, loss, gradients)") {
  Rng rng(3);
  compare_decoder<Cpu>(rng, 0.0, /*mixtral=*/false);
}
TEST_CASE("backend generic: a Mixtral DecoderLM is deterministic (sparse FFNs, HF's cross-layer aux loss)") {
  Rng rng(5);
  compare_decoder<Cpu>(rng, 0.0, /*mixtral=*/true);
}
TEST_CASE("backend generic: the whole upcycled CuMo is deterministic, through clipped AdamW steps") {
  Rng rng(4);
  compare_cumo<Cpu>(rng, 0.0, 0.0);
}

TEST_CASE("backend generic: KV-cache decoding and CuMo::generate are deterministic") {
  Rng rng(6);
  compare_cached_decode<Cpu>(rng, 0.0);
}
TEST_CASE("backend generic: an upcycled CuMo with S² features is deterministic (losses, loads, every gradient)") {
  Rng rng(7);
  compare_s2<Cpu>(rng, 0.0);
}
TEST_CASE("backend generic: inference with bf16 and f16 weights (loaded from fp32) is deterministic, through the cache") {
  for (DType dt : {DType::bf16, DType::f16}) {
    CAPTURE(name_of(dt));
    Rng rng(8);
    compare_half_weights<Cpu>(rng, dt, 0.0, (test::tmp_root() / "backend_generic_half.safetensors").string());
  }
}

// StudentPass pass(lm) takes lm's backend (a deduction guide: the constructor's parameter alone cannot deduce it).
static_assert(std::is_same_v<decltype(models::StudentPass(std::declval<nn::DecoderLM<>&>())), models::StudentPass<>>);
// Every layer and model refuses, at compile time and in words, a backend that does not implement the contract
// (tests/compile_fail/layer_not_a_backend.cpp proves the refusal).
static_assert(backend::Backend<Cpu>);
static_assert(!backend::Backend<int>);
