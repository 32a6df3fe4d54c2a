#!/usr/bin/env bash
# kNN-LM on a GPU with the torch search backend, timed beside the base LM in one run: WikiText-2 (the shipped
# checkpoint, a datastore over train dumped on the GPU, a Flat index for its sidecar), test split.
#   bash scripts/gpu_wt2_torch_search.sh OUT RAW_DIR CHECKPOINT [DEVICE_FLAGS]
# RAW_DIR holds wiki.{train,valid,test}.tokens; CHECKPOINT's folder holds its dict.txt. DEVICE_FLAGS default to
# none (CUDA); a CPU dry run: DEVICE_FLAGS=--cpu with a small RAW_DIR. Writes OUT/metrics.json and the logs.
set -euo pipefail
OUT=${1:?usage: OUT RAW_DIR CHECKPOINT [DEVICE_FLAGS]}; RAW=$2; CKPT=$3; DEV=${4:-}
WORK=$(mktemp -d); mkdir -p "$OUT"
W="--tokens-per-sample 512 --context-window 256 --max-tokens 65536 --no-progress-bar $DEV"
KNN="--knnlm --dstore-dir $WORK/dstore --k 1024 --lmbda 0.25 --knn-temp 10 --knn-backend torch"
fairseq-preprocess --only-source --srcdict "$(dirname "$CKPT")/dict.txt" --trainpref "$RAW/wiki.train.tokens" \
    --validpref "$RAW/wiki.valid.tokens" --testpref "$RAW/wiki.test.tokens" --destdir "$WORK/bin" \
    --workers 8 > "$OUT/preprocess.log" 2>&1
ev() { fairseq-eval-lm "$WORK/bin" --path "$CKPT" --user-dir knnlm_fairseq --task knn_eval $W "$@"; }
ev --gen-subset train --save-dstore --dstore-dir "$WORK/dstore" > "$OUT/dump.log" 2>&1
knnlm-build-index "$WORK/dstore" --factory Flat --no-progress-bar > "$OUT/index.log" 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || echo cpu > "$OUT/gpu.txt"
for run in base torch_approx torch_exact base_again; do
  case $run in
    base|base_again) ev --gen-subset test > "$OUT/$run.log" 2>&1 ;;
    torch_approx) ev --gen-subset test $KNN --knn-dist approx --knn-stats "$OUT/$run.stats.json" > "$OUT/$run.log" 2>&1 ;;
    torch_exact) ev --gen-subset test $KNN --knn-dist exact --knn-stats "$OUT/$run.stats.json" > "$OUT/$run.log" 2>&1 ;;
  esac
done
python - "$OUT" <<'EOF'
import json, re, sys
out = sys.argv[1]
def read(name):
    log = open(f"{out}/{name}.log").read()
    n, s = re.search(r"Evaluated ([\d,]+) tokens in ([\d.]+)s", log).groups()
    return {"tokens": int(n.replace(",", "")), "seconds": float(s),
            "ppl": float(re.search(r"Perplexity: ([\d.]+)", log).group(1))}
runs = {name: read(name) for name in ("base", "torch_approx", "torch_exact", "base_again")}
base_s = min(runs["base"]["seconds"], runs["base_again"]["seconds"])
for name in ("torch_approx", "torch_exact"):
    runs[name]["vs_base"] = round(runs[name]["seconds"] / base_s, 2)
dump = open(f"{out}/dump.log").read()
m = {"gpu": open(f"{out}/gpu.txt").read().strip(), "runs": runs, "base_seconds_min": base_s,
     "dstore_entries": int(re.search(r"Evaluated ([\d,]+) tokens", dump).group(1).replace(",", "")),
     "settings": "k=1024, lambda=0.25, T=10, Flat neighbours from --knn-backend torch (fp16 keys on the device)"}
json.dump(m, open(f"{out}/metrics.json", "w"), indent=1)
print(json.dumps(m))
EOF
rm -rf "$WORK"
