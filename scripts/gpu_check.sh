#!/usr/bin/env bash
# Everything the GPU side still has to prove, in one command for a machine with an NVIDIA GPU (docs/cuda.md
# "Commands on a GPU machine" lists each step by hand):
#
#   bash scripts/gpu_check.sh                      # all steps
#   STEPS="build test parity" bash scripts/gpu_check.sh   # some of them (in this order whatever the order given)
#   bash scripts/gpu_check.sh --quick              # the 15-minute version for a bare lent machine (see below)
#
# Steps:
#   build     configure build-cuda (Release, CUMO_CUDA=ON, benchmarks on, examples off) and build the CUDA targets
#   test      ctest -L cuda: cuda_backend(+_host), cuda_backend_ops, cuda_model, parity_cuda_fixtures, app_cuda_train,
#             app_cuda_generate (cumo_generate --device cuda, fp32 / bf16 / f16 weights),
#             and with NCCL: nccl, app_nccl_one_rank (nccl_np2 and app_nccl_np2 skip on one GPU)
#   parity    cumo_parity --device cuda on every shipped fixture (every kind)
#   sanitize  compute-sanitizer memcheck + racecheck on the three CUDA test binaries (fixed seed)
#   bench     bench_cuda_cumo_step in fp32, tf32, bf16 (the CuMo training step, equal-FLOP dense GEMM beside it)
#   torch     benchmarks/torch_cumo_step.py, the same model in PyTorch eager and torch.compile (needs torch +
#             transformers; skipped with a message otherwise)
#   demo      the built-in demo on the GPU: DEVICE=cuda scripts/run_demo.sh into runs/demo-gpu
#
# Each step's output goes to $OUT/<step>.log (OUT defaults to runs/gpu_check) and a line per step to
# $OUT/summary.txt: ok, FAILED (rc) or skipped. The script goes on after a failed step and exits 1 if any failed;
# without a GPU it prints why and exits 77.
# Environment: BUILD (build-cuda), CUDA_ARCH (CMAKE_CUDA_ARCHITECTURES, default native), JOBS (nproc); the demo
# step calls scripts/setup.sh, so on a machine without apt access install the packages first and set
# CUMO_SKIP_SETUP=1. The demo skips its plots unless PLOT=1.
#
# --quick: sized for a 15-minute lease of a lent machine with 16 cores and no package registry (docs/cuda.md):
#   deps      unpacks the .debs of .devdeps/ (scripts/fetch_devdeps.sh fetches them where apt works; carry the
#             folder) into /tmp/cumo-devdeps and points CMake and the compilers at it
#   build     the CUDA targets only, CMAKE_CUDA_ARCHITECTURES 90 (sm_90a-capable H100/H200), every core
#   test      ctest -L cuda
#   parity    cumo_parity --device cuda on every shipped fixture
#   bench     one bench_cuda_cumo_step --precision bf16
#   torch     PyTorch's side of that step (torch_cumo_step.py, eager, bf16 autocast, grouped MoE)
# OUT defaults to $OUT when the device tool sets it (what is written there comes back), else runs/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; fi
BUILD=${BUILD:-build-cuda}
OUT=${OUT:-runs/gpu_check}
JOBS=${JOBS:-$(nproc)}
if [ $QUICK = 1 ]; then
  CUDA_ARCH=${CUDA_ARCH:-90}
  STEPS=" ${STEPS:-deps build test parity bench torch} "
  export CUMO_SKIP_SETUP=1
else
  CUDA_ARCH=${CUDA_ARCH:-native}
  STEPS=" ${STEPS:-build test parity sanitize bench torch demo} "
fi
DEPS=/tmp/cumo-devdeps
CMAKE_EXTRA=()

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: SKIPPED: no NVIDIA GPU on this machine (nvidia-smi -L fails)"
  exit 77
fi
mkdir -p "$OUT" || exit 1
: >"$OUT/summary.txt"
nvidia-smi -L | tee "$OUT/device.txt"

failed=0
# run_step NAME COMMAND...: runs COMMAND when NAME is among $STEPS, its output (stdout + stderr) to $OUT/NAME.log.
run_step() {
  local name=$1
  shift
  [[ "$STEPS" == *" $name "* ]] || return 0
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if [ $rc -eq 0 ] && grep -q "(Skipped)" "$OUT/$name.log"; then  # ctest counts a skipped test as a pass
    echo "$name: ok but SKIPPED some (${took} s): $(grep "(Skipped)" "$OUT/$name.log" | awk '{print $3}' | xargs)" |
      tee -a "$OUT/summary.txt"
  elif [ $rc -eq 0 ]; then
    echo "$name: ok (${took} s)" | tee -a "$OUT/summary.txt"
  elif [ $rc -eq 77 ]; then
    echo "$name: skipped ($(tail -n 1 "$OUT/$name.log"))" | tee -a "$OUT/summary.txt"
  else
    echo "$name: FAILED (rc $rc, ${took} s; tail of $OUT/$name.log below)" | tee -a "$OUT/summary.txt"
    tail -n 20 "$OUT/$name.log"
    failed=1
  fi
}

deps() {
  local d
  [ -d .devdeps ] && ls .devdeps/*.deb >/dev/null 2>&1 || { echo "no .devdeps/*.deb (run scripts/fetch_devdeps.sh)"; return 1; }
  rm -rf "$DEPS" && mkdir -p "$DEPS" || return 1
  for d in .devdeps/*.deb; do
    if command -v dpkg >/dev/null; then
      dpkg -x "$d" "$DEPS" || return 1
    else  # a .deb is an ar archive holding data.tar.*: unpack that
      local tmp
      tmp=$(mktemp -d) && (cd "$tmp" && ar x "$OLDPWD/$d") && tar -xf "$tmp"/data.tar.* -C "$DEPS" || return 1
      rm -rf "$tmp"
    fi
  done
  ls "$DEPS/usr/include"
}
# with unpacked deps: CMake finds their package configs, the compilers their headers, the programs libbenchmark
use_deps() {
  [ -d "$DEPS/usr" ] || return 0
  CMAKE_EXTRA=(-DCMAKE_PREFIX_PATH="$DEPS/usr" -DCMAKE_CXX_FLAGS="-isystem $DEPS/usr/include"
               -DCMAKE_CUDA_FLAGS="-isystem $DEPS/usr/include")
  export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
build() {
  use_deps
  local targets=(cumo_cuda_tests cumo_cuda_backend_ops_tests cumo_cuda_model_tests cumo_parity cumo_train cumo_eval
                 cumo_generate bench_cuda_cumo_step)
  [ $QUICK = 1 ] || targets+=(bench_cuda_moe)
  # every option spelled out: a build-cuda first configured by run_demo.sh has tests and benchmarks off
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCUMO_CUDA=ON -DCUMO_BUILD_TESTS=ON -DCUMO_BUILD_TOOLS=ON \
    -DCUMO_BUILD_BENCHMARKS=ON -DCUMO_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" "${CMAKE_EXTRA[@]}" ||
    return 1
  # the NCCL suite when the configure found NCCL (GPU ranks: nccl, nccl_np2, app_nccl_one_rank, app_nccl_np2)
  if [ -f "$BUILD/tests/cuda/CMakeFiles/cumo_nccl_tests.dir/build.make" ]; then targets+=(cumo_nccl_tests); fi
  cmake --build "$BUILD" -j "$JOBS" --target "${targets[@]}"
}
cuda_tests() { ctest --test-dir "$BUILD" -L cuda --output-on-failure; }
parity() { "$BUILD/tools/cumo_parity" --device cuda tests/fixtures/*.safetensors; }
sanitize() {
  local cs t tool rc=0
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -z "$cs" ]; then
    echo "no compute-sanitizer on PATH or in /usr/local/cuda/bin"
    return 77
  fi
  for t in cumo_cuda_tests cumo_cuda_backend_ops_tests cumo_cuda_model_tests; do
    for tool in memcheck racecheck; do
      echo "-- compute-sanitizer --tool $tool $t (CUMO_TEST_SEED=1)"
      CUMO_TEST_SEED=1 "$cs" --tool "$tool" --error-exitcode 1 "$BUILD/tests/cuda/$t" || rc=1
    done
  done
  return $rc
}
bench() {
  local p precisions=(fp32 tf32 bf16)
  [ $QUICK = 1 ] && precisions=(bf16)
  for p in "${precisions[@]}"; do "$BUILD/benchmarks/cuda/bench_cuda_cumo_step" --precision "$p" || return 1; done
}
torch_side() {
  if ! python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "no CUDA-enabled torch + transformers here"
    return 77
  fi
  if [ $QUICK = 1 ]; then python3 benchmarks/torch_cumo_step.py --moe grouped --modes eager; else
    python3 benchmarks/torch_cumo_step.py --moe grouped; fi
}
demo() { DEVICE=cuda BUILD="$BUILD" OUT=runs/demo-gpu PLOT=${PLOT:-0} bash scripts/run_demo.sh; }

run_step deps deps
use_deps
run_step build build
run_step test cuda_tests
run_step parity parity
run_step sanitize sanitize
run_step bench bench
run_step torch torch_side
run_step demo demo

echo "summary ($OUT/summary.txt):"
cat "$OUT/summary.txt"
exit $failed
