#!/usr/bin/env bash
# The CPU training step, cumo vs PyTorch eager, side by side in one run (docs/benchmarks.md): the demo's stage-3
# model and batch (configs/demo.json, 16 × 116 tokens), at 1 and 2 threads, each side ROUNDS times, alternating
# so that both see the same machine state. Run on an otherwise idle machine.
#   BUILD=dir (default build-bench)   ROUNDS=n (default 3)   CONFIG=run config (default configs/demo.json)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-bench}
ROUNDS=${ROUNDS:-3}
CONFIG=${CONFIG:-configs/demo.json}
PY=/usr/bin/python3  # Debian's python3-torch lives in the system interpreter, not in a pyenv/venv one
"$PY" -c "import torch" 2>/dev/null || { echo "cpu_step_vs_torch.sh: needs Debian's python3-torch (apt-get install python3-torch)"; exit 1; }
bash scripts/configure_bench.sh "$BUILD"  # keeps an existing directory's other options
cmake --build "$BUILD" -j2 --target bench_cpu_cumo_step
# The same step with Eigen's own GEMM kernel (built when the build has oneDNN, whose GEMMs the step then runs).
EIGEN_TWIN=""
if cmake --build "$BUILD" -j2 --target bench_cpu_cumo_step_eigen >/dev/null 2>&1; then
  EIGEN_TWIN="$BUILD/benchmarks/bench_cpu_cumo_step_eigen"
fi
for threads in 1 2; do
  for round in $(seq "$ROUNDS"); do
    echo "== threads $threads round $round"
    OMP_NUM_THREADS=$threads "$BUILD/benchmarks/bench_cpu_cumo_step" --config "$CONFIG" \
      --benchmark_min_time=3 2>/dev/null | grep -E "^cumo step"
    if [[ -n $EIGEN_TWIN ]]; then
      OMP_NUM_THREADS=$threads "$EIGEN_TWIN" --config "$CONFIG" --benchmark_min_time=3 2>/dev/null |
        grep -E "^cumo step" | sed "s/^/[Eigen GEMM] /"
    fi
    # Debian's PyTorch runs its GEMMs in OpenBLAS (pthread build, BLAS_INFO=generic), whose own thread count
    # (OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS, else every core) is not torch.set_num_threads: pin both.
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=$threads "$PY" benchmarks/torch_cpu_cumo_step.py --config "$CONFIG" \
      --threads 1 --steps 20 | sed "s/^/[torch 1 x openblas $threads] /"
    # The same trick as cumo's trainer (the last LLM layer and the head on the rows from the first label on only):
    # what PyTorch gains from it, beside what cumo gains (docs/benchmarks.md).
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=$threads "$PY" benchmarks/torch_cpu_cumo_step.py --config "$CONFIG" \
      --threads 1 --steps 20 --loss-rows | sed "s/^/[torch 1 x openblas $threads, loss rows] /"
    if [ "$threads" -gt 1 ]; then  # the other way to use the cores: torch's threads, single-threaded BLAS
      OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=1 "$PY" benchmarks/torch_cpu_cumo_step.py --config "$CONFIG" \
        --threads "$threads" --steps 20 | sed "s/^/[torch $threads x openblas 1] /"
    fi
  done
done
