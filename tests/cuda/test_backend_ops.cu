// backend::Cuda against backend::Cpu (the reference) for every non-MoE operation of the backend contract
// (backend/contract.hpp), in the manner of ggml's tests/test-backend-ops.cpp: one generic harness, `both`, calls
// the same generic lambda once with a backend::Cpu and once with a backend::Cuda instance. The lambda makes its
// inputs with be.upload(host tensor) from the same fresh random host tensors, runs the operation through the
// instance (`be.layernorm_forward(...)`) and returns its named outputs, which are then compared — the same call on
// each backend, each operation once. The MoE operations (softmax_topk, aux losses, dispatch, grouped_linear, glu)
// are tested op by op in test_cuda_backend.cu; the elementwise activations and the dense gated FFN op are here.
//
// Fresh random inputs each run (the seed is printed; CUMO_TEST_SEED=<n> repeats a run). Outputs are NaN-poisoned
// before an operation runs (test::poisoned on the GPU, NaN host tensors on the CPU), so an element an operation
// forgets to write fails the comparison. Some operations fill a tensor of the backend's own layout for their
// backward (LayerNorm/RMSNorm stats, attention's saved state: P on the CPU, the row logsumexp on the GPU): those
// are never compared, only the outputs and the gradients computed from them.
//
// Tolerances, relative error ‖gpu − cpu‖ / ‖cpu‖:
//   kF32 = 1e-5 for fp32: both sides compute the same formulas in fp32 with double row reductions; what differs is
//     the summation order of fp32 dot products (attention: ~√D·2⁻²⁴ ≈ 1e-6 per product) and CUDA's expf/sincosf
//     (≤ 2 ulp) against glibc's — errors of a few 1e-7, so 1e-5 leaves a 10× margin and still catches any
//     indexing or formula error (those give O(1)).
//   kReduced = 3e-2 for the reduced-precision dense GEMMs of an instance built with Options::dense_bf16 or
//     Options::allow_tf32, against the CPU's fp32 on the unrounded inputs: bf16 keeps 8 significant bits (unit
//     roundoff 2⁻⁹ ≈ 2e-3), so each product of two rounded operands is off by up to 2·2⁻⁹ and the independent
//     rounding errors of a dot product give a norm-wise ~2e-3 (accumulation stays fp32); TF32 keeps 11 bits
//     (~5e-4). 3e-2 is a > 10× margin over bf16 and still far below an indexing or formula error (O(1)).
//   kLow = 1e-2 for bf16 storage (a Cuda instance on bf16 tensors) against the CPU's fp32 on the same bf16-rounded
//     values: bf16 keeps 8 bits, 2⁻⁹ ≈ 2e-3 per stored output value.
//   Exact where both sides do the same fp32 operations in the same order: copies and gathers, elementwise add /
//     multiply / scale, the embedding and ViT-embedding gradient sums (fixed row / batch order), S² pooling
//     (rel_error == 0), fill_uniform (the same Philox numbers, lo + (hi − lo)·u rounded op by op) and AdamW (both
//     backends take backend::adamw_scalars and apply the same fp32 operations in the same order; the device rounds
//     each one explicitly, __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn, and the CPU build of this test file has
//     no -march, so the host compiler has no FMA to contract into on x86-64). Where the host compiler could have
//     contracted (not x86-64, or -mfma) the bitwise checks of fill_uniform and AdamW fall back to 1e-6.
//   Cross-entropy's loss and sum are reduced in double on both sides: 1e-12, target counts exactly. Gradient
//     norms are one fp32 rounding of a double sum added in a different order: 1e-6.
//
// Without a usable GPU the binary prints "SKIPPED: no CUDA device (...)" and exits 77 (ctest: skipped).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "cuda_test_main.cuh"

#include "cumo/backend/cpu.hpp"
#include "cumo/backend/cuda.cuh"
#include "cumo/core/activation.hpp"
#include "cumo/core/compare.hpp"
#include "cumo/nn/rope.hpp"

using namespace cumo;

namespace {

std::uint64_t g_seed = 0;

constexpr double kF32 = 1e-5;
constexpr double kReduced = 3e-2;
constexpr double kLow = 1e-2;
constexpr double kNorm = 1e-6;
constexpr double kDouble = 1e-12;
constexpr double kBitwise = -1;  // a tolerance meaning: compare the bytes
#if defined(__x86_64__) && !defined(__FMA__)
constexpr bool kHostRoundsEachOp = true;  // no FMA instructions: the host compiler cannot contract a·b + c
#else
constexpr bool kHostRoundsEachOp = false;
#endif
// The tolerance of a computation that is bitwise the CPU's unless the host compiler contracted it.
constexpr double kExactOp = kHostRoundsEachOp ? kBitwise : 1e-6;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- host tensors -----------------------------------------------------------------------------------------------
Tensor randn(Shape s, Rng& rng, float scale = 1.f, float mean = 0.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, mean, scale);
  return t;
}
Tensor nan_host(Shape s, DType t = DType::f32) {
  Tensor h = Tensor::empty(s, t);
  for (std::int64_t i = 0; i < h.numel(); ++i)
    detail::store_from_double(h.raw(), t, i, t == DType::i32 ? -77777.0 : std::numeric_limits<double>::quiet_NaN());
  return h;
}
Tensor i64_tensor(const std::vector<std::int64_t>& v) {
  Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::i64);
  std::copy(v.begin(), v.end(), t.data<std::int64_t>());
  return t;
}
// fp32 values rounded through bf16, as fp32 (the CPU's input where the GPU stores bf16).
Tensor rounded(const Tensor& t) { return t.to(DType::bf16).to(DType::f32); }

// ---- the harness ------------------------------------------------------------------------------------------------
struct Out {
  std::string name;
  Tensor t;
};
using Outs = std::vector<Out>;

constexpr backend::Cpu cpu_be{};
// The fp32 GPU instance most cases run on (default options: TF32 and bf16 GEMMs off, the stream-ordered pool).
const backend::Cuda& cuda_be() {
  static const backend::Cuda b;
  return b;
}

// A host tensor as an input on `be`. backend::Cpu::upload shares the host tensor, and some operations write their
// inputs (RoPE in place, AdamW's parameters, clipped and accumulated gradients): each backend gets its own copy.
template <class B>
Tensor in(const B& be, const Tensor& host) {
  return be.upload(host.clone());
}
// An output on `be`, every element NaN (−77777 for i32): what an operation leaves unwritten fails the comparison.
template <class B>
Tensor poison(const B&, Shape s, DType t = DType::f32) {
  if constexpr (B::device == Device::cuda)
    return test::poisoned(s, t);
  else
    return nan_host(s, t);
}
// bf16 storage: a bf16 tensor on the GPU; on the CPU (fp32 only) an fp32 tensor of the same bf16-rounded values.
template <class B>
DType low_dtype(const B&) {
  return B::device == Device::cuda ? DType::bf16 : DType::f32;
}
template <class B>
Tensor in_low(const B& be, const Tensor& host) {
  return be.upload(B::device == Device::cuda ? host.to(DType::bf16) : rounded(host));
}
template <class B>
Outs to_host(const B& be, Outs o) {
  for (Out& x : o) x.t = be.to_host(x.t);
  return o;
}
const Tensor& named(const Outs& o, const std::string& name) {
  for (const Out& x : o)
    if (x.name == name) return x.t;
  FAIL("no output named " << name);
  return o.front().t;
}

// f(cpu backend), then f(cuda backend): the same call on each backend. Outputs come back on the host.
template <class F>
auto both(F&& f, const backend::Cuda& gpu = cuda_be()) {
  using R = std::decay_t<decltype(f(cpu_be))>;
  std::pair<R, R> r;
  {
    INFO("on backend::", backend::Cpu::name);
    if constexpr (std::is_same_v<R, Outs>)
      r.first = to_host(cpu_be, f(cpu_be));
    else
      r.first = f(cpu_be);
  }
  {
    INFO("on backend::", backend::Cuda::name);
    if constexpr (std::is_same_v<R, Outs>)
      r.second = to_host(gpu, f(gpu));
    else
      r.second = f(gpu);
  }
  return r;
}

// Every output of `got` against the same-named one of `want`: relative error ≤ tol, or bitwise (kBitwise).
void expect_match(const std::string& op, const Outs& want, const Outs& got, double tol) {
  REQUIRE(want.size() == got.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    const std::string what = op + ": " + want[i].name;
    REQUIRE_MESSAGE(want[i].name == got[i].name, what);
    const double e = rel_error(got[i].t, want[i].t);
    if (tol == kBitwise)
      CHECK_MESSAGE(bitwise_equal(got[i].t, want[i].t), what, ": not bitwise equal (relative error ", e, ")");
    else
      CHECK_MESSAGE(e <= tol, what, ": relative error ", e, " exceeds ", tol);
  }
}
// The one-line form: run f on both backends, compare every output at `tol`; returns both runs for extra checks.
template <class F>
std::pair<Outs, Outs> check_op(const std::string& op, double tol, F&& f, const backend::Cuda& gpu = cuda_be()) {
  auto r = both(f, gpu);
  expect_match(op, r.first, r.second, tol);
  return r;
}

bool close_double(double got, double want, double tol) { return std::abs(got - want) <= tol * std::abs(want); }

}  // namespace

// =================================================================================================================
// memory: empty, zeros, upload / to_host, upload_i32, item, all_finite
// =================================================================================================================
TEST_CASE("upload / to_host round-trip bitwise (f32, i64, bf16, a strided view); upload_i32, zeros, empty agree") {
  Rng rng(g_seed + __LINE__);
  const Tensor x = randn({13, 9}, rng);
  const Tensor strided = x.slice(1, 2, 7);  // (13, 5), row stride 9: upload makes it contiguous
  std::vector<std::int64_t> ids(77);
  for (auto& v : ids) v = std::int64_t(rng.next_u32()) - 2000000000;
  const Tensor i64 = i64_tensor(ids);
  const Tensor bf = x.to(DType::bf16);
  std::vector<std::int32_t> small = {3, -1, 0, 2147483647, -2147483647 - 1};
  std::vector<std::int32_t> large(20000);  // more than one staging slot (16 Ki entries): two chunks
  for (std::size_t i = 0; i < large.size(); ++i) large[i] = std::int32_t(rng.next_u32());
  auto host_i32 = [](const std::vector<std::int32_t>& v) {
    Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::i32);
    std::copy(v.begin(), v.end(), t.data<std::int32_t>());
    return t;
  };
  const auto r = check_op("upload / to_host", kBitwise, [&](const auto& be) -> Outs {
    using B = std::decay_t<decltype(be)>;
    const Tensor e = be.empty({4, 3});
    CHECK(e.device() == B::device);
    CHECK((e.shape() == Shape{4, 3}));
    CHECK(e.dtype() == DType::f32);
    CHECK(be.empty({5}, DType::i32).dtype() == DType::i32);
    return {{"f32", be.to_host(be.upload(x))},
            {"strided f32", be.to_host(be.upload(strided))},
            {"i64", be.to_host(be.upload(i64))},
            {"bf16", be.to_host(be.upload(bf))},
            {"upload_i32 (5)", be.to_host(be.upload_i32(small))},
            {"upload_i32 (20000)", be.to_host(be.upload_i32(large))},
            {"zeros", be.to_host(be.zeros({6, 7}))},
            {"zeros i32", be.to_host(be.zeros({9}, DType::i32))}};
  });
  const Tensor want[] = {x,           strided.contiguous(), i64, bf, host_i32(small), host_i32(large),
                         Tensor::zeros({6, 7}), Tensor::zeros({9}, DType::i32)};
  for (std::size_t i = 0; i < r.second.size(); ++i) {
    CAPTURE(r.second[i].name);
    CHECK(bitwise_equal(r.first[i].t, want[i]));
    CHECK(bitwise_equal(r.second[i].t, want[i]));
  }
}

TEST_CASE("item and all_finite agree on both backends (NaN, +Inf, -Inf in the last element; one element)") {
  Rng rng(g_seed + __LINE__);
  const Tensor shapes[] = {randn({33, 17}, rng), randn({1}, rng), randn({100003}, rng)};
  for (const Tensor& a : shapes) {
    CAPTURE(a.numel());
    both([&](const auto& be) -> Outs {
      CHECK(be.item(in(be, a)) == a.data<float>()[0]);
      CHECK(be.all_finite(in(be, a)));
      for (float bad : {kNaN, kInf, -kInf}) {
        Tensor c = a.clone();
        c.data<float>()[c.numel() - 1] = bad;
        CHECK_FALSE(be.all_finite(in(be, c)));
      }
      return {};
    });
  }
}

// =================================================================================================================
// elementwise and row blocks
// =================================================================================================================
TEST_CASE("add, multiply, scale: Cuda is bitwise Cpu (one fp32 operation per element; out may alias an input)") {
  Rng rng(g_seed + __LINE__);
  const Shape shapes[] = {{33, 17}, {1}, {100003}};
  for (const Shape& s : shapes) {
    CAPTURE(s.numel());
    const Tensor a = randn(s, rng), b = randn(s, rng, 3.f);
    check_op("elementwise", kBitwise, [&](const auto& be) -> Outs {
      const Tensor ab = in(be, a), bb = in(be, b);
      Tensor sum = poison(be, s), prod = poison(be, s);
      be.add(ab, bb, sum);
      be.multiply(ab, bb, prod);
      Tensor acc = in(be, a), mul = in(be, b);
      be.add(acc, bb, acc);   // in place: a residual
      be.multiply(ab, mul, mul);  // in place on the second operand
      Tensor sc = in(be, b);
      be.scale(sc, 0.37f);
      Tensor one = in(be, b);
      be.scale(one, 1.f);
      return {{"add", sum}, {"multiply", prod}, {"add in place", acc}, {"multiply in place", mul},
              {"scale 0.37", sc}, {"scale 1", one}};
    });
  }
}

TEST_CASE("copy_blocks / add_blocks: Cuda is bitwise Cpu (height 1, height > 1 with pitches, CLS-row pattern)") {
  Rng rng(g_seed + __LINE__);
  const Tensor src = randn({200}, rng), dst0 = randn({300}, rng);
  struct Blocks {
    const char* name;
    std::int64_t src0, spitch, dst0, dpitch, width, height;
  };
  const Blocks cases[] = {
      {"height 1 (pitches ignored)", 5, 0, 17, 0, 13, 1},
      {"height 4, pitches 20 / 31", 3, 20, 2, 31, 17, 4},
      {"height 7, equal pitches (a contiguous run)", 0, 9, 40, 9, 9, 7},
      {"height 3, one element per block", 11, 50, 7, 97, 1, 3},
      {"empty (width 0)", 0, 0, 0, 0, 0, 3},
  };
  for (const Blocks& c : cases) {
    CAPTURE(c.name);
    check_op("copy_blocks / add_blocks", kBitwise, [&](const auto& be) -> Outs {
      const Tensor s = in(be, src);
      Tensor cp = in(be, dst0), ad = in(be, dst0);
      be.copy_blocks(s, c.src0, c.spitch, cp, c.dst0, c.dpitch, c.width, c.height);
      be.add_blocks(s, c.src0, c.spitch, ad, c.dst0, c.dpitch, c.width, c.height);
      return {{"copy_blocks (whole dst)", cp}, {"add_blocks (whole dst)", ad}};
    });
  }
  // ClipVision's pattern: (B·N, H) features added past each CLS row of (B·T, H).
  const std::int64_t B = 3, N = 4, T = N + 1, H = 6;
  const Tensor feat = randn({B * N, H}, rng), hid = randn({B * T, H}, rng);
  check_op("add_blocks past CLS rows", kBitwise, [&](const auto& be) -> Outs {
    Tensor dh = in(be, hid), ch = in(be, hid);
    be.add_blocks(in(be, feat), 0, N * H, dh, H, T * H, N * H, B);
    be.copy_blocks(in(be, feat), 0, N * H, ch, H, T * H, N * H, B);
    return {{"add", dh}, {"copy", ch}};
  });
}

TEST_CASE("fill_uniform: Cuda draws the Cpu's numbers bitwise and advances the generator alike") {
  const std::uint64_t seed = g_seed + __LINE__;
  const auto r = check_op("fill_uniform", kExactOp, [&](const auto& be) -> Outs {
    Rng rng(seed);
    rng.next_u32();  // a non-zero counter
    Tensor a = poison(be, {1000, 3}), b = poison(be, {7}), c = poison(be, {1});
    be.fill_uniform(a, rng, 0.9f, 1.1f);
    be.fill_uniform(b, rng, -2.f, 3.f);
    be.fill_uniform(c, rng, 0.f, 1.f);
    return {{"uniform [0.9, 1.1)", a}, {"uniform [-2, 3)", b}, {"uniform [0, 1)", c},
            {"counter after", i64_tensor({std::int64_t(rng.state().counter)})}};
  });
  CHECK(bitwise_equal(named(r.first, "counter after"), named(r.second, "counter after")));
  CHECK(named(r.first, "counter after").data<std::int64_t>()[0] == 1 + 3000 + 7 + 1);
}

// =================================================================================================================
// dense linear
// =================================================================================================================
namespace {

struct GemmShape {
  std::int64_t M, K, N;
};
// Odd sizes, one row, K = 1, and a larger product (K = 512: fp32 summation-order differences ~√K·2⁻²⁴ ≈ 1e-6).
constexpr GemmShape kGemms[] = {{37, 24, 7}, {1, 5, 3}, {64, 96, 130}, {129, 33, 65}, {2, 1, 4}, {200, 512, 48}};

// linear (with and without bias), linear_backward (dw, db accumulate onto non-zero values, dx is overwritten),
// linear_dinput (accumulate false and true), linear_dweight, all on `gpu`'s precision at `tol`.
void check_linear_family(const std::string& tag, double tol, const backend::Cuda& gpu, Rng& rng) {
  for (const GemmShape& g : kGemms) {
    const std::int64_t M = g.M, K = g.K, N = g.N;
    CAPTURE(M);
    CAPTURE(K);
    CAPTURE(N);
    const Tensor x = randn({M, K}, rng), w = randn({N, K}, rng, 1.f / std::sqrt(float(K))), b = randn({N}, rng);
    const Tensor dy = randn({M, N}, rng), dw0 = randn({N, K}, rng), db0 = randn({N}, rng), dx0 = randn({M, K}, rng);
    check_op(tag + "linear", tol, [&](const auto& be) -> Outs {
      const Tensor xb = in(be, x), wb = in(be, w), bb = in(be, b);
      Tensor y = poison(be, {M, N}), yb = poison(be, {M, N});
      be.linear(xb, wb, nullptr, y);
      be.linear(xb, wb, &bb, yb);
      return {{"y = x wᵀ", y}, {"y = x wᵀ + b", yb}};
    }, gpu);
    check_op(tag + "linear_backward", tol, [&](const auto& be) -> Outs {
      const Tensor dyb = in(be, dy), xb = in(be, x), wb = in(be, w);
      Tensor dw = in(be, dw0), db = in(be, db0), dx = poison(be, {M, K});
      be.linear_backward(dyb, xb, wb, dw, &db, dx);
      Tensor dw_nb = in(be, dw0), dx_nb = poison(be, {M, K});
      be.linear_backward(dyb, xb, wb, dw_nb, nullptr, dx_nb);
      return {{"dw (+=)", dw}, {"db (+=)", db}, {"dx", dx}, {"dw (+=), no bias", dw_nb}, {"dx, no bias", dx_nb}};
    }, gpu);
    check_op(tag + "linear_dinput / linear_dweight", tol, [&](const auto& be) -> Outs {
      const Tensor dyb = in(be, dy), wb = in(be, w), xb = in(be, x);
      Tensor dx = poison(be, {M, K}), dxa = in(be, dx0), dw = in(be, dw0);
      be.linear_dinput(dyb, wb, dx, /*accumulate=*/false);
      be.linear_dinput(dyb, wb, dxa, /*accumulate=*/true);
      be.linear_dweight(dyb, xb, dw);
      return {{"dx = dy w", dx}, {"dx += dy w", dxa}, {"dw += dyᵀ x", dw}};
    }, gpu);
  }
}

}  // namespace

TEST_CASE("linear, linear_backward, linear_dinput, linear_dweight: Cuda matches Cpu in fp32 (1e-5)") {
  Rng rng(g_seed + __LINE__);
  check_linear_family("fp32 ", kF32, cuda_be(), rng);
}

TEST_CASE("linear family on instances with allow_tf32 and dense_bf16 matches the fp32 Cpu loosely (3e-2)") {
  Rng rng(g_seed + __LINE__);
  const backend::Cuda tf32(gpu::Options{.allow_tf32 = true});
  const backend::Cuda bf16(gpu::Options{.dense_bf16 = true});
  check_linear_family("tf32 ", kReduced, tf32, rng);
  check_linear_family("dense_bf16 ", kReduced, bf16, rng);
}

// Weights held in bf16 / f16 for inference (ParameterStorage) with f32 activations: the GPU rounds x to the weight's
// dtype for its tensor cores, the CPU widens the weight and keeps x in fp32 below 32 rows or for f16 (and rounds x
// as the GPU does for bf16 from 32 rows): kReduced covers x's rounding. The embedding widens each element exactly on both: bitwise.
TEST_CASE("bf16 / f16 weights with f32 activations (inference): linear matches Cpu (3e-2), embedding widens bitwise") {
  Rng rng(g_seed + __LINE__);
  for (DType dt : {DType::bf16, DType::f16}) {
    CAPTURE(name_of(dt));
    for (const GemmShape& g : kGemms) {
      const std::int64_t M = g.M, K = g.K, N = g.N;
      CAPTURE(M);
      CAPTURE(K);
      CAPTURE(N);
      const Tensor x = randn({M, K}, rng), b = randn({N}, rng);
      const Tensor w = randn({N, K}, rng, 1.f / std::sqrt(float(K))).to(dt);
      check_op("half-weight linear", kReduced, [&](const auto& be) -> Outs {
        const Tensor xb = in(be, x), wb = in(be, w), bb = in(be, b);
        Tensor y = poison(be, {M, N}), yb = poison(be, {M, N});
        be.linear(xb, wb, nullptr, y);
        be.linear(xb, wb, &bb, yb);
        return {{"y = x wᵀ", y}, {"y = x wᵀ + b", yb}};
      });
    }
    const std::vector<std::int64_t> ids = {7, 0, 7, 36, 5, 12};
    const Tensor table = randn({37, 24}, rng).to(dt);
    check_op("half-weight embedding", kBitwise, [&](const auto& be) -> Outs {
      Tensor y = poison(be, {std::int64_t(ids.size()), 24});  // f32 rows from the bf16 / f16 table
      be.embedding_forward(in(be, table), ids, y);
      return {{"y", y}};
    });
  }
}

TEST_CASE("two Cuda instances with different options in one process each keep their own precision") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t M = 96, K = 256, N = 64;
  const Tensor x = randn({M, K}, rng), w = randn({N, K}, rng, 1.f / 16.f), b = randn({N}, rng);
  auto run = [&](const auto& be) -> Outs {
    Tensor y = poison(be, {M, N});
    const Tensor bb = in(be, b);
    be.linear(in(be, x), in(be, w), &bb, y);
    return to_host(be, {{"y", y}});
  };
  const backend::Cuda f32;                                     // fp32 GEMMs
  const backend::Cuda half(gpu::Options{.dense_bf16 = true});  // bf16 operands, fp32 accumulation
  const Tensor want = run(cpu_be)[0].t;
  const Tensor y32 = run(f32)[0].t;
  const Tensor yh = run(half)[0].t;
  const Tensor y32_again = run(f32)[0].t;  // after the bf16 instance ran: still fp32
  const double e32 = rel_error(y32, want), eh = rel_error(yh, want);
  CHECK_MESSAGE(e32 <= kF32, "fp32 instance: relative error ", e32);
  CHECK_MESSAGE(eh > kF32, "dense_bf16 instance: relative error ", eh, " — no bf16 rounding happened");
  CHECK_MESSAGE(eh <= kReduced, "dense_bf16 instance: relative error ", eh);
  CHECK(bitwise_equal(y32_again, y32));
  CHECK_FALSE(f32.options().dense_bf16);
  // Copies share their instance's state (the layers of one model hold copies of its backend).
  backend::Cuda copy = half;
  copy.set_options(gpu::Options{});
  CHECK_FALSE(half.options().dense_bf16);
  CHECK(rel_error(run(half)[0].t, want) <= kF32);
  CHECK(bitwise_equal(run(f32)[0].t, y32));
}

// =================================================================================================================
// norms, RoPE
// =================================================================================================================
TEST_CASE("layernorm_forward/backward: Cuda matches Cpu (fp32 1e-5; offset means; dweight, dbias accumulate)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t shapes[][2] = {{37, 96}, {5, 1000}, {130, 33}, {1, 3}, {3, 4096}};
  for (const auto& s : shapes) {
    const std::int64_t N = s[0], H = s[1];
    CAPTURE(N);
    CAPTURE(H);
    const Tensor x = randn({N, H}, rng, 2.f, 3.f);  // an offset mean: the statistics must not cancel
    const Tensor dy = randn({N, H}, rng), w = randn({H}, rng, 0.3f, 1.f), b = randn({H}, rng, 0.3f);
    const Tensor dw0 = randn({H}, rng), db0 = randn({H}, rng);
    check_op("layernorm", kF32, [&](const auto& be) -> Outs {
      const Tensor xb = in(be, x), wb = in(be, w), bb = in(be, b);
      Tensor y = poison(be, {N, H}), stats;  // stats: the backend's own layout, never compared
      be.layernorm_forward(xb, wb, bb, 1e-5, y, stats);
      Tensor dx = poison(be, {N, H}), dw = in(be, dw0), db = in(be, db0);
      be.layernorm_backward(in(be, dy), xb, wb, stats, dx, dw, db);
      return {{"y", y}, {"dx", dx}, {"dweight (+=)", dw}, {"dbias (+=)", db}};
    });
  }
}

TEST_CASE("rmsnorm_forward/backward: Cuda matches Cpu (fp32 1e-5; dweight accumulates)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t shapes[][2] = {{37, 96}, {3, 4096}, {100, 17}, {1, 5}};
  for (const auto& s : shapes) {
    const std::int64_t N = s[0], H = s[1];
    CAPTURE(N);
    CAPTURE(H);
    const Tensor x = randn({N, H}, rng, 1.5f, 0.5f), dy = randn({N, H}, rng), w = randn({H}, rng, 0.3f, 1.f);
    const Tensor dw0 = randn({H}, rng);
    check_op("rmsnorm", kF32, [&](const auto& be) -> Outs {
      const Tensor xb = in(be, x), wb = in(be, w);
      Tensor y = poison(be, {N, H}), stats;
      be.rmsnorm_forward(xb, wb, 1e-6, y, stats);
      Tensor dx = poison(be, {N, H}), dw = in(be, dw0);
      be.rmsnorm_backward(in(be, dy), xb, wb, stats, dx, dw);
      return {{"y", y}, {"dx", dx}, {"dweight (+=)", dw}};
    });
  }
}

TEST_CASE("rope forward (in place) and inverse: Cuda matches Cpu (fp32 1e-5; large positions; 1 row)") {
  Rng rng(g_seed + __LINE__);
  struct RopeCase {
    std::int64_t N, heads, D;
    double theta;
  };
  const RopeCase cases[] = {{29, 4, 64, 10000.0}, {7, 1, 128, 1e6}, {50, 3, 16, 10000.0}, {1, 2, 8, 500.0}};
  for (const RopeCase& c : cases) {
    const std::int64_t N = c.N, heads = c.heads, D = c.D;
    CAPTURE(N);
    CAPTURE(D);
    const nn::RotaryEmbedding rope(D, c.theta);
    std::vector<std::int32_t> pos(static_cast<std::size_t>(N));
    for (auto& p : pos) p = std::int32_t(rng.next_u32() % 4096);  // large angles: the range reduction matters
    const Tensor x = randn({N, heads * D}, rng);
    const auto r = check_op("rope", kF32, [&](const auto& be) -> Outs {
      const Tensor p = be.upload_i32(pos), f = be.upload(rope.inv_freq_tensor());
      Tensor fwd = in(be, x);
      be.rope(fwd, p, f, heads, /*inverse=*/false, fwd);  // in place (out == x)
      Tensor inv = poison(be, {N, heads * D});
      be.rope(in(be, x), p, f, heads, /*inverse=*/true, inv);
      Tensor back = poison(be, {N, heads * D});
      be.rope(fwd, p, f, heads, /*inverse=*/true, back);
      return {{"forward (in place)", fwd}, {"inverse", inv}, {"inverse of forward", back}};
    });
    // inverse ∘ forward = identity up to rounding, on each backend
    CHECK(rel_error(named(r.first, "inverse of forward"), x) <= kF32);
    CHECK(rel_error(named(r.second, "inverse of forward"), x) <= kF32);
  }
}

// =================================================================================================================
// activations (elementwise) and the dense gated FFN's Act(gate)·up
// =================================================================================================================
namespace {

template <class Act>
void check_activation(const char* name, Rng& rng) {
  CAPTURE(name);
  const std::int64_t shapes[][2] = {{45, 77}, {1, 3}, {128, 256}};
  for (const auto& s : shapes) {
    const std::int64_t N = s[0], F = s[1];
    CAPTURE(N);
    CAPTURE(F);
    const Tensor h = randn({N, F}, rng, 2.f), da = randn({N, F}, rng);
    const Tensor gate = randn({N, F}, rng, 2.f), up = randn({N, F}, rng);
    check_op(std::string(name) + " activation_forward/backward", kF32, [&](const auto& be) -> Outs {
      const Tensor hb = in(be, h);
      Tensor a = poison(be, {N, F}), dh = poison(be, {N, F});
      be.template activation_forward<Act>(hb, N, a);
      be.template activation_backward<Act>(hb, in(be, da), N, dh);
      Tensor dh_inplace = in(be, da);
      be.template activation_backward<Act>(hb, dh_inplace, N, dh_inplace);  // in place, as Expert<MLP>::backward
      return {{"a", a}, {"dh", dh}, {"dh (in place)", dh_inplace}};
    });
    check_op(std::string(name) + " gated_forward/backward", kF32, [&](const auto& be) -> Outs {
      const Tensor g = in(be, gate), u = in(be, up);
      Tensor a = poison(be, {N, F}), dg = poison(be, {N, F}), du = poison(be, {N, F});
      be.template gated_forward<Act>(g, u, a);
      be.template gated_backward<Act>(g, u, in(be, da), dg, du);
      return {{"a = Act(gate)·up", a}, {"dgate", dg}, {"dup", du}};
    });
  }
}

}  // namespace

TEST_CASE("activation_forward/backward and gated_forward/backward: Cuda matches Cpu (QuickGELU, GELU, GELUTanh, "
          "SiLU, ReLU; 1e-5)") {
  Rng rng(g_seed + __LINE__);
  check_activation<QuickGELU>("quick_gelu", rng);
  check_activation<GELU>("gelu", rng);
  check_activation<GELUTanh>("gelu_tanh", rng);
  check_activation<SiLU>("silu", rng);
  check_activation<ReLU>("relu", rng);
}

// =================================================================================================================
// attention
// =================================================================================================================
namespace {

struct AttnCase {
  const char* name;
  std::int64_t B, T, H, G, D;
  bool causal, mask;
  std::int64_t Tq = 0;  // > 0: queries at the last Tq positions only (a last layer under a loss on them), else T
};

// Padding keys: right padding of random length per sequence; sequence 1 also loses its first key (with causal
// attention its first query then has no key: output 0, zero gradients); with B ≥ 3 the last sequence is all padding.
std::vector<std::int32_t> padding_mask(std::int64_t B, std::int64_t T, Rng& rng) {
  std::vector<std::int32_t> valid(std::size_t(B * T), 1);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = (B >= 3 && b == B - 1) ? 0 : 1 + std::int64_t(rng.next_u32() % std::uint32_t(T));
    for (std::int64_t t = len; t < T; ++t) valid[std::size_t(b * T + t)] = 0;
    if (b == 1) valid[std::size_t(b * T)] = 0;
  }
  return valid;
}

void check_attention(const AttnCase& c, Rng& rng) {
  CAPTURE(c.name);
  const std::int64_t B = c.B, T = c.T, H = c.H, G = c.G, D = c.D, Tq = c.Tq > 0 ? c.Tq : c.T;
  const backend::AttentionShape shape{B, Tq, T, 0, H, G, D, c.causal};
  const Tensor q = randn({B * Tq, H * D}, rng), k = randn({B * T, G * D}, rng), v = randn({B * T, G * D}, rng);
  const Tensor dout = randn({B * Tq, H * D}, rng);
  const std::vector<std::int32_t> valid = c.mask ? padding_mask(B, T, rng) : std::vector<std::int32_t>{};
  const auto r = check_op("attention", kF32, [&](const auto& be) -> Outs {
    const Tensor qb = in(be, q), kb = in(be, k), vb = in(be, v), db = in(be, dout);
    const Tensor mask = c.mask ? be.upload_i32(valid) : Tensor();
    const Tensor* kv_valid = c.mask ? &mask : nullptr;
    Tensor out = poison(be, {B * Tq, H * D}), saved;  // saved: the backend's own layout, never compared
    be.attention_forward(qb, kb, vb, kv_valid, shape, out, &saved);
    Tensor out_inf = poison(be, {B * Tq, H * D});
    be.attention_forward(qb, kb, vb, kv_valid, shape, out_inf, nullptr);  // inference: nothing saved
    Tensor dq = poison(be, {B * Tq, H * D}), dk = poison(be, {B * T, G * D}), dv = poison(be, {B * T, G * D});
    be.attention_backward(qb, kb, vb, kv_valid, out, saved, db, shape, dq, dk, dv);
    Tensor dq2 = poison(be, {B * Tq, H * D}), dk2 = poison(be, {B * T, G * D}), dv2 = poison(be, {B * T, G * D});
    be.attention_backward(qb, kb, vb, kv_valid, out, saved, db, shape, dq2, dk2, dv2);
    return {{"out", out}, {"out (saved = null)", out_inf}, {"dq", dq}, {"dk", dk}, {"dv", dv},
            {"dq (again)", dq2}, {"dk (again)", dk2}, {"dv (again)", dv2}};
  });
  // Deterministic on each backend: the inference forward is the training forward, a second backward the first.
  for (const Outs* o : {&r.first, &r.second}) {
    CHECK(bitwise_equal(named(*o, "out (saved = null)"), named(*o, "out")));
    CHECK(bitwise_equal(named(*o, "dq (again)"), named(*o, "dq")));
    CHECK(bitwise_equal(named(*o, "dk (again)"), named(*o, "dk")));
    CHECK(bitwise_equal(named(*o, "dv (again)"), named(*o, "dv")));
  }
}

}  // namespace

TEST_CASE("attention_forward/backward: Cuda matches Cpu (causal and bidirectional, GQA 4/2 and 4/1, padding keys, "
          "head_dim 16..256, B 1..3, queries at the last rows only; 1e-5)") {
  Rng rng(g_seed + __LINE__);
  const AttnCase cases[] = {
      {"causal GQA 4/2, D 16, padding", 2, 37, 4, 2, 16, true, true},
      {"causal MQA 4/1, D 64", 1, 70, 4, 1, 64, true, false},
      {"bidirectional 4/4, D 64, padding + an all-padding sequence", 3, 50, 4, 4, 64, false, true},
      {"bidirectional GQA 4/2, D 16", 2, 33, 4, 2, 16, false, false},
      {"bidirectional MQA 4/1, D 64, padding", 2, 45, 4, 1, 64, false, true},
      {"causal, one token per sequence", 3, 1, 4, 2, 16, true, false},
      {"causal, one row in all", 1, 1, 4, 1, 64, true, false},
      {"bidirectional 2 heads, D 80 (not a power of two)", 1, 33, 2, 2, 80, false, false},
      {"causal MQA 2/1, D 128", 2, 70, 2, 1, 128, true, false},
      {"causal 1 head, D 256 (above 48 KiB of shared memory), padding", 2, 40, 1, 1, 256, true, true},
      // training with the queries of the last rows only (DecoderLM::set_logit_rows): q_len < kv_len, packed keys
      {"causal GQA 4/2, D 16, the last 9 of 37 queries, padding", 2, 37, 4, 2, 16, true, true, 9},
      {"causal MQA 4/1, D 64, the last 70 of 130 queries", 1, 130, 4, 1, 64, true, false, 70},
  };
  for (const AttnCase& c : cases) check_attention(c, rng);
}

TEST_CASE("attention_forward, KV-cache decode form (kv_stride > kv_len, causal, q_len new tokens): Cuda matches "
          "Cpu (1e-5)") {
  Rng rng(g_seed + __LINE__);
  struct DecodeCase {
    std::int64_t B, q_len, S, C, H, G, D;  // C: cache rows per sequence (the stride), S ≤ C of them filled
  };
  const DecodeCase cases[] = {
      {1, 1, 37, 64, 4, 2, 16}, {2, 1, 20, 48, 4, 1, 64}, {2, 3, 45, 70, 4, 2, 64}, {1, 4, 9, 16, 2, 2, 16},
      {2, 5, 5, 8, 4, 4, 16},  // q_len = kv_len in a strided cache: the prompt step
  };
  for (const DecodeCase& c : cases) {
    const std::int64_t B = c.B, Tq = c.q_len, S = c.S, C = c.C, H = c.H, G = c.G, D = c.D, W = G * D;
    CAPTURE(B);
    CAPTURE(Tq);
    CAPTURE(S);
    CAPTURE(C);
    const Tensor q = randn({B * Tq, H * D}, rng), k = randn({B * S, W}, rng), v = randn({B * S, W}, rng);
    const backend::AttentionShape cached{B, Tq, S, C, H, G, D, /*causal=*/true};
    const backend::AttentionShape packed{B, Tq, S, 0, H, G, D, /*causal=*/true};
    const auto r = check_op("attention decode", kF32, [&](const auto& be) -> Outs {
      // The cache: (B·C, W), sequence b's S keys at rows b·C …; the rows past S stay NaN (never to be read).
      Tensor kc = poison(be, {B * C, W}), vc = poison(be, {B * C, W});
      const Tensor kb = in(be, k), vb = in(be, v), qb = in(be, q);
      be.copy_blocks(kb, 0, S * W, kc, 0, C * W, S * W, B);
      be.copy_blocks(vb, 0, S * W, vc, 0, C * W, S * W, B);
      Tensor out = poison(be, {B * Tq, H * D}), out_packed = poison(be, {B * Tq, H * D});
      be.attention_forward(qb, kc, vc, nullptr, cached, out, nullptr);
      be.attention_forward(qb, kb, vb, nullptr, packed, out_packed, nullptr);
      return {{"out (strided cache)", out}, {"out (packed keys)", out_packed}};
    });
    for (const Outs* o : {&r.first, &r.second})
      CHECK(bitwise_equal(named(*o, "out (strided cache)"), named(*o, "out (packed keys)")));
  }
}

// =================================================================================================================
// embeddings, S² pooling
// =================================================================================================================
TEST_CASE("embedding_forward/backward: Cuda is bitwise Cpu (repeated ids, skipped rows, odd rows, 20000 ids)") {
  Rng rng(g_seed + __LINE__);
  // repeated ids (7 four times), the first and last id of the vocabulary, skipped (image) rows
  const std::vector<std::int64_t> base = {7, 0, 7, 36, 5, 7, 5, 12, 7, 0, 3};
  std::vector<std::int64_t> many(20000);  // more than a staging slot holds (16 Ki): the tables take another path
  for (std::size_t r = 0; r < many.size(); ++r) many[r] = std::int64_t((r * 7919) % 37);
  struct EmbCase {
    const char* name;
    std::int64_t V, H;
    std::vector<std::int64_t> ids;
  };
  std::vector<std::int64_t> odd = base;
  for (auto& id : odd) id %= 11;
  const EmbCase cases[] = {
      {"V 37, H 24 (16-byte rows)", 37, 24, base},
      {"V 11, H 7 (28-byte rows)", 11, 7, odd},
      {"one id", 37, 24, {36}},
      {"20000 ids", 37, 24, many},
  };
  for (const EmbCase& c : cases) {
    CAPTURE(c.name);
    const std::int64_t N = std::int64_t(c.ids.size()), H = c.H;
    std::vector<bool> skip(c.ids.size(), false);
    for (std::size_t r = 2; r < skip.size(); r += 3) skip[r] = true;
    const Tensor table = randn({c.V, H}, rng), dy = randn({N, H}, rng), g0 = randn({c.V, H}, rng);
    check_op("embedding", kBitwise, [&](const auto& be) -> Outs {
      Tensor y = poison(be, {N, H});
      be.embedding_forward(in(be, table), c.ids, y);
      const Tensor dyb = in(be, dy);
      Tensor dt = in(be, g0), dt_skip = in(be, g0);  // accumulate onto something non-zero
      be.embedding_backward(dyb, c.ids, dt, nullptr);
      be.embedding_backward(dyb, c.ids, dt_skip, &skip);
      return {{"y", y}, {"dtable (+=)", dt}, {"dtable (+=), skipped rows", dt_skip}};
    });
  }
}

TEST_CASE("vit_embeddings / vit_embeddings_backward: Cuda is bitwise Cpu ([CLS; patches] + positions)") {
  // One fp32 add per output; the backward adds each (t, h) over the batch in batch order on both sides.
  Rng rng(g_seed + __LINE__);
  const std::int64_t cases[][3] = {{2, 5, 7}, {1, 17, 32}, {3, 2, 1}};  // B, T (= patches + 1), H
  for (const auto& c : cases) {
    const std::int64_t B = c[0], T = c[1], H = c[2];
    CAPTURE(B);
    CAPTURE(T);
    CAPTURE(H);
    const Tensor patch = randn({B * (T - 1), H}, rng), cls = randn({H}, rng), pos = randn({T, H}, rng);
    const Tensor demb = randn({B * T, H}, rng), dcls0 = randn({H}, rng), dpos0 = randn({T, H}, rng);
    check_op("vit_embeddings", kBitwise, [&](const auto& be) -> Outs {
      Tensor emb = poison(be, {B * T, H});
      be.vit_embeddings(in(be, patch), in(be, cls), in(be, pos), B, emb);
      Tensor dpatch = poison(be, {B * (T - 1), H}), dcls = in(be, dcls0), dpos = in(be, dpos0);
      be.vit_embeddings_backward(in(be, demb), B, dpatch, dcls, dpos);
      return {{"emb", emb}, {"dpatch", dpatch}, {"dcls (+=)", dcls}, {"dpos (+=)", dpos}};
    });
  }
}

TEST_CASE("s2_pool_tiles / s2_pool_tiles_backward: Cuda equals Cpu exactly (rel_error 0)") {
  // Exact, not close: the kernel sums each n×n window of the merged grid in the CPU's (i, j) order starting from
  // 0.f and scales by the same float 1/n², every operation rounded on its own (__fadd_rn, __fmul_rn) — the same fp32
  // operations in the same order as cpu::area_pool; the backward is one multiplication per element on both sides.
  Rng rng(g_seed + __LINE__);
  const std::int64_t cases[][4] = {{2, 3, 3, 5}, {1, 2, 2, 8}, {3, 1, 2, 4}};  // B, G, n, H
  for (const auto& c : cases) {
    const std::int64_t B = c[0], G = c[1], n = c[2], H = c[3];
    CAPTURE(B);
    CAPTURE(G);
    CAPTURE(n);
    const Tensor tiles = randn({n * n * B * G * G, H}, rng), dpooled = randn({B * G * G, H}, rng);
    check_op("s2_pool_tiles", 0.0, [&](const auto& be) -> Outs {
      Tensor pooled = poison(be, {B * G * G, H}), dtiles = poison(be, {n * n * B * G * G, H});
      be.s2_pool_tiles(in(be, tiles), B, G, n, pooled);
      be.s2_pool_tiles_backward(in(be, dpooled), B, G, n, dtiles);
      return {{"pooled", pooled}, {"dtiles", dtiles}};
    });
  }
}

// =================================================================================================================
// cross-entropy
// =================================================================================================================
namespace {
struct CeRun {
  backend::CrossEntropyResult r;
  Tensor dlogits;
};
void expect_same_ce(const std::string& what, const CeRun& want, const CeRun& got) {
  CAPTURE(what);
  CHECK(got.r.targets == want.r.targets);
  CHECK_MESSAGE(close_double(got.r.sum, want.r.sum, kDouble), "sum ", got.r.sum, " vs ", want.r.sum);
  CHECK_MESSAGE(close_double(got.r.loss, want.r.loss, kDouble), "loss ", got.r.loss, " vs ", want.r.loss);
  if (want.dlogits.defined()) {
    const double e = rel_error(got.dlogits, want.dlogits);
    CHECK_MESSAGE(e <= kF32, "dlogits: relative error ", e);
  }
}
}  // namespace

TEST_CASE("cross_entropy: Cuda matches Cpu (ignore -100, mean, normalizer, grad_scale; i64 and i32 labels)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t shapes[][2] = {{50, 1000}, {7, 3}, {1, 32000}};
  for (const auto& s : shapes) {
    const std::int64_t N = s[0], V = s[1];
    CAPTURE(N);
    CAPTURE(V);
    const Tensor logits = randn({N, V}, rng, 5.f, 40.f);  // large, shifted logits: the max must be subtracted
    std::vector<std::int64_t> lab(static_cast<std::size_t>(N));
    for (auto& l : lab) l = (N > 1 && rng.uniform() < 0.3f) ? backend::kIgnoreIndex : std::int64_t(rng.next_u32() % V);
    const Tensor labels = i64_tensor(lab);
    const std::vector<std::int32_t> lab32(lab.begin(), lab.end());
    backend::CrossEntropyOptions opts[3];
    opts[1].normalizer = 123;
    opts[2].grad_scale = 0.25;
    for (const auto& o : opts) {
      CAPTURE(o.normalizer);
      CAPTURE(o.grad_scale);
      const auto r = both([&](const auto& be) {
        CeRun run;
        Tensor dl = poison(be, {N, V});
        run.r = be.cross_entropy(in(be, logits), in(be, labels), &dl, o);
        run.dlogits = be.to_host(dl);
        return run;
      });
      expect_same_ce("i64 labels", r.first, r.second);
    }
    // i32 labels through upload_i32, dlogits left undefined (the operation allocates it), and no gradient at all.
    const auto r = both([&](const auto& be) {
      CeRun run;
      Tensor dl;
      run.r = be.cross_entropy(in(be, logits), be.upload_i32(lab32), &dl);
      CHECK(dl.defined());
      run.dlogits = be.to_host(dl);
      const backend::CrossEntropyResult nograd = be.cross_entropy(in(be, logits), in(be, labels), nullptr);
      CHECK(nograd.targets == run.r.targets);
      CHECK(nograd.loss == run.r.loss);
      return run;
    });
    expect_same_ce("i32 labels", r.first, r.second);
  }
}

TEST_CASE("cross_entropy: no target gives loss 0 and a zero gradient; a label outside the vocabulary throws on both") {
  Rng rng(g_seed + __LINE__);
  const Tensor logits = randn({4, 10}, rng);
  const Tensor none = Tensor::full<std::int64_t>({4}, backend::kIgnoreIndex);
  both([&](const auto& be) -> Outs {
    Tensor dl = poison(be, {4, 10});
    const backend::CrossEntropyResult r = be.cross_entropy(in(be, logits), in(be, none), &dl);
    CHECK(r.loss == 0.0);
    CHECK(r.sum == 0.0);
    CHECK(r.targets == 0);
    CHECK(rel_error(dl, Tensor::zeros({4, 10})) == 0.0);
    return {};
  });
  Tensor bad = Tensor::full<std::int64_t>({4}, 3);
  bad.data<std::int64_t>()[2] = 10;
  Tensor negative = Tensor::full<std::int64_t>({4}, 3);
  negative.data<std::int64_t>()[1] = -5;  // negative, and not the ignore index
  both([&](const auto& be) -> Outs {
    Tensor dl = poison(be, {4, 10});
    CHECK_THROWS_WITH_AS(be.cross_entropy(in(be, logits), in(be, bad), &dl),
                         doctest::Contains("label 10 at position 2 is outside the vocabulary"), Error);
    CHECK_THROWS_WITH_AS(be.cross_entropy(in(be, logits), in(be, negative), nullptr),
                         doctest::Contains("label -5 at position 1 is outside the vocabulary"), Error);
    return {};
  });
}

// =================================================================================================================
// optimizer
// =================================================================================================================
TEST_CASE("adamw_step: after 3 steps Cuda's params and both moments are bitwise Cpu's (own lr, decay, step count)") {
  Rng rng(g_seed + __LINE__);
  struct SlotInit {
    Tensor p, m, v;
    std::vector<Tensor> g;  // one gradient per step
    std::int64_t step0;     // the step count of the first update
    double lr, wd;
  };
  const backend::AdamWHyper hyper{0.9, 0.95, 1e-8};
  const double schedule[] = {1.0, 0.6, 0.25};  // the lr schedule over the three steps
  std::vector<SlotInit> init;
  auto add_slot = [&](Shape s, std::int64_t step0, double lr, double wd, bool fresh) {
    SlotInit si;
    si.p = randn(s, rng);
    si.m = fresh ? Tensor::zeros(s) : randn(s, rng, 0.1f);
    si.v = Tensor::zeros(s);
    if (!fresh) rng.fill_uniform(si.v, 1e-4f, 1e-2f);
    for (int k = 0; k < 3; ++k) si.g.push_back(randn(s, rng, k == 1 ? 1e-4f : 1.f));  // small gradients: eps matters
    si.step0 = step0;
    si.lr = lr;
    si.wd = wd;
    init.push_back(si);
  };
  add_slot({37}, 1, 1e-3, 0.1, true);            // fresh (zero moments), decoupled weight decay
  add_slot({5, 3000}, 5, 3e-3, 0.0, false);      // resumed at step 5 with moments, no decay
  add_slot({70001}, 100, 5e-4, 0.01, false);     // late in training: bias corrections near 1, many blocks
  add_slot({1}, 1, 1e-2, 0.5, true);             // one element, strong decay
  const auto r = both([&](const auto& be) -> Outs {
    std::vector<backend::AdamWSlot> slots;
    for (const SlotInit& si : init) {
      backend::AdamWSlot sl;
      sl.param = in(be, si.p);
      sl.exp_avg = in(be, si.m);
      sl.exp_avg_sq = in(be, si.v);
      sl.weight_decay = si.wd;
      slots.push_back(sl);
    }
    for (int k = 0; k < 3; ++k) {
      for (std::size_t i = 0; i < init.size(); ++i) {
        slots[i].grad = in(be, init[i].g[std::size_t(k)]);
        slots[i].step = init[i].step0 + k;
        slots[i].lr = init[i].lr * schedule[k];
      }
      be.adamw_step(slots, hyper);
    }
    Outs o;
    for (std::size_t i = 0; i < slots.size(); ++i) {
      const std::string n = "slot " + std::to_string(i);
      o.push_back({n + " param", slots[i].param});
      o.push_back({n + " exp_avg", slots[i].exp_avg});
      o.push_back({n + " exp_avg_sq", slots[i].exp_avg_sq});
    }
    return o;
  });
  expect_match("adamw_step", r.first, r.second, 1e-6);  // everywhere
  // Bitwise where the host compiler cannot have contracted (x86-64 without FMA: this file's CPU build has no -march).
  if (kHostRoundsEachOp) expect_match("adamw_step (bitwise)", r.first, r.second, kBitwise);

  // The GPU's optional bf16 copy of the updated parameter (the compute weights): bitwise the host's rounding.
  const backend::Cuda& be = cuda_be();
  backend::AdamWSlot sl;
  sl.param = in(be, init[1].p);
  sl.grad = in(be, init[1].g[0]);
  sl.exp_avg = in(be, init[1].m);
  sl.exp_avg_sq = in(be, init[1].v);
  sl.param_bf16 = test::poisoned(init[1].p.shape(), DType::bf16);
  sl.step = 5;
  be.adamw_step({sl}, hyper);
  CHECK(bitwise_equal(be.to_host(sl.param_bf16), be.to_host(sl.param).to(DType::bf16)));
}

TEST_CASE("grad_norm and clip_grad_norm: Cuda matches Cpu (1e-6); a non-finite gradient leaves every gradient "
          "untouched and gives a non-finite norm on both") {
  Rng rng(g_seed + __LINE__);
  const Shape shapes[] = {{100000}, {7}, {3, 5}, {65536}, {1}};  // more than one 65536-element chunk, odd sizes
  std::vector<Tensor> host;
  for (const Shape& s : shapes) host.push_back(randn(s, rng, 3.f));
  const float norm = cpu_be.grad_norm(host).data<float>()[0];
  const double max_norm = 0.25 * norm;  // the same max_norm on both backends
  const auto r = check_op("grad_norm / clip_grad_norm", kNorm, [&](const auto& be) -> Outs {
    std::vector<Tensor> g;
    for (const Tensor& h : host) g.push_back(in(be, h));
    Outs o;
    o.push_back({"grad_norm", be.to_host(be.grad_norm(g))});
    o.push_back({"clip_grad_norm, max above the norm", be.to_host(be.clip_grad_norm(g, 2.0 * norm))});
    for (std::size_t i = 0; i < g.size(); ++i) CHECK(bitwise_equal(be.to_host(g[i]), host[i]));  // coefficient 1
    o.push_back({"clip_grad_norm {norm, coefficient}", be.to_host(be.clip_grad_norm(g, max_norm))});
    for (std::size_t i = 0; i < g.size(); ++i) o.push_back({"clipped gradient " + std::to_string(i), g[i]});
    o.push_back({"grad_norm after clipping", be.to_host(be.grad_norm(g))});
    return o;
  });
  for (const Outs* o : {&r.first, &r.second}) {
    CHECK(named(*o, "grad_norm").numel() == 1);
    CHECK(named(*o, "clip_grad_norm, max above the norm").numel() == 2);
    CHECK(named(*o, "clip_grad_norm, max above the norm").data<float>()[1] == 1.f);
    const float after = named(*o, "grad_norm after clipping").data<float>()[0];
    CHECK(std::abs(after - float(max_norm)) <= 1e-5f * float(max_norm));
  }

  for (float bad : {kNaN, kInf}) {
    CAPTURE(bad);
    std::vector<Tensor> hb;
    for (const Tensor& h : host) hb.push_back(h.clone());
    hb[1].data<float>()[3] = bad;
    both([&](const auto& be) -> Outs {
      std::vector<Tensor> g;
      for (const Tensor& h : hb) g.push_back(in(be, h));
      const Tensor n = be.to_host(be.grad_norm(g));
      CHECK_FALSE(std::isfinite(n.data<float>()[0]));
      const Tensor c = be.to_host(be.clip_grad_norm(g, 1e-3));
      CHECK(c.numel() == 2);
      CHECK_FALSE(std::isfinite(c.data<float>()[0]));
      if (std::isnan(bad)) CHECK(c.data<float>()[1] == 1.f);
      for (std::size_t i = 0; i < g.size(); ++i) CHECK(bitwise_equal(be.to_host(g[i]), hb[i]));  // untouched
      return {};
    });
  }
}

// =================================================================================================================
// bf16 storage on the GPU (beyond the fp32 contract: the CPU runs fp32 on the same bf16-rounded values)
// =================================================================================================================
TEST_CASE("bf16 storage: Cuda on bf16 tensors matches Cpu on the bf16-rounded values (norms, attention, "
          "cross-entropy 1e-2; embedding exact)") {
  Rng rng(g_seed + __LINE__);
  {
    const std::int64_t N = 37, H = 96;
    const Tensor x = randn({N, H}, rng, 2.f, 3.f), dy = randn({N, H}, rng), w = randn({H}, rng, 0.3f, 1.f);
    const Tensor b = randn({H}, rng, 0.3f);
    check_op("bf16 layernorm / rmsnorm", kLow, [&](const auto& be) -> Outs {
      const DType t = low_dtype(be);
      const Tensor xb = in_low(be, x), dyb = in_low(be, dy), wb = in(be, w), bb = in(be, b);
      Tensor y = poison(be, {N, H}, t), dx = poison(be, {N, H}, t), stats;
      Tensor dw = be.zeros({H}), db = be.zeros({H});  // parameters and their gradients stay fp32
      be.layernorm_forward(xb, wb, bb, 1e-5, y, stats);
      be.layernorm_backward(dyb, xb, wb, stats, dx, dw, db);
      Tensor ry = poison(be, {N, H}, t), rdx = poison(be, {N, H}, t), rstats, rdw = be.zeros({H});
      be.rmsnorm_forward(xb, wb, 1e-6, ry, rstats);
      be.rmsnorm_backward(dyb, xb, wb, rstats, rdx, rdw);
      return {{"layernorm y", y}, {"layernorm dx", dx}, {"layernorm dweight", dw}, {"layernorm dbias", db},
              {"rmsnorm y", ry},  {"rmsnorm dx", rdx},  {"rmsnorm dweight", rdw}};
    });
  }
  {
    const std::int64_t B = 2, T = 37, H = 4, G = 2, D = 64;
    const backend::AttentionShape shape{B, T, 0, 0, H, G, D, /*causal=*/true};
    const Tensor q = randn({B * T, H * D}, rng), k = randn({B * T, G * D}, rng), v = randn({B * T, G * D}, rng);
    const Tensor dout = randn({B * T, H * D}, rng);
    const std::vector<std::int32_t> valid = padding_mask(B, T, rng);
    check_op("bf16 attention", kLow, [&](const auto& be) -> Outs {
      const DType t = low_dtype(be);
      const Tensor qb = in_low(be, q), kb = in_low(be, k), vb = in_low(be, v), db = in_low(be, dout);
      const Tensor mask = be.upload_i32(valid);
      Tensor out = poison(be, {B * T, H * D}, t), saved;
      be.attention_forward(qb, kb, vb, &mask, shape, out, &saved);
      Tensor dq = poison(be, {B * T, H * D}, t), dk = poison(be, {B * T, G * D}, t), dv = poison(be, {B * T, G * D}, t);
      be.attention_backward(qb, kb, vb, &mask, out, saved, db, shape, dq, dk, dv);
      return {{"out", out}, {"dq", dq}, {"dk", dk}, {"dv", dv}};
    });
  }
  {
    const std::int64_t N = 21, V = 300;
    const Tensor logits = randn({N, V}, rng, 5.f, 40.f);
    std::vector<std::int64_t> lab(static_cast<std::size_t>(N));
    for (auto& l : lab) l = rng.uniform() < 0.3f ? backend::kIgnoreIndex : std::int64_t(rng.next_u32() % V);
    const Tensor labels = i64_tensor(lab);
    const auto r = both([&](const auto& be) {
      CeRun run;
      Tensor dl = poison(be, {N, V}, low_dtype(be));
      run.r = be.cross_entropy(in_low(be, logits), in(be, labels), &dl);  // double math on the rounded logits
      run.dlogits = be.to_host(dl);
      return run;
    });
    CHECK(r.second.r.targets == r.first.r.targets);
    CHECK(close_double(r.second.r.loss, r.first.r.loss, kDouble));
    CHECK(rel_error(r.second.dlogits, r.first.dlogits) <= kLow);
  }
  {
    const std::int64_t V = 37, H = 24;
    const std::vector<std::int64_t> ids = {7, 0, 7, 36, 5, 7, 5, 12, 7, 0, 3};
    const std::int64_t N = std::int64_t(ids.size());
    const Tensor table = randn({V, H}, rng), dy = randn({N, H}, rng), g0 = randn({V, H}, rng);
    // Rows are copied exactly; the fp32 gradient adds the same rounded dy values in the same order.
    check_op("bf16 embedding", 0.0, [&](const auto& be) -> Outs {
      Tensor y = poison(be, {N, H}, low_dtype(be)), dt = in(be, g0);
      be.embedding_forward(in_low(be, table), ids, y);
      be.embedding_backward(in_low(be, dy), ids, dt, nullptr);
      return {{"y", y}, {"dtable (+=, fp32)", dt}};
    });
  }
}

// =================================================================================================================
// a caller-owned workspace
// =================================================================================================================
TEST_CASE("a Cuda instance on a gpu::Workspace: after two measured runs and reserve(required_bytes()) a run "
          "overflows nothing and is bitwise the pool instance's") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t N = 37, H = 96, M = 19, K = 24, O = 13, B = 2, T = 21, Hh = 4, G = 2, D = 16, V = 50;
  const Tensor x = randn({N, H}, rng, 2.f, 3.f), dy = randn({N, H}, rng), w = randn({H}, rng, 0.3f, 1.f);
  const Tensor b = randn({H}, rng, 0.3f);
  const Tensor lx = randn({M, K}, rng), lw = randn({O, K}, rng, 0.2f), lb = randn({O}, rng), ldy = randn({M, O}, rng);
  const backend::AttentionShape shape{B, T, 0, 0, Hh, G, D, /*causal=*/true};
  const Tensor q = randn({B * T, Hh * D}, rng), k = randn({B * T, G * D}, rng), v = randn({B * T, G * D}, rng);
  const Tensor dout = randn({B * T, Hh * D}, rng);
  const std::vector<std::int32_t> valid = padding_mask(B, T, rng);
  const Tensor logits = randn({9, V}, rng, 3.f);
  const Tensor labels = i64_tensor({1, 4, backend::kIgnoreIndex, 49, 0, 7, 7, backend::kIgnoreIndex, 20});
  const std::vector<std::int64_t> ids = {3, 1, 3, 3, 0, 4};
  const Tensor table = randn({5, H}, rng), edy = randn({6, H}, rng);
  // A few operations whose temporaries and outputs all come from the instance (be.empty / zeros / upload).
  auto run = [&](const auto& be) -> Outs {
    const Tensor xb = in(be, x), wb = in(be, w);
    Tensor y = be.empty({N, H}), dx = be.empty({N, H}), dw = be.zeros({H}), db = be.zeros({H}), stats;
    be.layernorm_forward(xb, wb, in(be, b), 1e-5, y, stats);
    be.layernorm_backward(in(be, dy), xb, wb, stats, dx, dw, db);
    const Tensor lxb = in(be, lx), lwb = in(be, lw), lbb = in(be, lb);
    Tensor ly = be.empty({M, O}), ldw = be.zeros({O, K}), ldb = be.zeros({O}), ldx = be.empty({M, K});
    be.linear(lxb, lwb, &lbb, ly);
    be.linear_backward(in(be, ldy), lxb, lwb, ldw, &ldb, ldx);
    const Tensor qb = in(be, q), kb = in(be, k), vb = in(be, v), mask = be.upload_i32(valid);
    Tensor out = be.empty({B * T, Hh * D}), saved;
    be.attention_forward(qb, kb, vb, &mask, shape, out, &saved);
    Tensor dq = be.empty({B * T, Hh * D}), dk = be.empty({B * T, G * D}), dv = be.empty({B * T, G * D});
    be.attention_backward(qb, kb, vb, &mask, out, saved, in(be, dout), shape, dq, dk, dv);
    Tensor dl = be.empty({9, V});
    const backend::CrossEntropyResult ce = be.cross_entropy(in(be, logits), in(be, labels), &dl);
    Tensor ce_t = Tensor::empty({3}, DType::f64);
    ce_t.data<double>()[0] = ce.loss;
    ce_t.data<double>()[1] = ce.sum;
    ce_t.data<double>()[2] = double(ce.targets);
    Tensor ey = be.empty({6, H}), dt = be.zeros({5, H});
    be.embedding_forward(in(be, table), ids, ey);
    be.embedding_backward(in(be, edy), ids, dt, nullptr);
    std::vector<Tensor> grads = {dw, db, ldw};
    const Tensor clip = be.clip_grad_norm(grads, 0.5);
    CHECK(be.all_finite(y));
    return to_host(be, {{"layernorm y", y}, {"layernorm dx", dx}, {"layernorm dweight (clipped)", dw},
                        {"layernorm dbias (clipped)", db}, {"linear y", ly}, {"linear dw (clipped)", ldw},
                        {"linear db", ldb}, {"linear dx", ldx}, {"attention out", out}, {"attention dq", dq},
                        {"attention dk", dk}, {"attention dv", dv}, {"cross_entropy dlogits", dl},
                        {"cross_entropy {loss, sum, targets}", ce_t}, {"embedding y", ey}, {"embedding dtable", dt},
                        {"clip {norm, coefficient}", clip}});
  };
  gpu::Workspace ws;  // declared before the instance that draws from it: destroyed after every tensor of it
  const backend::Cuda pool;                          // the stream-ordered pool
  const backend::Cuda carved(gpu::Options{}, &ws);  // the same options, every tensor from the workspace
  const Outs want = run(pool);
  expect_match("pool instance against the CPU", run(cpu_be), want, kF32);
  for (int i = 0; i < 2; ++i) expect_match("workspace, measuring", want, run(carved), kBitwise);
  CHECK(ws.overflow_count() > 0);  // no buffer yet: everything went to the pool
  REQUIRE(ws.required_bytes() > 0);
  ws.reserve(ws.required_bytes());
  ws.reset_counters();
  expect_match("workspace, reserved", want, run(carved), kBitwise);
  CHECK(ws.overflow_count() == 0);
  CHECK(ws.live_blocks() == 0);  // every tensor of the run is gone
}

// =================================================================================================================
int main(int argc, char** argv) { return cumo::test::run_cuda_tests(argc, argv, "cuda backend ops", g_seed); }
