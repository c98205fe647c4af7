// The CPU backend's kernels against plain double-precision references: the GEMM engine the build links (oneDNN or
// Eigen), the vectorised activations, attention's softmax (causal rows rounded up to whole packets, padding keys, a
// KV cache's past), RoPE's position table, the eight-lane double sums and the one-loop gradient norm / AdamW.
// Tolerances: fp32 products of length k accumulate ~√k·2^-24 relative error; the references are exact in double.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cumo/backend/cpu.hpp"
#include "cumo/core.hpp"

using namespace cumo;

namespace {

Tensor randn(Shape s, Rng& rng, float scale = 1.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, 0.f, scale);
  return t;
}

// max |a − b| / max |b| over two same-sized buffers.
double rel_max(const float* a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return den > 0 ? num / den : num;
}

}  // namespace

TEST_CASE("cpu gemm: every transpose, beta 0 / 1 / 0.5, strided operands and k = 0 match a double reference") {
  Rng rng(11);
  for (const auto& [m, n, k] : {std::array<std::int64_t, 3>{37, 29, 70}, {1, 17, 5}, {64, 1, 300}, {5, 7, 0}}) {
    for (cpu::Op oa : {cpu::Op::N, cpu::Op::T})
      for (cpu::Op ob : {cpu::Op::N, cpu::Op::T})
        for (float beta : {0.f, 1.f, 0.5f}) {
          const int ta = int(oa), tb = int(ob);
          CAPTURE(m);
          CAPTURE(n);
          CAPTURE(k);
          CAPTURE(ta);
          CAPTURE(tb);
          CAPTURE(beta);
          // stored A: (m, k) or (k, m), B: (k, n) or (n, k), each with 3 spare columns (row stride > width)
          const std::int64_t ar = oa == cpu::Op::N ? m : k, ac = oa == cpu::Op::N ? k : m;
          const std::int64_t br = ob == cpu::Op::N ? k : n, bc = ob == cpu::Op::N ? n : k;
          const Tensor a = randn({ar, ac + 3}, rng), b = randn({br, bc + 3}, rng);
          Tensor c = randn({m, n + 3}, rng);
          std::vector<double> ref(std::size_t(m * n));
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) {
              double s = 0;
              for (std::int64_t p = 0; p < k; ++p) {
                const double av = oa == cpu::Op::N ? a.at<float>(i, p) : a.at<float>(p, i);
                const double bv = ob == cpu::Op::N ? b.at<float>(p, j) : b.at<float>(j, p);
                s += av * bv;
              }
              ref[std::size_t(i * n + j)] = 1.5 * s + (beta == 0.f ? 0.0 : double(beta) * c.at<float>(i, j));
            }
          const Tensor spare = c.clone();
          cpu::gemm(oa, ob, m, n, k, 1.5f, a.data<float>(), ac + 3, b.data<float>(), bc + 3, beta, c.data<float>(),
                    n + 3);
          std::vector<float> got(std::size_t(m * n));
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < n; ++j) got[std::size_t(i * n + j)] = c.at<float>(i, j);
          CHECK(rel_max(got.data(), ref) < 1e-5);
          for (std::int64_t i = 0; i < m; ++i)  // the spare columns are never written
            for (std::int64_t j = n; j < n + 3; ++j) CHECK(c.at<float>(i, j) == spare.at<float>(i, j));
        }
  }
}

TEST_CASE("cpu linear: the bias written first and the product accumulated onto it equals x·Wᵀ + b (and + beta·y)") {
  Rng rng(12);
  const Tensor x = randn({45, 33}, rng), w = randn({21, 33}, rng), b = randn({21}, rng);
  for (float beta : {0.f, 1.f}) {
    CAPTURE(beta);
    Tensor y = randn({45, 21}, rng);
    std::vector<double> ref(45 * 21);
    for (int i = 0; i < 45; ++i)
      for (int j = 0; j < 21; ++j) {
        double s = b.data<float>()[j] + (beta != 0.f ? double(y.at<float>(i, j)) : 0.0);
        for (int p = 0; p < 33; ++p) s += double(x.at<float>(i, p)) * w.at<float>(j, p);
        ref[std::size_t(i * 21 + j)] = s;
      }
    cpu::linear(x, w, &b, y, beta);
    CHECK(rel_max(y.data<float>(), ref) < 1e-5);
  }
}

TEST_CASE("cpu activations: the vectorised forms match the scalar Act::f / Act::df (exp ≤ 1.2e-7, erf ≤ 3.3e-7 rel)") {
  std::vector<float> x;
  for (int i = -4000; i <= 4000; ++i) x.push_back(float(i) * 0.005f);  // [-20, 20]
  x.push_back(std::numeric_limits<float>::infinity());
  x.push_back(-std::numeric_limits<float>::infinity());
  auto check = [&](auto act, const char* name) {
    using Act = decltype(act);
    CAPTURE(name);
    double worst_f = 0, worst_df = 0;
    for (std::size_t o = 0; o < x.size(); o += cpu::kActChunk) {
      const std::int64_t n = std::min<std::int64_t>(cpu::kActChunk, std::int64_t(x.size() - o));
      std::vector<float> f(static_cast<std::size_t>(n)), df(static_cast<std::size_t>(n));
      cpu::VectorActivation<Act>::eval(x.data() + o, n, f.data(), df.data());
      for (std::int64_t i = 0; i < n; ++i) {
        const float xi = x[o + std::size_t(i)];
        const float sf = Act::f(xi), sdf = Act::df(xi);
        if (!std::isfinite(xi)) {  // ±∞: the limits, or NaN where the scalar form gives NaN too (∞·0)
          CHECK((std::isnan(sf) ? std::isnan(f[std::size_t(i)]) : f[std::size_t(i)] == sf));
          continue;
        }
        // absolute error against the scale of x: f and df are O(|x|) and O(1); a wrong term is off by O(0.1)
        worst_f = std::max(worst_f, std::fabs(double(f[std::size_t(i)]) - sf) / (1.0 + std::fabs(xi)));
        worst_df = std::max(worst_df, std::fabs(double(df[std::size_t(i)]) - sdf) / (1.0 + std::fabs(xi)));
      }
    }
    CHECK(worst_f < 2e-6);
    CHECK(worst_df < 2e-6);
  };
  check(QuickGELU{}, "quick_gelu");
  check(SiLU{}, "silu");
  check(GELU{}, "gelu");
  check(GELUTanh{}, "gelu_tanh");
  check(ReLU{}, "relu (the scalar fallback)");
}

TEST_CASE("cpu activations: chunked loops cover every element, in place and across chunk boundaries") {
  Rng rng(13);
  const std::int64_t rows = 7, width = 301;  // 2107 elements: four full chunks and a tail
  const Tensor h = randn({rows + 2, width}, rng, 3.f);
  Tensor a = Tensor::full<float>({rows + 2, width}, std::nanf(""));
  cpu::activation_forward<QuickGELU>(h, rows, a);
  for (std::int64_t i = 0; i < rows * width; ++i)
    CHECK(a.data<float>()[i] == doctest::Approx(QuickGELU::f(h.data<float>()[i])).epsilon(1e-5));
  CHECK(std::isnan(a.data<float>()[rows * width]));  // rows past `rows` are left alone
  Tensor d = randn({rows + 2, width}, rng);
  const Tensor d0 = d.clone();
  cpu::activation_backward<QuickGELU>(h, d, rows, d);  // in place, as nn::DenseMLP calls it
  for (std::int64_t i = 0; i < rows * width; ++i)
    CHECK(d.data<float>()[i] == doctest::Approx(d0.data<float>()[i] * QuickGELU::df(h.data<float>()[i]))
                                    .epsilon(1e-5)
                                    .scale(std::fabs(d0.data<float>()[i])));  // df is O(1): error ∝ |da|

  // SwiGLU from one fused [gate | up] buffer and from two buffers
  const std::int64_t F = 600;
  const Tensor hgu = randn({rows, 2 * F}, rng, 2.f), da = randn({rows, F}, rng);
  Tensor ag = Tensor::empty({rows, F}), dh = Tensor::empty({rows, 2 * F});
  cpu::glu_forward<SiLU>(hgu, rows, ag);
  cpu::glu_backward<SiLU>(hgu, da, rows, dh);
  Tensor gate = Tensor::empty({rows, F}), up = Tensor::empty({rows, F});
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < F; ++j) {
      const float g = hgu.at<float>(r, j), u = hgu.at<float>(r, F + j), dj = da.at<float>(r, j);
      gate.at<float>(r, j) = g, up.at<float>(r, j) = u;
      // errors relative to the factors' sizes: f(g)/g and df(g) are O(1), and df crosses 0 near g = −1.28
      CHECK(ag.at<float>(r, j) == doctest::Approx(SiLU::f(g) * u).epsilon(1e-5).scale(std::fabs(g * u)));
      CHECK(dh.at<float>(r, j) == doctest::Approx(dj * u * SiLU::df(g)).epsilon(1e-5).scale(std::fabs(dj * u)));
      CHECK(dh.at<float>(r, F + j) == doctest::Approx(dj * SiLU::f(g)).epsilon(1e-5).scale(std::fabs(dj * g)));
    }
  Tensor a2 = Tensor::empty({rows, F}), dg = Tensor::empty({rows, F}), du = Tensor::empty({rows, F});
  cpu::gated_forward<SiLU>(gate, up, a2);
  cpu::gated_backward<SiLU>(gate, up, da, dg, du);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < F; ++j) {
      CHECK(a2.at<float>(r, j) == ag.at<float>(r, j));
      CHECK(dg.at<float>(r, j) == dh.at<float>(r, j));
      CHECK(du.at<float>(r, j) == dh.at<float>(r, F + j));
    }
}

TEST_CASE("cpu attention: causal rows, a KV cache's past, padding keys and a fully masked query match a double "
          "reference") {
  Rng rng(14);
  backend::AttentionShape s;
  s.batch = 2, s.q_len = 23, s.kv_len = 37, s.heads = 4, s.kv_heads = 2, s.head_dim = 8, s.causal = true;
  const std::int64_t B = s.batch, Tq = s.q_len, S = s.S(), H = s.heads, G = s.G(), D = s.head_dim;
  const Tensor q = randn({B * Tq, H * D}, rng), k = randn({B * S, G * D}, rng), v = randn({B * S, G * D}, rng);
  Tensor valid = Tensor::empty({B * S}, DType::i32);
  for (std::int64_t i = 0; i < B * S; ++i) valid.data<std::int32_t>()[i] = (i % 5 == 3) ? 0 : 1;
  for (std::int64_t j = 0; j < S; ++j) valid.data<std::int32_t>()[S + j] = j >= 20 ? 1 : 0;  // seq 1: keys < 20 off
  Tensor out = Tensor::full<float>({B * Tq, H * D}, std::nanf("")), probs;
  cpu::attention_forward(q, k, v, &valid, s, out, &probs);
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> ref(std::size_t(B * Tq * H * D), 0.0);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < Tq; ++i) {
        std::vector<double> p(std::size_t(S), 0.0);
        double mx = -INFINITY;
        for (std::int64_t j = 0; j < S; ++j) {
          if (j > s.past() + i || !valid.data<std::int32_t>()[b * S + j]) continue;
          double dot = 0;
          for (std::int64_t d = 0; d < D; ++d)
            dot += double(q.at<float>(b * Tq + i, h * D + d)) * k.at<float>(b * S + j, (h / (H / G)) * D + d);
          p[std::size_t(j)] = dot * scale;
          mx = std::max(mx, dot * scale);
        }
        if (mx == -INFINITY) continue;  // seq 1's first queries see no key: output 0
        double sum = 0;
        for (std::int64_t j = 0; j < S; ++j)
          if (j <= s.past() + i && valid.data<std::int32_t>()[b * S + j]) sum += (p[std::size_t(j)] = std::exp(p[std::size_t(j)] - mx));
          else p[std::size_t(j)] = 0;
        for (std::int64_t j = 0; j < S; ++j)
          for (std::int64_t d = 0; d < D; ++d)
            ref[std::size_t((b * Tq + i) * H * D + h * D + d)] +=
                p[std::size_t(j)] / sum * v.at<float>(b * S + j, (h / (H / G)) * D + d);
        for (std::int64_t j = 0; j < S; ++j)  // the saved probabilities, masked keys exactly 0
          CHECK(probs.data<float>()[((b * H + h) * Tq + i) * S + j] == doctest::Approx(p[std::size_t(j)] / sum).epsilon(1e-5).scale(1e-6));
      }
  CHECK(rel_max(out.data<float>(), ref) < 1e-5);
  // seq 1, query 0 (position past + 0 = 14) sees keys 0…14, all padding: a zero row of output and of P
  for (std::int64_t d = 0; d < H * D; ++d) CHECK(out.at<float>(Tq, d) == 0.f);
}

TEST_CASE("cpu rope: the position table equals the per-row rotation, for batch positions and a KV cache's late ones") {
  Rng rng(15);
  const std::int64_t heads = 3, half = 4, D = 2 * half;
  Tensor inv = Tensor::empty({half});
  for (std::int64_t i = 0; i < half; ++i) inv.data<float>()[i] = float(std::pow(10000.0, -2.0 * i / double(D)));
  for (bool late : {false, true}) {
    CAPTURE(late);
    const std::int64_t N = 10;
    Tensor pos = Tensor::empty({N}, DType::i32);
    for (std::int64_t r = 0; r < N; ++r) pos.data<std::int32_t>()[r] = std::int32_t(late ? 500 + r : r % 5);
    const Tensor x = randn({N, heads * D}, rng);
    Tensor y = Tensor::empty({N, heads * D});
    cpu::rope(x, pos, inv, heads, false, y);
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < half; ++i) {
          const float ang = inv.data<float>()[i] * float(pos.data<std::int32_t>()[r]);
          const float a = x.at<float>(r, h * D + i), b = x.at<float>(r, h * D + i + half);
          CHECK(y.at<float>(r, h * D + i) == doctest::Approx(a * std::cos(ang) - b * std::sin(ang)).epsilon(1e-6).scale(1e-6));
          CHECK(y.at<float>(r, h * D + i + half) == doctest::Approx(b * std::cos(ang) + a * std::sin(ang)).epsilon(1e-6).scale(1e-6));
        }
    Tensor back = y.clone();
    cpu::rope(back, pos, inv, heads, true, back);  // the inverse rotation, in place
    for (std::int64_t e = 0; e < x.numel(); ++e)  // (c² + s² = 1 up to fp32 rounding: error relative to |x| ~ 1)
      CHECK(back.data<float>()[e] == doctest::Approx(x.data<float>()[e]).epsilon(1e-6).scale(1.0));
  }
}

TEST_CASE("cpu sum8 and grad_norm: eight-lane double sums match a long-double reference, many tensors in one loop") {
  Rng rng(16);
  for (std::int64_t n : {0, 1, 7, 8, 9, 1000, 70001}) {
    CAPTURE(n);
    const Tensor t = randn({std::max<std::int64_t>(n, 1)}, rng);
    long double ref = 0;
    for (std::int64_t i = 0; i < n; ++i) ref += (long double)(t.data<float>()[i]) * t.data<float>()[i];
    const double s = cpu::sum8(n, [&](std::int64_t i) { return double(t.data<float>()[i]) * t.data<float>()[i]; });
    CHECK(s == doctest::Approx(double(ref)).epsilon(double(n + 1) * 0x1p-53));  // n additions of positive terms
  }
  std::vector<Tensor> grads;  // a 3-element bias, a norm weight, a 2.5-chunk matrix, …
  for (std::int64_t n : {3, 64, 163840, 1, 4096}) grads.push_back(randn({n}, rng, 0.1f));
  long double ss = 0;
  for (const Tensor& g : grads)
    for (std::int64_t i = 0; i < g.numel(); ++i) ss += (long double)(g.data<float>()[i]) * g.data<float>()[i];
  const float norm = cpu::grad_norm(grads).data<float>()[0];
  CHECK(norm == doctest::Approx(double(std::sqrt(ss))).epsilon(1e-7));
  const Tensor r = cpu::clip_grad_norm(grads, 0.5 * double(norm));
  CHECK(r.data<float>()[0] == norm);
  CHECK(cpu::grad_norm(grads).data<float>()[0] == doctest::Approx(0.5 * double(norm)).epsilon(1e-6));
}

TEST_CASE("cpu add_column_sums: register-blocked column sums equal the row-ordered fp32 sums bit for bit") {
  Rng rng(17);
  for (std::int64_t cols : {1, 16, 37, 128}) {  // a tail-only width, one block, two blocks + a 5-column tail, eight
    for (std::int64_t rows : {0, 1, 50, 1857}) {
      CAPTURE(cols);
      CAPTURE(rows);
      const Tensor x = randn({std::max<std::int64_t>(rows, 1), cols}, rng);
      const Tensor start = randn({cols}, rng);  // the sums add onto what the gradient holds already
      std::vector<float> ref(start.data<float>(), start.data<float>() + cols);
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < cols; ++j) ref[std::size_t(j)] += x.data<float>()[r * cols + j] * 0.5f;
      std::vector<float> out(start.data<float>(), start.data<float>() + cols);
      cpu::add_column_sums(cols, rows, out.data(),
                           [&](std::int64_t r, std::int64_t j) { return x.data<float>()[r * cols + j] * 0.5f; });
      CHECK(out == ref);
    }
  }
}

// grouped_gemm.hpp runs the groups one per thread when there are two per thread, else one after another with each
// product threaded (and always one per thread on one thread): that choice depends on the thread count, so the
// products must not — with oneDNN's sgemm every element of a GEMM call is computed the same way whichever threads
// run it: bitwise. Eigen's own kernel chooses its blocking from the thread count, so a product it threads may sum K
// in other blocks (seen: the weight gradient at 4 threads): there the test holds them to 1e-5 relative. Groups of
// 64 … 520 rows, work above the 4-MFLOP rule: 4 groups take the threaded-products path at 4 and 8 threads and the
// per-thread path at 1 and 2; 8 groups the per-thread path at 1, 2, 4 and the threaded one at 8.
TEST_CASE("cpu grouped_linear: forward, input and weight gradients do not depend on the thread count (1, 2, 4, 8)") {
#if defined(_OPENMP)
  Rng rng(23);
  const std::int64_t N = 192, K = 256;
  for (const std::vector<std::int64_t>& rows : {std::vector<std::int64_t>{520, 64, 300, 97},
                                                std::vector<std::int64_t>{64, 130, 64, 200, 77, 64, 150, 90}}) {
    const std::int64_t E = std::int64_t(rows.size());
    std::vector<std::int64_t> off{0};
    for (std::int64_t r : rows) off.push_back(off.back() + r);
    const std::int64_t T = off.back();
    const Tensor a = randn({T, K}, rng), w = randn({E, N, K}, rng, 0.1f), bias = randn({E, N}, rng);
    const Tensor dc = randn({T, N}, rng);
    struct Out {
      Tensor c, da, dw, db;
    };
    auto run = [&](int threads) {
      const int before = omp_get_max_threads();
      omp_set_num_threads(threads);
      Out o{Tensor::empty({T, N}), Tensor::empty({T, K}), Tensor::zeros({E, N, K}), Tensor::zeros({E, N})};
      cpu::grouped_linear(a, w, &bias, off, o.c);
      cpu::grouped_linear_dinput(dc, w, off, o.da);
      cpu::grouped_linear_dweight(dc, a, off, o.dw, &o.db);
      omp_set_num_threads(before);
      return o;
    };
    const Out one = run(1);
    // the forward against a double reference (fp32 products of K = 256 terms)
    std::vector<double> ref(std::size_t(T * N));
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t i = off[std::size_t(e)]; i < off[std::size_t(e) + 1]; ++i)
        for (std::int64_t j = 0; j < N; ++j) {
          double s = bias.data<float>()[e * N + j];
          for (std::int64_t k = 0; k < K; ++k)
            s += double(a.data<float>()[i * K + k]) * w.data<float>()[(e * N + j) * K + k];
          ref[std::size_t(i * N + j)] = s;
        }
    CHECK(rel_max(one.c.data<float>(), ref) < 1e-5);
    for (int threads : {2, 4, 8}) {
      CAPTURE(E);
      CAPTURE(threads);
      const Out o = run(threads);
      for (const auto& [got, want] : {std::pair{&o.c, &one.c}, {&o.da, &one.da}, {&o.dw, &one.dw}, {&o.db, &one.db}}) {
#if defined(CUMO_CPU_DNNL)
        CHECK(bitwise_equal(*got, *want));
#else
        CHECK(rel_max(got->data<float>(), std::vector<double>(want->data<float>(), want->data<float>() + want->numel())) <
              1e-5);
#endif
      }
    }
  }
#else
  MESSAGE("built without OpenMP: one thread only, nothing to compare");
#endif
}
