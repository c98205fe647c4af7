#!/usr/bin/env bash
# cumo_generate on the app smoke run's stage-3 checkpoint (run from its working directory; $1 = the binary):
# greedy answers stream and end with a tokens/s line; the same seed samples the same answer; --batch writes one JSON
# line per record; --dtype bf16/f16 hold the weights in half precision; bad input fails with a message, not a crash.
set -u
gen=$1
img=data/images/eval_000000.png
fail() { echo "FAIL: $*"; exit 1; }

out=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "what colour is the circle?" --max-new-tokens 6 2>err.txt) ||
  fail "greedy run exited $?: $(cat err.txt)"
grep -q "tokens/s" err.txt || fail "no tokens/s line: $(cat err.txt)"
echo "greedy: '$out' / $(cat err.txt)"
again=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "what colour is the circle?" --max-new-tokens 6 2>/dev/null)
[ "$out" = "$again" ] || fail "greedy answers differ: '$out' vs '$again'"

s1=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "what colour is the circle?" --max-new-tokens 8 \
      --temperature 1.5 --top-p 0.95 --seed 7 2>/dev/null) || fail "sampling run failed"
s2=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "what colour is the circle?" --max-new-tokens 8 \
      --temperature 1.5 --top-p 0.95 --seed 7 2>/dev/null)
[ "$s1" = "$s2" ] || fail "the same seed sampled '$s1' and then '$s2'"

printf '{"image": "%s", "prompt": "what colour is the circle?"}\n\n{"image": "%s", "prompt": "how many shapes?"}\n' \
  "$PWD/$img" "$PWD/$img" > batch.jsonl
"$gen" --checkpoint run/stage3 --batch batch.jsonl --max-new-tokens 4 > batch_out.jsonl 2>err.txt ||
  fail "--batch exited $?: $(cat err.txt)"
[ "$(wc -l < batch_out.jsonl)" -eq 2 ] || fail "--batch wrote $(wc -l < batch_out.jsonl) lines, want 2"
python3 -c "import json,sys; [json.loads(l)['answer'] for l in open('batch_out.jsonl')]" || fail "--batch output is not JSON lines"
grep -q "2 prompts" err.txt || fail "no batch summary: $(cat err.txt)"

"$gen" --checkpoint run/stage3 --image no_such.png --prompt "q" > /dev/null 2>err.txt && fail "a missing image passed"
grep -q "no_such.png" err.txt || fail "the missing image is not named: $(cat err.txt)"
# bf16 and f16 weights in memory: the run answers, says which weights it held, and times the decode apart.
for dt in bf16 f16; do
  half=$("$gen" --checkpoint run/stage3 --image "$img" --prompt "what colour is the circle?" --max-new-tokens 6 \
          --dtype $dt 2>err.txt) || fail "--dtype $dt exited $?: $(cat err.txt)"
  grep -q "weights $dt" err.txt || fail "--dtype $dt: no weights line: $(cat err.txt)"
  grep -q "decode [0-9.]* tokens/s" err.txt || fail "--dtype $dt: no decode rate: $(cat err.txt)"
  [ -n "$half" ] || fail "--dtype $dt answered nothing"
  echo "$dt: '$half' / $(cat err.txt)"
done
"$gen" --checkpoint run/stage3 --image "$img" --prompt "q" --dtype f8 > /dev/null 2>err.txt && fail "--dtype f8 passed"
grep -q "accepted: f32, bf16, f16" err.txt || fail "--dtype f8 not explained: $(cat err.txt)"
"$gen" --checkpoint run/stage3 --image "$img" --prompt "q" --top-p 0 > /dev/null 2>err.txt && fail "--top-p 0 passed"
"$gen" --checkpoint run/stage3 --image "$img" --prompt "q" --device tpu > /dev/null 2>err.txt && fail "--device tpu passed"
grep -q "must be cpu or cuda" err.txt || fail "--device tpu not explained: $(cat err.txt)"
echo "ok"
