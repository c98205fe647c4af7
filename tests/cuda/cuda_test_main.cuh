#pragma once
// The main() of the CUDA test binaries: the seed (printed; CUMO_TEST_SEED=<n> repeats a run), then either the
// doctest cases on the GPU or, without a usable one, "SKIPPED: no CUDA device (...)" and exit 77 (ctest: skipped).
// `--host-only` runs just the test-suite "host" (the cases that need no GPU), anywhere.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "cumo/backend/cuda/common.cuh"

namespace cumo::test {

inline int run_cuda_tests(int argc, char** argv, const char* what, std::uint64_t& seed) {
  const char* env_seed = std::getenv("CUMO_TEST_SEED");
  seed = env_seed ? std::strtoull(env_seed, nullptr, 10) : std::random_device{}();
  std::printf("%s: seed %llu (CUMO_TEST_SEED=%llu repeats this run)\n", what, (unsigned long long)seed,
              (unsigned long long)seed);
  bool host_only = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host-only") == 0)
      host_only = true;
    else
      args.push_back(argv[i]);
  }
  doctest::Context ctx;
  ctx.applyCommandLine(int(args.size()), args.data());
  if (host_only) {
    ctx.addFilter("test-suite", "host");
    return ctx.run();
  }
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
  return ctx.run();
}

}  // namespace cumo::test
