#!/usr/bin/env bash
# CPU benchmarks of docs/benchmarks.md: the MoE layer vs the equal-FLOP dense GEMM pair, with Eigen's own GEMM and
# with OpenBLAS, at the SPEC shapes. Prints both ratio tables; run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${BUILD:-build-bench}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCUMO_CUDA=OFF -DCUMO_BUILD_TESTS=OFF -DCUMO_BUILD_EXAMPLES=OFF \
      -DCUMO_BUILD_TOOLS=OFF -DCUMO_BUILD_BENCHMARKS=ON >/dev/null
cmake --build "$BUILD" -j2 --target bench_moe_cpu bench_moe_cpu_blas
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
echo "== Eigen GEMM (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
"$BUILD/benchmarks/bench_moe_cpu" --benchmark_min_time=2 "$@"
echo "== OpenBLAS GEMM (CUMO_CPU_BLAS)"
"$BUILD/benchmarks/bench_moe_cpu_blas" --benchmark_min_time=2 "$@"
