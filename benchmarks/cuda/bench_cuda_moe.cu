// The CUDA MoE layer against the equal-FLOP dense cuBLAS GEMM pair, in one binary, at the SPEC's shapes.
//
//   moe_fwd / moe_fwdbwd     a bf16 layer built from backend ops (router → plan → gather → grouped GEMM →
//                            activation/GLU → grouped GEMM → combine, and the full backward incl. router grads),
//                            once per grouped-GEMM path: per_expert, grouped_batched, device_offsets (no sync)
//   dense_fwd / dense_fwdbwd the same expert FLOPs as two plain GEMMs over T·K rows (the anchor)
//   dispatch                 router + plan + gather + combine alone; `share` = its time / the layer's forward
//   sparse_moe_f32           the public SparseMoE<…, backend::Cuda> (fp32, optionally TF32) at the CLIP shape
//
// Timing: CUDA events around each iteration, reported through UseManualTime. Counters: TFLOP/s (expert GEMM FLOPs
// only, the same count for the dense anchor), tokens/s, and x_dense = this time / the dense anchor's time for the
// same pass, measured in this process. Inputs are random (never zeros); every weight and activation set is far
// larger than the 50 MB L2, so nothing is served from cache across iterations.
//
//   ./bench_cuda_moe --benchmark_filter='mixtral'      # one shape
//   ./bench_cuda_moe --benchmark_format=json > cuda.json
// Without a GPU it prints "SKIPPED: no CUDA device (...)" and exits 0.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cumo/backend/cuda.cuh"
#include "cumo/moe.hpp"

using namespace cumo;

namespace {

struct LayerShape {
  const char* name;
  std::int64_t T, H, F;
  int E, K;
  bool gated;  // SwiGLU (no biases) or MLP<QuickGELU> with biases
  // Expert GEMM FLOPs of one forward: rows · (H·F1 + F·H) · 2, F1 = 2F when gated.
  double fwd_flops() const {
    const double rows = double(T) * K, f1 = gated ? 2.0 * F : double(F);
    return 2.0 * rows * (double(H) * f1 + double(F) * double(H));
  }
};

// SPEC: Mixtral (H4096 F14336 E8 k2), fine-grained (H2048 F768 E128 k8), CLIP-MoE (H1024 F4096 E4 k2, 576 × 16).
const LayerShape kShapes[] = {
    {"mixtral", 8192, 4096, 14336, 8, 2, true},
    {"fine", 8192, 2048, 768, 128, 8, true},
    {"clip", 576 * 16, 1024, 4096, 4, 2, false},
};

// ---- device helpers ------------------------------------------------------------------------------------------------
Tensor random_device(Shape s, DType dt, Rng& rng, float scale) {
  Tensor f = Tensor::empty(s, DType::f32, Device::cuda);
  gpu::fill_uniform(f, rng, -scale, scale);
  if (dt == DType::f32) return f;
  Tensor t = Tensor::empty(s, dt, Device::cuda);
  gpu::cast(f, t);
  return t;
}

struct EventTimer {
  cudaEvent_t start{}, stop{};
  EventTimer() {
    CUMO_CUDA_CHECK(cudaEventCreate(&start));
    CUMO_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~EventTimer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  // Milliseconds of the work f enqueues (f may also synchronise inside, as make_plan does).
  template <class F>
  double ms(F&& f) {
    CUMO_CUDA_CHECK(cudaEventRecord(start, gpu::stream()));
    f();
    CUMO_CUDA_CHECK(cudaEventRecord(stop, gpu::stream()));
    CUMO_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0.f;
    CUMO_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    return double(t);
  }
};

// Mean milliseconds over `iters` runs after `warmup` runs (for the in-process anchors of the ratios).
template <class F>
double mean_ms(F&& f, int warmup = 3, int iters = 10) {
  EventTimer timer;
  for (int i = 0; i < warmup; ++i) f();
  double total = 0;
  for (int i = 0; i < iters; ++i) total += timer.ms(f);
  return total / iters;
}

// ---- the dense anchor: two GEMMs with the experts' FLOPs -----------------------------------------------------------
struct Dense {
  LayerShape s;
  DType dt;
  bool tf32 = false;  // fp32 operands on TF32 tensor cores (the block it is compared with runs so too)
  Tensor x, w1, w2, h, a, y, dy, da, dh, dx, dw1, dw2;
  Dense(const LayerShape& shape, DType dtype, Rng& rng) : s(shape), dt(dtype) {
    const std::int64_t R = s.T * s.K, F1 = s.gated ? 2 * s.F : s.F;
    x = random_device({R, s.H}, dt, rng, 1.f);
    w1 = random_device({F1, s.H}, dt, rng, 0.02f);
    w2 = random_device({s.H, s.F}, dt, rng, 0.02f);
    h = Tensor::empty({R, F1}, dt, Device::cuda);
    a = random_device({R, s.F}, dt, rng, 1.f);
    y = Tensor::empty({R, s.H}, dt, Device::cuda);
    dy = random_device({R, s.H}, dt, rng, 1.f);
    da = Tensor::empty({R, s.F}, dt, Device::cuda);
    dh = random_device({R, F1}, dt, rng, 1.f);
    dx = Tensor::empty({R, s.H}, dt, Device::cuda);
    dw1 = Tensor::zeros({F1, s.H}, dt, Device::cuda);
    dw2 = Tensor::zeros({s.H, s.F}, dt, Device::cuda);
  }
  void forward() {
    gpu::linear(x, w1, h, tf32);  // (R, F1)
    gpu::linear(a, w2, y, tf32);  // (R, H)
  }
  void backward() {
    gpu::linear_dweight(dy, a, dw2, tf32);         // (H, F)
    gpu::linear_dinput(dy, w2, da, false, tf32);   // (R, F)
    gpu::linear_dweight(dh, x, dw1, tf32);         // (F1, H)
    gpu::linear_dinput(dh, w1, dx, false, tf32);   // (R, H)
  }
};

// ---- the MoE layer from backend ops ----------------------------------------------------------------------------------
struct MoELayer {
  LayerShape s;
  gpu::Options o;  // the expert GEMM algorithm and whether make_plan syncs for host offsets
  Tensor wr, w1, b1, w2, b2, x, dy;                       // parameters and inputs
  Tensor logits, probs, idx, w, xs, h, a, out, y;         // forward
  Tensor dout, dw, da, dh, dxs, dx, dprobs, dlogits, dlogits_low, dwr, dw1, db1, dw2, db2;  // backward
  DispatchPlan plan;

  MoELayer(const LayerShape& shape, Rng& rng) : s(shape) {
    const DType dt = DType::bf16;
    const std::int64_t R = s.T * s.K, F1 = s.gated ? 2 * s.F : s.F;
    const int E = s.E;
    wr = random_device({E, s.H}, dt, rng, 0.05f);
    w1 = random_device({E, F1, s.H}, dt, rng, 0.02f);
    w2 = random_device({E, s.H, s.F}, dt, rng, 0.02f);
    if (!s.gated) {
      b1 = random_device({E, F1}, dt, rng, 0.02f);
      b2 = random_device({E, s.H}, dt, rng, 0.02f);
      db1 = Tensor::zeros({E, F1}, dt, Device::cuda);
      db2 = Tensor::zeros({E, s.H}, dt, Device::cuda);
    }
    x = random_device({s.T, s.H}, dt, rng, 1.f);
    dy = random_device({s.T, s.H}, dt, rng, 1.f);
    logits = Tensor::empty({s.T, E}, DType::f32, Device::cuda);
    probs = Tensor::empty({s.T, E}, DType::f32, Device::cuda);
    idx = Tensor::empty({s.T, s.K}, DType::i32, Device::cuda);
    w = Tensor::empty({s.T, s.K}, DType::f32, Device::cuda);
    xs = Tensor::empty({R, s.H}, dt, Device::cuda);
    h = Tensor::empty({R, F1}, dt, Device::cuda);
    a = Tensor::empty({R, s.F}, dt, Device::cuda);
    out = Tensor::empty({R, s.H}, dt, Device::cuda);
    y = Tensor::empty({s.T, s.H}, dt, Device::cuda);
    dout = Tensor::empty({R, s.H}, dt, Device::cuda);
    dw = Tensor::empty({s.T, s.K}, DType::f32, Device::cuda);
    da = Tensor::empty({R, s.F}, dt, Device::cuda);
    dh = Tensor::empty({R, F1}, dt, Device::cuda);
    dxs = Tensor::empty({R, s.H}, dt, Device::cuda);
    dx = Tensor::empty({s.T, s.H}, dt, Device::cuda);
    dprobs = Tensor::empty({s.T, E}, DType::f32, Device::cuda);
    dlogits = Tensor::empty({s.T, E}, DType::f32, Device::cuda);
    dlogits_low = Tensor::empty({s.T, E}, dt, Device::cuda);
    dwr = Tensor::zeros({E, s.H}, DType::f32, Device::cuda);
    dw1 = Tensor::zeros({E, F1, s.H}, dt, Device::cuda);
    dw2 = Tensor::zeros({E, s.H, s.F}, dt, Device::cuda);
    plan.tokens = s.T;
    plan.experts = E;
    plan.top_k = s.K;
    plan.demand = Tensor::empty({E}, DType::i32, Device::cuda);
    plan.counts = Tensor::empty({E}, DType::i32, Device::cuda);
    plan.offsets = Tensor::empty({E + 1}, DType::i32, Device::cuda);
    plan.row_of_slot = Tensor::empty({R}, DType::i32, Device::cuda);
    plan.slot_of_row = Tensor::empty({R}, DType::i32, Device::cuda);
  }
  const Tensor* bias1() const { return s.gated ? nullptr : &b1; }
  const Tensor* bias2() const { return s.gated ? nullptr : &b2; }

  void dispatch_in() {
    gpu::linear(x, wr, logits);                           // (T, E) fp32 from bf16
    gpu::softmax_topk(logits, probs, idx, w, true);       // (T, K)
    gpu::make_plan(idx, plan, o.plan_host_offsets);       // one host sync unless plan_host_offsets is off
    gpu::gather_rows(x, plan, xs);                        // (rows, H)
  }
  void forward() {
    dispatch_in();
    const std::int64_t rows = plan.rows();
    gpu::grouped_linear(xs, w1, bias1(), plan, h, o);  // (rows, F1)
    if (s.gated)
      gpu::glu_forward<SiLU>(h, rows, a);                 // (rows, F)
    else
      gpu::activation_forward<QuickGELU>(h, rows, a);
    gpu::grouped_linear(a, w2, bias2(), plan, out, o); // (rows, H)
    gpu::combine(out, w, plan, y);                        // (T, H)
  }
  void backward() {
    const std::int64_t rows = plan.rows();
    gpu::combine_backward(dy, out, w, plan, dout, dw);                      // (rows, H), (T, K)
    gpu::grouped_linear_dweight(dout, a, plan, dw2, s.gated ? nullptr : &db2, o);
    gpu::grouped_linear_dinput(dout, w2, plan, da, o);                   // (rows, F)
    if (s.gated)
      gpu::glu_backward<SiLU>(h, da, rows, dh);                             // (rows, 2F)
    else
      gpu::activation_backward<QuickGELU>(h, da, rows, dh);
    gpu::grouped_linear_dweight(dh, xs, plan, dw1, s.gated ? nullptr : &db1, o);
    gpu::grouped_linear_dinput(dh, w1, plan, dxs, o);                    // (rows, H)
    dx.zero_();
    gpu::scatter_add_rows(dxs, plan, dx);                                   // (T, H)
    dprobs.zero_();
    dlogits.zero_();
    gpu::topk_weights_backward(probs, idx, w, dw, true, dprobs);
    gpu::softmax_backward(probs, dprobs, dlogits);                          // (T, E)
    gpu::cast(dlogits, dlogits_low);
    gpu::linear_dweight(dlogits_low, x, dwr);                               // (E, H) fp32
    gpu::linear_dinput(dlogits_low, wr, dx, true);                          // (T, H)
  }
};

// One shape's objects at a time (the Mixtral layer alone holds ~10 GB), rebuilt when the shape changes.
struct Cache {
  std::string shape;
  std::unique_ptr<MoELayer> moe;
  std::unique_ptr<Dense> dense;
  std::map<std::string, double> anchors;  // "fwd", "fwdbwd", "moe_fwd" in ms
};
Cache g_cache;

void prepare(const LayerShape& s) {
  if (g_cache.shape == s.name) return;
  g_cache = Cache{};
  gpu::synchronize();
  Rng rng(1234);
  g_cache.shape = s.name;
  g_cache.moe = std::make_unique<MoELayer>(s, rng);
  g_cache.dense = std::make_unique<Dense>(s, DType::bf16, rng);
  Dense& d = *g_cache.dense;
  g_cache.anchors["fwd"] = mean_ms([&] { d.forward(); });
  g_cache.anchors["fwdbwd"] = mean_ms([&] {
    d.forward();
    d.backward();
  });
  MoELayer& m = *g_cache.moe;
  m.o.grouped_gemm = gpu::GroupedGemm::per_expert;
  g_cache.anchors["moe_fwd"] = mean_ms([&] { m.forward(); });
}

void set_counters(benchmark::State& state, const LayerShape& s, double flops, double anchor_ms) {
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(s.T), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["anchor_ms"] = anchor_ms;
}

template <class F>
void run_timed(benchmark::State& state, F&& f, double anchor_ms) {
  EventTimer timer;
  f();  // warm-up (plans, cuBLAS heuristics, pool growth)
  double total = 0;
  for (auto _ : state) {
    const double ms = timer.ms(f);
    total += ms;
    state.SetIterationTime(ms * 1e-3);
  }
  if (state.iterations() > 0 && anchor_ms > 0) state.counters["x_dense"] = total / double(state.iterations()) / anchor_ms;
}

struct PathChoice {
  const char* name;
  gpu::GroupedGemm algo;
  bool host_offsets;
};
const PathChoice kPaths[] = {
    {"per_expert", gpu::GroupedGemm::per_expert, true},
    {"grouped_batched", gpu::GroupedGemm::grouped_batched, true},
    {"device_offsets", gpu::GroupedGemm::device_offsets, false},
};

void register_all() {
  for (const LayerShape& s : kShapes) {
    const std::string n = s.name;
    benchmark::RegisterBenchmark(("dense_fwd/" + n).c_str(), [s](benchmark::State& st) {
      prepare(s);
      set_counters(st, s, s.fwd_flops(), g_cache.anchors["fwd"]);
      run_timed(st, [&] { g_cache.dense->forward(); }, g_cache.anchors["fwd"]);
    })->UseManualTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dense_fwdbwd/" + n).c_str(), [s](benchmark::State& st) {
      prepare(s);
      set_counters(st, s, 3 * s.fwd_flops(), g_cache.anchors["fwdbwd"]);
      run_timed(st, [&] {
        g_cache.dense->forward();
        g_cache.dense->backward();
      }, g_cache.anchors["fwdbwd"]);
    })->UseManualTime()->Unit(benchmark::kMillisecond);
    for (const PathChoice& p : kPaths) {
      benchmark::RegisterBenchmark(("moe_fwd/" + n + "/" + p.name).c_str(), [s, p](benchmark::State& st) {
        prepare(s);
        g_cache.moe->o.plan_host_offsets = p.host_offsets;
        g_cache.moe->o.grouped_gemm = p.algo;
        set_counters(st, s, s.fwd_flops(), g_cache.anchors["fwd"]);
        run_timed(st, [&] { g_cache.moe->forward(); }, g_cache.anchors["fwd"]);
      })->UseManualTime()->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("moe_fwdbwd/" + n + "/" + p.name).c_str(), [s, p](benchmark::State& st) {
        prepare(s);
        g_cache.moe->o.plan_host_offsets = p.host_offsets;
        g_cache.moe->o.grouped_gemm = p.algo;
        set_counters(st, s, 3 * s.fwd_flops(), g_cache.anchors["fwdbwd"]);
        run_timed(st, [&] {
          g_cache.moe->forward();
          g_cache.moe->backward();
        }, g_cache.anchors["fwdbwd"]);
      })->UseManualTime()->Unit(benchmark::kMillisecond);
    }
    benchmark::RegisterBenchmark(("dispatch/" + n).c_str(), [s](benchmark::State& st) {
      prepare(s);
      MoELayer& m = *g_cache.moe;
      EventTimer timer;
      double total = 0;
      m.dispatch_in();
      for (auto _ : st) {
        const double ms = timer.ms([&] {
          m.dispatch_in();
          gpu::combine(m.out, m.w, m.plan, m.y);
        });
        total += ms;
        st.SetIterationTime(ms * 1e-3);
      }
      st.counters["tokens/s"] = benchmark::Counter(double(s.T), benchmark::Counter::kIsIterationInvariantRate);
      if (st.iterations() > 0) st.counters["share"] = total / double(st.iterations()) / g_cache.anchors["moe_fwd"];
    })->UseManualTime()->Unit(benchmark::kMillisecond);
  }

  // The public block in fp32 (what SparseMoE runs today) at the CLIP shape, fwd+bwd, vs the dense fp32 pair.
  for (bool tf32 : {false, true}) {
    const std::string name = std::string("sparse_moe_f32/clip/fwdbwd") + (tf32 ? "/tf32" : "");
    benchmark::RegisterBenchmark(name.c_str(), [tf32](benchmark::State& st) {
      const LayerShape s = kShapes[2];
      g_cache = Cache{};
      gpu::Options o;
      o.allow_tf32 = tf32;
      using Block = SparseMoE<Router<TopK<2>>, Expert<MLP<QuickGELU>>, backend::Cuda>;
      SparseMoEOptions opt;
      opt.check_finite = false;  // the finiteness check is a host sync
      Block block(s.H, s.F, s.E, opt, {}, 0, backend::Cuda(o));
      Rng rng(7);
      block.reset_parameters(rng);
      const Tensor x = random_device({s.T, s.H}, DType::f32, rng, 1.f);
      const Tensor dy = random_device({s.T, s.H}, DType::f32, rng, 1.f);
      Dense dense(s, DType::f32, rng);
      dense.tf32 = tf32;
      const double anchor = mean_ms([&] {
        dense.forward();
        dense.backward();
      });
      set_counters(st, s, 3 * s.fwd_flops(), anchor);
      run_timed(st, [&] {
        block.forward(x, ForwardArgs{16, true});
        block.backward(dy, AuxLossWeights{0.1f, 0.01f});
      }, anchor);
    })->UseManualTime()->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string why;
  if (!gpu::device_available(&why)) {
    std::printf("SKIPPED: no CUDA device (cudaGetDeviceCount: %s)\n", why.c_str());
    return 0;
  }
  cudaDeviceProp prop{};
  CUMO_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("bench_cuda_moe: %s (sm_%d%d, %d SMs), bf16 storage with fp32 accumulation unless named f32\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_cache = Cache{};
  return 0;
}
