#!/usr/bin/env bash
# The CuMo demo, end to end, on the built-in shapes world and 2 CPU threads:
#   generate the data if needed -> stage 1 (connector) -> stage 2 (all, dense) -> stage 3 (co-upcycled CLIP-MoE +
#   MLP-MoE with bzloss) -> exact-match accuracy per question type and the expert load of every MoE layer -> plots.
#
#   scripts/run_demo.sh                      # everything (builds cumo_train / cumo_eval first if needed)
#   CONFIG=configs/demo.json OUT=runs/demo BUILD=build OMP_NUM_THREADS=2 scripts/run_demo.sh
#   FRESH=1 scripts/run_demo.sh              # retrain even if OUT already holds a finished run
#   PLOT=0 scripts/run_demo.sh               # skip the plots (they need python3 + matplotlib, installed if missing)
#   DEVICE=cuda BUILD=build-cuda scripts/run_demo.sh   # train on the GPU (a CUDA build; DEVICE=auto, the default,
#                                                      # takes the GPU when the build has the CUDA backend and one)
#
# A finished run in OUT is evaluated again, not retrained; a stopped one (Ctrl-C saves OUT/stage<s>-partial) is
# resumed where it stopped.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
CONFIG=${CONFIG:-configs/demo.json}
OUT=${OUT:-runs/demo}
BUILD=${BUILD:-build}
PLOT=${PLOT:-1}
DEVICE=${DEVICE:-auto}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

TRAIN=$BUILD/tools/cumo_train
EVAL=$BUILD/tools/cumo_eval
if [[ ! -x $TRAIN || ! -x $EVAL || -n ${REBUILD:-} ]]; then
  echo "== building cumo_train and cumo_eval in $BUILD"
  if [[ ! -f $BUILD/CMakeCache.txt ]]; then
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCUMO_BUILD_TESTS=OFF -DCUMO_BUILD_BENCHMARKS=OFF \
          -DCUMO_BUILD_EXAMPLES=OFF >/dev/null
  fi
  cmake --build "$BUILD" --target cumo_train cumo_eval -j "$(nproc)"
fi

if [[ -n ${FRESH:-} ]]; then rm -rf "$OUT"; fi
start=$(date +%s)
if [[ -f $OUT/stage3/trainer_state.json ]]; then
  echo "== $OUT/stage3 exists: evaluating it (FRESH=1 retrains)"
else
  partial=""
  for s in 1 2 3; do
    if [[ -f $OUT/stage$s-partial/trainer_state.json ]]; then partial=$OUT/stage$s-partial; fi
  done
  last_done=""
  for s in 1 2; do
    if [[ -f $OUT/stage$s/trainer_state.json ]]; then last_done=$OUT/stage$s; fi
  done
  if [[ -n $partial ]]; then
    echo "== resuming $partial"
    "$TRAIN" --resume "$partial" --device "$DEVICE"
  elif [[ -n $last_done ]]; then
    echo "== continuing after $last_done"
    "$TRAIN" --resume "$last_done" --device "$DEVICE"
  else
    echo "== training all three stages ($CONFIG -> $OUT, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
    "$TRAIN" --config "$CONFIG" --out "$OUT" --device "$DEVICE"
  fi
  echo "== training took $(( $(date +%s) - start )) s of wall time (per stage: $OUT/train_summary.json)"
fi

echo "== evaluating $OUT/stage3 on the held-out eval split"
"$EVAL" --checkpoint "$OUT/stage3"

if [[ $PLOT != 0 ]]; then
  if command -v python3 >/dev/null; then
    python3 scripts/plot.py "$OUT" || echo "(plots skipped: scripts/plot.py failed)"
  else
    echo "(plots skipped: no python3)"
  fi
fi
