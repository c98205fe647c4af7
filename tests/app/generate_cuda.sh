#!/usr/bin/env bash
# cumo_generate --device cuda on the app smoke run's stage-3 checkpoint (run from its working directory; $1 = the
# binary): the fp32 greedy answer equals the CPU's (a trained model's greedy choices have margins far above fp32
# summation-order noise), bf16 and f16 weights answer and report the weights they held and a decode rate. Without a
# usable GPU: "SKIPPED" and exit 77.
set -u
gen=$1
img=data/images/eval_000000.png
q="what colour is the circle?"
fail() { echo "FAIL: $*"; exit 1; }

gpu=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "$q" --max-new-tokens 6 --device cuda 2>err.txt)
status=$?
if grep -q "no CUDA device is available\|has no CUDA backend" err.txt; then
  echo "SKIPPED: $(cat err.txt)"
  exit 77
fi
[ $status -eq 0 ] || fail "--device cuda exited $status: $(cat err.txt)"
grep -q "on cuda" err.txt || fail "the weights are not reported on cuda: $(cat err.txt)"
cpu=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "$q" --max-new-tokens 6 2>/dev/null) ||
  fail "the CPU run failed"
echo "cpu: '$cpu'  cuda: '$gpu'"
[ "$gpu" = "$cpu" ] || fail "the fp32 greedy answers differ"
for dt in bf16 f16; do
  half=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "$q" --max-new-tokens 6 --device cuda --dtype $dt \
          2>err.txt) || fail "--device cuda --dtype $dt exited $?: $(cat err.txt)"
  grep -q "weights $dt" err.txt || fail "--dtype $dt: no weights line: $(cat err.txt)"
  grep -q "decode [0-9.]* tokens/s" err.txt || fail "--dtype $dt: no decode rate: $(cat err.txt)"
  [ -n "$half" ] || fail "--device cuda --dtype $dt answered nothing"
  echo "cuda $dt: '$half'"
done
echo "ok"
