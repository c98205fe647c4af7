// cumo_parity [--device cpu|cuda] [--expert-parallel K] [--dtype f32|bf16|f16] FILE...
// Runs every fixture whose `kind` it supports, building each model from the fixture's metadata `config` alone,
// prints one line per checked tensor and ends with "N passed, M failed". Exit status 1 when anything failed or a
// file could not be run (unsupported kind, unreadable file); 77 for --device cuda on a machine without a CUDA device
// (ctest's "skipped", as the CUDA test binaries).
// Under `mpirun -np K … --expert-parallel K` (a build with MPI) the sparse block kinds run with their experts sharded
// over the K ranks (parity/moe.hpp); the verdict is over every rank's checks. With --device cuda (a build with NCCL)
// the ranks are GPUs, one each, and the rows travel over NCCL in device memory (unverified: never run on a GPU);
// `--device cuda --expert-parallel 1` runs that exchange in one process.
// --dtype bf16|f16 (CPU) builds every model with its matrix weights in that dtype and no gradients, rounds the inputs
// to it and compares the outputs against tolerances derived from the rounding (parity/report.hpp, Report::tol);
// gradients are compared in fp32 only.
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cumo/dist/world.hpp"
#include "cumo/io/safetensors.hpp"
#if defined(__CUDACC__)
#include "cumo/backend/cuda.cuh"
#if defined(CUMO_WITH_NCCL) && CUMO_WITH_NCCL
#include "cumo/dist/nccl.cuh"
#endif
#endif
#include "parity/kinds.hpp"

namespace {

#if defined(__CUDACC__) && defined(CUMO_WITH_NCCL) && CUMO_WITH_NCCL
constexpr bool kHaveNccl = true;
#else
constexpr bool kHaveNccl = false;
#endif

int usage() {
  std::fprintf(stderr, "usage: cumo_parity [--device cpu|cuda] [--expert-parallel K] [--dtype f32|bf16|f16] FILE...\n"
                       "  --expert-parallel K  under mpirun -np K: the sparse blocks' experts sharded over the K ranks (with\n"
                       "                       --device cuda: one GPU per rank, over NCCL)\n"
                       "  --dtype D            the models' matrix weights and inputs in D (CPU; outputs only)\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<cumo::dist::World> world;
  try {
    world.emplace(&argc, &argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cumo_parity: %s\n", e.what());
    return 1;
  }
  cumo::dist::Communicator& comm = world->comm();
  const bool rank0 = comm.rank() == 0;
  std::string device = "cpu", dtype = "f32";
  int expert_parallel = 0;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--device") && i + 1 < argc)
      device = argv[++i];
    else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc)
      dtype = argv[++i];
    else if (!std::strcmp(argv[i], "--expert-parallel") && i + 1 < argc)
      expert_parallel = std::atoi(argv[++i]);
    else if (!std::strncmp(argv[i], "--device=", 9))
      device = argv[i] + 9;
    else if (argv[i][0] == '-')
      return usage();
    else
      files.push_back(argv[i]);
  }
  if (files.empty()) return usage();
  cumo::DType weights = cumo::DType::f32;
  if (dtype == "bf16") weights = cumo::DType::bf16;
  else if (dtype == "f16") weights = cumo::DType::f16;
  else if (dtype != "f32") {
    if (rank0) std::fprintf(stderr, "cumo_parity: --dtype '%s' is not supported (accepted: f32, bf16, f16)\n", dtype.c_str());
    return 2;
  }
  if (weights != cumo::DType::f32 && device != "cpu") {
    if (rank0) std::fprintf(stderr, "cumo_parity: --dtype %s runs on the CPU (backend::Cuda holds fp32 weights)\n", dtype.c_str());
    return 2;
  }
  if (expert_parallel || comm.size() > 1) {
    // the same arguments on every rank, so every rank ends here the same way
    std::string why;
    if (expert_parallel < 1)
      why = "several ranks need --expert-parallel K (K = the number of ranks)";
    else if (expert_parallel != comm.size())
      why = "--expert-parallel " + std::to_string(expert_parallel) + " but " + std::to_string(comm.size()) +
            " ranks: run it as mpirun -np " + std::to_string(expert_parallel) + (cumo::dist::kHaveMpi ? "" :
            " in a build with MPI (this one has none)");
    else if (device != "cpu" && !kHaveNccl)
      why = "--expert-parallel with --device " + device + " needs a build with CUDA and NCCL (GPU ranks exchange "
            "rows over NCCL); this one has none";
    if (!why.empty()) {
      if (rank0) std::fprintf(stderr, "cumo_parity: %s\n", why.c_str());
      return 2;
    }
  }
  cumo::dist::Communicator* ep = expert_parallel ? &comm : nullptr;
#if defined(__CUDACC__) && defined(CUMO_WITH_NCCL) && CUMO_WITH_NCCL
  std::optional<cumo::dist::NcclCommunicator> nccl;  // GPU ranks' expert exchange (--device cuda --expert-parallel)
#endif

  std::map<std::string, cumo::parity::Runner> table;
  if (device == "cpu") {
    table = cumo::parity::runners<cumo::backend::Cpu>(ep);
  } else if (device == "cuda") {
#if defined(__CUDACC__)
    if (ep) {
#if defined(CUMO_WITH_NCCL) && CUMO_WITH_NCCL
      // one GPU per rank (claim_gpu makes it current), or every rank skips alike
      const std::string mine = cumo::dist::claim_gpu(comm);
      if (cumo::dist::any(comm, !mine.empty())) {
        if (rank0)
          std::fprintf(stderr, "cumo_parity: --device cuda: %s (SKIPPED)\n",
                       mine.empty() ? "another rank has no GPU of its own" : mine.c_str());
        return 77;
      }
      nccl.emplace(comm);
      ep = &*nccl;
#endif
    } else {
      int n = 0;
      if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        std::fprintf(stderr, "cumo_parity: --device cuda but no CUDA device is available (SKIPPED)\n");
        return 77;
      }
    }
    table = cumo::parity::runners<cumo::backend::Cuda>(ep);
#else
    std::fprintf(stderr, "cumo_parity: this build has no CUDA backend (configure with CUMO_CUDA=ON)\n");
    return 1;
#endif
  } else {
    return usage();
  }

  cumo::parity::Report report;
  report.weights = weights;
  if (!rank0) report.prefix = "[rank " + std::to_string(comm.rank()) + "] ";
  int unrun = 0;
  for (const std::string& path : files) {
    try {
      const auto file = cumo::io::SafeTensors::open(path);
      const auto& meta = file.metadata();
      const auto kind_it = meta.find("kind");
      const std::string kind = kind_it == meta.end() ? "" : kind_it->second;
      if (rank0)
        std::printf("%s  [kind %s, device %s%s%s]\n", path.c_str(), kind.empty() ? "?" : kind.c_str(), device.c_str(),
                    ep ? (", experts over " + std::to_string(comm.size()) + " ranks").c_str() : "",
                    weights != cumo::DType::f32 ? (", " + dtype + " weights").c_str() : "");
      const auto run = table.find(kind);
      if (run == table.end()) {
        std::printf("  unsupported kind '%s'\n", kind.c_str());
        ++unrun;
        continue;
      }
      const auto config_it = meta.find("config");
      CUMO_CHECK(config_it != meta.end(), "fixture has no metadata 'config'");
      const auto config = nlohmann::json::parse(config_it->second);
      cumo::parity::check_claimed_sizes(file, kind, config);
      run->second(file, config, report);
    } catch (const std::exception& e) {
      std::printf("  error: %s\n", e.what());
      ++unrun;
    }
  }
  std::fflush(stdout);
  // checks: every rank's; files not run or skipped: each rank meets the same ones, so the most any rank met
  std::vector<std::int64_t> totals{report.passed, report.failed}, unrun_skipped{unrun, report.skipped};
  if (comm.size() > 1) {
    cumo::dist::allreduce_sum(comm, std::span<std::int64_t>(totals));
    comm.allreduce(unrun_skipped, cumo::dist::ReduceOp::max);
  }
  totals.insert(totals.end(), unrun_skipped.begin(), unrun_skipped.end());
  if (!rank0) return totals[1] || totals[2] ? 1 : 0;
  if (totals[2]) std::printf("%lld file(s) could not be run\n", (long long)totals[2]);
  std::printf("%lld passed, %lld failed%s\n", (long long)totals[0], (long long)totals[1],
              totals[3] ? (", " + std::to_string(totals[3]) + " skipped").c_str() : "");
  return totals[1] || totals[2] ? 1 : 0;
}
