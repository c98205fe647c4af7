#!/usr/bin/env bash
# Checks that the README's two commands both do their job in either order, each pair on its own fresh clone of
# this repository's HEAD (issue 18: test.sh after run_demo.sh once ran no test and exited 0):
#   order 1: bash scripts/run_demo.sh, then bash scripts/test.sh
#   order 2: bash scripts/test.sh, then bash scripts/run_demo.sh
# run_demo.sh must train and print its evaluation (the per-type table's "overall" row); test.sh must run a
# non-empty default test set with every test passing. The demo runs a seconds-long config (CONFIG below) instead
# of configs/demo.json, and test.sh runs with SANITIZE=0: the check is about what each command builds and runs,
# not about the full demo or the sanitizer pass. Two full builds: about half an hour on 2 cores. On demand:
#   bash scripts/check_readme_commands.sh [WORKDIR]      (default: a new directory under /tmp)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${1:-$(mktemp -d /tmp/cumo-readme-check.XXXXXX)}
mkdir -p "$W"
cat > "$W/tiny.json" <<JSON
{"name": "readme-check", "out": "runs/readme-check", "seed": 7,
 "data": {"dir": "runs/data/readme-check", "generate": {"seed": 1, "train": 48, "eval": 10}, "tokenizer": "byte"},
 "model": {"image_size": 32, "patch_size": 8,
           "vision": {"hidden": 16, "layers": 2, "heads": 2, "ffn": 32},
           "text": {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 32}, "experts": 4, "top_k": 2},
 "stages": {"defaults": {"batch": 4, "lr": 3e-3, "steps": 3}},
 "eval": {"max_new_tokens": 4}}
JSON
fail() { echo "check_readme_commands: FAIL: $*"; exit 1; }
demo() {  # demo CLONE LOG
  (cd "$1" && CONFIG="$W/tiny.json" PLOT=0 bash scripts/run_demo.sh) > "$2" 2>&1 || fail "run_demo.sh exited non-zero ($2)"
  grep -q "overall" "$2" || fail "run_demo.sh printed no evaluation ($2)"
}
tests() {  # tests CLONE LOG
  (cd "$1" && SANITIZE=0 bash scripts/test.sh) > "$2" 2>&1 || fail "test.sh exited non-zero ($2)"
  grep -Eq "100% tests passed, 0 tests failed out of [1-9][0-9]*" "$2" || fail "test.sh ran no tests ($2)"
}
for order in 1 2; do
  C=$W/clone$order
  rm -rf "$C" && git clone -q "$ROOT" "$C"
  if [ $order = 1 ]; then demo "$C" "$W/$order-demo.log"; tests "$C" "$W/$order-test.log"
  else tests "$C" "$W/$order-test.log"; demo "$C" "$W/$order-demo.log"; fi
  echo "check_readme_commands: order $order OK ($(grep -Eo 'out of [0-9]+' "$W/$order-test.log" | tail -1) tests)"
done
echo "check_readme_commands: PASS (logs in $W)"
