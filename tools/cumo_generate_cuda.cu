// cumo_generate on the GPU: the shared run (generate_run.hpp) instantiated for backend::Cuda, in the one translation
// unit nvcc compiles (cumo_generate.cpp, with main and the CPU run, stays g++'s). The weights are loaded straight
// into device memory in --dtype (bf16 / f16: the products round the activations to it and accumulate in fp32).
// Unverified: this has never run on a GPU.
#include "cumo/backend/cuda.cuh"
#include "generate_run.hpp"

namespace cumo_generate_app {

int run_on_gpu(const Args& a) {
  std::string why;
  CUMO_CHECK(cumo::gpu::device_available(&why), "--device cuda but no CUDA device is available (", why, ")");
  return run(a, cumo::backend::Cuda());
}

}  // namespace cumo_generate_app
