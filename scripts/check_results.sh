#!/usr/bin/env bash
# Reproduces docs/results.md section 1: trains the demo from scratch (configs/demo.json, OMP_NUM_THREADS=2, into a
# new run directory) and compares the evaluation it prints with the block the doc holds between the
# `demo-eval:begin` / `demo-eval:end` markers, line for line (per-type correct counts and accuracies, overall, eval
# CE, expert loads). A run with the same thread count on the same CPU model must reproduce them exactly: training is
# deterministic for a seed, a thread count and a CPU. Another thread count sums in another order, and another CPU
# model gets other GEMM kernels and blocking from oneDNN (and -march=native code from the compiler): both may differ
# in the last digits or more. The begin marker names the CPU the block came from; a FAIL on another one says so.
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
# This machine's CPU as the marker writes it: "<model name>, family F model M".
cpu_field() { grep -m1 "^$1[[:space:]]*:" /proc/cpuinfo 2>/dev/null | sed 's/^[^:]*:[[:space:]]*//'; }
this_cpu="$(cpu_field "model name"), family $(cpu_field "cpu family") model $(cpu_field model)"
doc_cpu=$(grep -m1 'demo-eval:begin' "$DOC" | sed -n 's/.*CPU: \(.*\)) -->.*/\1/p')
if [[ "$got" == "$expected" ]]; then
  echo "check_results: PASS: the demo's evaluation equals $DOC's, line for line (CPU: $this_cpu)"
else
  echo "check_results: FAIL: the demo's evaluation differs from $DOC's (< doc, > this run):"
  diff <(echo "$expected") <(echo "$got") || true
  if [[ -n $doc_cpu && $doc_cpu != "$this_cpu" ]]; then
    echo "check_results: note: the doc's block came from another CPU ($doc_cpu; this one: $this_cpu). Runs are"
    echo "  bitwise the same only on the same CPU model and thread count: oneDNN chooses its GEMM kernels and blocking"
    echo "  per CPU, so the training rounds, and then learns, differently (docs/results.md)."
  fi
  exit 1
fi
