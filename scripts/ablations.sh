#!/usr/bin/env bash
# The CuMo paper's ablations (its Tables 3-5) in miniature, on the built-in shapes world at the demo's scale: the same
# data and the same budget (steps, batch, lr) for every variant, several seeds, mean ± sample std.
#
#   dense        stages 1-2, then a dense stage 3                            (the baseline)
#   moe          co-upcycled CLIP-MoE + MLP-MoE (top-2 of 4), bzloss          (CuMo; the demo itself)
#   moe_nobz     co-upcycled, without the balance / z losses
#   moe_scratch  MoE blocks whose experts start from random weights           (upcycling ablated)
#   moe_mlponly  only the connector upcycled (MLP-MoE; the CLIP MLPs stay dense)
#   moe_conn8    as moe, with the connector top-2 of 8 experts
#
# Stages 1-2 do not depend on the variant, so each seed trains them once and every variant's stage 3 starts from
# that seed's stage-2 checkpoint. Writes ABL/seed<s>/<variant>/{metrics.csv,eval_results.json,expert_load.csv} and
# the markdown table ABL/ablations.md (accuracy per question type, expert load max/mean per layer).
#
#   scripts/ablations.sh                                  # configs/demo.json, seeds 0 1 2, all six variants
#   CONFIG=configs/ablation.json SEEDS="0 1 2 3 4" VARIANTS="dense moe" ABL=runs/ablations JOBS=1 scripts/ablations.sh
#
# With the demo's config, seed 0's `moe` run is the demo itself, trained stage by stage: its eval.log is what
# scripts/check_results.sh compares (LOG=ABL/seed0/moe/eval.log).
# JOBS > 1 runs that many trainings side by side (each with OMP_NUM_THREADS threads); wall times then stretch but
# nothing else changes: every run is deterministic for its thread count.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CONFIG=${CONFIG:-configs/demo.json}
ABL=${ABL:-runs/ablations}
BUILD=${BUILD:-build}
SEEDS=${SEEDS:-"0 1 2"}
VARIANTS=${VARIANTS:-"dense moe moe_nobz moe_scratch moe_mlponly moe_conn8"}
JOBS=${JOBS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

TRAIN=$BUILD/tools/cumo_train
EVAL=$BUILD/tools/cumo_eval
if [[ ! -x $TRAIN || ! -x $EVAL ]]; then
  if [[ ! -f $BUILD/CMakeCache.txt ]]; then
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCUMO_BUILD_TESTS=OFF -DCUMO_BUILD_BENCHMARKS=OFF \
          -DCUMO_BUILD_EXAMPLES=OFF >/dev/null
  fi
  cmake --build "$BUILD" --target cumo_train cumo_eval -j "$(nproc)"
fi
mkdir -p "$ABL"
cp "$CONFIG" "$ABL/config.json"

# Waits until fewer than JOBS background jobs run.
throttle() { while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done; }

base_of() { echo "$ABL/seed$1/base"; }

# Stages 1 and 2 for one seed (skipped when done).
train_base() {
  local seed=$1 out
  out=$(base_of "$seed")
  if [[ -f $out/stage2/trainer_state.json ]]; then return 0; fi
  if [[ ! -f $out/stage1/trainer_state.json ]]; then
    "$TRAIN" --config "$CONFIG" --seed "$seed" --stage 1 --out "$out" --quiet > "$out.log" 2>&1 ||
      { echo "seed $seed stage 1 failed: see $out.log"; return 1; }
  fi
  "$TRAIN" --config "$CONFIG" --seed "$seed" --stage 2 --out "$out" --quiet >> "$out.log" 2>&1 ||
    { echo "seed $seed stage 2 failed: see $out.log"; return 1; }
  echo "seed $seed: stages 1-2 done ($(tail -n 1 "$out.log"))"
}

# Stage 3 of one variant + eval (skipped when done).
train_variant() {
  local seed=$1 v=$2 out
  out=$ABL/seed$seed/$v
  if [[ ! -f $out/stage3/trainer_state.json ]]; then
    mkdir -p "$out"
    "$TRAIN" --config "$CONFIG" --seed "$seed" --variant "$v" --stage 3 --from "$(base_of "$seed")/stage2" \
             --out "$out" --quiet > "$out/train.log" 2>&1 ||
      { echo "seed $seed $v: stage 3 failed: see $out/train.log"; return 1; }
  fi
  if [[ ! -f $out/eval_results.json ]]; then
    "$EVAL" --checkpoint "$out/stage3" --out "$out" --quiet > "$out/eval.log" 2>&1 ||
      { echo "seed $seed $v: eval failed: see $out/eval.log"; return 1; }
  fi
  echo "seed $seed $v: $(grep overall "$out/eval.log")"
}

start=$(date +%s)
# The data set is generated once, before any job needs it.
"$TRAIN" --config "$CONFIG" --stage 1 --max-steps 0 --out "$ABL/.probe.$$" --quiet > /dev/null 2>&1 || true
rm -rf "$ABL/.probe.$$" || true

for seed in $SEEDS; do
  mkdir -p "$ABL/seed$seed"
  throttle
  train_base "$seed" &
done
wait
for seed in $SEEDS; do
  for v in $VARIANTS; do
    throttle
    train_variant "$seed" "$v" &
  done
done
wait
echo "all runs done in $(( $(date +%s) - start )) s"

python3 - "$ABL" "$SEEDS" "$VARIANTS" <<'PY'
import json, math, os, sys
abl, seeds, variants = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()

def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"

res = {v: [] for v in variants}
secs = {v: [] for v in variants}
for v in variants:
    for s in seeds:
        p = os.path.join(abl, f"seed{s}", v, "eval_results.json")
        if os.path.exists(p):
            res[v].append(json.load(open(p)))
        t = os.path.join(abl, f"seed{s}", v, "train_summary.json")
        if os.path.exists(t):
            secs[v].append(json.load(open(t)).get("stage3", {}).get("seconds"))
types = sorted({t for rs in res.values() for r in rs for t in r["per_type"]})
lines = []
cfg = json.load(open(os.path.join(abl, "config.json")))
st = cfg.get("stages", {})
lines.append(f"Config `{cfg.get('name', '?')}` — seeds {' '.join(seeds)}; stage-3 budget per variant: "
             f"{st.get('3', {}).get('steps', '?')} steps. Cells: mean ± sample std over seeds (n per row).\n")
lines.append("| variant | n | " + " | ".join(types) + " | overall | eval CE | stage-3 s (mean) |")
lines.append("|" + " --- |" * (len(types) + 5))
for v in variants:
    rs = res[v]
    if not rs:
        lines.append(f"| {v} | 0 |" + " pending |" * (len(types) + 3))
        continue
    row = [v, str(len(rs))] + [ms([r["per_type"].get(t, {}).get("accuracy") for r in rs]) for t in types]
    ts = [x for x in secs[v] if x is not None]
    row += [ms([r["accuracy"] for r in rs]), ms([r["eval_ce"] for r in rs]),
            f"{sum(ts) / len(ts):.0f}" if ts else "—"]
    lines.append("| " + " | ".join(row) + " |")
any_r = next((rs[0] for rs in res.values() if rs), None)
if any_r:
    lines.append("| chance (uniform) | | " + " | ".join(f"{any_r['per_type'][t].get('chance', float('nan')):.3f}"
                                                       for t in types) + " | | | |")
    lines.append("| majority answer | | " + " | ".join(f"{any_r['per_type'][t]['majority_baseline']:.3f}"
                                                      for t in types) + " | | | |")
lines.append("")
moe = [v for v in variants if v != "dense" and res[v]]
if moe:
    layers = []
    for v in moe:
        for r in res[v]:
            for n in r.get("expert_load", {}):
                if n not in layers:
                    layers.append(n)
    lines.append("Expert load on the eval set, max/mean tokens per expert (1 = balanced; E/k = every token on the "
                 "same k experts: 2 for top-2 of 4, 4 for the connector's top-2 of 8):\n")
    lines.append("| variant | " + " | ".join(layers) + " |")
    lines.append("|" + " --- |" * (len(layers) + 1))
    for v in moe:
        lines.append("| " + v + " | " + " | ".join(
            ms([r["expert_load"].get(n, {}).get("max_over_mean") for r in res[v]]) for n in layers) + " |")
    lines.append("")
out = os.path.join(abl, "ablations.md")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print("wrote", out)
PY
if command -v python3 >/dev/null; then python3 scripts/plot.py --ablation "$ABL" || true; fi
