// CPU MoE layer vs an equal-FLOP dense GEMM pair, measured in the same binary (SPEC "Numbers" table).
//
//   bench_moe_cpu                      Eigen's own GEMM kernels
//   bench_moe_cpu_blas                 the same, every GEMM handed to cblas_sgemm (OpenBLAS here)
//
// For each shape: the MoE layer forward and forward+backward; the dense baseline that does the same FLOPs
// (T·k rows through one expert-sized SwiGLU FFN: gate_up (2F, H), down (H, F)) forward and forward+backward;
// and the dispatch alone (router GEMM + softmax/top-k + plan + gather + combine). After the run a table prints
// each layer's throughput as a ratio of the dense baseline's, and dispatch as a share of the layer.
// Inference (`*_prepacked`, oneDNN builds): the weights packed once (cpu::prepack_weight, SparseMoE::prepack_experts)
// for the MoE layer and for the dense baseline alike; its ratio is against the faster of the two dense forwards.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include <cumo/moe.hpp>

using namespace cumo;

namespace {

struct ShapeCfg {
  const char* name;
  std::int64_t H, F;
  int E, K;
  std::int64_t T;
};
const ShapeCfg kShapes[] = {
    {"mixtral_like", 1024, 3584, 8, 2, 256},  // SPEC: H1024 F3584 E8 k2, T = 256
    {"fine_grained", 1024, 256, 64, 8, 256},  // SPEC: H1024 F256 E64 k8, T = 256
    {"mixtral_like_T2048", 1024, 3584, 8, 2, 2048},
};
using Block = SparseMoE<Router<TopKDynamic>, Expert<GatedMLP<SiLU>>>;

// FLOPs of the expert GEMMs for T·k rows (forward): 2·rows·H·2F + 2·rows·F·H.
double expert_flops(const ShapeCfg& s) { return 2.0 * double(s.T * s.K) * double(s.H) * double(3 * s.F); }

Tensor randn(Shape shape, Rng& rng, float scale) {
  Tensor t = Tensor::empty(shape);
  rng.fill_normal(t, 0.f, scale);
  return t;
}

struct Fixture {
  Block moe;
  Tensor x, dy;
  explicit Fixture(const ShapeCfg& s) : moe(s.H, s.F, s.E, {}, TopKDynamic{s.K}) {
    Rng rng(1);
    moe.reset_parameters(rng);
    x = randn({s.T, s.H}, rng, 1.f);
    dy = randn({s.T, s.H}, rng, 1.f);
  }
};

void set_counters(benchmark::State& st, const ShapeCfg& s, double flops) {
  st.SetItemsProcessed(st.iterations() * s.T);
  st.counters["FLOP/s"] = benchmark::Counter(flops * double(st.iterations()), benchmark::Counter::kIsRate);
}

void BM_moe_forward(benchmark::State& st, ShapeCfg s) {
  Fixture f(s);
  for (auto _ : st) benchmark::DoNotOptimize(f.moe.forward(f.x).y.raw());
  set_counters(st, s, expert_flops(s));
}

// Inference: the experts' weights packed once, no activations kept for a backward.
void BM_moe_forward_prepacked(benchmark::State& st, ShapeCfg s) {
  Fixture f(s);
  if (f.moe.prepack_experts() == 0) {
    st.SkipWithError("no packed weights in this build (oneDNN only)");
    return;
  }
  for (auto _ : st) benchmark::DoNotOptimize(f.moe.forward(f.x, ForwardArgs{1, false}).y.raw());
  f.moe.release_packed_experts();
  set_counters(st, s, expert_flops(s));
}

void BM_moe_forward_backward(benchmark::State& st, ShapeCfg s) {
  Fixture f(s);
  for (auto _ : st) {
    f.moe.forward(f.x);
    benchmark::DoNotOptimize(f.moe.backward(f.dy, {0.01f, 0.001f}).raw());
  }
  set_counters(st, s, 3 * expert_flops(s));
}

// Dense equal-FLOP baseline: one SwiGLU FFN over T·k rows.
struct Dense {
  Tensor x, wgu, wd, h, a, y, dy, da, dh, dx, dwgu, dwd;
  explicit Dense(const ShapeCfg& s) {
    Rng rng(2);
    const std::int64_t R = s.T * s.K;
    x = randn({R, s.H}, rng, 1.f);
    wgu = randn({2 * s.F, s.H}, rng, 0.02f);
    wd = randn({s.H, s.F}, rng, 0.02f);
    h = Tensor::empty({R, 2 * s.F});
    a = Tensor::empty({R, s.F});
    y = Tensor::empty({R, s.H});
    dy = randn({R, s.H}, rng, 1.f);
    da = Tensor::empty({R, s.F});
    dh = Tensor::empty({R, 2 * s.F});
    dx = Tensor::empty({R, s.H});
    dwgu = Tensor::zeros({2 * s.F, s.H});
    dwd = Tensor::zeros({s.H, s.F});
  }
  void forward() {
    cpu::linear(x, wgu, nullptr, h);                  // (R, 2F)
    cpu::glu_forward<SiLU>(h, h.size(0), a);           // (R, F)
    cpu::linear(a, wd, nullptr, y);                   // (R, H)
  }
  void backward() {
    backend::Cpu::linear_dweight(dy, a, dwd);          // (H, F)
    backend::Cpu::linear_dinput(dy, wd, da, false);    // (R, F)
    cpu::glu_backward<SiLU>(h, da, h.size(0), dh);     // (R, 2F)
    backend::Cpu::linear_dweight(dh, x, dwgu);         // (2F, H)
    backend::Cpu::linear_dinput(dh, wgu, dx, false);   // (R, H)
  }
};

void BM_dense_forward(benchmark::State& st, ShapeCfg s) {
  Dense d(s);
  for (auto _ : st) {
    d.forward();
    benchmark::DoNotOptimize(d.y.raw());
  }
  set_counters(st, s, expert_flops(s));
}

// The dense baseline with its two weights packed once as well (the best dense forward this build has).
void BM_dense_forward_prepacked(benchmark::State& st, ShapeCfg s) {
  Dense d(s);
  if (!cpu::prepack_weight(d.wgu) || !cpu::prepack_weight(d.wd)) {
    st.SkipWithError("no packed weights in this build (oneDNN only)");
    return;
  }
  for (auto _ : st) {
    d.forward();
    benchmark::DoNotOptimize(d.y.raw());
  }
  cpu::release_packed_weights();
  set_counters(st, s, expert_flops(s));
}

void BM_dense_forward_backward(benchmark::State& st, ShapeCfg s) {
  Dense d(s);
  for (auto _ : st) {
    d.forward();
    d.backward();
    benchmark::DoNotOptimize(d.dx.raw());
  }
  set_counters(st, s, 3 * expert_flops(s));
}

// Router + plan + gather + combine: the MoE layer minus the expert GEMMs and activations.
void BM_dispatch(benchmark::State& st, ShapeCfg s) {
  Fixture f(s);
  f.moe.forward(f.x);  // a plan and expert outputs to combine
  const Tensor out = Tensor::zeros({s.T * s.K, s.H});
  for (auto _ : st) {
    RouterOutput r;
    f.moe.router().forward(backend::Cpu{}, f.x, false, nullptr, r);
    DispatchPlan plan;
    plan.tokens = s.T, plan.experts = s.E, plan.top_k = s.K;
    plan.demand = Tensor::empty({s.E}, DType::i32);
    plan.counts = Tensor::empty({s.E}, DType::i32);
    plan.offsets = Tensor::empty({s.E + 1}, DType::i32);
    plan.row_of_slot = Tensor::empty({s.T * s.K}, DType::i32);
    plan.slot_of_row = Tensor::empty({s.T * s.K}, DType::i32);
    backend::Cpu::make_plan(r.topk_idx, plan);
    Tensor xs = Tensor::empty({s.T * s.K, s.H}), y = Tensor::empty({s.T, s.H});
    backend::Cpu::gather_rows(f.x, plan, xs);
    backend::Cpu::combine(out, r.topk_w, plan, y);
    benchmark::DoNotOptimize(y.raw());
  }
  st.SetItemsProcessed(st.iterations() * s.T);
}

// Keeps every run's time so the ratio table can be printed at the end.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs)
      if (r.run_type == Run::RT_Iteration && !r.error_occurred)
        times[r.run_name.function_name] = r.GetAdjustedRealTime();
    ConsoleReporter::ReportRuns(runs);
  }
  std::map<std::string, double> times;
};

}  // namespace

int main(int argc, char** argv) {
  for (const auto& s : kShapes) {
    const bool big = s.T > 256;
    auto reg = [&](const char* what, void (*fn)(benchmark::State&, ShapeCfg)) {
      auto* b = benchmark::RegisterBenchmark((std::string(what) + "/" + s.name).c_str(), fn, s);
      b->Unit(benchmark::kMillisecond)->UseRealTime();
      if (big) b->Iterations(3);
    };
    reg("dense_forward", BM_dense_forward);
    reg("moe_forward", BM_moe_forward);
    reg("dense_forward_prepacked", BM_dense_forward_prepacked);
    reg("moe_forward_prepacked", BM_moe_forward_prepacked);
    reg("dispatch", BM_dispatch);
    if (!big) {
      reg("dense_forward_backward", BM_dense_forward_backward);
      reg("moe_forward_backward", BM_moe_forward_backward);
    }
  }
  benchmark::Initialize(&argc, argv);
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);

  std::printf("\n%-22s %-18s %12s %12s %14s\n", "shape", "pass", "moe ms", "dense ms", "moe/dense thr");
  for (const auto& s : kShapes) {
    for (const char* pass : {"forward", "forward_backward"}) {
      const auto m = reporter.times.find(std::string("moe_") + pass + "/" + s.name);
      const auto d = reporter.times.find(std::string("dense_") + pass + "/" + s.name);
      if (m == reporter.times.end() || d == reporter.times.end()) continue;
      std::printf("%-22s %-18s %12.2f %12.2f %14.3f\n", s.name, pass, m->second, d->second, d->second / m->second);
    }
    // inference: the packed MoE forward against the faster dense forward (plain or packed)
    const auto mp = reporter.times.find(std::string("moe_forward_prepacked/") + s.name);
    const auto dp = reporter.times.find(std::string("dense_forward_prepacked/") + s.name);
    const auto d = reporter.times.find(std::string("dense_forward/") + s.name);
    if (mp != reporter.times.end() && dp != reporter.times.end() && d != reporter.times.end()) {
      const double best = std::min(d->second, dp->second);
      std::printf("%-22s %-18s %12.2f %12.2f %14.3f   (dense plain %.2f, packed %.2f ms)\n", s.name,
                  "forward_prepacked", mp->second, best, best / mp->second, d->second, dp->second);
    }
    const auto disp = reporter.times.find(std::string("dispatch/") + s.name);
    const auto m = reporter.times.find(std::string("moe_forward/") + s.name);
    if (disp != reporter.times.end() && m != reporter.times.end())
      std::printf("%-22s %-18s %12.2f ms = %.1f %% of the forward\n", s.name, "dispatch", disp->second,
                  100.0 * disp->second / m->second);
  }
  benchmark::Shutdown();
  return 0;
}
