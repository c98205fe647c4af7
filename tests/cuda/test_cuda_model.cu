// The model on backend::Cuda against the same model on backend::Cpu, which is its reference: the layers of nn/
// (Linear, ClipVision, DecoderLM with GQA + RoPE + padding keys) and the whole models::CuMo<Backend> — logits, every
// loss term, every parameter gradient, and a few optimizer steps (train::AdamW<Cuda> against train::AdamW<Cpu>
// with clipping), KV-cache generation and S² multi-scale features. Both sides start from the same bits: the CUDA
// model's parameters are copied from the CPU model's. The same comparisons run on the CPU against itself at
// tolerance 0 (tests/test_backend_generic.cpp).
//
// Tolerances, relative error ‖gpu − cpu‖ / ‖cpu‖ (max-abs for scalars):
//   kF32 = 1e-5 in fp32 (TF32 off): the two sides differ only in the summation order of fp32 dot products
//     (cuBLAS against Eigen, ~√K·2⁻²⁴ per product) and CUDA's expf/erff against glibc's (≤ 2 ulp); any indexing or
//     formula error gives O(1). Top-k routing is discrete: with random weights no two router probabilities of a
//     token are within 1e-5 of each other in these sizes, so both sides pick the same experts.
//   kSteps = 1e-4 after three AdamW steps: the 1e-6-level gradient differences pass through Adam's m/√v, which
//     amplifies relative differences of small gradients.
//   A gradient that is zero in exact arithmetic (CLIP's key bias) is noise on both sides: absolute 1e-5 instead,
//     and Adam's ±lr step on it is left out of the after-steps comparison (it cannot change the loss).
//   kBf16 = 3e-2 for Options::dense_bf16 (bf16 GEMM operands against fp32): bf16 keeps 8 bits, 2⁻⁹ ≈ 2e-3 per
//     operand, accumulated over a few layers.
//
// Without a usable GPU the binary prints "SKIPPED: no CUDA device (...)" and exits 77 (ctest: skipped).
#include <cstdint>
#include <filesystem>
#include <string>

#include <unistd.h>

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "cuda_test_main.cuh"

#include "cumo/backend/cuda.cuh"
#include "cumo/models/cumo.hpp"
#include "../backend_compare.hpp"

using namespace cumo;
using Cuda = backend::Cuda;
using namespace cumo::backend_test;

namespace {

std::uint64_t g_seed = 0;

constexpr double kF32 = 1e-5;
constexpr double kSteps = 1e-4;
constexpr double kBf16 = 3e-2;

}  // namespace

TEST_CASE("cuda nn::Linear<Cuda> matches nn::Linear<Cpu> (bias, backward accumulates)") {
  Rng rng(g_seed + __LINE__);
  compare_linear<Cuda>(rng, kF32);
}
TEST_CASE("cuda nn::ClipVision<Cuda> matches the CPU: hidden states, features, parameter gradients") {
  Rng rng(g_seed + __LINE__);
  compare_clip_vision<Cuda>(rng, kF32);
}
TEST_CASE("cuda nn::DecoderLM<Cuda> matches the CPU: GQA, RoPE, a padding key, loss and every gradient") {
  Rng rng(g_seed + __LINE__);
  compare_decoder<Cuda>(rng, kF32, /*mixtral=*/false);
}
TEST_CASE("cuda a Mixtral DecoderLM<Cuda> matches the CPU (sparse FFNs, HF's cross-layer aux loss, gradients)") {
  Rng rng(g_seed + __LINE__);
  compare_decoder<Cuda>(rng, kF32, /*mixtral=*/true);
}
TEST_CASE("cuda models::CuMo<Cuda> matches CuMo<Cpu>: logits, every loss term, every gradient, CudaAdamW steps") {
  Rng rng(g_seed + __LINE__);
  compare_cumo<Cuda>(rng, kF32, kSteps);
}

TEST_CASE("cuda KV-cache decoding and CuMo::generate on the GPU match the CPU") {
  Rng rng(g_seed + __LINE__);
  compare_cached_decode<Cuda>(rng, kF32);
}
// bf16 / f16 weights for inference: the GPU rounds the activations to the weight's dtype for every product, the CPU
// only for bf16 weights from 32 rows (otherwise it widens the weight and keeps the activations in fp32); both keep the
// biases in fp32: the two differ by bf16's (f16's) rounding of the operands, kBf16 as for dense_bf16 (f16 keeps 11
// bits: the same bound holds with room).
TEST_CASE("cuda inference with bf16 and f16 weights matches the CPU with the same weights (prefill, decode steps)") {
  for (DType dt : {DType::bf16, DType::f16}) {
    CAPTURE(name_of(dt));
    Rng rng(g_seed + __LINE__);
    // Removed on the way out, also when a REQUIRE inside the comparison ends the test case.
    struct RemovedAtExit {
      std::filesystem::path path;
      ~RemovedAtExit() {
        std::error_code ec;
        std::filesystem::remove(path, ec);
      }
    } file{std::filesystem::temp_directory_path() / ("cumo_cuda_half_" + std::to_string(::getpid()) + ".safetensors")};
    compare_half_weights<Cuda>(rng, dt, kBf16, file.path.string());
  }
}
TEST_CASE("cuda an upcycled CuMo<Cuda> with S² features matches the CPU (losses, loads, gradients, d pixels)") {
  Rng rng(g_seed + __LINE__);
  compare_s2<Cuda>(rng, kF32);
}

TEST_CASE("cuda models::CuMo<Cuda> with bf16 dense GEMMs (Options::dense_bf16, per backend instance) stays near fp32") {
  Rng rng(g_seed + __LINE__);
  const models::CuMoConfig cfg = test::tiny_cumo_config();
  const Cuda be;
  models::CuMo<Cuda> g(cfg, be);
  Rng init(11);
  g.reset_parameters(init);
  randomize(g.parameters(), rng, 0.3f);
  g.upcycle(init);
  Batch b(rng);
  const auto f32 = g.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  gpu::Options bf16;
  bf16.dense_bf16 = true;
  be.set_options(bf16);  // every layer of g holds a copy of `be`: the whole model switches
  const auto bf = g.forward(b.ids, b.B, b.T, b.px, &b.labels, &b.key_valid);
  expect_close("logits bf16 vs fp32", bf.logits, f32.logits, kBf16);
  CHECK(rel_error(bf.logits, f32.logits) > 0);  // the switch took effect
  expect_near("ce bf16 vs fp32", bf.ce, f32.ce, kBf16);
}

TEST_CASE("cuda models::CuMo<Cuda>: bad input gets the CPU's errors (host-side ids, shapes)") {
  Rng rng(g_seed + __LINE__);
  models::CuMo<Cuda> g(test::tiny_cumo_config());
  Batch b(rng);
  std::vector<std::int64_t> bad = b.ids;
  bad[6] = 99;  // outside the vocabulary
  CHECK_THROWS_AS(g.forward(bad, b.B, b.T, b.px, &b.labels), Error);
  CHECK_THROWS_AS(g.forward(b.ids, b.B, b.T, Tensor::zeros({1, 3, 8, 8}), &b.labels), Error);  // 4 features for 8
}

// =================================================================================================================
int main(int argc, char** argv) { return cumo::test::run_cuda_tests(argc, argv, "cuda model tests", g_seed); }
