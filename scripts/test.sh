#!/usr/bin/env bash
# The test command: install what is missing, configure, build (-j2) and run the default test set, then the same
# suite's CPU tests once more under AddressSanitizer + UndefinedBehaviorSanitizer in a separate build directory.
#   BUILD=dir          the build directory (default build). Whatever an earlier command left there (run_demo.sh
#                      configures it without tests), it is reconfigured with the tests, tools, examples and
#                      benchmarks on, so this command always builds and runs the full default set.
#   SANITIZE=0         skip the sanitizer pass (default 1); SANITIZE_BUILD=dir its build directory (build-asan)
#   CUMO_CMAKE_ARGS    extra configure arguments for the main build
# Heavy cases (long fuzzing, big shapes) are labelled `heavy`: run them with  ctest --test-dir build -L heavy
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${BUILD:-build}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCUMO_BUILD_TESTS=ON -DCUMO_BUILD_TOOLS=ON \
      -DCUMO_BUILD_EXAMPLES=ON -DCUMO_BUILD_BENCHMARKS=ON ${CUMO_CMAKE_ARGS:-}
cmake --build "$BUILD" -j2
# --no-tests=error: a configuration that registers nothing fails instead of passing by running nothing
ctest --test-dir "$BUILD" -LE heavy --output-on-failure -j2 --no-tests=error

if [[ ${SANITIZE:-1} != 0 ]]; then
  # ASan + UBSan (any UB report fails the test: -fno-sanitize-recover). The CPU suite: the doctest binary, the
  # tools' tests (parity on every fixture, the app smoke/resume/safety runs, the distillation runs) and the
  # examples. Left out: the CUDA backend (nvcc objects are not instrumented, and there is no GPU here), the
  # benchmarks (timing, not correctness), the fuzzers (already ASan + UBSan builds), the installed-package check (it rebuilds the README example outside
  # this build) and the `heavy` label. -O1 keeps Eigen fast enough to fit the CI budget. Built without MPI
  # (-DCUMO_MPI=OFF): the distributed suite runs in the pass above, and this one proves a build without MPI works.
  # Built without oneDNN (-DCUMO_DNNL=OFF): the pass above runs the GEMMs through oneDNN, this one through Eigen's
  # own kernel, so both engines of backend/cpu/gemm.hpp run the whole suite (and oneDNN's JIT code, which ASan
  # cannot instrument, stays out of the sanitised run).
  SAN=${SANITIZE_BUILD:-build-asan}
  flags="-O1 -g1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
  cmake -S . -B "$SAN" -DCMAKE_BUILD_TYPE=None -DCUMO_CUDA=OFF -DCUMO_BUILD_TESTS=ON -DCUMO_BUILD_TOOLS=ON \
        -DCUMO_BUILD_EXAMPLES=ON -DCUMO_BUILD_BENCHMARKS=OFF -DCUMO_BUILD_FUZZERS=OFF -DCUMO_APP_NATIVE=ON -DCUMO_MPI=OFF -DCUMO_DNNL=OFF \
        "-DCMAKE_CXX_FLAGS=$flags" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined"
  cmake --build "$SAN" -j2
  # detect_leaks=0: LeakSanitizer needs ptrace, which containers often deny; leaks are not this pass's target
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir "$SAN" -LE 'heavy|cuda' -E 'readme_example_against_installed_package' \
          --output-on-failure -j2 --no-tests=error
fi
