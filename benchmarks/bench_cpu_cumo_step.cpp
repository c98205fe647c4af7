// bench_cpu_cumo_step — one CuMo stage-3 training step on backend::Cpu: the cumo side of
// benchmarks/torch_cpu_cumo_step.py (same model, batch, loss and optimizer; benchmarks/cpu_step_vs_torch.sh runs
// both, alternating, at 1 and 2 threads).
//
//   bench_cpu_cumo_step [--config configs/demo.json] [--text-len 51] [--labelled 8] [google-benchmark flags]
//
// The model is the config's (the demo's by default), upcycled as stage 3 does: every CLIP MLP and the connector
// a top-k-of-E MoE. The batch is the stage-3 batch size × (1 + patches + text-len) tokens (16 × 116 for the demo),
// the last `labelled` tokens of each row supervised. A step is zero_grad, forward (CE + bzloss), backward,
// global-norm clipping (the stage's max_grad_norm) and AdamW — what the trainer's step does. Measured in the same
// run: an equal-FLOP chain of square fp32 GEMMs (cpu::gemm: oneDNN, or Eigen in bench_cpu_cumo_step_eigen), the
// step's floor; the table after the run prints both.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include <Eigen/Core>

#include "app/footprint.hpp"
#include "app/run_config.hpp"
#include "cli.hpp"
#include "cumo/backend/cpu/gemm.hpp"
#include "cumo/io/tokenizer.hpp"
#include "cumo/train/optimizer.hpp"
#include "cumo_step.hpp"

using namespace cumo;

namespace {

struct Args {
  std::string config = CUMO_SOURCE_DIR "/configs/demo.json";
  std::int64_t text_len = 51, labelled = 8;
};

// The step's inputs, built once: the model (stage 3), its optimizer and the batch.
struct Step {
  app::RunConfig run;
  models::CuMo<backend::Cpu> model;
  train::AdamW<backend::Cpu> opt;
  bench::StepBatch batch;
  double max_grad_norm;
  double flops;

  static app::RunConfig load(const std::string& path) {
    return app::RunConfig::from_json(app::read_config_file(path, "bench_cpu_cumo_step"), "'" + path + "'");
  }
  static models::CuMo<backend::Cpu> build(const app::RunConfig& r) {
    models::CuMo<backend::Cpu> m(r.model_config(*io::load_tokenizer(r.tokenizer)));
    Rng rng(r.seed);
    m.reset_parameters(rng);
    m.upcycle(rng);
    m.set_logit_rows(models::CuMo<backend::Cpu>::LogitRows::loss);  // as cumo_train trains
    return m;
  }
  static train::AdamWOptions adamw(const app::StageConfig& s) {
    train::AdamWOptions o;
    o.lr = s.lr;
    o.weight_decay = s.weight_decay;
    return o;
  }
  explicit Step(const Args& a)
      : run(load(a.config)),
        model(build(run)),
        opt(model.parameters(), adamw(run.stage(3))),
        batch(bench::make_step_batch(model.config(), run.stage(3).batch, a.text_len, a.labelled)),
        max_grad_norm(run.stage(3).max_grad_norm),
        flops(bench::model_flops(model.config(), batch.B, batch.T, batch.n_img, model.config().top_k)) {}

  double operator()() {
    opt.zero_grad();
    const double loss = model.forward(batch.ids, batch.B, batch.T, batch.pixels, &batch.labels).total;
    model.backward();
    opt.clip_grad_norm(max_grad_norm);
    opt.step();
    return loss;
  }
};

Args g_args;
double g_flops = 0;

void BM_cumo_step(benchmark::State& st) {
  Step step(g_args);
  g_flops = step.flops;
  double loss = 0;
  for (auto _ : st) benchmark::DoNotOptimize(loss = step());
  st.counters["loss"] = loss;
  st.counters["FLOP/s"] = benchmark::Counter(step.flops * double(st.iterations()), benchmark::Counter::kIsRate);
  st.SetLabel(std::to_string(step.batch.B) + "x" + std::to_string(step.batch.T) + " tokens");
}

// The floor: the step's FLOPs as square n³ fp32 GEMMs (n = 256, about the demo's widest operand side), through the
// same cpu::gemm the step uses (oneDNN when the build has it, else Eigen's kernel).
void BM_dense_equal_flop(benchmark::State& st) {
  if (g_flops <= 0) {  // the step's FLOP count comes from cumo_step, which a --benchmark_filter may leave out
    st.SkipWithError("dense_equal_flop needs cumo_step to run first (its FLOP count)");
    return;
  }
  const std::int64_t n = 256;
  const double per = 2.0 * double(n) * double(n) * double(n);
  const int reps = std::max(1, int(g_flops / per + 0.5));
  Rng rng(3);
  Tensor a = Tensor::empty({n, n}), b = Tensor::empty({n, n}), c = Tensor::empty({n, n});
  rng.fill_normal(a);
  rng.fill_normal(b);
  for (auto _ : st)
    for (int r = 0; r < reps; ++r) {
      cpu::gemm(cpu::Op::N, cpu::Op::N, n, n, n, 1.f, a.data<float>(), n, b.data<float>(), n, 0.f, c.data<float>(), n);
      benchmark::DoNotOptimize(c.raw());
    }
  st.counters["FLOP/s"] = benchmark::Counter(per * reps * double(st.iterations()), benchmark::Counter::kIsRate);
}

class TimeReporter : public benchmark::ConsoleReporter {
 public:
  std::map<std::string, double> ms;
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs)
      if (r.run_type == Run::RT_Iteration) ms[r.run_name.function_name] = r.GetAdjustedRealTime();
    ConsoleReporter::ReportRuns(runs);
  }
};

}  // namespace

int main(int argc, char** argv) try {
  app::retain_freed_memory();  // as cumo_train does
  benchmark::Initialize(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    CUMO_CHECK(i + 1 < argc, "bench_cpu_cumo_step: ", k, " needs a value (see the header of bench_cpu_cumo_step.cpp)");
    if (k == "--config") g_args.config = argv[++i];
    else if (k == "--text-len") g_args.text_len = cli::to_int("bench_cpu_cumo_step", k, argv[++i], 1);
    else if (k == "--labelled") g_args.labelled = cli::to_int("bench_cpu_cumo_step", k, argv[++i], 0);
    else fail("bench_cpu_cumo_step: unknown argument '", k, "'");
  }
  benchmark::RegisterBenchmark("cumo_step", BM_cumo_step)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("dense_equal_flop", BM_dense_equal_flop)->Unit(benchmark::kMillisecond)->UseRealTime();
  TimeReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const double step = reporter.ms["cumo_step"], dense = reporter.ms["dense_equal_flop"];
  if (step > 0 && dense > 0)
    std::printf("\ncumo step %.2f ms  %.1f GFLOP/s  | equal-FLOP dense GEMM %.2f ms (step / dense %.2f)\n", step,
                g_flops / (step * 1e-3) / 1e9, dense, step / dense);
  benchmark::Shutdown();
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_cpu_cumo_step: %s\n", e.what());
  return 1;
}
