#!/usr/bin/env bash
# Reproduces docs/results.md section 1: trains the demo from scratch (configs/demo.json, OMP_NUM_THREADS=2, into a
# new run directory) and compares the evaluation it prints with the block the doc holds between the
# `demo-eval:begin` / `demo-eval:end` markers, line for line (per-type correct counts and accuracies, overall, eval
# CE, expert loads). A run with the same thread count must reproduce them exactly: training is deterministic for a
# seed and a thread count. Another thread count sums in another order and may differ in the last digits or more.
# About 9 minutes on an idle 2-core machine (the build excluded). On demand, not part of CI's default set:
#   bash scripts/check_results.sh [RUN_DIR]            (default: a new directory under /tmp)
#   LOG=runs/demo.log bash scripts/check_results.sh    compare a demo log you already have instead of training
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DOC=docs/results.md
THREADS=2
expected=$(sed -n '/demo-eval:begin/,/demo-eval:end/p' "$DOC" | sed '1d;$d' | sed '/^```/d')
[[ -n $expected ]] || { echo "check_results: FAIL: no demo-eval block in $DOC"; exit 1; }

if [[ -z ${LOG:-} ]]; then
  OUT=${1:-$(mktemp -d /tmp/cumo-results-check.XXXXXX)/demo}
  LOG=$OUT.log
  mkdir -p "$(dirname "$OUT")"
  echo "check_results: training the demo into $OUT (OMP_NUM_THREADS=$THREADS; log $LOG)"
  OUT=$OUT FRESH=1 PLOT=0 OMP_NUM_THREADS=$THREADS bash scripts/run_demo.sh > "$LOG" 2>&1 ||
    { echo "check_results: FAIL: run_demo.sh exited non-zero ($LOG)"; exit 1; }
fi
# What cumo_eval printed: from the table header to the last expert-load row.
got=$(sed -n '/^type  *correct/,$p' "$LOG" | grep -E '^(type|colour|count|position|shape|yesno|overall|eval CE|expert load|  clip\.|  connector)')
if [[ "$got" == "$expected" ]]; then
  echo "check_results: PASS: the demo's evaluation equals $DOC's, line for line"
else
  echo "check_results: FAIL: the demo's evaluation differs from $DOC's (< doc, > this run):"
  diff <(echo "$expected") <(echo "$got") || true
  exit 1
fi
