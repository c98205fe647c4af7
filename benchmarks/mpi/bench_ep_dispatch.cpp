// Expert-parallel token exchange on CPU ranks against a raw MPI_Alltoallv of the same bytes (Google Benchmark).
//   OMP_NUM_THREADS=1 mpirun -np 2 build-bench/benchmarks/mpi/bench_ep_dispatch
// Each rank routes T tokens (H wide, top-2 of E experts, random router) and runs the exchange of one SparseMoE
// forward: the per-expert counts, the rows to their experts' ranks (dispatch) and the outputs back (combine),
// including the permutations to and from expert-major order. The baseline is what MPI alone costs for the same
// traffic: one MPI_Alltoallv of the per-rank row bytes each way, on the same buffers sizes, no counts exchange and
// no permutation. The allocator keeps freed memory, as in cumo_train. Fixed iteration counts: every rank runs every collective in the same order. Rank 0 reports.
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <malloc.h>

#include <cstdint>
#include <vector>

#include "cumo/backend/cpu.hpp"
#include "cumo/dist/expert_parallel.hpp"
#include "cumo/dist/mpi.hpp"
#include "cumo/moe/router.hpp"

using namespace cumo;

namespace {
dist::MpiCommunicator* g_comm = nullptr;

struct Routed {
  Tensor xs;           // (T*K, H) expert-sorted
  DispatchPlan plan;   // over E experts
};
Routed route(std::int64_t T, std::int64_t H, int E) {
  const backend::Cpu be;
  Rng rng(11 + std::uint64_t(g_comm->rank()));
  Router<TopK<2>> router(H, E);
  router.reset_parameters(rng);
  Tensor x = Tensor::empty({T, H});
  rng.fill_normal(x);
  RouterOutput ro;
  router.forward(be, x, false, nullptr, ro);
  Routed r;
  r.plan.tokens = T;
  r.plan.experts = E;
  r.plan.top_k = 2;
  r.plan.demand = be.empty({E}, DType::i32);
  r.plan.counts = be.empty({E}, DType::i32);
  r.plan.offsets = be.empty({E + 1}, DType::i32);
  r.plan.row_of_slot = be.empty({T * 2}, DType::i32);
  r.plan.slot_of_row = be.empty({T * 2}, DType::i32);
  be.make_plan(ro.topk_idx, r.plan);
  r.xs = be.empty({T * 2, H});
  be.gather_rows(x, r.plan, r.xs);
  return r;
}

void BM_ep_exchange(benchmark::State& state) {
  const std::int64_t T = state.range(0), H = state.range(1);
  const int E = int(state.range(2));
  const Routed r = route(T, H, E);
  const dist::ExpertExchange ep(*g_comm, E);
  dist::ExpertExchange::Saved s;
  for (auto _ : state) {
    ep.dispatch(r.xs, r.plan, s);                    // (rows_local, H)
    const Tensor back = ep.to_senders(s.xs_local, s);  // (rows, H): the experts' identity, sent back
    benchmark::DoNotOptimize(back.data<float>());
  }
  state.SetBytesProcessed(state.iterations() * 2 * r.xs.numel() * 4);
}

void BM_raw_alltoallv(benchmark::State& state) {
  const std::int64_t T = state.range(0), H = state.range(1);
  const int E = int(state.range(2));
  const Routed r = route(T, H, E);
  // the same per-rank byte counts as the exchange
  const dist::ExpertExchange ep(*g_comm, E);
  dist::ExpertExchange::Saved s;
  ep.dispatch(r.xs, r.plan, s);
  const int K = g_comm->size();
  std::vector<int> sc(K), rc(K), sd(K), rd(K);
  for (int q = 0, so = 0, ro = 0; q < K; ++q) {
    sc[q] = int(s.send_rows[q] * H * 4);
    rc[q] = int(s.recv_rows[q] * H * 4);
    sd[q] = so;
    rd[q] = ro;
    so += sc[q];
    ro += rc[q];
  }
  std::vector<char> recv(std::size_t(rd[K - 1] + rc[K - 1])), back(std::size_t(r.xs.numel() * 4));
  for (auto _ : state) {
    MPI_Alltoallv(r.xs.data<float>(), sc.data(), sd.data(), MPI_BYTE, recv.data(), rc.data(), rd.data(), MPI_BYTE,
                  g_comm->handle());
    MPI_Alltoallv(recv.data(), rc.data(), rd.data(), MPI_BYTE, back.data(), sc.data(), sd.data(), MPI_BYTE,
                  g_comm->handle());
    benchmark::DoNotOptimize(back.data());
  }
  state.SetBytesProcessed(state.iterations() * 2 * r.xs.numel() * 4);
}

// T tokens per rank, H, E: a CLIP-MoE layer of the demo (64-wide), a Mixtral-like layer
#define CUMO_EP_SHAPES ->Args({1024, 64, 4})->Args({256, 1024, 8})->Args({2048, 1024, 8})
BENCHMARK(BM_ep_exchange) CUMO_EP_SHAPES->Iterations(200)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_raw_alltoallv) CUMO_EP_SHAPES->Iterations(200)->Unit(benchmark::kMicrosecond);

class Silent : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};
}  // namespace

int main(int argc, char** argv) {
  // The allocator setting cumo_train runs with (app::retain_freed_memory): freed blocks stay in the heap, so the
  // exchange's output tensors are not fresh pages (page faults) on every call.
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
  dist::MpiSession session(&argc, &argv);
  dist::MpiCommunicator comm;
  g_comm = &comm;
  benchmark::Initialize(&argc, argv);
  Silent silent;
  if (comm.rank() == 0)
    benchmark::RunSpecifiedBenchmarks();
  else
    benchmark::RunSpecifiedBenchmarks(&silent);
  benchmark::Shutdown();
  return 0;
}
