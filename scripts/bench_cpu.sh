#!/usr/bin/env bash
# CPU benchmarks of docs/benchmarks.md: the MoE layer vs the equal-FLOP dense GEMM pair at the SPEC shapes, with each
# GEMM engine: oneDNN (what the build ships when libdnnl-dev is there), Eigen's own kernel and OpenBLAS. Prints the
# ratio tables; run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${BUILD:-build-bench}
bash scripts/configure_bench.sh "$BUILD"  # keeps an existing directory's other options
cmake --build "$BUILD" -j2 --target bench_moe_cpu bench_moe_cpu_blas
# the Eigen twin exists when the build has oneDNN (whose GEMMs bench_moe_cpu then runs)
cmake --build "$BUILD" -j2 --target bench_moe_cpu_eigen >/dev/null 2>&1 || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
if [[ -x $BUILD/benchmarks/bench_moe_cpu_eigen ]]; then
  echo "== oneDNN GEMM (OMP_NUM_THREADS=$OMP_NUM_THREADS)"
  "$BUILD/benchmarks/bench_moe_cpu" --benchmark_min_time=2 "$@"
  echo "== Eigen GEMM"
  "$BUILD/benchmarks/bench_moe_cpu_eigen" --benchmark_min_time=2 "$@"
else
  echo "== Eigen GEMM (OMP_NUM_THREADS=$OMP_NUM_THREADS; no oneDNN in this build)"
  "$BUILD/benchmarks/bench_moe_cpu" --benchmark_min_time=2 "$@"
fi
echo "== OpenBLAS GEMM (CUMO_CPU_BLAS)"
"$BUILD/benchmarks/bench_moe_cpu_blas" --benchmark_min_time=2 "$@"
