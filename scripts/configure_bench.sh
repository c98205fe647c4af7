#!/usr/bin/env bash
# Configures build directory $1 for the CPU benchmarks (bench_cpu.sh, benchmarks/cpu_step_vs_torch.sh). A fresh
# directory gets a benchmarks-only Release configuration; an existing one (say build/, with tests and tools) keeps
# its other options and only gains the benchmarks.
set -euo pipefail
BUILD=$1
if [[ -f $BUILD/CMakeCache.txt ]]; then
  cmake -S . -B "$BUILD" -DCUMO_BUILD_BENCHMARKS=ON >/dev/null
else
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCUMO_CUDA=OFF -DCUMO_BUILD_TESTS=OFF -DCUMO_BUILD_EXAMPLES=OFF \
        -DCUMO_BUILD_TOOLS=OFF -DCUMO_BUILD_BENCHMARKS=ON >/dev/null
fi
