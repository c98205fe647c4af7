#!/usr/bin/env bash
# cumo_train data parallel under mpirun, on the app smoke run's stage-2 checkpoint (ctest label `distributed`):
#   distributed.sh TRAIN MPIRUN CASE     (run in the app smoke directory; MPIRUN may carry options)
# CASE:
#   matches     stage 3 with 2 and with 4 ranks against one process on the same global batches (a batch of 5 over
#               48 samples ends each epoch with 3 rows, so with 4 ranks one rank gets none): every step's loss within
#               1e-5 relative; the ranks' checkpoint is rank 0's alone
#   resume      2 ranks stopped after 3 steps and resumed on 2 ranks end bitwise where the uninterrupted 2-rank run
#               ended; resumed on 1 process instead, it finishes
#   zero1       2 ranks with --zero1 (AdamW moments sharded) end bitwise where 2 replicated ranks end
#   expert      --expert-parallel: 2 ranks as one group of 2, 4 ranks as groups of 2 and as one group of 4, every
#               step's loss within 1e-5 relative of one process (4 ranks: one rank without rows in each epoch's
#               short batch); the checkpoint holds whole experts and one process starts from it; 8 connector
#               experts over 4; a K that does not divide the ranks and a K that does not divide the experts are
#               one clear error, no hang
#   expert_s2   S² vision features, all three stages, stage 3 with --expert-parallel 2 on 2 ranks: every stage-3
#               step's loss within 1e-5 relative of one process
#   expert_resume  2 ranks with --expert-parallel 2 stopped after 3 steps and resumed with it end bitwise where the
#               uninterrupted run ended; the stop resumed on 4 ranks with --expert-parallel 4, and on one process,
#               finishes
#   expert_zero1  --expert-parallel with --zero1 (the replicated moments sharded over the world, each expert slice's
#               over its replica group) ends bitwise where the same run without --zero1 ends: 2 ranks K = 2 and 4
#               ranks K = 2
#   overlap     --overlap-grad-sum (the gradient sum on a second thread during the backward) ends bitwise where the
#               same run without it ends: 2 ranks, and 4 (one rank without rows in each epoch's short batch), 2
#               with --zero1 too, and with --expert-parallel 2 on 2 and 4 ranks
#   mismatch    two ranks started with different configs stop with the same clear error, no hang
#   dead        a rank killed (SIGKILL) mid-stage ends the job with an error within a bound
#   hang        a rank stopped (SIGSTOP) mid-stage: the other's collective times out (CUMO_COMM_TIMEOUT=5) and the
#               job ends with the timeout's message
#   expert_dead, expert_hang  the same two faults with --expert-parallel 2
#   overlap_dead, overlap_hang  the same two faults with --overlap-grad-sum (the survivor may wait on its second
#               thread)
#   expert_overlap_hang  a stopped rank with --expert-parallel 2 --overlap-grad-sum (both threads may wait)
set -uo pipefail
train=$1
read -r -a mpirun <<<"$2"
case=$3
fail() { echo "FAIL [$case]: $*"; exit 1; }
[ -f run/stage2/model.safetensors ] || fail "no run/stage2 (the app_smoke_train fixture)"
export OMP_NUM_THREADS=1

# stage 3 of tiny.json with a batch of 5 and 12 steps of 2 micro-batches: 24 micro-batches, two epochs' short batch
python3 - <<'EOF'
import json
c = json.load(open("tiny.json"))
c["stages"]["3"].update({"steps": 12, "batch": 5})
json.dump(c, open("dp.json", "w"))
c["stages"]["3"]["lr"] = 1e-3
json.dump(c, open("dp_other.json", "w"))
EOF
stage3() { "$@" --config dp.json --stage 3 --from run/stage2 --quiet --overwrite; }
losses() { grep -E '^[0-9]+,3,' "$1/metrics.csv" | cut -d, -f1,4; }
# same_losses A B: every stage-3 step's loss of run B within 1e-5 relative of run A's
same_losses() {
  python3 - "$1" "$2" <<'EOF'
import sys
def rows(d):
    return [tuple(map(float, l.split(",")[:4:3])) for l in open(d + "/metrics.csv") if l.split(",")[1:2] == ["3"]]
a, b = rows(sys.argv[1]), rows(sys.argv[2])
assert len(a) == len(b) == 12, (len(a), len(b))
worst = max(abs(x[1] - y[1]) / abs(x[1]) for x, y in zip(a, b))
print(f"{sys.argv[2]}: 12 steps, worst loss rel diff {worst:.2e}")
sys.exit(0 if worst <= 1e-5 else 1)
EOF
}

case $case in
matches)
  rm -rf dp1 dp2 dp4
  stage3 "$train" --out dp1 >/dev/null || fail "the single-process run failed"
  for np in 2 4; do
    out=$(stage3 "${mpirun[@]}" -np $np "$train" --out dp$np 2>&1) || fail "$np ranks failed: $out"
    [ -f dp$np/stage3/model.safetensors ] || fail "$np ranks wrote no checkpoint"
    same_losses dp1 dp$np || fail "$np ranks: the losses differ from one process"
  done
  echo "PASS [matches]"
  ;;
resume)
  rm -rf dpa dpb
  "${mpirun[@]}" -np 2 "$train" --config dp.json --stage 3 --from run/stage2 --out dpa --quiet >/dev/null 2>&1 ||
    fail "the uninterrupted 2-rank run failed"
  "${mpirun[@]}" -np 2 "$train" --config dp.json --stage 3 --from run/stage2 --out dpb --quiet --max-steps 3 \
    >/dev/null 2>&1 || fail "the stopped 2-rank run failed"
  [ -f dpb/stage3-partial/trainer_state.json ] || fail "no partial checkpoint"
  cp -r dpb dpc
  out=$("${mpirun[@]}" -np 2 "$train" --resume dpb/stage3-partial --quiet 2>&1) || fail "the 2-rank resume failed: $out"
  for f in model.safetensors optimizer.safetensors; do
    cmp -s dpa/stage3/$f dpb/stage3/$f || fail "stage3/$f after a 2-rank resume differs from the uninterrupted run"
  done
  out=$("$train" --resume dpc/stage3-partial --quiet 2>&1) || fail "resuming a 2-rank checkpoint on 1 process: $out"
  [ -f dpc/stage3/model.safetensors ] || fail "the 1-process resume wrote no final checkpoint"
  rm -rf dpc
  echo "PASS [resume]"
  ;;
zero1)
  rm -rf dpz dpr
  out=$("${mpirun[@]}" -np 2 "$train" --config dp.json --stage 3 --from run/stage2 --out dpr --quiet 2>&1) ||
    fail "2 replicated ranks failed: $out"
  out=$("${mpirun[@]}" -np 2 "$train" --config dp.json --stage 3 --from run/stage2 --out dpz --quiet --zero1 2>&1) ||
    fail "2 ranks with --zero1 failed: $out"
  for f in model.safetensors optimizer.safetensors; do
    cmp -s dpr/stage3/$f dpz/stage3/$f || fail "stage3/$f with --zero1 differs from the replicated run's"
  done
  echo "PASS [zero1]"
  ;;
expert)
  rm -rf dp1 dpe22 dpe42 dpe44 dpeb
  stage3 "$train" --out dp1 >/dev/null || fail "the single-process run failed"
  for run in "2 2" "4 2" "4 4"; do
    read -r np k <<<"$run"
    out=$(stage3 "${mpirun[@]}" -np $np "$train" --out dpe$np$k --expert-parallel $k 2>&1) ||
      fail "$np ranks, --expert-parallel $k failed: $out"
    same_losses dp1 dpe$np$k || fail "$np ranks, --expert-parallel $k: the losses differ from one process"
  done
  # the checkpoint holds every expert (the single-process format; expert_resume resumes one on one process)
  python3 - dpe22/stage3 <<'EOF' || fail "the expert-parallel checkpoint does not hold whole experts"
import json, struct, sys
raw = open(sys.argv[1] + "/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n])
shapes = {k: v["shape"] for k, v in h.items() if ".experts." in k}
assert shapes and all(s[0] == 4 for s in shapes.values()), shapes
print(f"{len(shapes)} expert tensors, all with 4 experts")
EOF
  # 8 connector experts (moe_conn8) over groups of 4
  out=$(stage3 "${mpirun[@]}" -np 4 "$train" --out dpeb --expert-parallel 4 --variant moe_conn8 2>&1) ||
    fail "4 ranks, --expert-parallel 4 with 8 connector experts failed: $out"
  # errors: K that does not divide the ranks, K that does not divide the experts
  out=$(stage3 "${mpirun[@]}" -np 2 "$train" --out dpeb --expert-parallel 3 2>&1)
  [ $? -ne 0 ] || fail "--expert-parallel 3 with 2 ranks trained"
  echo "$out" | grep -q "must form whole expert-parallel groups" || fail "no clear error for K = 3 over 2 ranks: $out"
  python3 - <<'EOF'
import json
c = json.load(open("dp.json"))
c["model"]["experts"] = 6
json.dump(c, open("dp6.json", "w"))
EOF
  out=$("${mpirun[@]}" -np 4 "$train" --config dp6.json --stage 3 --from run/stage2 --out dpeb --quiet --overwrite \
        --expert-parallel 4 2>&1)
  [ $? -ne 0 ] || fail "6 experts over groups of 4 trained"
  echo "$out" | grep -q "do not split evenly over groups of 4" || fail "no clear error for 6 experts over 4: $out"
  [ "$(echo "$out" | grep -c "do not split evenly")" -eq 1 ] || fail "the error was not reported once: $out"
  rm -rf dpeb
  echo "PASS [expert]"
  ;;
expert_s2)
  # S² vision features (two tower passes per batch): all three stages from scratch, stage 3 expert parallel
  rm -rf dps1 dps2
  python3 - <<'EOF'
import json
c = json.load(open("dp.json"))
c["model"]["vision"]["s2"] = True
json.dump(c, open("dps2.json", "w"))
EOF
  "$train" --config dps2.json --out dps1 --quiet --overwrite >/dev/null 2>&1 || fail "the single-process S² run failed"
  out=$("${mpirun[@]}" -np 2 "$train" --config dps2.json --out dps2 --quiet --overwrite --expert-parallel 2 2>&1) ||
    fail "2 ranks, --expert-parallel 2 with S² failed: $out"
  same_losses dps1 dps2 || fail "S² with --expert-parallel 2: the losses differ from one process"
  rm -rf dps1 dps2
  echo "PASS [expert_s2]"
  ;;
expert_resume)
  rm -rf dpea dpeb dpec dped
  "${mpirun[@]}" -np 2 "$train" --config dp.json --stage 3 --from run/stage2 --out dpea --quiet --expert-parallel 2 \
    >/dev/null 2>&1 || fail "the uninterrupted run failed"
  "${mpirun[@]}" -np 2 "$train" --config dp.json --stage 3 --from run/stage2 --out dpeb --quiet --expert-parallel 2 \
    --max-steps 3 >/dev/null 2>&1 || fail "the stopped run failed"
  [ -f dpeb/stage3-partial/trainer_state.json ] || fail "no partial checkpoint"
  cp -r dpeb dpec
  cp -r dpeb dped
  out=$("${mpirun[@]}" -np 2 "$train" --resume dpeb/stage3-partial --quiet --expert-parallel 2 2>&1) ||
    fail "the resume failed: $out"
  for f in model.safetensors optimizer.safetensors; do
    cmp -s dpea/stage3/$f dpeb/stage3/$f || fail "stage3/$f after the resume differs from the uninterrupted run"
  done
  out=$("${mpirun[@]}" -np 4 "$train" --resume dpec/stage3-partial --quiet --expert-parallel 4 2>&1) ||
    fail "resuming on 4 ranks with --expert-parallel 4: $out"
  [ -f dpec/stage3/model.safetensors ] || fail "the 4-rank resume wrote no final checkpoint"
  out=$("$train" --resume dped/stage3-partial --quiet 2>&1) || fail "resuming on one process: $out"
  [ -f dped/stage3/model.safetensors ] || fail "the 1-process resume wrote no final checkpoint"
  rm -rf dpec dped
  echo "PASS [expert_resume]"
  ;;
expert_zero1)
  for run in "2 2" "4 2"; do
    read -r np k <<<"$run"
    rm -rf dpez dper
    out=$(stage3 "${mpirun[@]}" -np $np "$train" --out dper --expert-parallel $k 2>&1) ||
      fail "$np ranks, --expert-parallel $k failed: $out"
    out=$(stage3 "${mpirun[@]}" -np $np "$train" --out dpez --expert-parallel $k --zero1 2>&1) ||
      fail "$np ranks, --expert-parallel $k --zero1 failed: $out"
    for f in model.safetensors optimizer.safetensors; do
      cmp -s dper/stage3/$f dpez/stage3/$f || fail "$np ranks, K = $k: stage3/$f with --zero1 differs"
    done
    echo "$np ranks, --expert-parallel $k: --zero1 bitwise the same"
  done
  rm -rf dpez dper
  echo "PASS [expert_zero1]"
  ;;
overlap)
  for np in 2 4; do
    rm -rf dpr$np dpo$np
    out=$("${mpirun[@]}" -np $np "$train" --config dp.json --stage 3 --from run/stage2 --out dpr$np --quiet 2>&1) ||
      fail "$np ranks failed: $out"
    out=$("${mpirun[@]}" -np $np "$train" --config dp.json --stage 3 --from run/stage2 --out dpo$np --quiet \
          --overlap-grad-sum 2>&1) || fail "$np ranks with --overlap-grad-sum failed: $out"
    for f in model.safetensors optimizer.safetensors; do
      cmp -s dpr$np/stage3/$f dpo$np/stage3/$f || fail "stage3/$f with --overlap-grad-sum ($np ranks) differs"
    done
    cmp -s <(losses dpr$np) <(losses dpo$np) || fail "the losses with --overlap-grad-sum ($np ranks) differ"
  done
  rm -rf dpoz
  out=$("${mpirun[@]}" -np 2 "$train" --config dp.json --stage 3 --from run/stage2 --out dpoz --quiet \
        --overlap-grad-sum --zero1 2>&1) || fail "2 ranks with --overlap-grad-sum --zero1 failed: $out"
  for f in model.safetensors optimizer.safetensors; do
    cmp -s dpr2/stage3/$f dpoz/stage3/$f || fail "stage3/$f with --overlap-grad-sum --zero1 differs"
  done
  # with expert parallelism: the sum on the second thread while the backward exchanges rows (MPI_THREAD_MULTIPLE)
  for np in 2 4; do
    rm -rf dper dpoe
    out=$(stage3 "${mpirun[@]}" -np $np "$train" --out dper --expert-parallel 2 2>&1) ||
      fail "$np ranks, --expert-parallel 2 failed: $out"
    out=$(stage3 "${mpirun[@]}" -np $np "$train" --out dpoe --expert-parallel 2 --overlap-grad-sum 2>&1) ||
      fail "$np ranks, --expert-parallel 2 --overlap-grad-sum failed: $out"
    for f in model.safetensors optimizer.safetensors; do
      cmp -s dper/stage3/$f dpoe/stage3/$f || fail "stage3/$f with --expert-parallel 2 --overlap-grad-sum ($np ranks) differs"
    done
    cmp -s <(losses dper) <(losses dpoe) || fail "the losses with --expert-parallel 2 --overlap-grad-sum differ"
    echo "$np ranks, --expert-parallel 2: --overlap-grad-sum bitwise the same"
  done
  rm -rf dper dpoe
  echo "PASS [overlap]"
  ;;
mismatch)
  rm -rf dpm
  start=$SECONDS
  out=$("${mpirun[@]}" -np 1 "$train" --config dp.json --stage 3 --from run/stage2 --out dpm --quiet : \
        -np 1 "$train" --config dp_other.json --stage 3 --from run/stage2 --out dpm --quiet 2>&1)
  status=$?
  echo "$out" | tail -3
  [ $status -ne 0 ] || fail "ranks with different configs trained"
  echo "$out" | grep -q "the ranks disagree on the run configuration" || fail "no clear error"
  ((SECONDS - start < 60)) || fail "took $((SECONDS - start)) s"
  echo "PASS [mismatch]"
  ;;
dead | hang | expert_dead | expert_hang | overlap_dead | overlap_hang | expert_overlap_hang)
  # expert_*: the same faults with the experts split over the two ranks (the survivor waits in a row exchange or
  # in the gradient sum); overlap_*: with the gradient sum on the ranks' second threads; expert_overlap_*: both
  # (the survivor may wait on both threads at once)
  extra=()
  [[ $case == expert_* ]] && extra+=(--expert-parallel 2)
  [[ $case == *overlap_* ]] && extra+=(--overlap-grad-sum)
  rm -rf dpk dpk.log
  python3 - <<'EOF'
import json
c = json.load(open("dp.json"))
c["stages"]["3"]["steps"] = 100000  # long enough to be interrupted
json.dump(c, open("dp_long.json", "w"))
EOF
  export CUMO_COMM_TIMEOUT=5
  start=$SECONDS
  "${mpirun[@]}" -np 2 "$train" --config dp_long.json --stage 3 --from run/stage2 --out dpk --log-every 1 \
    "${extra[@]}" >dpk.log 2>&1 &
  job=$!
  # wait until both ranks train (rank 0 logs steps), then pick the rank that is not the first child
  for _ in $(seq 200); do grep -q "stage 3 step 2/" dpk.log 2>/dev/null && break; sleep 0.1; done
  ranks=($(pgrep -f "dp_long.json" | while read -r p; do [ "$(cat /proc/$p/comm)" = cumo_train ] && echo $p; done))
  ((${#ranks[@]} == 2)) || { kill -9 $job; fail "expected 2 training ranks, found ${#ranks[@]}: $(cat dpk.log)"; }
  victim=${ranks[1]}
  if [[ $case == *dead ]]; then kill -9 "$victim"; else kill -STOP "$victim"; fi
  t0=$SECONDS
  while kill -0 $job 2>/dev/null && ((SECONDS - t0 < 60)); do sleep 0.2; done
  kill -0 $job 2>/dev/null && { kill -9 $job "$victim"; fail "the job did not end within 60 s of the fault"; }
  wait $job
  status=$?
  kill -9 "$victim" 2>/dev/null
  tail -5 dpk.log
  [ $status -ne 0 ] || fail "the job ended with status 0"
  if [[ $case == *hang ]]; then
    grep -q "did not complete within 5 s" dpk.log || fail "no timeout message"
  fi
  echo "PASS [$case] (ended $((SECONDS - t0)) s after the fault, status $status)"
  ;;
*) fail "unknown case" ;;
esac
