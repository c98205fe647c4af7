#pragma once
// The main() of the CUDA test binaries: the seed (printed; CUMO_TEST_SEED=<n> repeats a run), then either the
// doctest cases on the GPU or, without a usable one, "SKIPPED: no CUDA device (...)" and exit 77 (ctest: skipped).
// `--host-only` runs just the test-suite "host" (the cases that need no GPU), anywhere. Also the tensor helpers the
// CUDA test files share (on_gpu, on_cpu, poisoned).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "cumo/backend/cuda/common.cuh"
#include "cumo/core/tensor.hpp"

namespace cumo::test {

inline Tensor on_gpu(const Tensor& t) { return t.to(Device::cuda); }
inline Tensor on_cpu(const Tensor& t) { return t.to(Device::cpu); }
// A device tensor whose every element is NaN (floating dtypes) or −77777 (i32): an output a kernel forgets to write
// shows up in the comparison.
inline Tensor poisoned(Shape s, DType t = DType::f32) {
  Tensor h = Tensor::empty(s, t);
  for (std::int64_t i = 0; i < h.numel(); ++i)
    detail::store_from_double(h.raw(), t, i, t == DType::i32 ? -77777.0 : std::numeric_limits<double>::quiet_NaN());
  return on_gpu(h);
}

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
