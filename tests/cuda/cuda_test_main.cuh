#pragma once
// The main() of the CUDA test binaries: the seed (printed; CUMO_TEST_SEED=<n> repeats a run), then either the
// doctest cases on the GPU or, without a usable one, "SKIPPED: no CUDA device (...)" and exit 77 (ctest: skipped).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include <doctest/doctest.h>

#include "cumo/backend/cuda/common.cuh"

namespace cumo::test {

inline int run_cuda_tests(int argc, char** argv, const char* what, std::uint64_t& seed) {
  const char* env_seed = std::getenv("CUMO_TEST_SEED");
  seed = env_seed ? std::strtoull(env_seed, nullptr, 10) : std::random_device{}();
  std::printf("%s: seed %llu (CUMO_TEST_SEED=%llu repeats this run)\n", what, (unsigned long long)seed,
              (unsigned long long)seed);
  std::string why;
  if (!gpu::device_available(&why)) {
    std::printf("SKIPPED: no CUDA device (cudaGetDeviceCount: %s)\n", why.c_str());
    std::fflush(stdout);
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    std::printf("%s: device 0 = %s (sm_%d%d, %d SMs)\n", what, prop.name, prop.major, prop.minor,
                prop.multiProcessorCount);
  doctest::Context ctx;
  ctx.applyCommandLine(argc, argv);
  return ctx.run();
}

}  // namespace cumo::test
