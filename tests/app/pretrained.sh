#!/usr/bin/env bash
# Stage starts from Hugging Face checkpoints (cumo_train --from HF_DIR; tools/app/pretrained.hpp), on the app smoke
# run (run from its working directory, after app_smoke_train). $1 = cumo_train, $2 = cumo_export, $3 = cumo_eval,
# $4 = which case, $5 = cumo_generate (release, sentencepiece), $6 = cumo_test_spm_train (sentencepiece):
#   llava     run/stage2 exported as llava-hf LLaVA-1.5; stage 3 from it (upcycled) reproduces the smoke run's
#             stage 3 loss for loss, and a stopped + resumed stage 3 from it ends bitwise where it ended
#   release   run/stage3 exported in the CuMo release layout; stage 3 from it keeps its experts (no upcycling);
#             cumo_generate answers with it as with run/stage3
#   sentencepiece  the smoke run again on a BPE tokenizer.model trained on its texts; exported as a release, the
#             tokenizer.model goes beside it, and cumo_generate answers with the export as with the run
#   parts     run/stage1's LLM and CLIP exported as two checkpoints; stage 1 from them (fresh connector)
#             reproduces the smoke run's stage 1 loss for loss (stage 1 trains only the connector)
#   errors    bad starts end with a message that names the problem
set -u
train=$1 export=$2 evaluate=$3 case=$4 generate=${5:-} spm_train=${6:-}
fail() { echo "FAIL [$case]: $*"; exit 1; }
work=pretrained_$case
rm -rf "$work"
mkdir -p "$work"

# Stage-s rows of a metrics.csv without the timing columns (tokens_per_s, elapsed_s).
rows() { python3 - "$1" "$2" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["stage"] == sys.argv[2]]
for r in rows:
    print(",".join(v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")))
PY
}
same_rows() {  # $1 $2 metrics files, $3 stage
  local a b
  a=$(rows "$1" "$3"); b=$(rows "$2" "$3")
  [ -n "$a" ] || fail "no stage-$3 rows in $1"
  [ "$a" = "$b" ] || fail "stage-$3 metrics differ: $1 vs $2:\n$a\n---\n$b"
}

# cumo_generate's greedy answers with checkpoint $1 (a run's) and $2 (its release export) to two questions: equal,
# and the export's run ends with its tokens/s line.
same_answers() {
  local q want got
  for q in "what colour is the circle?" "how many shapes are there?"; do
    want=$("$generate" --checkpoint "$1" --image data/images/eval_000000.png --prompt "$q" --max-new-tokens 8 \
             2>"$work/gen_err.txt") || fail "cumo_generate on $1 failed: $(cat "$work/gen_err.txt")"
    got=$("$generate" --checkpoint "$2" --image data/images/eval_000000.png --prompt "$q" --max-new-tokens 8 \
            2>"$work/gen_err.txt") || fail "cumo_generate on $2 failed: $(cat "$work/gen_err.txt")"
    [ "$got" = "$want" ] || fail "$2 answers '$got', $1 '$want' ('$q')"
    grep -q "tokens/s" "$work/gen_err.txt" || fail "no tokens/s line: $(cat "$work/gen_err.txt")"
  done
}

case $case in
llava)
  "$export" --checkpoint run/stage2 --out "$work/llava" --layout llava-hf || fail "export failed"
  python3 - "$work/llava/model.safetensors" <<'PY' || fail "the export's names are not llava-hf's"
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    names = [k for k in json.loads(f.read(n)) if k != "__metadata__"]
prefixes = ("vision_tower.vision_model.", "multi_modal_projector.linear_", "language_model.model.", "language_model.lm_head.")
bad = [k for k in names if not k.startswith(prefixes)]
assert not bad and any(k.startswith("language_model.lm_head.") for k in names), bad
PY
  grep -q '"model_type": "llava"' "$work/llava/config.json" || fail "config.json is not a LlavaConfig"
  out=$("$train" --config tiny.json --stage 3 --from "$work/llava" --out "$work/run" --quiet 2>&1) ||
    fail "stage 3 from the llava-hf export failed: $out"
  echo "$out" | grep -q "stage 3: finished at step 5/5" || fail "stage 3 did not finish: $out"
  same_rows run/metrics.csv "$work/run/metrics.csv" 3
  "$evaluate" --checkpoint "$work/run/stage3" --quiet | grep -q "expert load" || fail "cumo_eval of the run failed"
  # stopped after 2 steps and resumed: the stored model config rebuilds the model without the llava-hf directory
  "$train" --config tiny.json --stage 3 --from "$work/llava" --out "$work/stopped" --max-steps 2 --quiet \
    >/dev/null 2>&1 || fail "the stopped run failed"
  mv "$work/llava" "$work/llava.moved"
  "$train" --resume "$work/stopped/stage3-partial" --quiet >/dev/null 2>&1 || fail "the resume failed"
  cmp -s "$work/run/stage3/model.safetensors" "$work/stopped/stage3/model.safetensors" ||
    fail "the resumed run's weights differ from the uninterrupted run's"
  ;;
release)
  "$export" --checkpoint run/stage3 --out "$work/release" --layout release || fail "export failed"
  grep -q '"mm_projector_type": "smoe_mlp"' "$work/release/config.json" || fail "config.json is not a sparse release's"
  out=$("$train" --config tiny.json --stage 3 --from "$work/release" --out "$work/run" 2>&1) ||
    fail "stage 3 from the release export failed: $out"
  echo "$out" | grep -q "sparse already" || fail "a sparse release was upcycled again: $out"
  echo "$out" | grep -q "vision tower from .*clip_config.json" || fail "the CLIP config beside the release was not read: $out"
  echo "$out" | grep -q "assumed" && fail "the vision tower was guessed, not read: $out"
  echo "$out" | grep -q "stage 3: finished at step 5/5" || fail "stage 3 did not finish: $out"
  "$evaluate" --checkpoint "$work/run/stage3" --quiet | grep -q "expert load" || fail "cumo_eval of the run failed"
  # cumo_generate prompts the export as it prompts the run it came from: the byte tokenizer and the run's template
  # come from config.json, "<image>" is the byte tokenizer's id 259 (image_token_index), not one past the vocabulary
  [ -n "$generate" ] || fail "no cumo_generate given"
  grep -q '"cumo_tokenizer": "byte"' "$work/release/config.json" || fail "the export does not name its tokenizer"
  grep -q '"image_token_index": 259' "$work/release/config.json" || fail "the export does not name its image id"
  same_answers run/stage3 "$work/release"
  ;;
sentencepiece)
  [ -n "$generate" ] && [ -n "$spm_train" ] || fail "cumo_generate and cumo_test_spm_train are needed"
  python3 - data "$work/corpus.txt" <<'PY' || fail "no corpus"
import json, pathlib, sys
lines = [c["value"].replace("<image>", "").strip() for f in pathlib.Path(sys.argv[1]).glob("stage*.json")
         for r in json.load(open(f)) for c in r["conversations"]]
open(sys.argv[2], "w").write("\n".join(l for l in lines if l) + "\n")
PY
  mkdir -p "$work/sp"
  "$spm_train" "$work/corpus.txt" "$work/sp" 120 || fail "training the tokenizer failed"
  python3 - tiny.json "$work/tiny_sp.json" "$work/sp/tokenizer.model" "$work/run" <<'PY' || fail "no config"
import json, sys
c = json.load(open(sys.argv[1]))
c["data"]["tokenizer"] = sys.argv[3]
c["out"] = sys.argv[4]
json.dump(c, open(sys.argv[2], "w"))
PY
  out=$("$train" --config "$work/tiny_sp.json" --quiet 2>&1) || fail "the run on tokenizer.model failed: $out"
  "$export" --checkpoint "$work/run/stage3" --out "$work/release" --layout release || fail "export failed"
  cmp -s "$work/sp/tokenizer.model" "$work/release/tokenizer.model" || fail "the export has not the run's tokenizer.model"
  grep -q '"cumo_tokenizer"' "$work/release/config.json" && fail "the export names a tokenizer besides tokenizer.model"
  same_answers "$work/run/stage3" "$work/release"
  ;;
parts)
  "$export" --checkpoint run/stage1 --out "$work/parts" --layout llm+clip || fail "export failed"
  grep -q '"model_type": "mistral"' "$work/parts/language/config.json" || fail "language/config.json is not Mistral's"
  out=$("$train" --config tiny.json --stage 1 --from "$work/parts/language" --vision-from "$work/parts/vision" \
          --out "$work/run" --quiet 2>&1) || fail "stage 1 from the LLM + CLIP failed: $out"
  same_rows run/metrics.csv "$work/run/metrics.csv" 1
  ;;
errors)
  "$export" --checkpoint run/stage1 --out "$work/parts" --layout llm+clip >/dev/null || fail "export failed"
  out=$("$train" --config tiny.json --stage 1 --from "$work/parts/language" --out "$work/r1" --quiet 2>&1) &&
    fail "an LLM without --vision-from trained"
  echo "$out" | grep -q "vision-from" || fail "no --vision-from hint: $out"
  mkdir -p "$work/odd" && echo '{"model_type": "bert"}' > "$work/odd/config.json"
  out=$("$train" --config tiny.json --stage 1 --from "$work/odd" --out "$work/r2" --quiet 2>&1) &&
    fail "a BERT config was accepted"
  echo "$out" | grep -q "model_type 'bert'.*accepted: llava" || fail "no list of accepted types: $out"
  out=$("$export" --checkpoint run/stage3 --out "$work/x" --layout llava-hf 2>&1) && fail "a sparse llava-hf export"
  echo "$out" | grep -q "use --layout release" || fail "no hint for the sparse export: $out"
  # a checkpoint with a tensor missing and one misshapen: both named, with both shapes
  "$export" --checkpoint run/stage2 --out "$work/llava" --layout llava-hf >/dev/null || fail "export failed"
  python3 - "$work/llava/model.safetensors" <<'PY' || fail "could not edit the export"
import json, struct, sys
p = sys.argv[1]
raw = open(p, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
head = json.loads(raw[8:8 + n]); data = raw[8 + n:]
meta = head.pop("__metadata__", None)
head.pop("language_model.model.norm.weight")
norm = "vision_tower.vision_model.pre_layrnorm.weight"
head[norm]["shape"] = [head[norm]["shape"][0] // 2, 2]  # same bytes, another shape
out, off = {}, 0
for k, v in head.items():
    b, e = v["data_offsets"]
    out[k] = dict(v, data_offsets=[off, off + e - b]); off += e - b
chunks = b"".join(data[v["data_offsets"][0]:v["data_offsets"][1]] for v in head.values())
if meta is not None: out["__metadata__"] = meta
h = json.dumps(out).encode(); h += b" " * (-len(h) % 8)
open(p, "wb").write(struct.pack("<Q", len(h)) + h + chunks)
PY
  out=$("$train" --config tiny.json --stage 3 --from "$work/llava" --out "$work/r3" --quiet 2>&1) &&
    fail "a checkpoint with a missing tensor trained"
  echo "$out" | grep -q "norm.weight" || fail "the missing tensor is not named: $out"
  echo "$out" | grep -q "pre_layrnorm" || fail "the misshapen tensor is not named: $out"
  [ ! -e "$work/r3/stage3" ] || fail "a failed start left a stage-3 checkpoint"
  ;;
*) fail "unknown case '$case'" ;;
esac
echo "PASS [$case]"
