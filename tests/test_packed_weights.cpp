// cpu::prepack_weight (backend/cpu/packed_weights.hpp): fp32 weights packed once into oneDNN's matmul layout.
// Tolerances: the packed products are another fp32 kernel than dnnl_sgemm, so both are checked against a double
// reference at the bound test_cpu_kernels states for fp32 products of K ≤ 256 terms (max-norm relative 1e-5; the
// observed error is ~1e-7); where the packed copy must NOT be used (a stale weight), the result must be bitwise the
// unpacked path's, which is the same call as without any packing.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cumo/backend/cpu.hpp"
#include "cumo/core.hpp"
#include "cumo/moe.hpp"
#include "nn_test_util.hpp"

using namespace cumo;

namespace {

using test::random_tensor;  // N(0, scale²), tests/nn_test_util.hpp

// max |got − want| / max |want|
double rel_max(const Tensor& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num = std::max(num, std::fabs(double(got.data<float>()[i]) - want[i]));
    den = std::max(den, std::fabs(want[i]));
  }
  return den > 0 ? num / den : num;
}

// C = A · W[e]ᵀ (+ bias[e]) per group, in double.
std::vector<double> grouped_reference(const Tensor& a, const Tensor& w, const Tensor* bias,
                                      const std::vector<std::int64_t>& off) {
  const std::int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  std::vector<double> c(std::size_t(off.back() * N));
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t i = off[std::size_t(e)]; i < off[std::size_t(e) + 1]; ++i)
      for (std::int64_t j = 0; j < N; ++j) {
        double s = bias ? bias->data<float>()[e * N + j] : 0.0;
        for (std::int64_t k = 0; k < K; ++k) s += double(a.data<float>()[i * K + k]) * w.data<float>()[(e * N + j) * K + k];
        c[std::size_t(i * N + j)] = s;
      }
  return c;
}

// Runs f with `threads` OpenMP threads (where there is OpenMP).
template <class F>
void with_threads(int threads, F&& f) {
#if defined(_OPENMP)
  const int before = omp_get_max_threads();
  omp_set_num_threads(threads);
  f();
  omp_set_num_threads(before);
#else
  (void)threads;
  f();
#endif
}

struct Cleanup {  // every test leaves the process without packed copies, also when a REQUIRE fails
  ~Cleanup() { cpu::release_packed_weights(); }
};

}  // namespace

#if defined(CUMO_CPU_DNNL)

TEST_CASE("cpu prepack_weight: grouped_linear on packed expert weights matches a double reference, 1 and 2 threads, "
          "deterministic") {
  Cleanup cleanup;
  Rng rng(31);
  const std::int64_t N = 96, K = 160;
  // empty groups, one row, odd counts, and more groups than threads (the one-product-per-thread schedule)
  const std::vector<std::int64_t> rows{0, 1, 17, 64, 130, 0, 33, 8};
  std::vector<std::int64_t> off{0};
  for (std::int64_t r : rows) off.push_back(off.back() + r);
  const std::int64_t E = std::int64_t(rows.size()), T = off.back();
  const Tensor a = random_tensor({T, K}, rng), w = random_tensor({E, N, K}, rng, 0.1f), bias = random_tensor({E, N}, rng);
  REQUIRE(cpu::prepack_weight(w));
  CHECK(cpu::packed_weight_count() == 1);
  CHECK(cpu::detail::find_packed(w) != nullptr);
  for (const Tensor* b : {&bias, static_cast<const Tensor*>(nullptr)}) {
    CAPTURE(b != nullptr);
    const std::vector<double> want = grouped_reference(a, w, b, off);
    for (int threads : {1, 2}) {
      CAPTURE(threads);
      Tensor c = Tensor::empty({T, N}), again = Tensor::empty({T, N});
      with_threads(threads, [&] {
        cpu::grouped_linear(a, w, b, off, c);
        cpu::grouped_linear(a, w, b, off, again);
      });
      CHECK(rel_max(c, want) < 1e-5);
      CHECK(bitwise_equal(c, again));
    }
  }
  CHECK(cpu::detail::find_packed(w) != nullptr);  // still current: nothing changed the weight
}

TEST_CASE("cpu prepack_weight: the products read the packed snapshot (an edit the sample misses shows only after "
          "packing again)") {
  Cleanup cleanup;
  Rng rng(35);
  const std::vector<std::int64_t> off{0, 20, 45, 45, 70};
  const std::int64_t N = 64, K = 96, slice = N * K;
  const Tensor a = random_tensor({70, K}, rng);
  Tensor w = random_tensor({4, N, K}, rng, 0.1f);
  REQUIRE(cpu::prepack_weight(w));
  const auto packed = cpu::detail::find_packed(w);
  REQUIRE(packed);
  MESSAGE("oneDNN kernel on the packed weights: " << std::string(packed->implementation()));
  const std::vector<double> before = grouped_reference(a, w, nullptr, off);
  // expert 1, row 0, column 1: not one of the sampled elements (the middle of each sixteenth of a slice)
  w.data<float>()[1 * slice + 1] += 100.f;
  const std::vector<double> after = grouped_reference(a, w, nullptr, off);
  Tensor c = Tensor::empty({70, N});
  cpu::grouped_linear(a, w, nullptr, off, c);
  CHECK(rel_max(c, before) < 1e-5);  // the snapshot, not w: the packed path ran
  CHECK(rel_max(c, after) > 1e-2);
  REQUIRE(cpu::prepack_weight(w));  // packed again: the edit is in
  cpu::grouped_linear(a, w, nullptr, off, c);
  CHECK(rel_max(c, after) < 1e-5);
  // a view at the weight's address with another shape misses without dropping the whole weight's copy
  CHECK(cpu::detail::find_packed(w.select(0, 0)) == nullptr);
  CHECK(cpu::detail::find_packed(w) != nullptr);
}

TEST_CASE("cpu prepack_weight: linear on a packed 2-D weight, strided x, bias first and accumulation") {
  Cleanup cleanup;
  Rng rng(32);
  const std::int64_t M = 45, N = 70, K = 128;
  const Tensor wide = random_tensor({M, K + 16}, rng), w = random_tensor({N, K}, rng, 0.1f), bias = random_tensor({N}, rng);
  const Tensor x = wide.slice(1, 8, 8 + K);  // (M, K) with row stride K + 16
  REQUIRE(x.strides()[0] == K + 16);
  REQUIRE(cpu::prepack_weight(w));
  std::vector<double> want(std::size_t(M * N));
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t j = 0; j < N; ++j) {
      double s = bias.data<float>()[j];
      for (std::int64_t k = 0; k < K; ++k) s += double(x.at<float>(i, k)) * w.data<float>()[j * K + k];
      want[std::size_t(i * N + j)] = s;
    }
  Tensor y = Tensor::empty({M, N});
  cpu::linear(x, w, &bias, y);
  CHECK(rel_max(y, want) < 1e-5);
  // beta = 1: y += x·wᵀ (the sum post-op), here onto y = x·wᵀ + b
  std::vector<double> twice = want;
  for (std::int64_t i = 0; i < M * N; ++i) twice[std::size_t(i)] += want[std::size_t(i)] - bias.data<float>()[i % N];
  cpu::linear(x, w, nullptr, y, 1.f);
  CHECK(rel_max(y, twice) < 1e-5);
}

TEST_CASE("cpu prepack_weight: a weight changed in place, freed or released is read unpacked again") {
  Cleanup cleanup;
  Rng rng(33);
  const std::vector<std::int64_t> off{0, 40, 40, 97};
  const Tensor a = random_tensor({97, 64}, rng);
  Tensor w = random_tensor({3, 48, 64}, rng, 0.1f);
  auto unpacked = [&] {  // the same call with no packed copy anywhere: the sgemm path
    Tensor c = Tensor::empty({97, 48});
    cpu::grouped_linear(a, w, nullptr, off, c);
    return c;
  };
  REQUIRE(cpu::prepack_weight(w));
  // an update in place (every element, as an optimizer step): the sampled check sees it and drops the copy
  for (std::int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] *= 1.5f;
  Tensor c = Tensor::empty({97, 48});
  cpu::grouped_linear(a, w, nullptr, off, c);
  CHECK(cpu::packed_weight_count() == 0);
  CHECK(rel_max(c, grouped_reference(a, w, nullptr, off)) < 1e-5);
  CHECK(bitwise_equal(c, unpacked()));
  // packed again: used again; released: gone
  REQUIRE(cpu::prepack_weight(w));
  CHECK(cpu::detail::find_packed(w) != nullptr);
  CHECK(cpu::release_packed_weight(w));
  CHECK_FALSE(cpu::release_packed_weight(w));
  CHECK(cpu::detail::find_packed(w) == nullptr);
  // a weight freed while packed: its copy goes at the next prepack, and nothing reads it
  {
    const Tensor gone = random_tensor({2, 8, 16}, rng);
    REQUIRE(cpu::prepack_weight(gone));
  }
  REQUIRE(cpu::prepack_weight(w));
  CHECK(cpu::packed_weight_count() == 1);
}

TEST_CASE("cpu prepack_weight: refuses what it cannot pack, naming the tensor") {
  Cleanup cleanup;
  CHECK_THROWS_WITH_AS(cpu::prepack_weight(Tensor::zeros({4, 8, 8}, DType::bf16)), doctest::Contains("bf16"), Error);
  CHECK_THROWS_WITH_AS(cpu::prepack_weight(Tensor::zeros({16})), doctest::Contains("(N, K) or (E, N, K)"), Error);
  const Tensor wide = Tensor::zeros({8, 12});
  CHECK_THROWS_WITH_AS(cpu::prepack_weight(wide.slice(1, 0, 8)), doctest::Contains("contiguous"), Error);
  CHECK(cpu::packed_weight_count() == 0);
}

namespace {
template <class ExpertT>
void check_block_prepacked() {
  Cleanup cleanup;
  using Block = SparseMoE<Router<TopK<2>>, ExpertT>;
  const std::int64_t H = 48, F = 80, T = 75;
  Rng rng(34);
  Block packed(H, F, 6), plain(H, F, 6);
  packed.reset_parameters(rng);
  const ParameterList pp = packed.parameters(), qp = plain.parameters();
  for (std::size_t i = 0; i < pp.size(); ++i) qp[i]->value.copy_from(pp[i]->value);
  const Tensor x = random_tensor({T, H}, rng), dy = random_tensor({T, H}, rng);
  CHECK(packed.prepack_experts() == 2);  // the two stacked weights (biases and the router stay as they are)
  const auto yp = packed.forward(x, ForwardArgs{1, true});
  const auto yq = plain.forward(x, ForwardArgs{1, true});
  // fp32 products of ≤ 80 terms by two kernels: relative norm error ~1e-7, 1e-5 the bound used throughout
  CHECK(rel_error(yp.y, yq.y) < 1e-5);
  const Tensor dxp = packed.backward(dy, {0.01f, 0.001f}), dxq = plain.backward(dy, {0.01f, 0.001f});
  CHECK(rel_error(dxp, dxq) < 1e-5);
  for (std::size_t i = 0; i < pp.size(); ++i) {
    CAPTURE(pp[i]->name);
    CHECK(rel_error(pp[i]->grad, qp[i]->grad) < 1e-5);
  }
  // an optimizer-like update of every weight: the packed copies no longer match, and the forward is the plain one's
  for (Block* b : {&packed, &plain})
    for (Parameter* p : b->parameters())
      if (p->value.dtype() == DType::f32)
        for (std::int64_t i = 0; i < p->value.numel(); ++i)
          p->value.data<float>()[i] -= 1e-3f * p->grad.data<float>()[i];
  CHECK(bitwise_equal(packed.forward(x, ForwardArgs{1, false}).y, plain.forward(x, ForwardArgs{1, false}).y));
  CHECK(cpu::packed_weight_count() == 0);
  packed.release_activations();
  plain.release_activations();
  // packed again for inference, then released by the block
  CHECK(packed.prepack_experts() == 2);
  packed.release_packed_experts();
  CHECK(cpu::packed_weight_count() == 0);
}
}  // namespace

TEST_CASE("SparseMoE::prepack_experts: forward and backward as the unpacked block's, and an update unpacks (MLP)") {
  check_block_prepacked<Expert<MLP<QuickGELU>>>();
}
TEST_CASE("SparseMoE::prepack_experts: forward and backward as the unpacked block's, and an update unpacks (SwiGLU)") {
  check_block_prepacked<Expert<GatedMLP<SiLU>>>();
}

#else

TEST_CASE("cpu prepack_weight: a build without oneDNN packs nothing and the products are unchanged") {
  const Tensor w = Tensor::zeros({2, 4, 8});
  CHECK_FALSE(cpu::prepack_weight(w));
  CHECK(cpu::packed_weight_count() == 0);
}

#endif
