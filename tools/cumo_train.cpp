// cumo_train: trains the CuMo reference model with the paper's three-stage recipe from a JSON config.
//
//   cumo_train --config CONFIG.json [--stage 1|2|3|all] [--resume DIR] [--from DIR [--vision-from DIR]] [--out DIR]
//              [--variant dense|moe|moe_nobz|moe_scratch|moe_mlponly|moe_conn8] [--seed S] [--max-steps N]
//              [--log-every N] [--quiet]
//              [--device auto|cpu|cuda] [--precision fp32|tf32|bf16] [--zero1] [--overlap-grad-sum]
//              [--expert-parallel K]
//
// Built with the CUDA backend (tools/cumo_train_cuda.cu joins the target), the same tool trains
// models::CuMo<backend::Cuda> when a GPU is present (--device auto, the default) or asked for (--device cuda); its
// checkpoints are the CPU run's format, so cumo_eval and a CPU --resume read them. The run itself is train_run.hpp.
// Under `mpirun -np N` (a build with MPI) the N processes train data parallel: each its share of every global batch,
// the gradients summed deterministically, rank 0 writing; on CPU ranks, or on GPU ranks (one GPU each, over NCCL,
// when every rank has one or --device cuda); --expert-parallel K splits the MoE blocks' experts over groups of K
// ranks (docs/distributed.md; GPU ranks unverified).
// Stage s > 1 starts from the previous stage's final checkpoint (<out>/stage<s-1>, or --from DIR). --resume DIR
// continues from a checkpoint this tool wrote: a stopped stage (<out>/stage<s>-partial) continues where it stopped,
// bitwise; a finished stage (<out>/stage<s>) goes on with the next one. See docs/training_app.md.
#include <iostream>
#include <new>
#include <optional>
#include <string>
#include <string_view>

#include "cumo/dist/world.hpp"
#include "train_run.hpp"

using namespace cumo_train_app;

namespace {
std::string rank_prefix(const cumo::dist::Communicator& comm) {
  return comm.size() > 1 ? "rank " + std::to_string(comm.rank()) + ": " : "";
}
}  // namespace

int main(int argc, char** argv) {
  app::retain_freed_memory();
  // Under mpirun (a build with MPI): one data-parallel rank per process; otherwise a world of one.
  std::optional<dist::World> world;
  try {
    world.emplace(&argc, &argv);
  } catch (const std::exception& e) {
    std::cerr << "cumo_train: " << e.what() << "\n";
    return 1;
  }
  dist::Communicator& comm = world->comm();
  Args a;
  auto on_switch = [&](std::string_view f) {
    if (f == "--quiet" || f == "-q") return a.quiet = true;
    if (f == "--overwrite") return a.overwrite = true;
    if (f == "--zero1") return a.zero1 = true;
    if (f == "--overlap-grad-sum") return a.overlap_grad_sum = true;
    return false;
  };
  auto on_value = [&](std::string_view f, const char* v) {
    if (f == "--config") a.config = v;
    else if (f == "--stage") a.stage = v;
    else if (f == "--resume") a.resume = v;
    else if (f == "--from") a.from = v;
    else if (f == "--vision-from") a.vision_from = v;
    else if (f == "--out") a.out = v;
    else if (f == "--variant") a.variant = v;
    else if (f == "--seed") a.seed = cli::to_int(kTool, f, v, 0);
    else if (f == "--max-steps") a.max_steps = cli::to_int(kTool, f, v, 0);
    else if (f == "--log-every") a.log_every = cli::to_int(kTool, f, v, 1);
    else if (f == "--device") a.device = v;
    else if (f == "--precision") a.precision = v;
    else if (f == "--expert-parallel") a.expert_parallel = cli::to_int(kTool, f, v, 1);
    else return false;
    return true;
  };
  if (const auto status = cli::parse_args(kTool, argc, argv, usage, on_switch, on_value)) return *status;

  try {
    CUMO_CHECK(a.device == "auto" || a.device == "cpu" || a.device == "cuda",
               "--device must be auto, cpu or cuda, got '", a.device, "'");
    CUMO_CHECK(a.precision == "fp32" || a.precision == "tf32" || a.precision == "bf16",
               "--precision must be fp32, tf32 or bf16, got '", a.precision, "'");
#if defined(CUMO_TRAIN_CUDA)
    if (a.device != "cpu")
      if (const auto status = run_on_gpu(a, comm)) return *status;
#else
    CUMO_CHECK(a.device != "cuda", "--device cuda, but this build has no CUDA backend "
               "(configure with -DCUMO_CUDA=ON on a machine with the CUDA toolkit)");
#endif
    CUMO_CHECK(a.precision == "fp32", "--precision ", a.precision, " is for the GPU; the CPU trains in fp32");
    return run<backend::Cpu>(a, comm);
  } catch (const dist::AgreedError& e) {
    // every rank has this same error: one report, and each rank ends on its own
    if (comm.rank() == 0) std::cerr << "\ncumo_train: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "\ncumo_train: " << rank_prefix(comm) << "out of memory (std::bad_alloc): the model, a batch or the "
                 "data does not fit in this machine's memory; reduce the model sizes, the stage's batch or max_length\n";
    if (comm.size() > 1) comm.abort(1);
    return 1;
  } catch (const std::exception& e) {
    // An error on some ranks only (a NaN, a collective that timed out): the others would wait for this one in
    // their next collective, so the whole job ends now.
    std::cerr << "\ncumo_train: " << rank_prefix(comm) << e.what() << "\n";
    if (comm.size() > 1) comm.abort(1);
    return 1;
  }
}
