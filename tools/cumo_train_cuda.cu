// cumo_train on the GPU: the shared run (train_run.hpp) instantiated for backend::Cuda, in the one translation unit
// nvcc compiles (cumo_train.cpp, with main and the CPU path, stays g++'s).
#include "cumo/backend/cuda.cuh"
#include "train_run.hpp"

namespace cumo_train_app {

std::optional<int> run_on_gpu(const Args& a) {
  std::string why;
  const bool have_gpu = cumo::gpu::device_available(&why);
  CUMO_CHECK(have_gpu || a.device != "cuda", "--device cuda but no CUDA device is available (", why, ")");
  if (!have_gpu) return std::nullopt;
  cumo::gpu::Options o;
  o.allow_tf32 = a.precision != "fp32";
  o.dense_bf16 = a.precision == "bf16";
  cumo::dist::SelfCommunicator one;  // multi-GPU data parallelism needs the NCCL communicator (not written yet)
  return run(a, one, cumo::backend::Cuda(o));
}

}  // namespace cumo_train_app
