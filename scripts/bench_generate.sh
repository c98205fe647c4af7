#!/usr/bin/env bash
# Peak memory and decode speed of cumo_generate on a synthetic CuMo release (random weights at a released model's
# sizes, benchmarks/make_synthetic_release.cpp), in each --dtype given, against the memory-bandwidth bound measured
# by a copy loop in the same run. The checkpoint is written in bf16 to a scratch directory and deleted afterwards.
#
#   bash scripts/bench_generate.sh BUILD_DIR PRESET "DTYPES" [NEW_TOKENS]
#   e.g. bash scripts/bench_generate.sh build-cpu 7b "bf16"        (7b in fp32 needs ~32 GB: not on a 24 GiB machine)
#        bash scripts/bench_generate.sh build-cpu 1b "f32 bf16"
# Prints one line per dtype: peak RSS / in-memory weight bytes, prefill seconds, decode tokens/s, the bound
# (copy bandwidth / bytes one decode step reads) and their ratio, and the same against the read bandwidth (a decode
# only reads its weights; on this machine reading alone runs at ~0.6 of the copy figure). Threads: OMP_NUM_THREADS (default: all cores).
set -euo pipefail
build=${1:?build dir}; preset=${2:?preset}; dtypes=${3:-bf16}; new=${4:-16}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/cumo_synthetic.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
dir=$scratch/$preset
"$build/benchmarks/make_synthetic_release" --preset "$preset" --out "$dir" --dtype bf16
probe=$("$build/benchmarks/make_synthetic_release" --bandwidth | tee /dev/stderr)
bw=$(echo "$probe" | sed -nE 's/^copy bandwidth: ([0-9.]+) GB\/s.*/\1/p')
rbw=$(echo "$probe" | sed -nE 's/^read bandwidth: ([0-9.]+) GB\/s.*/\1/p')
for dt in $dtypes; do
  /usr/bin/time -v "$build/tools/cumo_generate" --checkpoint "$dir" --tokenizer byte --image "$dir/image.png" \
    --prompt "Describe the image." --max-new-tokens "$new" --dtype "$dt" > "$scratch/answer.txt" 2> "$scratch/err.txt" ||
    { cat "$scratch/err.txt"; exit 1; }
  grep "^cumo_generate:" "$scratch/err.txt"  # its own account: weights, memory after loading, peak, timings
  python3 - "$dir/synthetic.json" "$scratch/err.txt" "$dt" "$bw" "$rbw" <<'PY'
import json, re, sys
syn = json.load(open(sys.argv[1])); err = open(sys.argv[2]).read(); dt = sys.argv[3]; bw = float(sys.argv[4])
rbw = float(sys.argv[5])
scale = {"f32": 2.0, "bf16": 1.0, "f16": 1.0}[dt]  # the file is bf16; fp32 holds the matrices at 4 bytes
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
m = re.search(r"prefill ([0-9.]+) s \((\d+) prompt tokens\), decode ([0-9.]+) tokens/s", err)
prefill, prompt, rate = float(m.group(1)), int(m.group(2)), float(m.group(3))
# Matrices follow --dtype, vectors (norms, biases) stay fp32: close enough to scale the matrix bytes alone.
weights = syn["weight_bytes"] * scale
decode_bytes = syn["decode_bytes_per_token"] * scale
bound, rbound = bw * 1e9 / decode_bytes, rbw * 1e9 / decode_bytes
print(f"{syn['preset']} {dt}: {syn['parameters']/1e9:.2f} B parameters, weights {weights/1e9:.2f} GB, "
      f"peak RSS {rss/1e9:.2f} GB = {rss/weights:.3f} x weights; prefill {prefill:.1f} s ({prompt} tokens); "
      f"decode {rate:.3f} tokens/s, bound {bound:.3f} tokens/s ({bw:.1f} GB/s copy / {decode_bytes/1e9:.2f} GB per "
      f"token), ratio {rate/bound:.2f}; read bound {rbound:.3f} tokens/s ({rbw:.1f} GB/s read), ratio {rate/rbound:.2f}")
PY
done
