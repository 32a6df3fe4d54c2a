#!/usr/bin/env bash
# The WikiText-103 config's first training steps on one GPU, on a stand-in shaped like WikiText-103 (267,735
# word types, Zipf-distributed synthetic tokens: the text is not WikiText-103, the dictionary and model are):
# which model fairseq-hydra-train builds (its logged parameter count) and its training throughput.
#   bash scripts/gpu_wt103_first_steps.sh OUT_DIR [UPDATES]
# EXTRA='hydra overrides' are appended (a CPU dry run: EXTRA='common.cpu=true common.fp16=false ...').
# Writes OUT_DIR/train.log and OUT_DIR/metrics.json. Needs a CUDA GPU (on the device machine: source .gpu/setup.sh).
set -euo pipefail
OUT=${1:?usage: gpu_wt103_first_steps.sh OUT_DIR [UPDATES]}; UPDATES=${2:-60}
ROOT=$(cd "$(dirname "$0")/.." && pwd); WORK=$(mktemp -d)
mkdir -p "$OUT"
python - "$WORK" "${TRAIN_TOKENS:-3000000}" <<'EOF'
import os, sys
import numpy as np
work = sys.argv[1]
types = 267_735  # WikiText-103's vocabulary; fairseq adds 4 specials: 267,739 symbols
with open(os.path.join(work, "dict.txt"), "w") as f:
    f.writelines(f"w{i} {10**8 - i}\n" for i in range(types))
rng = np.random.default_rng(0)
for split, n in (("train", int(sys.argv[2])), ("valid", 60_000)):
    ranks = np.minimum(rng.zipf(1.1, n) - 1, types - 1)  # heavy-tailed like word frequencies
    words = np.char.add("w", ranks.astype(str))
    with open(os.path.join(work, f"{split}.txt"), "w") as f:
        for line in np.array_split(words, n // 100):
            f.write(" ".join(line) + "\n")
EOF
fairseq-preprocess --only-source --srcdict "$WORK/dict.txt" --trainpref "$WORK/train.txt" \
    --validpref "$WORK/valid.txt" --destdir "$WORK/bin" --workers 8 > "$OUT/preprocess.log" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
start=$(date +%s)
fairseq-hydra-train --config-dir "$ROOT/config" --config-name wt103 task.data="$WORK/bin" \
    common.user_dir="$ROOT/knnlm_fairseq" hydra.run.dir="$WORK/hydra" checkpoint.no_save=true \
    distributed_training.distributed_world_size=1 optimization.max_update="$UPDATES" common.log_interval=10 \
    dataset.max_valid_steps=2 ${EXTRA:-} 2>&1 | tee "$OUT/train.log" | grep -E "model params|train_inner|done training"
end=$(date +%s)
python - "$OUT" "$((end - start))" <<'EOF'
import json, re, sys
out, wall = sys.argv[1], int(sys.argv[2])
log = open(f"{out}/train.log").read()
params = re.search(r"num\. (?:shared )?model params: ([\d,]+)", log).group(1)
wps = [float(w) for w in re.findall(r"train_inner.*?wps[=| ]+([\d.]+)", log)]  # simple or tqdm format
layers, dim = (re.search(rf"'model': {{[^}}]*'{k}': (\d+)", log) for k in ("decoder_layers", "decoder_embed_dim"))
m = {"gpu": open(f"{out}/gpu.txt").read().strip(), "params": int(params.replace(",", "")),
     "dict_symbols": 267_739, "wps_per_interval": wps, "wps_after_warmup": wps[1:],
     "wps_median_after_warmup": sorted(wps[1:])[len(wps[1:]) // 2] if len(wps) > 1 else None,
     "valid_loss_bits": float(re.findall(r"valid on 'valid' subset \| loss ([\d.]+)", log)[-1]),
     "loss_inf_intervals": len(re.findall(r"train_inner.*?loss=inf", log)), "tokens_per_batch": 3072, "update_freq": 3, "fp16": True, "wall_s": wall,
     "decoder_layers": int(layers.group(1)), "decoder_embed_dim": int(dim.group(1))}
json.dump(m, open(f"{out}/metrics.json", "w"), indent=1)
print(json.dumps(m))
EOF
rm -rf "$WORK"
