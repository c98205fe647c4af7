// cumo_train on the GPU: the shared run (train_run.hpp) instantiated for backend::Cuda, in the one translation unit
// nvcc compiles (cumo_train.cpp, with main and the CPU path, stays g++'s). Several ranks (mpirun, or the NCCL file
// rendezvous) train data parallel with one GPU each, over dist::NcclCommunicator, when the build found NCCL, with
// --zero1, --expert-parallel and --overlap-grad-sum (the last two not together: NCCL forbids two threads issuing at
// once; cumo_stage.hpp refuses it on every rank). Unverified: no GPU has run the multi-rank paths.
#include <cstdlib>
#include <iostream>

#include "cumo/backend/cuda.cuh"
#include "train_run.hpp"
#if defined(CUMO_WITH_NCCL) && CUMO_WITH_NCCL
#include "cumo/dist/nccl.cuh"
#endif

namespace cumo_train_app {

namespace {

int env_int(const char* name) {
  const char* v = std::getenv(name);
  CUMO_CHECK(v && *v, "CUMO_NCCL_RENDEZVOUS is set but ", name, " is not (the rank and world size of this process)");
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  CUMO_CHECK(*end == '\0' && x >= 0, name, " must be a non-negative integer, got '", v, "'");
  return int(x);
}

}  // namespace

std::optional<int> run_on_gpu(const Args& a, dist::Communicator& world) {
  std::string why;
  const bool have_gpu = cumo::gpu::device_available(&why);
  cumo::gpu::Options o;
  o.allow_tf32 = a.precision != "fp32";
  o.dense_bf16 = a.precision == "bf16";
  const char* rendezvous = std::getenv("CUMO_NCCL_RENDEZVOUS");
  if (world.size() == 1 && !rendezvous) {
    CUMO_CHECK(have_gpu || a.device != "cuda", "--device cuda but no CUDA device is available (", why, ")");
    if (!have_gpu) return std::nullopt;
    cumo::dist::SelfCommunicator one;
    return run(a, one, cumo::backend::Cuda(o));
  }
#if defined(CUMO_WITH_NCCL) && CUMO_WITH_NCCL
  if (world.size() > 1) {
    // One GPU per rank: each rank takes its own (claim_gpu makes it current), or the job does not run on GPUs.
    const std::string mine = cumo::dist::claim_gpu(world);
    if (a.device == "auto") {
      if (cumo::dist::any(world, !mine.empty())) {
        if (world.rank() == 0)
          std::cerr << "note: --device auto: not every rank has a GPU of its own; training on CPU ranks\n";
        return std::nullopt;
      }
    } else {
      cumo::dist::agree(world, mine.empty() ? "" : "--device cuda: " + mine);
    }
    cumo::dist::NcclCommunicator nccl(world);
    return run(a, nccl, cumo::backend::Cuda(o));
  }
  // Started without MPI: CUMO_NCCL_RENDEZVOUS names a fresh file, CUMO_RANK and CUMO_WORLD_SIZE this process's place.
  const int rank = env_int("CUMO_RANK"), size = env_int("CUMO_WORLD_SIZE");
  CUMO_CHECK(have_gpu, "rank ", rank, ": --device ", a.device, " with CUMO_NCCL_RENDEZVOUS, but no CUDA device is "
             "available (", why, ")");
  cumo::dist::use_local_gpu(rank);
  auto nccl = cumo::dist::NcclCommunicator::rendezvous_file(rendezvous, rank, size);
  return run(a, *nccl, cumo::backend::Cuda(o));
#else
  (void)rendezvous;
  CUMO_CHECK(a.device == "auto", "--device cuda with ", world.size(), " ranks: GPU ranks need NCCL, which this build "
             "did not find (configure with the CUDA toolkit's NCCL: cumo: NCCL ON); train on CPU ranks with --device "
             "cpu");
  return std::nullopt;
#endif
}

}  // namespace cumo_train_app
