#!/usr/bin/env bash
# Issue #14 §2: what the paper's modules are worth on RSICD-AID150. Every row trains the pir-small config
# of models/ (bench/ablation/*.json: soft VIR, hard VIR, soft VIR + LCA, hard VIR + LCA, no instruction)
# with one recipe and one budget: batch 64, 1,000 steps (2 epochs of 32,000 samples drawn from all of
# train+val), AdamW lr 5e-4, wd 0.2, 200 warm-up steps then cosine, affiliation loss (on every row, the
# plain CLIP too: it needs only the features and the file-name classes), seed SEED, one thread per run.
# Then test-split retrieval with running BatchNorm and a 1,000-draw bootstrap interval, and each row's
# mean-recall difference to the first row, paired on the same draws (bench/ablation_paired.py).
#   bench/ablation.sh [SEED=0] [JOBS=2] [ROWS="soft hard soft-lca hard-lca plain"]  -> bench/results/ablation-seedN.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-0}; JOBS=${2:-2}; ROWS=${3:-"soft hard soft-lca hard-lca plain"}
A=../shared/data/rsicd-aid150
BIN=${PIRCLIP:-target/release/pirclip}
LOGS=${LOGS:-bench/results/ablation-logs}
OUT=bench/results/ablation-seed$SEED.jsonl
mkdir -p "$LOGS"
row() {
  set -euo pipefail
  local name=$1
  local run="$name-seed$SEED"
  rm -rf "$LOGS/$run"
  /usr/bin/time -f '%e' -o "$LOGS/$run.time" "$BIN" train --model "bench/ablation/$name.json" \
    --train-data "$A/dataset_rsicd_aid150.json" --images-dir "$A/images" --train-split train,val \
    --batch-size 64 --epochs 2 --train-num-samples 32000 --lr 5e-4 --wd 0.2 --warmup 200 \
    --lr-scheduler cosine --aff-loss --logs "$LOGS" --name "$run" --threads 1 --workers 1 \
    --seed "$SEED" --log-every-n-steps 50 > "$LOGS/$run.train.txt" 2>&1
  "$BIN" eval --model "bench/ablation/$name.json" --checkpoint "$LOGS/$run/checkpoints/epoch_2.safetensors" \
    --json "$A/dataset_rsicd_aid150.json" --images-dir "$A/images" --threads 1 \
    --out "$LOGS/$run.metrics.json" --embeddings-out "$LOGS/$run.emb" > "$LOGS/$run.eval.txt" 2>&1
  python3 - "$name" "$SEED" "$LOGS/$run.metrics.json" "$LOGS/$run.time" >> "$OUT" <<'PY'
import json, sys
name, seed, metrics, t = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3])), open(sys.argv[4]).read().split()[-1]
raw = metrics["raw"]
print(json.dumps({"row": name, "seed": seed, "train_s": float(t),
                  **{k: round(v, 2) for k, v in raw.items() if k.startswith("retrieval-")},
                  "bootstrap": raw.get("mean-recall-bootstrap")}))
PY
}
export -f row; export SEED LOGS OUT A BIN
printf '%s\n' $ROWS | xargs -P "$JOBS" -I{} bash -c 'row {}'
cat "$OUT"
# Paired differences against the first row, every row on the same bootstrap draws of the test images.
set -- $ROWS
.venv/bin/python bench/ablation_paired.py "$LOGS/$1-seed$SEED.emb" $(shift; for r in "$@"; do echo "$LOGS/$r-seed$SEED.emb"; done) \
  | tee bench/results/ablation-paired-seed$SEED.jsonl
