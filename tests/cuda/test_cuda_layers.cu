// The dense model layers' CUDA kernels (backend/cuda/layers.cuh, attention.cuh, optim.cuh) against the CPU code
// that is their reference: nn::LayerNorm, nn::RMSNorm, nn::RotaryEmbedding, nn::Attention, train::cross_entropy,
// train::AdamW and train::grad_norm / clip_grad_norm themselves (and, for the gated activation, which nn::
// DenseGatedMLP computes inline, the same loop). Fresh random inputs each run (the seed is printed;
// CUMO_TEST_SEED=<n> repeats a run); outputs are NaN-poisoned before a kernel runs, so an unwritten element fails.
//
// Tolerances, relative error ‖gpu − cpu‖ / ‖cpu‖:
//   kF32 = 1e-5 for fp32: both sides compute the same formulas in fp32 with double row reductions; what differs is
//     the summation order of fp32 dot products (attention: ~√D·2⁻²⁴ ≈ 1e-6 per product) and CUDA's expf/sincosf
//     (≤ 2 ulp) against glibc's — errors of a few 1e-7, so 1e-5 leaves a 10× margin and still catches any
//     indexing or formula error (those give O(1)).
//   kLow = 1e-2 for bf16 storage against fp32 on the same rounded inputs (bf16 keeps 8 bits: 2⁻⁹ ≈ 2e-3 per value).
//   Cross-entropy's loss is reduced in double on both sides: 1e-12. AdamW is bitwise the CPU's on x86-64 (both
//     sides round every fp32 operation in the same order, no FMA); the check is 1e-6 everywhere plus bitwise where
//     the host compiler cannot have contracted (x86-64 without FMA).
//
// Without a usable GPU the binary prints "SKIPPED: no CUDA device (...)" and exits 77 (ctest: skipped).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "cuda_test_main.cuh"

#include "cumo/backend/cuda.cuh"
#include "cumo/backend/cuda/attention.cuh"
#include "cumo/backend/cuda/layers.cuh"
#include "cumo/backend/cuda/optim.cuh"
#include "cumo/core/compare.hpp"
#include "cumo/moe/activation.hpp"
#include "cumo/nn/attention.hpp"
#include "cumo/nn/embedding.hpp"
#include "cumo/nn/layernorm.hpp"
#include "cumo/nn/rmsnorm.hpp"
#include "cumo/nn/rope.hpp"
#include "cumo/train/clip.hpp"
#include "cumo/train/loss.hpp"
#include "cumo/train/optimizer.hpp"

using namespace cumo;

namespace {

std::uint64_t g_seed = 0;

constexpr double kF32 = 1e-5;
constexpr double kLow = 1e-2;

Tensor randn(Shape s, Rng& rng, float scale = 1.f, float mean = 0.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, mean, scale);
  return t;
}
using test::on_cpu;
using test::on_gpu;
using test::poisoned;
Tensor gpu_zeros(Shape s) { return Tensor::zeros(s, DType::f32, Device::cuda); }
// fp32 values rounded through bf16, as fp32 (the CPU reference input of a bf16 kernel).
Tensor rounded(const Tensor& t) { return t.to(DType::bf16).to(DType::f32); }
Tensor as_bf16_gpu(const Tensor& t) { return on_gpu(t.to(DType::bf16)); }
Tensor f32_of(const Tensor& gpu_tensor) { return on_cpu(gpu_tensor).to(DType::f32); }

void expect_close(const std::string& what, const Tensor& got, const Tensor& want, double tol) {
  const double e = rel_error(got, want);
  CHECK_MESSAGE(e <= tol, what, ": relative error ", e, " exceeds ", tol);
}

Tensor i64_tensor(const std::vector<std::int64_t>& v) {
  Tensor t = Tensor::empty({std::int64_t(v.size())}, DType::i64);
  std::copy(v.begin(), v.end(), t.data<std::int64_t>());
  return t;
}

// C (m, n) = op(A) · op(B) in fp32 on the CPU (the projections around attention).
Tensor matmul(const Tensor& a, bool ta, const Tensor& b, bool tb) {
  const std::int64_t m = ta ? a.size(1) : a.size(0), k = ta ? a.size(0) : a.size(1);
  const std::int64_t n = tb ? b.size(0) : b.size(1);
  Tensor c = Tensor::zeros({m, n});
  cpu::gemm(ta ? cpu::Op::T : cpu::Op::N, tb ? cpu::Op::T : cpu::Op::N, m, n, k, 1.f, a.data<float>(), a.size(1),
            b.data<float>(), b.size(1), 0.f, c.data<float>(), n);
  return c;
}

}  // namespace

// =================================================================================================================
// norms
// =================================================================================================================
TEST_CASE("cuda layernorm forward/backward match nn::LayerNorm<> (fp32; bf16 storage on rounded inputs)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t shapes[][2] = {{37, 96}, {5, 1000}, {130, 33}, {1, 3}};
  for (const auto& s : shapes) {
    const std::int64_t N = s[0], H = s[1];
    CAPTURE(N);
    CAPTURE(H);
    nn::LayerNorm<> ln("ln", H, 1e-5);
    rng.fill_normal(ln.weight.value, 1.f, 0.3f);
    rng.fill_normal(ln.bias.value, 0.f, 0.3f);
    const Tensor x = randn({N, H}, rng, 2.f, 3.f);  // an offset mean: the statistics must not cancel
    const Tensor dy = randn({N, H}, rng);
    const Tensor y = ln.forward(x);
    const Tensor dx = ln.backward(dy);

    const Tensor w = on_gpu(ln.weight.value), b = on_gpu(ln.bias.value);
    Tensor yg = poisoned({N, H}), mean = poisoned({N}), rstd = poisoned({N}), dxg = poisoned({N, H});
    Tensor dw = gpu_zeros({H}), db = gpu_zeros({H});
    const Tensor xg = on_gpu(x);
    gpu::layernorm_forward(xg, w, b, 1e-5, yg, mean, rstd);
    gpu::layernorm_backward(on_gpu(dy), xg, w, mean, rstd, dxg, dw, db);
    expect_close("layernorm y", yg, y, kF32);
    expect_close("layernorm dx", dxg, dx, kF32);
    expect_close("layernorm dweight", dw, ln.weight.grad, kF32);
    expect_close("layernorm dbias", db, ln.bias.grad, kF32);

    // bf16 activations, fp32 parameters and statistics: the CPU layer on the same rounded values.
    nn::LayerNorm<> lr("lr", H, 1e-5);
    lr.weight.value.copy_from(ln.weight.value);
    lr.bias.value.copy_from(ln.bias.value);
    const Tensor xr = rounded(x), dyr = rounded(dy);
    const Tensor yr = lr.forward(xr), dxr = lr.backward(dyr);
    Tensor yb = poisoned({N, H}, DType::bf16), dxb = poisoned({N, H}, DType::bf16);
    Tensor dwb = gpu_zeros({H}), dbb = gpu_zeros({H});
    const Tensor xb = as_bf16_gpu(x);
    gpu::layernorm_forward(xb, w, b, 1e-5, yb, mean, rstd);
    gpu::layernorm_backward(as_bf16_gpu(dy), xb, w, mean, rstd, dxb, dwb, dbb);
    expect_close("layernorm bf16 y", f32_of(yb), yr, kLow);
    expect_close("layernorm bf16 dx", f32_of(dxb), dxr, kLow);
    expect_close("layernorm bf16 dweight", dwb, lr.weight.grad, kF32);  // fp32 math on the same bf16 values
    expect_close("layernorm bf16 dbias", dbb, lr.bias.grad, kF32);
  }
}

TEST_CASE("cuda layernorm_backward accumulates parameter gradients and checks shapes in words") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t N = 9, H = 40;
  const Tensor x = on_gpu(randn({N, H}, rng)), dy = on_gpu(randn({N, H}, rng));
  const Tensor w = on_gpu(randn({H}, rng)), b = on_gpu(randn({H}, rng));
  Tensor y = gpu_zeros({N, H}), mean = gpu_zeros({N}), rstd = gpu_zeros({N}), dx = gpu_zeros({N, H});
  gpu::layernorm_forward(x, w, b, 1e-5, y, mean, rstd);
  Tensor dw1 = gpu_zeros({H}), db1 = gpu_zeros({H});
  gpu::layernorm_backward(dy, x, w, mean, rstd, dx, dw1, db1);
  Tensor dw2 = dw1.clone(), db2 = db1.clone();
  gpu::layernorm_backward(dy, x, w, mean, rstd, dx, dw2, db2);  // += a second time: exactly twice (×2 is exact)
  Tensor twice = on_cpu(dw1);
  for (std::int64_t i = 0; i < H; ++i) twice.data<float>()[i] *= 2.f;
  CHECK(bitwise_equal(dw2, twice));
  Tensor bad_w = gpu_zeros({H + 1});
  CHECK_THROWS_WITH_AS(gpu::layernorm_forward(x, bad_w, b, 1e-5, y, mean, rstd),
                       doctest::Contains("gpu::layernorm_forward: weight has shape"), Error);
}

TEST_CASE("cuda rmsnorm forward/backward match nn::RMSNorm<> (fp32; bf16 storage on rounded inputs)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t shapes[][2] = {{37, 96}, {3, 4096}, {100, 17}};
  for (const auto& s : shapes) {
    const std::int64_t N = s[0], H = s[1];
    CAPTURE(N);
    CAPTURE(H);
    nn::RMSNorm<> rn("rms", H, 1e-6);
    rng.fill_normal(rn.weight.value, 1.f, 0.3f);
    const Tensor x = randn({N, H}, rng, 1.5f, 0.5f), dy = randn({N, H}, rng);
    const Tensor y = rn.forward(x), dx = rn.backward(dy);

    const Tensor w = on_gpu(rn.weight.value), xg = on_gpu(x);
    Tensor yg = poisoned({N, H}), rr = poisoned({N}), dxg = poisoned({N, H}), dw = gpu_zeros({H});
    gpu::rmsnorm_forward(xg, w, 1e-6, yg, rr);
    gpu::rmsnorm_backward(on_gpu(dy), xg, w, rr, dxg, dw);
    expect_close("rmsnorm y", yg, y, kF32);
    expect_close("rmsnorm dx", dxg, dx, kF32);
    expect_close("rmsnorm dweight", dw, rn.weight.grad, kF32);

    nn::RMSNorm<> rb("rb", H, 1e-6);
    rb.weight.value.copy_from(rn.weight.value);
    const Tensor yr = rb.forward(rounded(x)), dxr = rb.backward(rounded(dy));
    Tensor yb = poisoned({N, H}, DType::bf16), dxb = poisoned({N, H}, DType::bf16), dwb = gpu_zeros({H});
    const Tensor xb = as_bf16_gpu(x);
    gpu::rmsnorm_forward(xb, w, 1e-6, yb, rr);
    gpu::rmsnorm_backward(as_bf16_gpu(dy), xb, w, rr, dxb, dwb);
    expect_close("rmsnorm bf16 y", f32_of(yb), yr, kLow);
    expect_close("rmsnorm bf16 dx", f32_of(dxb), dxr, kLow);
    expect_close("rmsnorm bf16 dweight", dwb, rb.weight.grad, kLow);
  }
}

// =================================================================================================================
// rotary embedding, gated activation
// =================================================================================================================
TEST_CASE("cuda rope matches nn::RotaryEmbedding forward and inverse (i64 and i32 positions, in place)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t cases[][3] = {{29, 4, 64}, {7, 1, 128}, {50, 3, 16}};  // rows, heads, head_dim
  for (const auto& c : cases) {
    const std::int64_t N = c[0], heads = c[1], D = c[2];
    CAPTURE(N);
    CAPTURE(D);
    nn::RotaryEmbedding rope(D, 10000.0);
    std::vector<std::int64_t> pos(static_cast<std::size_t>(N));
    for (auto& p : pos) p = std::int64_t(rng.next_u32() % 4096);  // large angles: the range reduction matters
    const Tensor x = randn({N, heads * D}, rng);
    Tensor fwd = x.clone(), inv = x.clone();
    rope.rotate(fwd, heads, pos);
    rope.rotate(inv, heads, pos, /*inverse=*/true);

    const Tensor freq = gpu::rope_inv_freq(D, 10000.0);
    const Tensor p64 = on_gpu(i64_tensor(pos));
    Tensor p32h = Tensor::empty({N}, DType::i32);
    for (std::int64_t i = 0; i < N; ++i) p32h.data<std::int32_t>()[i] = std::int32_t(pos[std::size_t(i)]);
    const Tensor p32 = on_gpu(p32h);
    const Tensor xg = on_gpu(x);
    Tensor out = poisoned({N, heads * D});
    gpu::rope(xg, p64, freq, heads, false, out);
    expect_close("rope forward (i64 positions)", out, fwd, kF32);
    Tensor inplace = on_gpu(x);
    gpu::rope(inplace, p32, freq, heads, true, inplace);
    expect_close("rope inverse (i32 positions, in place)", inplace, inv, kF32);
    gpu::rope(out, p64, freq, heads, true, out);  // inverse ∘ forward = identity up to rounding
    expect_close("rope inverse of forward", out, x, kF32);
  }
}

template <class Act>
void check_gated(const char* name, Rng& rng) {
  CAPTURE(name);
  const std::int64_t N = 45, F = 77;
  const Tensor g = randn({N, F}, rng, 2.f), u = randn({N, F}, rng), da = randn({N, F}, rng);
  // nn::DenseGatedMLP's loops.
  Tensor a = Tensor::empty({N, F}), dg = Tensor::empty({N, F}), du = Tensor::empty({N, F});
  for (std::int64_t i = 0; i < g.numel(); ++i) {
    const float gi = g.data<float>()[i], ui = u.data<float>()[i], di = da.data<float>()[i];
    a.data<float>()[i] = Act::f(gi) * ui;
    dg.data<float>()[i] = di * ui * Act::df(gi);
    du.data<float>()[i] = di * Act::f(gi);
  }
  Tensor ag = poisoned({N, F}), dgg = poisoned({N, F}), dug = poisoned({N, F});
  gpu::gated_forward<Act>(on_gpu(g), on_gpu(u), ag);
  gpu::gated_backward<Act>(on_gpu(g), on_gpu(u), on_gpu(da), dgg, dug);
  expect_close(std::string(name) + " gated a", ag, a, kF32);
  expect_close(std::string(name) + " gated dgate", dgg, dg, kF32);
  expect_close(std::string(name) + " gated dup", dug, du, kF32);
}

TEST_CASE("cuda gated activation Act(gate)·up forward/backward matches nn::DenseGatedMLP<>'s loop (SiLU, GELU)") {
  // The plain activations (GELU, QuickGELU, SiLU) are gpu::activation_forward/backward, tested in
  // test_cuda_backend.cu against the CPU backend's loops.
  Rng rng(g_seed + __LINE__);
  check_gated<SiLU>("silu", rng);
  check_gated<GELU>("gelu", rng);
  check_gated<QuickGELU>("quick_gelu", rng);
}

// =================================================================================================================
// cross-entropy
// =================================================================================================================
TEST_CASE("cuda cross_entropy matches train::cross_entropy (ignore -100, mean, normalizer, grad_scale)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t shapes[][2] = {{50, 1000}, {7, 3}, {1, 32000}};
  for (const auto& s : shapes) {
    const std::int64_t N = s[0], V = s[1];
    CAPTURE(N);
    CAPTURE(V);
    const Tensor logits = randn({N, V}, rng, 5.f, 40.f);  // large, shifted logits: the max must be subtracted
    Tensor labels = Tensor::empty({N}, DType::i64);
    for (std::int64_t i = 0; i < N; ++i)
      labels.data<std::int64_t>()[i] = (N > 1 && rng.uniform() < 0.3f) ? -100 : std::int64_t(rng.next_u32() % V);
    train::CrossEntropyOptions copts[3];
    copts[1].normalizer = 123;
    copts[2].grad_scale = 0.25;
    for (const auto& co : copts) {
      Tensor dl;
      const train::CrossEntropyResult want = train::cross_entropy(logits, labels, &dl, co);
      gpu::CrossEntropyOptions go;
      go.ignore_index = co.ignore_index;
      go.normalizer = co.normalizer;
      go.grad_scale = co.grad_scale;
      Tensor dg = poisoned({N, V});
      const auto got = gpu::read_result(gpu::cross_entropy(on_gpu(logits), on_gpu(labels), &dg, go));
      CHECK(got.targets == want.targets);
      CHECK(std::abs(got.sum - want.sum) <= 1e-12 * std::abs(want.sum));
      CHECK(std::abs(got.loss - want.loss) <= 1e-12 * std::abs(want.loss));
      expect_close("cross_entropy dlogits", dg, dl, kF32);
    }
    // bf16 logits (fp32/double math on the rounded values), i32 labels, no gradient requested.
    Tensor l32 = Tensor::empty({N}, DType::i32);
    for (std::int64_t i = 0; i < N; ++i) l32.data<std::int32_t>()[i] = std::int32_t(labels.data<std::int64_t>()[i]);
    Tensor dr;
    const auto want = train::cross_entropy(rounded(logits), labels, &dr);
    Tensor db = poisoned({N, V}, DType::bf16);
    const auto got = gpu::read_result(gpu::cross_entropy(as_bf16_gpu(logits), on_gpu(l32), &db));
    CHECK(std::abs(got.loss - want.loss) <= 1e-12 * std::abs(want.loss));
    expect_close("cross_entropy bf16 dlogits", f32_of(db), dr, kLow);
    const auto nograd = gpu::read_result(gpu::cross_entropy(on_gpu(logits), on_gpu(labels)));
    CHECK(nograd.targets == want.targets);
  }
}

TEST_CASE("cuda cross_entropy: no target gives loss 0 and a zero gradient; a bad label throws on read") {
  Rng rng(g_seed + __LINE__);
  const Tensor logits = on_gpu(randn({4, 10}, rng));
  Tensor none = Tensor::full<std::int64_t>({4}, -100);
  Tensor dg = poisoned({4, 10});
  const auto r = gpu::read_result(gpu::cross_entropy(logits, on_gpu(none), &dg));
  CHECK(r.loss == 0.0);
  CHECK(r.targets == 0);
  CHECK(rel_error(dg, Tensor::zeros({4, 10})) == 0.0);
  Tensor bad = Tensor::full<std::int64_t>({4}, 3);
  bad.data<std::int64_t>()[2] = 10;
  const auto st = gpu::cross_entropy(logits, on_gpu(bad), &dg);
  CHECK_THROWS_WITH_AS(gpu::read_result(st), doctest::Contains("label 10 at position 2 is outside the vocabulary"),
                       Error);
}

// =================================================================================================================
// attention
// =================================================================================================================
namespace {

// nn::Attention on the CPU is the reference for the whole layer; the GPU replaces its core: the projections stay on
// the CPU (they are cuBLAS GEMMs on the GPU, tested elsewhere), RoPE and attention run on the GPU. Compared:
// the output y, dx, and the q/k/v weight gradients (each isolates one of dq, dk, dv).
struct AttnCase {
  const char* name;
  nn::AttentionConfig cfg;
  std::int64_t B, T;
  bool mask;
};

void check_attention(const AttnCase& c, Rng& rng) {
  CAPTURE(c.name);
  nn::Attention<> attn("attn", c.cfg);
  const nn::AttentionConfig& cfg = attn.config();
  const std::int64_t B = c.B, T = c.T, H = cfg.heads, G = cfg.kv_heads, D = cfg.head_dim, hidden = cfg.hidden;
  ParameterList ps;
  attn.collect(ps);
  for (Parameter* p : ps) rng.fill_normal(p->value, 0.f, p->value.dim() == 2 ? 1.f / std::sqrt(float(hidden)) : 0.1f);
  const Tensor x = randn({B * T, hidden}, rng), dy = randn({B * T, hidden}, rng);
  // Right padding of random length per sequence; with B ≥ 3 the last sequence is all padding (its queries see no
  // key: output 0, zero gradients).
  std::vector<std::uint8_t> valid(std::size_t(B * T), 1);
  if (c.mask)
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t len = (B >= 3 && b == B - 1) ? 0 : 1 + std::int64_t(rng.next_u32() % std::uint32_t(T));
      for (std::int64_t t = len; t < T; ++t) valid[std::size_t(b * T + t)] = 0;
    }
  const Tensor y = attn.forward(x, B, T, c.mask ? &valid : nullptr);
  const Tensor dx = attn.backward(dy);

  // ---- the GPU path ----
  Tensor q = on_gpu(attn.q_proj.apply(x)), k = on_gpu(attn.k_proj.apply(x)), v = on_gpu(attn.v_proj.apply(x));
  std::vector<std::int64_t> pos(std::size_t(B * T));
  for (std::int64_t i = 0; i < B * T; ++i) pos[std::size_t(i)] = i % T;
  const Tensor posg = on_gpu(i64_tensor(pos));
  Tensor freq;
  if (cfg.rope_theta > 0) {
    freq = gpu::rope_inv_freq(D, cfg.rope_theta);
    gpu::rope(q, posg, freq, H, false, q);
    gpu::rope(k, posg, freq, G, false, k);
  }
  Tensor kv_valid;
  if (c.mask) {
    Tensor h = Tensor::empty({B * T}, DType::i32);
    for (std::int64_t i = 0; i < B * T; ++i) h.data<std::int32_t>()[i] = valid[std::size_t(i)];
    kv_valid = on_gpu(h);
  }
  gpu::AttentionShape shape;
  shape.batch = B;
  shape.q_len = T;
  shape.heads = H;
  shape.kv_heads = G;
  shape.head_dim = D;
  shape.causal = cfg.causal;
  Tensor ctx = poisoned({B * T, H * D}), lse = poisoned({B, H, T});
  gpu::attention_forward(q, k, v, c.mask ? &kv_valid : nullptr, shape, ctx, lse);
  const Tensor yg = attn.o_proj.apply(on_cpu(ctx));
  expect_close("attention y", yg, y, kF32);

  const Tensor dctx = on_gpu(matmul(dy, false, attn.o_proj.weight.value, false));  // (B·T, H·D)
  Tensor dq = poisoned({B * T, H * D}), dk = poisoned({B * T, G * D}), dv = poisoned({B * T, G * D});
  gpu::attention_backward(q, k, v, c.mask ? &kv_valid : nullptr, ctx, lse, dctx, shape, dq, dk, dv);
  // Determinism: a second backward is bitwise the first.
  Tensor dq2 = poisoned({B * T, H * D}), dk2 = poisoned({B * T, G * D}), dv2 = poisoned({B * T, G * D});
  gpu::attention_backward(q, k, v, c.mask ? &kv_valid : nullptr, ctx, lse, dctx, shape, dq2, dk2, dv2);
  CHECK(bitwise_equal(dq, dq2));
  CHECK(bitwise_equal(dk, dk2));
  CHECK(bitwise_equal(dv, dv2));
  if (cfg.rope_theta > 0) {
    gpu::rope(dq, posg, freq, H, true, dq);
    gpu::rope(dk, posg, freq, G, true, dk);
  }
  const Tensor dqh = on_cpu(dq), dkh = on_cpu(dk), dvh = on_cpu(dv);
  Tensor dxg = matmul(dqh, false, attn.q_proj.weight.value, false);  // (B·T, hidden)
  nn::add_(dxg, matmul(dkh, false, attn.k_proj.weight.value, false));
  nn::add_(dxg, matmul(dvh, false, attn.v_proj.weight.value, false));
  expect_close("attention dx", dxg, dx, kF32);
  expect_close("attention dWq (dq)", matmul(dqh, true, x, false), attn.q_proj.weight.grad, kF32);
  expect_close("attention dWk (dk)", matmul(dkh, true, x, false), attn.k_proj.weight.grad, kF32);
  expect_close("attention dWv (dv)", matmul(dvh, true, x, false), attn.v_proj.weight.grad, kF32);

  // bf16 storage: the same kernels on bf16-rounded q, k, v, dout against the fp32 kernels on the rounded values.
  const Tensor qr = on_gpu(rounded(on_cpu(q))), kr = on_gpu(rounded(on_cpu(k))), vr = on_gpu(rounded(on_cpu(v)));
  const Tensor dor = on_gpu(rounded(on_cpu(dctx)));
  Tensor ctx_r = poisoned({B * T, H * D}), lse_r = poisoned({B, H, T});
  gpu::attention_forward(qr, kr, vr, c.mask ? &kv_valid : nullptr, shape, ctx_r, lse_r);
  Tensor dq_r = poisoned({B * T, H * D}), dk_r = poisoned({B * T, G * D}), dv_r = poisoned({B * T, G * D});
  gpu::attention_backward(qr, kr, vr, c.mask ? &kv_valid : nullptr, ctx_r, lse_r, dor, shape, dq_r, dk_r, dv_r);
  auto bf = [](const Tensor& t) { return on_gpu(on_cpu(t).to(DType::bf16)); };
  const Tensor qb = bf(qr), kb = bf(kr), vb = bf(vr), dob = bf(dor);
  Tensor ctx_b = poisoned({B * T, H * D}, DType::bf16), lse_b = poisoned({B, H, T});
  gpu::attention_forward(qb, kb, vb, c.mask ? &kv_valid : nullptr, shape, ctx_b, lse_b);
  Tensor dq_b = poisoned({B * T, H * D}, DType::bf16), dk_b = poisoned({B * T, G * D}, DType::bf16),
         dv_b = poisoned({B * T, G * D}, DType::bf16);
  gpu::attention_backward(qb, kb, vb, c.mask ? &kv_valid : nullptr, ctx_b, lse_b, dob, shape, dq_b, dk_b, dv_b);
  expect_close("attention bf16 out", f32_of(ctx_b), ctx_r, kLow);
  expect_close("attention bf16 dq", f32_of(dq_b), dq_r, kLow);
  expect_close("attention bf16 dk", f32_of(dk_b), dk_r, kLow);
  expect_close("attention bf16 dv", f32_of(dv_b), dv_r, kLow);
}

nn::AttentionConfig attn_cfg(std::int64_t hidden, std::int64_t heads, std::int64_t kv_heads, std::int64_t head_dim,
                             bool causal, double rope_theta, bool bias) {
  nn::AttentionConfig c;
  c.hidden = hidden;
  c.heads = heads;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.causal = causal;
  c.rope_theta = rope_theta;
  c.qkv_bias = bias;
  c.out_bias = bias;
  c.out_name = bias ? "out_proj" : "o_proj";
  return c;
}

}  // namespace

TEST_CASE("cuda attention forward/backward match nn::Attention<> (causal GQA + RoPE, bidirectional, padding masks)") {
  Rng rng(g_seed + __LINE__);
  const AttnCase cases[] = {
      {"causal GQA 4/2 heads, D 16, RoPE, padding", attn_cfg(64, 4, 2, 16, true, 10000.0, false), 2, 37, true},
      {"causal MQA 2/1 heads, D 128, RoPE", attn_cfg(128, 2, 1, 128, true, 1e6, false), 2, 70, false},
      {"bidirectional CLIP-like 3 heads, D 32, biases, padding + an all-padding sequence",
       attn_cfg(96, 3, 3, 32, false, 0.0, true), 3, 50, true},
      {"bidirectional 2 heads, D 80 (not a power of two)", attn_cfg(160, 2, 2, 80, false, 0.0, false), 1, 33, false},
      {"causal 1 head, D 256 (above 48 KiB of shared memory), padding", attn_cfg(256, 1, 1, 256, true, 10000.0, false),
       2, 40, true},
  };
  for (const AttnCase& c : cases) check_attention(c, rng);
}

TEST_CASE("cuda attention rejects heads that do not split into kv groups and mismatched shapes") {
  Tensor q = gpu_zeros({8, 3 * 16}), k = gpu_zeros({8, 2 * 16}), out = gpu_zeros({8, 3 * 16}), lse = gpu_zeros({3 * 8});
  gpu::AttentionShape s;
  s.batch = 1;
  s.q_len = 8;
  s.heads = 3;
  s.kv_heads = 2;
  s.head_dim = 16;
  CHECK_THROWS_WITH_AS(gpu::attention_forward(q, k, k, nullptr, s, out, lse),
                       doctest::Contains("3 heads do not split into groups of 2 kv heads"), Error);
  s.kv_heads = 1;
  CHECK_THROWS_WITH_AS(gpu::attention_forward(q, k, k, nullptr, s, out, lse), doctest::Contains("k has shape"), Error);
}

// =================================================================================================================
// optimizer and clipping
// =================================================================================================================
TEST_CASE("cuda adamw_step matches train::AdamW (groups, weight decay, lr schedule, bias correction; bf16 copy)") {
  Rng rng(g_seed + __LINE__);
  Parameter p1("a.bias", randn({37}, rng)), p2("a.weight", randn({5, 3000}, rng)), p3("b.weight", randn({9000}, rng));
  std::vector<Parameter*> all = {&p1, &p2, &p3};
  std::vector<train::ParamGroup> groups(2);
  groups[0].name = "a";
  groups[0].params = {&p1, &p2};
  groups[0].weight_decay = 0.1;
  groups[1].name = "b";
  groups[1].params = {&p3};
  groups[1].lr_scale = 0.5;
  groups[1].weight_decay = 0.0;
  train::AdamWOptions opt;
  opt.beta1 = 0.9;
  opt.beta2 = 0.95;
  opt.eps = 1e-8;
  train::AdamW cpu_opt(groups, opt);

  struct Dev {
    Tensor p, g, m, v, pb;
  };
  std::vector<Dev> dev;
  for (Parameter* p : all)
    dev.push_back({on_gpu(p->value), gpu_zeros(p->value.shape()), gpu_zeros(p->value.shape()),
                   gpu_zeros(p->value.shape()), poisoned(p->value.shape(), DType::bf16)});
  const double lrs[] = {1e-3, 3e-3, 5e-4, 2e-3};
  for (int s = 0; s < 4; ++s) {
    for (std::size_t i = 0; i < all.size(); ++i) {
      all[i]->grad = randn(all[i]->value.shape(), rng, s == 2 ? 1e-4f : 1.f);  // small gradients: eps matters
      dev[i].g = on_gpu(all[i]->grad);
    }
    cpu_opt.step(lrs[s]);
    std::vector<gpu::AdamWSlot> slots;
    for (std::size_t i = 0; i < all.size(); ++i) {
      gpu::AdamWSlot sl;
      sl.param = dev[i].p;
      sl.grad = dev[i].g;
      sl.exp_avg = dev[i].m;
      sl.exp_avg_sq = dev[i].v;
      if (i != 1) sl.param_bf16 = dev[i].pb;  // one parameter without a bf16 copy
      sl.step = s + 1;
      const train::ParamGroup& g = i < 2 ? groups[0] : groups[1];
      sl.lr = lrs[s] * g.lr_scale;
      sl.weight_decay = *g.weight_decay;
      slots.push_back(sl);
    }
    gpu::adamw_step(slots, {opt.beta1, opt.beta2, opt.eps});
  }
  for (std::size_t i = 0; i < all.size(); ++i) {
    CAPTURE(all[i]->name);
    const train::AdamW::State* st = cpu_opt.state(*all[i]);
    REQUIRE(st);
    expect_close("adamw param", dev[i].p, all[i]->value, 1e-6);
    expect_close("adamw exp_avg", dev[i].m, st->exp_avg, 1e-6);
    expect_close("adamw exp_avg_sq", dev[i].v, st->exp_avg_sq, 1e-6);
#if defined(__x86_64__) && !defined(__FMA__)
    CHECK(bitwise_equal(dev[i].p, all[i]->value));
    CHECK(bitwise_equal(dev[i].m, st->exp_avg));
    CHECK(bitwise_equal(dev[i].v, st->exp_avg_sq));
#endif
    if (i != 1) CHECK(bitwise_equal(dev[i].pb, on_gpu(all[i]->value.to(DType::bf16))));
  }
}

TEST_CASE("cuda grad_norm and clip_grad_norm match train::grad_norm / clip_grad_norm; NaN leaves gradients alone") {
  Rng rng(g_seed + __LINE__);
  Parameter a("a", Tensor::zeros({100000})), b("b", Tensor::zeros({7})), c("c", Tensor::zeros({3, 5})),
      d("d", Tensor::zeros({65536})), frozen("frozen", Tensor::zeros({10}));
  frozen.trainable = false;
  ParameterList ps = {&a, &b, &c, &d, &frozen};
  for (Parameter* p : ps) p->grad = randn(p->value.shape(), rng, 3.f);
  std::vector<Tensor> grads;  // the trainable ones, as AdamW::trainable_parameters() would give them
  for (Parameter* p : ps)
    if (p->trainable) grads.push_back(on_gpu(p->grad));

  const float want = train::grad_norm(ps);
  const float got = gpu::item(gpu::grad_norm(grads));
  CHECK(std::abs(got - want) <= 1e-6f * want);

  // No clipping (max_norm above the norm): coefficient 1, gradients bitwise unchanged.
  std::vector<Tensor> before;
  for (const Tensor& g : grads) before.push_back(on_cpu(g));
  const Tensor nc = on_cpu(gpu::clip_grad_norm(grads, 2.0 * want));
  CHECK(nc.data<float>()[1] == 1.f);
  for (std::size_t i = 0; i < grads.size(); ++i) CHECK(bitwise_equal(grads[i], before[i]));

  // Clipping to a quarter of the norm.
  const double max_norm = 0.25 * want;
  const Tensor cc = on_cpu(gpu::clip_grad_norm(grads, max_norm));
  const float total = train::clip_grad_norm(ps, max_norm);
  CHECK(std::abs(cc.data<float>()[0] - total) <= 1e-6f * total);
  CHECK(std::abs(cc.data<float>()[1] - train::clip_coefficient(total, max_norm)) <= 1e-6f);
  std::size_t j = 0;
  for (Parameter* p : ps)
    if (p->trainable) expect_close("clipped " + p->name, grads[j++], p->grad, 1e-6);
  CHECK(std::abs(gpu::item(gpu::grad_norm(grads)) - float(max_norm)) <= 1e-5f * float(max_norm));

  // A NaN gradient: the norm is NaN, nothing is scaled (the CPU throws).
  Tensor bad = on_cpu(grads[1]);
  bad.data<float>()[3] = std::numeric_limits<float>::quiet_NaN();
  grads[1] = on_gpu(bad);
  before.clear();
  for (const Tensor& g : grads) before.push_back(on_cpu(g));
  const Tensor nan_out = on_cpu(gpu::clip_grad_norm(grads, 1e-3));
  CHECK(std::isnan(nan_out.data<float>()[0]));
  for (std::size_t i = 0; i < grads.size(); ++i) CHECK(bitwise_equal(grads[i], before[i]));
  b.grad.copy_from(bad);
  CHECK_THROWS_AS(train::clip_grad_norm(ps, 1e-3), Error);
}

TEST_CASE("cuda embedding forward/backward match nn::Embedding (repeated ids, skipped rows; bitwise)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t V = 37, H = 24;
  nn::Embedding<> emb("embed_tokens", V, H);
  rng.fill_normal(emb.weight.value, 0.f, 1.f);
  // repeated ids (7 four times), the first and last id of the vocabulary, skipped (image) rows
  const std::vector<std::int64_t> ids = {7, 0, 7, 36, 5, 7, 5, 12, 7, 0, 3};
  std::vector<bool> skip(ids.size(), false);
  skip[2] = skip[4] = true;
  const Tensor y_cpu = emb.forward(ids);  // (N, H)
  const Tensor dy = randn({std::int64_t(ids.size()), H}, rng);
  rng.fill_normal(emb.weight.grad, 0.f, 1.f);  // accumulate onto something non-zero
  const Tensor g0 = emb.weight.grad.clone();
  emb.backward(dy, &skip);

  const Tensor table = on_gpu(emb.weight.value);
  Tensor y = poisoned({std::int64_t(ids.size()), H});
  gpu::embedding_forward(table, ids, y);
  CHECK(bitwise_equal(on_cpu(y), y_cpu));
  Tensor dtable = on_gpu(g0);
  gpu::embedding_backward(on_gpu(dy), ids, dtable, &skip);
  CHECK(bitwise_equal(on_cpu(dtable), emb.weight.grad));

  // bf16 table and activations: the rows are copied exactly; the gradient sums the rounded dy in fp32
  Tensor yb = poisoned({std::int64_t(ids.size()), H}, DType::bf16);
  gpu::embedding_forward(as_bf16_gpu(emb.weight.value), ids, yb);
  CHECK(bitwise_equal(on_cpu(yb), y_cpu.to(DType::bf16)));
  nn::Embedding<> ref("ref", V, H);
  (void)ref.forward(ids);
  ref.weight.grad.copy_from(g0);
  ref.backward(rounded(dy), &skip);
  Tensor dtable_b = on_gpu(g0);
  gpu::embedding_backward(as_bf16_gpu(dy), ids, dtable_b, &skip);
  CHECK(bitwise_equal(on_cpu(dtable_b), ref.weight.grad));

  // more ids than a staging slot holds (16 Ki): the tables take the device-tensor path
  std::vector<std::int64_t> many(20000);
  for (std::size_t r = 0; r < many.size(); ++r) many[r] = std::int64_t((r * 7919) % std::size_t(V));
  nn::Embedding<> big("big", V, H);
  big.weight.value.copy_from(emb.weight.value);
  const Tensor y_big = big.forward(many);
  const Tensor dy_big = randn({std::int64_t(many.size()), H}, rng);
  big.backward(dy_big);
  Tensor yg_big = poisoned({std::int64_t(many.size()), H});
  gpu::embedding_forward(table, many, yg_big);
  CHECK(bitwise_equal(on_cpu(yg_big), y_big));
  Tensor dg_big = gpu_zeros({V, H});
  gpu::embedding_backward(on_gpu(dy_big), many, dg_big);
  CHECK(bitwise_equal(on_cpu(dg_big), big.weight.grad));

  // errors name the position and the shapes
  Tensor y3 = poisoned({3, H});
  CHECK_THROWS_WITH_AS(gpu::embedding_forward(table, {1, 2, 37}, y3), doctest::Contains("token id 37 at position 2"),
                       Error);
  Tensor small = gpu_zeros({V, H + 1});
  CHECK_THROWS_WITH_AS(gpu::embedding_backward(on_gpu(dy), ids, small), doctest::Contains("dtable"), Error);
}

// =================================================================================================================
int main(int argc, char** argv) { return cumo::test::run_cuda_tests(argc, argv, "cuda layer tests", g_seed); }
