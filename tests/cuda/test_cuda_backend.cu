// backend::Cuda against backend::Cpu (the reference), op by op and for the whole SparseMoE block, forward and
// backward, on fresh random inputs (the seed is printed; CUMO_TEST_SEED=<n> repeats a run). fp32 must agree to a
// relative error ‖gpu − cpu‖ / ‖cpu‖ ≤ 1e-5, bf16/f16 storage to ≤ 1e-2 against the CPU on the same rounded
// inputs; indices and plans must agree exactly; two GPU runs must agree bitwise. Outputs are NaN-poisoned before
// a kernel runs, so an element it forgets to write fails the comparison.
//
// Without a usable GPU the binary prints "SKIPPED: no CUDA device (...)" and exits 77, which ctest reports as
// skipped. `--host-only` runs just the suite "host" (the workspace allocator's bookkeeping), which needs no GPU.
#include <algorithm>
#include <cmath>
#include <functional>
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
#include "cumo/core/compare.hpp"
#include "cumo/moe.hpp"
#include "cumo/nn/linear.hpp"

using namespace cumo;

namespace {

std::uint64_t g_seed = 0;

constexpr double kF32 = 1e-5;  // fp32 tolerance of the issue
constexpr double kLow = 1e-2;  // bf16 / f16 storage

// ---- helpers -----------------------------------------------------------------------------------------------------
Tensor randn(Shape s, Rng& rng, float scale = 1.f) {
  Tensor t = Tensor::empty(s);
  rng.fill_normal(t, 0.f, scale);
  return t;
}
using test::on_cpu;
using test::on_gpu;
using test::poisoned;
// fp32 values rounded through a 16-bit dtype, as fp32 (the CPU reference input for bf16/f16 kernels).
Tensor rounded(const Tensor& t, DType low) { return t.to(low).to(DType::f32); }

void expect_close(const std::string& what, const Tensor& got, const Tensor& want, double tol) {
  const double e = rel_error(got, want);
  CHECK_MESSAGE(e <= tol, what, ": relative error ", e, " exceeds ", tol);
}
void expect_equal_i32(const std::string& what, const Tensor& got, const Tensor& want) {
  const Tensor a = on_cpu(got), b = want.device() == Device::cpu ? want.contiguous() : on_cpu(want);
  REQUIRE(a.numel() == b.numel());
  std::int64_t bad = 0, first = -1;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    if (a.data<std::int32_t>()[i] != b.data<std::int32_t>()[i]) {
      if (first < 0) first = i;
      ++bad;
    }
  CHECK_MESSAGE(bad == 0, what, ": ", bad, " of ", a.numel(), " entries differ (first at ", first, ")");
}

// The backend instance the op tests call (its options are its own: a test sets them with with_options).
const backend::Cuda& dev() {
  static const backend::Cuda b;
  return b;
}
// Restores dev()'s options when a test leaves.
struct OptionsGuard {
  gpu::Options saved = dev().options();
  ~OptionsGuard() { dev().set_options(saved); }
};
template <class F>
void with_options(F&& f) {
  gpu::Options o = dev().options();
  f(o);
  dev().set_options(o);
}

DispatchPlan new_plan(std::int64_t T, int K, int E, std::int64_t capacity, Device d) {
  DispatchPlan p;
  p.tokens = T;
  p.top_k = K;
  p.experts = E;
  p.capacity = capacity;
  p.demand = Tensor::empty({E}, DType::i32, d);
  p.counts = Tensor::empty({E}, DType::i32, d);
  p.offsets = Tensor::empty({E + 1}, DType::i32, d);
  p.row_of_slot = Tensor::empty({T * K}, DType::i32, d);
  p.slot_of_row = Tensor::empty({T * K}, DType::i32, d);
  return p;
}
// The CPU plan, moved to the GPU (so a kernel can be tested apart from make_plan).
DispatchPlan to_gpu(const DispatchPlan& c) {
  DispatchPlan g = c;
  g.demand = on_gpu(c.demand);
  g.counts = on_gpu(c.counts);
  g.offsets = on_gpu(c.offsets);
  g.row_of_slot = on_gpu(c.row_of_slot);
  g.slot_of_row = on_gpu(c.slot_of_row);
  return g;
}

// Router-like choices (T, K): K distinct experts per token, drawn from the first `hot` experts only when hot > 0
// (so the others get no rows: empty groups).
Tensor random_idx(std::int64_t T, int K, int E, Rng& rng, int hot = 0) {
  const int range = hot > 0 ? hot : E;
  REQUIRE(K <= range);
  Tensor idx = Tensor::empty({T, K}, DType::i32);
  std::vector<int> pool(std::size_t(range), 0);
  for (std::int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < range; ++e) pool[std::size_t(e)] = e;
    for (int k = 0; k < K; ++k) {
      const int j = k + int(rng.next_u32() % std::uint32_t(range - k));
      std::swap(pool[std::size_t(k)], pool[std::size_t(j)]);
      idx.at<std::int32_t>(t, k) = pool[std::size_t(k)];
    }
  }
  return idx;
}

// The smallest gap between consecutive probabilities among each token's K+1 largest (probs: CPU (T, E)). Two
// backends round a softmax differently in the last bit, so a near tie may be broken differently by each — a
// legitimate difference that the top-k comparisons avoid by redrawing such inputs.
double min_topk_gap(const Tensor& probs, int K) {
  const std::int64_t T = probs.size(0), E = probs.size(1);
  double gap = 1.0;
  std::vector<float> row(std::size_t(E), 0.f);
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t e = 0; e < E; ++e) row[std::size_t(e)] = probs.at<float>(t, e);
    std::sort(row.begin(), row.end(), std::greater<float>());
    for (int k = 0; k < K && k + 1 < E; ++k) gap = std::min(gap, double(row[std::size_t(k)] - row[std::size_t(k + 1)]));
  }
  return gap;
}

const char* algo_name(gpu::GroupedGemm a) {
  switch (a) {
    case gpu::GroupedGemm::automatic: return "automatic";
    case gpu::GroupedGemm::per_expert: return "per_expert";
    case gpu::GroupedGemm::grouped_batched: return "grouped_batched";
    case gpu::GroupedGemm::device_offsets: return "device_offsets";
  }
  return "?";
}

}  // namespace

// =================================================================================================================
// host: the workspace's first-fit bookkeeping (no GPU needed)
// =================================================================================================================
TEST_SUITE("host") {
  TEST_CASE("workspace layout: first fit, 256-byte blocks, freed neighbours merge") {
    gpu::ArenaLayout l(4096);
    const auto a = l.allocate(1), b = l.allocate(300), c = l.allocate(256);
    CHECK(a == 0);
    CHECK(b == 256);
    CHECK(c == 768);
    CHECK(l.high_water() == 1024);
    l.release(b);
    CHECK(l.allocate(200) == 256);  // the first hole that fits
    l.release(256);
    l.release(a);
    l.release(c);
    CHECK(l.live_blocks() == 0);
    CHECK(l.free_blocks() == 1);  // everything merged back into one block
    CHECK(l.allocate(4096) == 0);
    CHECK(l.allocate(1) == gpu::ArenaLayout::npos);
  }

  TEST_CASE("workspace layout: replaying a request sequence stays inside the measured high water") {
    std::mt19937_64 gen(g_seed);
    std::vector<std::pair<bool, std::size_t>> ops;  // (allocate?, bytes or index of the block to free)
    std::vector<std::size_t> live;
    gpu::ArenaLayout measure;  // unbounded
    std::vector<std::size_t> offsets_measured;
    for (int i = 0; i < 2000; ++i) {
      if (live.empty() || gen() % 3 != 0) {
        const std::size_t bytes = 1 + gen() % 100000;
        ops.push_back({true, bytes});
        live.push_back(measure.allocate(bytes));
        offsets_measured.push_back(live.back());
      } else {
        const std::size_t j = gen() % live.size();
        ops.push_back({false, j});
        measure.release(live[j]);
        live.erase(live.begin() + std::ptrdiff_t(j));
      }
    }
    gpu::ArenaLayout replay(measure.high_water());  // exactly the measured size
    live.clear();
    std::size_t k = 0;
    for (const auto& [alloc, v] : ops) {
      if (alloc) {
        const std::size_t off = replay.allocate(v);
        REQUIRE(off != gpu::ArenaLayout::npos);
        CHECK(off == offsets_measured[k++]);
        live.push_back(off);
      } else {
        replay.release(live[v]);
        live.erase(live.begin() + std::ptrdiff_t(v));
      }
    }
  }
}

// =================================================================================================================
// dense pieces
// =================================================================================================================
TEST_CASE("cuda linear, linear_dinput, linear_dweight match the CPU (fp32, strided rows)") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t M = 37, K = 24, N = 7;
  Tensor xw = randn({M, K + 5}, rng);
  Tensor x = xw.slice(1, 0, K);  // row stride K + 5: the router may read a strided view
  Tensor w = randn({N, K}, rng), dy = randn({M, N}, rng);
  Tensor y = Tensor::empty({M, N});
  backend::Cpu::linear(x, w, nullptr, y);
  Tensor yg = poisoned({M, N});
  Tensor xwg = on_gpu(xw);
  gpu::linear(xwg.slice(1, 0, K), on_gpu(w), yg);  // the strided router GEMM
  expect_close("linear", yg, y, kF32);

  for (bool acc : {false, true}) {
    Tensor dx0 = randn({M, K}, rng);
    Tensor dx = dx0.clone(), dxg = on_gpu(dx0);
    backend::Cpu::linear_dinput(dy, w, dx, acc);
    dev().linear_dinput(on_gpu(dy), on_gpu(w), dxg, acc);
    expect_close(acc ? "linear_dinput (accumulate)" : "linear_dinput", dxg, dx, kF32);
  }
  Tensor dw0 = randn({N, K}, rng);
  Tensor dw = dw0.clone(), dwg = on_gpu(dw0);
  backend::Cpu::linear_dweight(dy, x, dw);
  dev().linear_dweight(on_gpu(dy), xwg.slice(1, 0, K), dwg);
  expect_close("linear_dweight", dwg, dw, kF32);
}

TEST_CASE("cuda linear in bf16 and f16 with an fp32 output matches the CPU on rounded inputs") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t M = 64, K = 96, N = 8;
  Tensor x = randn({M, K}, rng), w = randn({N, K}, rng, 0.1f);
  for (DType low : {DType::bf16, DType::f16}) {
    Tensor y = Tensor::empty({M, N});
    backend::Cpu::linear(rounded(x, low), rounded(w, low), nullptr, y);
    Tensor yg = poisoned({M, N});
    gpu::linear(on_gpu(x.to(low)), on_gpu(w.to(low)), yg);
    expect_close(std::string("linear ") + std::string(name_of(low)), yg, y, kLow);
  }
}

TEST_CASE("cuda multiply, add, all_finite and item match the CPU") {
  Rng rng(g_seed + __LINE__);
  Tensor a = randn({33, 17}, rng), b = randn({33, 17}, rng);
  Tensor m = Tensor::empty(a.shape()), s = Tensor::empty(a.shape());
  backend::Cpu::multiply(a, b, m);
  backend::Cpu::add(a, b, s);
  Tensor mg = poisoned(a.shape()), sg = poisoned(a.shape());
  dev().multiply(on_gpu(a), on_gpu(b), mg);
  dev().add(on_gpu(a), on_gpu(b), sg);
  CHECK(bitwise_equal(mg, m));
  CHECK(bitwise_equal(sg, s));
  Tensor ag = on_gpu(a);
  dev().multiply(ag, on_gpu(b), ag);  // in place, as the router's backward does
  CHECK(bitwise_equal(ag, m));

  CHECK(dev().all_finite(on_gpu(a)));
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Tensor c = a.clone();
    c.at<float>(32, 16) = bad;
    CHECK_FALSE(dev().all_finite(on_gpu(c)));
  }
  CHECK(dev().item(on_gpu(a)) == a.data<float>()[0]);
}

TEST_CASE("cuda fill_uniform draws the CPU's numbers bitwise and advances the generator alike") {
  const std::uint64_t seed = g_seed + __LINE__;
  Rng rc(seed), rg(seed);
  rc.next_u32();  // a non-zero counter
  rg.next_u32();
  for (int round = 0; round < 2; ++round) {
    Tensor c = Tensor::empty({1000, 3});
    Tensor g = poisoned({1000, 3});
    backend::Cpu::fill_uniform(c, rc, 0.9f, 1.1f);
    dev().fill_uniform(g, rg, 0.9f, 1.1f);
    CHECK(bitwise_equal(g, c));
    CHECK(rc.state().counter == rg.state().counter);
  }
}

// =================================================================================================================
// router
// =================================================================================================================
TEST_CASE("cuda softmax_topk matches the CPU: probabilities, indices (exactly), weights") {
  Rng rng(g_seed + __LINE__);
  struct Case {
    std::int64_t T;
    int E, K;
  };
  for (Case c : {Case{37, 8, 1}, Case{37, 8, 2}, Case{64, 4, 4}, Case{50, 40, 3}, Case{129, 128, 8}})
    for (bool renorm : {true, false}) {
      CAPTURE(c.T);
      CAPTURE(c.E);
      CAPTURE(c.K);
      CAPTURE(renorm);
      Tensor z, p = Tensor::empty({c.T, c.E}), w = Tensor::empty({c.T, c.K});
      Tensor idx = Tensor::empty({c.T, c.K}, DType::i32);
      do {  // no near ties (see min_topk_gap)
        z = randn({c.T, c.E}, rng, 2.f);
        backend::Cpu::softmax_topk(z, p, idx, w, renorm);
      } while (min_topk_gap(p, c.K) < 1e-6);
      Tensor pg = poisoned({c.T, c.E}), wg = poisoned({c.T, c.K}), idxg = poisoned({c.T, c.K}, DType::i32);
      dev().softmax_topk(on_gpu(z), pg, idxg, wg, renorm);
      expect_close("probs", pg, p, kF32);
      expect_equal_i32("topk idx", idxg, idx);
      expect_close("topk w", wg, w, kF32);
    }
}

TEST_CASE("cuda topk_weights_backward and softmax_backward match the CPU") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t T = 45;
  const int E = 12, K = 3;
  Tensor z = randn({T, E}, rng, 2.f);
  Tensor p = Tensor::empty({T, E}), w = Tensor::empty({T, K});
  Tensor idx = Tensor::empty({T, K}, DType::i32);
  for (bool renorm : {true, false}) {
    CAPTURE(renorm);
    backend::Cpu::softmax_topk(z, p, idx, w, renorm);
    Tensor dw = randn({T, K}, rng), dp0 = randn({T, E}, rng), dz0 = randn({T, E}, rng);
    Tensor dp = dp0.clone(), dpg = on_gpu(dp0);
    backend::Cpu::topk_weights_backward(p, idx, w, dw, renorm, dp);
    dev().topk_weights_backward(on_gpu(p), on_gpu(idx), on_gpu(w), on_gpu(dw), renorm, dpg);
    expect_close("topk_weights_backward", dpg, dp, kF32);
    Tensor dz = dz0.clone(), dzg = on_gpu(dz0);
    backend::Cpu::softmax_backward(p, dp, dz);
    dev().softmax_backward(on_gpu(p), on_gpu(dp), dzg);
    expect_close("softmax_backward", dzg, dz, kF32);
  }
}

TEST_CASE("cuda aux_losses and aux_losses_backward match the CPU (segments, both countings)") {
  Rng rng(g_seed + __LINE__);
  struct Case {
    std::int64_t T, S;
    int E, K;
  };
  for (Case c : {Case{64, 1, 8, 2}, Case{96, 4, 8, 2}, Case{300, 3, 128, 8}, Case{130, 1, 4, 1}}) {
    CAPTURE(c.T);
    CAPTURE(c.S);
    CAPTURE(c.E);
    Tensor z = randn({c.T, c.E}, rng, 2.f);
    Tensor p = Tensor::empty({c.T, c.E}), w = Tensor::empty({c.T, c.K});
    Tensor idx = Tensor::empty({c.T, c.K}, DType::i32);
    backend::Cpu::softmax_topk(z, p, idx, w, true);
    AuxLosses lc{Tensor::zeros({1}), Tensor::zeros({1}), Tensor::zeros({1})};
    AuxLosses lg{poisoned({1}), poisoned({1}), poisoned({1})};
    backend::Cpu::aux_losses(z, p, idx, c.S, lc);
    dev().aux_losses(on_gpu(z), on_gpu(p), on_gpu(idx), c.S, lg);
    expect_close("balance_top1", lg.balance_top1, lc.balance_top1, kF32);
    expect_close("balance_allk", lg.balance_allk, lc.balance_allk, kF32);
    expect_close("z", lg.z, lc.z, kF32);
    for (BalanceCounts counting : {BalanceCounts::top1, BalanceCounts::all_k}) {
      const AuxLossWeights coef{0.1f, 0.01f};
      Tensor dp0 = randn({c.T, c.E}, rng, 0.01f), dz0 = randn({c.T, c.E}, rng, 0.01f);
      Tensor dp = dp0.clone(), dz = dz0.clone(), dpg = on_gpu(dp0), dzg = on_gpu(dz0);
      backend::Cpu::aux_losses_backward(z, p, idx, c.S, counting, coef, dp, dz);
      dev().aux_losses_backward(on_gpu(z), on_gpu(p), on_gpu(idx), c.S, counting, coef, dpg, dzg);
      expect_close("aux dprobs", dpg, dp, kF32);
      expect_close("aux dlogits", dzg, dz, kF32);
    }
  }
}

// =================================================================================================================
// dispatch
// =================================================================================================================
TEST_CASE("cuda make_plan equals the CPU plan exactly (dropless and with capacity, empty experts, no-sync mode)") {
  Rng rng(g_seed + __LINE__);
  OptionsGuard guard;
  struct Case {
    std::int64_t T;
    int E, K, hot;
    std::int64_t capacity;
  };
  for (Case c : {Case{50, 8, 2, 0, -1}, Case{50, 8, 2, 3, -1}, Case{64, 4, 1, 0, 9}, Case{77, 8, 2, 5, 12},
                 Case{300, 128, 8, 0, -1}, Case{300, 128, 8, 40, 30}, Case{1, 1, 1, 0, -1}, Case{33, 300, 2, 0, 1}})
    for (bool host_offsets : {true, false}) {
      CAPTURE(c.T);
      CAPTURE(c.E);
      CAPTURE(c.K);
      CAPTURE(c.hot);
      CAPTURE(c.capacity);
      CAPTURE(host_offsets);
      with_options([&](gpu::Options& o) { o.plan_host_offsets = host_offsets; });
      Tensor idx = random_idx(c.T, c.K, c.E, rng, c.hot);
      DispatchPlan pc = new_plan(c.T, c.K, c.E, c.capacity, Device::cpu);
      cpu::make_plan(idx, pc);
      DispatchPlan pg = new_plan(c.T, c.K, c.E, c.capacity, Device::cuda);
      pg.row_of_slot = poisoned({c.T * c.K}, DType::i32);
      pg.slot_of_row = poisoned({c.T * c.K}, DType::i32);
      dev().make_plan(on_gpu(idx), pg);
      expect_equal_i32("demand", pg.demand, pc.demand);
      expect_equal_i32("counts", pg.counts, pc.counts);
      expect_equal_i32("offsets", pg.offsets, pc.offsets);
      expect_equal_i32("row_of_slot", pg.row_of_slot, pc.row_of_slot);
      const std::int64_t rows = pc.host_offsets.back();
      expect_equal_i32("slot_of_row", pg.slot_of_row.slice(0, 0, rows), pc.slot_of_row.slice(0, 0, rows));
      if (host_offsets)
        CHECK(pg.host_offsets == pc.host_offsets);
      else
        CHECK(pg.host_offsets.empty());
    }
}

TEST_CASE("cuda make_plan rejects expert ids outside [0, E)") {
  Tensor idx = Tensor::zeros({4, 2}, DType::i32);
  idx.at<std::int32_t>(2, 1) = 8;
  DispatchPlan pg = new_plan(4, 2, 8, -1, Device::cuda);
  CHECK_THROWS_WITH_AS(dev().make_plan(on_gpu(idx), pg), doctest::Contains("outside [0, 8)"), Error);
}

TEST_CASE("cuda gather_rows, combine, combine_backward, scatter_add_rows match the CPU (f32; bf16, f16 storage)") {
  Rng rng(g_seed + __LINE__);
  struct Case {
    std::int64_t T, H;
    int E, K, hot;
    std::int64_t capacity;
  };
  for (Case c : {Case{40, 16, 4, 2, 0, -1}, Case{40, 33, 8, 2, 3, 15}, Case{70, 64, 8, 1, 0, 5}, Case{20, 7, 4, 4, 0, -1}}) {
    CAPTURE(c.T);
    CAPTURE(c.H);
    CAPTURE(c.capacity);
    Tensor idx = random_idx(c.T, c.K, c.E, rng, c.hot);
    DispatchPlan pc = new_plan(c.T, c.K, c.E, c.capacity, Device::cpu);
    cpu::make_plan(idx, pc);
    const DispatchPlan pg = to_gpu(pc);
    const std::int64_t rows = pc.rows(), cap = c.T * c.K;
    Tensor x = randn({c.T, c.H}, rng), out = randn({cap, c.H}, rng), dy = randn({c.T, c.H}, rng);
    Tensor w = randn({c.T, c.K}, rng), dxs = randn({cap, c.H}, rng), dx0 = randn({c.T, c.H}, rng);

    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
      CAPTURE(name_of(dt));
      const double tol = dt == DType::f32 ? kF32 : kLow;
      auto ref = [&](const Tensor& t) { return dt == DType::f32 ? t : rounded(t, dt); };
      auto to_dev = [&](const Tensor& t) { return on_gpu(dt == DType::f32 ? t : t.to(dt)); };

      Tensor xs = Tensor::empty({cap, c.H});
      cpu::gather_rows(ref(x), pc, xs);
      Tensor xsg = poisoned({cap, c.H}, dt);
      dev().gather_rows(to_dev(x), pg, xsg);
      expect_close("gather_rows", xsg.slice(0, 0, rows), xs.slice(0, 0, rows), 0.0);  // a copy: exact

      Tensor y = Tensor::empty({c.T, c.H});
      cpu::combine(ref(out), w, pc, y);
      Tensor yg = poisoned({c.T, c.H}, dt);
      dev().combine(to_dev(out), on_gpu(w), pg, yg);
      expect_close("combine", yg, y, tol);

      Tensor dout = Tensor::empty({cap, c.H}), dw = Tensor::empty({c.T, c.K});
      cpu::combine_backward(ref(dy), ref(out), w, pc, dout, dw);
      Tensor doutg = poisoned({cap, c.H}, dt), dwg = poisoned({c.T, c.K});
      dev().combine_backward(to_dev(dy), to_dev(out), on_gpu(w), pg, doutg, dwg);
      // Rows of dropped slots are never written (by either backend); compare the kept rows.
      expect_close("combine_backward dout", doutg.slice(0, 0, rows), dout.slice(0, 0, rows), tol);
      expect_close("combine_backward dw", dwg, dw, tol);

      Tensor dx = ref(dx0).clone();
      cpu::scatter_add_rows(ref(dxs), pc, dx);
      Tensor dxg = to_dev(dx0);
      dev().scatter_add_rows(to_dev(dxs), pg, dxg);
      expect_close("scatter_add_rows", dxg, dx, tol);
    }
  }
}

// =================================================================================================================
// experts
// =================================================================================================================
TEST_CASE("cuda grouped_linear (+bias), dinput, dweight (+dbias) match the CPU for every GEMM path (and bf16 weights)") {
  Rng rng(g_seed + __LINE__);
  struct Case {
    std::int64_t T, N, K;
    int E, topk, hot;
  };
  for (Case c : {Case{40, 24, 16, 4, 2, 0}, Case{60, 70, 33, 8, 2, 5}, Case{200, 96, 130, 16, 4, 0}})
    for (gpu::GroupedGemm algo : {gpu::GroupedGemm::per_expert, gpu::GroupedGemm::grouped_batched,
                                  gpu::GroupedGemm::device_offsets})
      for (bool host_offsets : {true, false}) {
        if (!host_offsets && algo != gpu::GroupedGemm::device_offsets) continue;
        CAPTURE(c.T);
        CAPTURE(c.N);
        CAPTURE(c.K);
        CAPTURE(c.E);
        CAPTURE(algo_name(algo));
        CAPTURE(host_offsets);
        gpu::Options go;
        go.grouped_gemm = algo;
        Tensor idx = random_idx(c.T, c.topk, c.E, rng, c.hot);
        DispatchPlan pc = new_plan(c.T, c.topk, c.E, -1, Device::cpu);
        cpu::make_plan(idx, pc);
        DispatchPlan pg = to_gpu(pc);
        if (!host_offsets) pg.host_offsets.clear();
        const std::int64_t rows = pc.rows(), cap = c.T * c.topk;
        Tensor a = randn({cap, c.K}, rng), w = randn({c.E, c.N, c.K}, rng, 0.2f), bias = randn({c.E, c.N}, rng);
        Tensor dc = randn({cap, c.N}, rng);
        Tensor dw0 = randn({c.E, c.N, c.K}, rng), db0 = randn({c.E, c.N}, rng);

        for (DType dt : {DType::f32, DType::bf16}) {
          CAPTURE(name_of(dt));
          // The reference takes the same rounded inputs and sums in fp32. A bf16 output is then the reference
          // rounded once to nearest: ≤ 2^-9 relative per element, so ≤ 2^-9 in norm; 2^-8 leaves room for the
          // order of the fp32 sums. An fp32 output (the weight gradients) differs only by that order: kF32.
          const double tol = dt == DType::f32 ? kF32 : 1.0 / 256;
          auto ref = [&](const Tensor& t) { return dt == DType::f32 ? t : rounded(t, dt); };
          auto to_dev = [&](const Tensor& t) { return on_gpu(dt == DType::f32 ? t : t.to(dt)); };
          for (bool with_bias : {true, false}) {
            CAPTURE(with_bias);
            Tensor cc = Tensor::empty({cap, c.N});
            Tensor bref = ref(bias);
            cpu::grouped_linear(ref(a), ref(w), with_bias ? &bref : nullptr, pc.host_offsets, cc);
            Tensor cg = poisoned({cap, c.N}, dt);
            Tensor bg = to_dev(bias);
            gpu::grouped_linear(to_dev(a), to_dev(w), with_bias ? &bg : nullptr, pg, cg, go);
            expect_close("grouped_linear", cg.slice(0, 0, rows), cc.slice(0, 0, rows), tol);
          }

          if (dt == DType::bf16) {
            // 16-bit expert weights held for inference, f32 rows, an f32 bias and an f32 output: the GPU rounds the
            // rows to the weights' dtype and keeps the bias in fp32; the reference takes the same rounded rows and
            // weights. A product of two bf16 (8-bit significands) or two f16 (11-bit) values is exact in fp32, so
            // the two differ only by the order of fp32 sums, as in the f32 case: kF32. Once with a caller's
            // Workspace (the rounded rows come from it), once without.
            for (DType low : {DType::bf16, DType::f16})
              for (bool caller_ws : {false, true}) {
                CAPTURE(name_of(low));
                CAPTURE(caller_ws);
                Tensor cc = Tensor::empty({cap, c.N});
                cpu::grouped_linear(rounded(a, low), rounded(w, low), &bias, pc.host_offsets, cc);
                Tensor cg = poisoned({cap, c.N}, DType::f32);
                const Tensor bg = on_gpu(bias);
                gpu::Workspace ws;
                if (caller_ws) ws.reserve(std::size_t(cap * c.K) * 2 + 4096);
                gpu::grouped_linear(on_gpu(a), on_gpu(w.to(low)), &bg, pg, cg, go, caller_ws ? &ws : nullptr);
                expect_close("grouped_linear, 16-bit weights, f32 rows and bias", cg.slice(0, 0, rows),
                             cc.slice(0, 0, rows), kF32);
                if (caller_ws) CHECK(ws.required_bytes() >= std::size_t(cap * c.K) * 2);  // the rows came from it
              }
          }

          Tensor da = Tensor::empty({cap, c.K});
          cpu::grouped_linear_dinput(ref(dc), ref(w), pc.host_offsets, da);
          Tensor dag = poisoned({cap, c.K}, dt);
          gpu::grouped_linear_dinput(to_dev(dc), to_dev(w), pg, dag, go);
          expect_close("grouped_linear_dinput", dag.slice(0, 0, rows), da.slice(0, 0, rows), tol);

          // Weight gradients accumulate into fp32 (master-gradient style) from f32 or bf16 activations.
          Tensor dw = dw0.clone(), db = db0.clone();
          cpu::grouped_linear_dweight(ref(dc), ref(a), pc.host_offsets, dw, &db);
          Tensor dwg = on_gpu(dw0), dbg = on_gpu(db0);
          gpu::grouped_linear_dweight(to_dev(dc), to_dev(a), pg, dwg, &dbg, go);
          expect_close("grouped_linear_dweight", dwg, dw, kF32);
          expect_close("grouped dbias", dbg, db, kF32);
        }
      }
}

template <class Act>
void check_activation(const char* name, Rng& rng) {
  CAPTURE(name);
  const std::int64_t cap = 50, rows = 41, F = 37;
  Tensor h = randn({cap, F}, rng, 2.f), da = randn({cap, F}, rng);
  Tensor a = Tensor::empty({cap, F}), dh = Tensor::empty({cap, F});
  cpu::activation_forward<Act>(h, rows, a);
  cpu::activation_backward<Act>(h, da, rows, dh);
  Tensor ag = poisoned({cap, F}), dag = on_gpu(da);
  dev().activation_forward<Act>(on_gpu(h), rows, ag);
  dev().activation_backward<Act>(on_gpu(h), dag, rows, dag);  // in place, as Expert<MLP>::backward does
  expect_close("activation_forward", ag.slice(0, 0, rows), a.slice(0, 0, rows), kF32);
  expect_close("activation_backward", dag.slice(0, 0, rows), dh.slice(0, 0, rows), kF32);
  // rows past `rows` stay untouched
  CHECK(std::isnan(on_cpu(ag).at<float>(rows, 0)));

  Tensor hg2 = randn({cap, 2 * F}, rng, 2.f);
  Tensor g = Tensor::empty({cap, F}), dg = Tensor::empty({cap, 2 * F});
  cpu::glu_forward<Act>(hg2, rows, g);
  cpu::glu_backward<Act>(hg2, da, rows, dg);
  Tensor gg = poisoned({cap, F}), dgg = poisoned({cap, 2 * F});
  dev().glu_forward<Act>(on_gpu(hg2), rows, gg);
  dev().glu_backward<Act>(on_gpu(hg2), on_gpu(da), rows, dgg);
  expect_close("glu_forward", gg.slice(0, 0, rows), g.slice(0, 0, rows), kF32);
  expect_close("glu_backward", dgg.slice(0, 0, rows), dg.slice(0, 0, rows), kF32);
}

TEST_CASE("cuda activations and GLU forward/backward match the CPU (QuickGELU, GELU, GELUTanh, SiLU, ReLU)") {
  Rng rng(g_seed + __LINE__);
  check_activation<QuickGELU>("quick_gelu", rng);
  check_activation<GELU>("gelu", rng);
  check_activation<GELUTanh>("gelu_tanh", rng);
  check_activation<SiLU>("silu", rng);
  check_activation<ReLU>("relu", rng);
}

// =================================================================================================================
// the whole block
// =================================================================================================================
namespace {

template <class MoE>
ParameterList params(MoE& m) {
  return m.parameters();
}

struct BlockRun {
  Tensor y, dx, b1, bk, z;
  std::vector<Tensor> grads;
};

template <class MoE>
BlockRun run_block(MoE& m, const Tensor& x, const Tensor& dy, std::int64_t segments, std::uint64_t jitter_seed) {
  Rng jitter(jitter_seed);
  m.zero_grad();
  auto out = m.forward(x, ForwardArgs{segments, true}, &jitter);
  BlockRun r;
  r.y = on_cpu(out.y);
  r.b1 = on_cpu(out.aux.balance_top1);
  r.bk = on_cpu(out.aux.balance_allk);
  r.z = on_cpu(out.aux.z);
  r.dx = on_cpu(m.backward(dy, AuxLossWeights{0.1f, 0.01f}));
  for (Parameter* p : m.parameters()) r.grads.push_back(on_cpu(p->grad));
  return r;
}

template <class ExpertT, int K>
void block_parity(SparseMoEOptions opt, std::int64_t T, std::int64_t H, std::int64_t F, int E, std::int64_t segments,
                  gpu::GroupedGemm algo, bool host_offsets) {
  using CpuMoE = SparseMoE<Router<TopK<K>>, ExpertT, backend::Cpu>;
  using GpuMoE = SparseMoE<Router<TopK<K>>, ExpertT, backend::Cuda>;
  gpu::Options o;
  o.grouped_gemm = algo;
  o.plan_host_offsets = host_offsets;
  const backend::Cuda be(o);  // this block's own options
  CAPTURE(K);
  CAPTURE(E);
  CAPTURE(opt.capacity_factor);
  CAPTURE(opt.jitter);
  CAPTURE(algo_name(algo));
  CAPTURE(host_offsets);
  const std::uint64_t seed = g_seed + std::uint64_t(K) * 1000 + std::uint64_t(E);
  Rng rng(seed);
  CpuMoE c(H, F, E, opt);
  c.reset_parameters(rng);
  GpuMoE g(H, F, E, opt, {}, 0, be);
  {
    ParameterList pc = c.parameters(), pg = g.parameters();
    REQUIRE(pc.size() == pg.size());
    for (std::size_t i = 0; i < pc.size(); ++i) pg[i]->value.copy_from(pc[i]->value);
  }
  Tensor x, dy = randn({T, H}, rng);
  for (int attempt = 0;; ++attempt) {  // no near ties in the router's choice (see min_topk_gap)
    x = randn({T, H}, rng);
    Rng jitter(seed + 1);
    c.forward(x, ForwardArgs{segments, true}, &jitter);
    if (min_topk_gap(c.router_output().probs, K) >= 1e-5) break;
    REQUIRE_MESSAGE(attempt < 20, "could not draw inputs without near ties in the router's top-k");
  }
  const Tensor xg = on_gpu(x), dyg = on_gpu(dy);

  const BlockRun rc = run_block(c, x, dy, segments, seed + 1);
  const BlockRun rg = run_block(g, xg, dyg, segments, seed + 1);
  expect_equal_i32("router top-k", g.router_output().topk_idx, c.router_output().topk_idx);
  expect_close("y", rg.y, rc.y, kF32);
  expect_close("balance_top1", rg.b1, rc.b1, kF32);
  expect_close("balance_allk", rg.bk, rc.bk, kF32);
  expect_close("z-loss", rg.z, rc.z, kF32);
  expect_close("dx", rg.dx, rc.dx, kF32);
  {
    ParameterList pc = c.parameters();
    for (std::size_t i = 0; i < pc.size(); ++i) expect_close("grad " + pc[i]->name, rg.grads[i], rc.grads[i], kF32);
  }
  CHECK(g.load().dropped == c.load().dropped);

  // Determinism: a second run on the GPU is bitwise the first.
  const BlockRun rg2 = run_block(g, xg, dyg, segments, seed + 1);
  CHECK(bitwise_equal(rg2.y, rg.y));
  CHECK(bitwise_equal(rg2.dx, rg.dx));
  CHECK(bitwise_equal(rg2.b1, rg.b1));
  CHECK(bitwise_equal(rg2.z, rg.z));
  for (std::size_t i = 0; i < rg.grads.size(); ++i) CHECK(bitwise_equal(rg2.grads[i], rg.grads[i]));
}

template <class ExpertT>
void block_matrix() {
  const gpu::GroupedGemm algos[] = {gpu::GroupedGemm::automatic, gpu::GroupedGemm::grouped_batched,
                                    gpu::GroupedGemm::device_offsets};
  for (float capacity : {0.f, 1.f})
    for (gpu::GroupedGemm algo : algos) {
      SparseMoEOptions opt;
      opt.capacity_factor = capacity;
      block_parity<ExpertT, 1>(opt, 64, 32, 48, 4, 2, algo, true);
      block_parity<ExpertT, 2>(opt, 64, 32, 48, 4, 2, algo, true);
    }
  SparseMoEOptions jit;
  jit.jitter = 0.05f;
  block_parity<ExpertT, 2>(jit, 96, 40, 24, 8, 3, gpu::GroupedGemm::automatic, true);
  block_parity<ExpertT, 2>(jit, 96, 40, 24, 8, 3, gpu::GroupedGemm::device_offsets, false);  // no host sync
  SparseMoEOptions fine;
  fine.capacity_factor = 1.25f;
  block_parity<ExpertT, 4>(fine, 128, 32, 16, 16, 1, gpu::GroupedGemm::automatic, true);
}

}  // namespace

TEST_CASE("cuda SparseMoE<MLP<QuickGELU>> matches the CPU block forward and backward, K = 1, 2, 4, +- capacity") {
  block_matrix<Expert<MLP<QuickGELU>>>();
}

TEST_CASE("cuda SparseMoE<GatedMLP<SiLU>> matches the CPU block forward and backward, K = 1, 2, 4, +- capacity") {
  block_matrix<Expert<GatedMLP<SiLU>>>();
}

TEST_CASE("cuda SparseMoE: upcycled experts give the dense MLP on the GPU too") {
  Rng rng(g_seed + __LINE__);
  const std::int64_t T = 48, H = 24, F = 40;
  DenseMLPWeights d{randn({F, H}, rng, 0.2f), randn({F}, rng, 0.2f), randn({H, F}, rng, 0.2f), randn({H}, rng, 0.2f)};
  using GpuMoE = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cuda>;
  GpuMoE g = upcycle_from_dense<GpuMoE>(d, 4, rng);
  Tensor x = randn({T, H}, rng);
  Tensor h = Tensor::empty({T, F}), a = Tensor::empty({T, F}), y = Tensor::empty({T, H});
  cpu::linear(x, d.fc1_weight, &d.fc1_bias, h);
  cpu::activation_forward<QuickGELU>(h, T, a);
  cpu::linear(a, d.fc2_weight, &d.fc2_bias, y);
  expect_close("upcycled block vs dense MLP", g.forward(on_gpu(x)).y, y, kF32);
}

TEST_CASE("cuda workspace: measured steps replay inside one buffer, bitwise equal to pool allocation") {
  using GpuMoE = SparseMoE<Router<TopK<2>>, Expert<GatedMLP<SiLU>>, backend::Cuda>;
  Rng rng(g_seed + __LINE__);
  gpu::Workspace ws;  // declared first, destroyed last: the block's saved tensors return to it before it goes
  const backend::Cuda pool;                     // the stream-ordered pool
  const backend::Cuda carved(gpu::Options{}, &ws);  // the same options, every tensor from the workspace
  GpuMoE g(32, 48, 8, {}, {}, 0, pool);
  GpuMoE gw(32, 48, 8, {}, {}, 0, carved);
  g.reset_parameters(rng);
  {
    ParameterList a = g.parameters(), b = gw.parameters();
    for (std::size_t i = 0; i < a.size(); ++i) b[i]->value.copy_from(a[i]->value);
  }
  const Tensor x = on_gpu(randn({80, 32}, rng)), dy = on_gpu(randn({80, 32}, rng));
  auto step = [&](GpuMoE& m) {
    m.zero_grad();
    BlockRun r;
    r.y = on_cpu(m.forward(x).y);
    r.dx = on_cpu(m.backward(dy));
    for (Parameter* p : m.parameters()) r.grads.push_back(on_cpu(p->grad));
    return r;
  };
  const BlockRun pooled = step(g);

  for (int i = 0; i < 2; ++i) step(gw);
  CHECK(ws.overflow_count() > 0);  // no buffer yet: everything went to the pool
  REQUIRE(ws.required_bytes() > 0);
  ws.reserve(ws.required_bytes());
  ws.reset_counters();
  for (int i = 0; i < 3; ++i) {
    const BlockRun r = step(gw);
    CHECK(bitwise_equal(r.y, pooled.y));
    CHECK(bitwise_equal(r.dx, pooled.dx));
    for (std::size_t j = 0; j < r.grads.size(); ++j) CHECK(bitwise_equal(r.grads[j], pooled.grads[j]));
  }
  CHECK(ws.overflow_count() == 0);
  CHECK(ws.live_blocks() > 0);  // the block's saved activations live in the buffer until the next forward
  CHECK_THROWS_AS(ws.reserve(1), Error);
}

// bf16 / f16 activations at the block's door (issue 15): widened to fp32 on the device (Backend::convert), the block
// in fp32, y and dx narrowed back. Against the CPU block on the same 16-bit inputs: both compute in fp32 from the
// same widened values, so the outputs differ by fp32 summation order plus, where that straddles a 16-bit rounding
// boundary, one unit of the 16-bit dtype (2^-8 relative for bf16): kLow.
TEST_CASE("cuda SparseMoE takes bf16 / f16 activations: y and dx in their dtype, as the CPU block computes them") {
  using CpuMoE = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>>;
  using GpuMoE = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cuda>;
  const std::int64_t T = 64, H = 32, F = 48;
  const int E = 4;
  for (DType low : {DType::bf16, DType::f16}) {
    CAPTURE(name_of(low));
    Rng rng(g_seed + __LINE__ + std::uint64_t(low == DType::f16));
    CpuMoE c(H, F, E);
    c.reset_parameters(rng);
    GpuMoE g(H, F, E);
    {
      ParameterList pc = c.parameters(), pg = g.parameters();
      REQUIRE(pc.size() == pg.size());
      for (std::size_t i = 0; i < pc.size(); ++i) pg[i]->value.copy_from(pc[i]->value);
    }
    Tensor x;  // (T, H) in the 16-bit dtype
    for (int attempt = 0;; ++attempt) {  // no near ties in the router's choice (see min_topk_gap)
      x = randn({T, H}, rng).to(low);
      c.forward(x);
      if (min_topk_gap(c.router_output().probs, 2) >= 1e-5) break;
      REQUIRE_MESSAGE(attempt < 20, "could not draw inputs without near ties in the router's top-k");
    }
    const Tensor dy = randn({T, H}, rng).to(low);  // (T, H)
    const Tensor yc = c.forward(x).y, dxc = c.backward(dy);
    const Tensor yg = g.forward(on_gpu(x)).y, dxg = g.backward(on_gpu(dy));
    CHECK(yg.dtype() == low);
    CHECK(dxg.dtype() == low);
    CHECK(yg.device() == Device::cuda);
    CHECK(dxg.device() == Device::cuda);
    expect_equal_i32("router top-k", g.router_output().topk_idx, c.router_output().topk_idx);
    expect_close("y", on_cpu(yg).to(DType::f32), yc.to(DType::f32), kLow);
    expect_close("dx", on_cpu(dxg).to(DType::f32), dxc.to(DType::f32), kLow);
  }
  // anything else is refused at the door, naming the tensor and the dtypes it takes
  GpuMoE g(H, F, E);
  CHECK_THROWS_WITH_AS(g.forward(Tensor::zeros({T, H}, DType::f64, Device::cuda)),
                       doctest::Contains("expected f32, bf16 or f16"), Error);

  // nn::Linear too: a 16-bit x widened on the device, y in x's dtype; a host x is a device error, not a dtype one
  Rng rng(g_seed + __LINE__);
  nn::Linear<> lc("lin", H, 16, true);
  nn::Linear<backend::Cuda> lg("lin", H, 16, true);
  lc.weight.value.copy_from(randn({16, H}, rng));
  lc.bias.value.copy_from(randn({16}, rng));
  lg.weight.value.copy_from(lc.weight.value);
  lg.bias.value.copy_from(lc.bias.value);
  for (DType low : {DType::bf16, DType::f16}) {
    CAPTURE(name_of(low));
    const Tensor xl = randn({T, H}, rng).to(low);  // (T, H)
    const Tensor yg = lg.apply(on_gpu(xl));        // (T, 16)
    CHECK(yg.dtype() == low);
    CHECK(yg.device() == Device::cuda);
    expect_close("Linear y", on_cpu(yg).to(DType::f32), lc.apply(xl).to(DType::f32), kLow);
    CHECK_THROWS_WITH_AS(lg.apply(xl), doctest::Contains("is on cpu but expected cuda"), Error);
  }
}

TEST_CASE("cuda entry points reject host tensors and wrong dtypes with a message") {
  Tensor h = Tensor::zeros({4, 4});
  Tensor d = on_gpu(h);
  CHECK_THROWS_WITH_AS(dev().multiply(h, d, d), doctest::Contains("is on cpu but expected cuda"), Error);
  Tensor i = Tensor::zeros({4, 4}, DType::i32, Device::cuda);
  CHECK_THROWS_WITH_AS(dev().add(i, i, i), doctest::Contains("not supported on cuda"), Error);
}

// =================================================================================================================
int main(int argc, char** argv) { return cumo::test::run_cuda_tests(argc, argv, "cuda tests", g_seed); }
