#!/usr/bin/env bash
# Data parallel on this machine: cumo_train's stage 3 at the demo's model and batch (configs/demo.json, stage 3
# shortened to STEPS steps; stages 1-2 one step each, they only make the start) as
#   1 process x 1 thread,  1 process x 2 threads,  mpirun -np 2 x 1 thread each (data parallel; with
#   --overlap-grad-sum: the gradient sum on a second thread during the backward; and with --expert-parallel 2: each
#   rank holding half of every MoE block's experts, also with the overlapped sum)
# and the share of the step the 2-rank run spends in its gradient all-reduce (printed by cumo_train).
#   BUILD=build-cpu STEPS=60 bash scripts/bench_distributed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
STEPS=${STEPS:-60}
train=$BUILD/tools/cumo_train
work=${WORK:-/tmp/cumo_bench_dist}
mkdir -p "$work"
python3 - "$work" "$STEPS" <<'PY'
import json, sys
work, steps = sys.argv[1], int(sys.argv[2])
c = json.load(open("configs/demo.json"))
c["out"] = work + "/run"
c["data"]["dir"] = work + "/data"
c["stages"]["1"]["steps"] = 1
c["stages"]["2"]["steps"] = 1
c["stages"]["3"]["steps"] = steps
json.dump(c, open(work + "/bench.json", "w"))
PY
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader
# stages 1-2 once (and the data), then stage 3 three ways from the same start
OMP_NUM_THREADS=2 "$train" --config "$work/bench.json" --stage 1 --quiet --overwrite >/dev/null
OMP_NUM_THREADS=2 "$train" --config "$work/bench.json" --stage 2 --quiet --overwrite >/dev/null
s3() { "$@" --config "$work/bench.json" --stage 3 --from "$work/run/stage2" --out "$work/$name" --quiet --overwrite $extra; }
printf "| run | stage 3 wall s (with load + save) | training tokens/s | vs 1 x 1 |\n| --- | ---: | ---: | ---: |\n"
base=""
for how in "1x1" "1x2" "mpi2x1" "mpi2x1-overlap" "mpi2x1-ep2" "mpi2x1-ep2-overlap"; do
  name=s3_$how
  extra=""
  case $how in
  1x1) out=$(OMP_NUM_THREADS=1 s3 "$train") ;;
  1x2) out=$(OMP_NUM_THREADS=2 s3 "$train") ;;
  mpi2x1) out=$(OMP_NUM_THREADS=1 s3 mpirun -np 2 --bind-to core "$train") ;;
  mpi2x1-overlap) extra="--overlap-grad-sum"; out=$(OMP_NUM_THREADS=1 s3 mpirun -np 2 --bind-to core "$train") ;;
  mpi2x1-ep2) extra="--expert-parallel 2"; out=$(OMP_NUM_THREADS=1 s3 mpirun -np 2 --bind-to core "$train") ;;
  mpi2x1-ep2-overlap)
    extra="--expert-parallel 2 --overlap-grad-sum"
    out=$(OMP_NUM_THREADS=1 s3 mpirun -np 2 --bind-to core "$train") ;;
  esac
  line=$(echo "$out" | grep "^stage 3: finished")
  secs=$(echo "$line" | sed -E 's/.* in ([0-9.]+) s .*/\1/')
  tps=$(echo "$line" | sed -E 's/.*\(([0-9]+) tok\/s\).*/\1/')
  [ -z "$base" ] && base=$tps
  printf "| %s | %s | %s | %s |\n" "$how" "$secs" "$tps" "$(python3 -c "print(f'{$tps/$base:.2f}')")"
  echo "$out" | grep "all-reduce" | sed 's/^/    /' || true
done
