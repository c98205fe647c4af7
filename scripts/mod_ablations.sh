#!/usr/bin/env bash
# LLaVA-MoD's ablations in miniature on the built-in shapes world (docs/llava_mod.md, docs/results.md):
#
#   teacher   a dense CuMo model trained by cumo_train (configs/mod_teacher.json), evaluated like the students
#   kd        init (CE) -> D2D (KL) -> upcycle -> D2S (KL + CE + aux)           LLaVA-MoD's mimic distillation
#   sft       init -> CE (dense) -> upcycle -> CE + aux, same steps              plain SFT of the same student
#   d2s_only  init -> upcycle -> D2S for the steps of D2D + D2S                  D2D ablated
#   dense     kd's stages with a dense student whose FFNs are wide enough to match the sparse student's activated
#             FFN parameters (2 layers x ffn 192 = 128 x top-2 + 128)
#   kd_dpo    kd, then preference distillation (DPO, the teacher as reference): hallucination rate and accuracy
#   kd_kto    kd, then preference distillation with the KTO-pair loss
#   kd_dpo_ce kd, then DPO + the CE of the chosen answers (an RPO-style anchor)
#
# Every arm of a seed starts from the same init stage (kd's), except `dense`, whose architecture differs. Writes
# ABL/seed<s>/<arm>/{eval_results.json,eval_predictions.jsonl,metrics.csv,distill_summary.json} and the markdown
# table ABL/mod_ablations.md (mean ± sample std over seeds).
#
#   scripts/mod_ablations.sh                        # seeds 0 1 2, two runs side by side with one thread each
#   SEEDS="0 1 2 3" JOBS=1 OMP_NUM_THREADS=2 ABL=runs/mod scripts/mod_ablations.sh
#
# The teacher trains with OMP_NUM_THREADS x JOBS threads (TEACHER_THREADS overrides). On a machine that other work
# shares, use 1: an OpenMP team whose threads get descheduled waits at every barrier (10x slower measured here).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TEACHER_CONFIG=${TEACHER_CONFIG:-configs/mod_teacher.json}
CONFIG=${CONFIG:-configs/mod.json}
ABL=${ABL:-runs/mod}
BUILD=${BUILD:-build}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

TRAIN=$BUILD/tools/cumo_train
DISTILL=$BUILD/tools/cumo_distill
if [[ ! -x $TRAIN || ! -x $DISTILL || -n ${REBUILD:-} ]]; then
  if [[ ! -f $BUILD/CMakeCache.txt ]]; then
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCUMO_BUILD_TESTS=OFF -DCUMO_BUILD_BENCHMARKS=OFF \
          -DCUMO_BUILD_EXAMPLES=OFF >/dev/null
  fi
  cmake --build "$BUILD" --target cumo_train cumo_distill -j "$(nproc)"
fi
mkdir -p "$ABL"
start=$(date +%s)

# ---- the teacher (both cores) -----------------------------------------------------------------------------------
TEACHER=$ABL/teacher
if [[ ! -f $TEACHER/stage3/trainer_state.json ]]; then
  # continue after the last finished stage of an interrupted run
  from=()
  for s in 1 2; do [[ -f $TEACHER/stage$s/trainer_state.json ]] && from=(--resume "$TEACHER/stage$s"); done
  echo "== training the teacher ($TEACHER_CONFIG -> $TEACHER ${from[*]})"
  if [[ ${#from[@]} -eq 0 ]]; then from=(--config "$TEACHER_CONFIG" --out "$TEACHER"); fi
  OMP_NUM_THREADS=${TEACHER_THREADS:-$(( OMP_NUM_THREADS * JOBS ))} "$TRAIN" "${from[@]}" --quiet \
    >> "$ABL/teacher.log" 2>&1 || { echo "teacher training failed: see $ABL/teacher.log"; exit 1; }
fi
# the teacher's training time, from its own summary (it may have been trained by an earlier invocation)
t_teacher=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(round(sum(v['seconds'] for k, v in d.items() if k.startswith('stage'))))" "$TEACHER/train_summary.json")
if [[ ! -f $ABL/teacher_eval/eval_results.json ]]; then
  "$DISTILL" --config "$CONFIG" --teacher "$TEACHER/stage3" --eval-teacher --out "$ABL/teacher_eval" --quiet > "$ABL/teacher_eval.log" 2>&1 ||
    { echo "teacher eval failed: see $ABL/teacher_eval.log"; exit 1; }
fi
echo "teacher: $(grep overall "$ABL/teacher_eval.log")  (trained in ${t_teacher} s)"

# ---- the students -----------------------------------------------------------------------------------------------
throttle() { while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done; }

# arm <seed> <name> <cumo_distill arguments...>: one arm, skipped when its eval exists.
arm() {
  local seed=$1 name=$2 out
  shift 2
  out=$ABL/seed$seed/$name
  if [[ -f $out/eval_results.json ]]; then return 0; fi
  mkdir -p "$out"
  "$DISTILL" --config "$CONFIG" --teacher "$TEACHER/stage3" --seed "$seed" --out "$out" --eval --quiet "$@" > "$out/run.log" 2>&1 ||
    { echo "seed $seed $name failed: see $out/run.log"; return 1; }
  echo "seed $seed $name: $(grep overall "$out/run.log")"
}

seed_runs() {
  local seed=$1 d=$ABL/seed$1
  arm "$seed" kd --stages init,d2d,d2s
  arm "$seed" kd_dpo --from "$d/kd/d2s" --stages dpo
  arm "$seed" kd_kto --from "$d/kd/d2s" --stages kto
  arm "$seed" kd_dpo_ce --from "$d/kd/d2s" --stages dpo_ce
  arm "$seed" sft --from "$d/kd/init" --stages sft_dense,sft_sparse
  arm "$seed" d2s_only --from "$d/kd/init" --stages d2s_long
}
dense_run() {
  arm "$1" dense --dense-student --student-ffn 192 --stages init,d2d,d2s
}

for seed in $SEEDS; do
  throttle
  seed_runs "$seed" &
  throttle
  dense_run "$seed" &
done
wait
total=$(( $(date +%s) - start ))
echo "all runs done in $total s of wall time in this invocation (teacher training: $t_teacher s)"

python3 - "$ABL" "$SEEDS" "$total" "$t_teacher" <<'PY'
import json, math, os, sys
abl, seeds, total, t_teacher = sys.argv[1], sys.argv[2].split(), int(sys.argv[3]), int(sys.argv[4])
arms = ["kd", "sft", "d2s_only", "dense", "kd_dpo", "kd_kto", "kd_dpo_ce"]
label = {"kd": "KD: init → D2D → D2S (sparse)", "sft": "SFT: init → CE → CE (sparse)",
         "d2s_only": "D2S only (sparse)", "dense": "KD, dense student (same active FFN)",
         "kd_dpo": "KD + DPO (sparse)", "kd_kto": "KD + KTO-pair (sparse)",
         "kd_dpo_ce": "KD + DPO + CE on chosen (sparse)"}

def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"

def load(p):
    return json.load(open(p)) if os.path.exists(p) else None

res = {a: [r for r in (load(os.path.join(abl, f"seed{s}", a, "eval_results.json")) for s in seeds) if r] for a in arms}
teacher = load(os.path.join(abl, "teacher_eval", "eval_results.json"))
types = sorted({t for rs in res.values() for r in rs for t in r["per_type"]} |
               (set(teacher["per_type"]) if teacher else set()))
lines = [f"Seeds {' '.join(seeds)}; cells: mean ± sample std over seeds (n per row); accuracy = exact match, "
         f"halluc. = share of answers naming something absent from the image. Wall time of the students in this "
         f"invocation: {total} s; the teacher's training: {t_teacher} s.\n",
         "| model | n | " + " | ".join(types) + " | accuracy | halluc. |",
         "|" + " --- |" * (len(types) + 4)]
if teacher:
    lines.append("| teacher (dense, cumo_train) | 1 | " + " | ".join(
        f"{teacher['per_type'][t]['accuracy']:.3f}" for t in types) +
        f" | {teacher['accuracy']:.3f} | {teacher['hallucination_rate']:.3f} |")
for a in arms:
    rs = res[a]
    if not rs:
        lines.append(f"| {label[a]} | 0 |" + " pending |" * (len(types) + 2))
        continue
    lines.append("| " + " | ".join([label[a], str(len(rs))] +
                                   [ms([r["per_type"].get(t, {}).get("accuracy") for r in rs]) for t in types] +
                                   [ms([r["accuracy"] for r in rs]), ms([r["hallucination_rate"] for r in rs])]) + " |")
lines.append("")
# memory of teacher + student during D2S (the largest trainable set of the sparse student)
for s in seeds:
    summ = load(os.path.join(abl, f"seed{s}", "kd", "distill_summary.json"))
    if summ and "d2s" in summ.get("stages", {}):
        m = summ["stages"]["d2s"]["memory"]
        lines.append(f"Memory during D2S (seed {s}): teacher {m['teacher_params']} parameters "
                     f"({m['teacher_weights_mib']:.2f} MiB), student {m['student_params']} parameters "
                     f"({m['student_active_params']} active per token in the LLM; weights + gradients "
                     f"{m['student_weights_and_grads_mib']:.2f} MiB), AdamW state {m['optimizer_state_mib']:.2f} MiB, "
                     f"peak RSS of the process {m['peak_rss_mib']:.0f} MiB.")
        break
out = os.path.join(abl, "mod_ablations.md")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print("wrote", out)
PY
