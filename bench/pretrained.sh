#!/usr/bin/env bash
# Issue #24: CLIP models on the pretrained towers (ImageNet EfficientNet-Lite0, sentence-transformers'
# MiniLM-L6) trained on RSICD-AID150 train+val, evaluated on its test split (the dedup-cleaned split is
# the full one: `pirclip dedup` finds no test image with a near-duplicate outside test). Each row: the
# same budget (EPOCHS passes of one caption per image (CAPTIONS=all: of every caption), batch 64, AdamW
# lr LR, wd 0.2, WARMUP (30) warm-up steps then cosine, affiliation loss, --recipe official, one thread) plus its own flags; test mR with a
# bootstrap interval, zero-shot top-1 over the 30 classes, train time; one JSON line per row.
#   [EPOCHS=2 LR=1e-4 WARMUP=30 CAPTIONS=one] bench/pretrained.sh [ROWS="both lock-text lock-image"] [JOBS=2]
#   (the shipped model: EPOCHS=1 LR=3e-4 WARMUP=50 CAPTIONS=all bench/pretrained.sh lock-image-emb 1)
#     -> bench/results/pretrained.jsonl, logs in bench/results/pretrained-logs/
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-"both lock-text lock-image"}; JOBS=${2:-2}
A=../shared/data/rsicd-aid150
BIN=${PIRCLIP:-target/release/pirclip}
LOGS=${LOGS:-bench/results/pretrained-logs}
OUT=${OUT:-bench/results/pretrained.jsonl}
EPOCHS=${EPOCHS:-2}; LR=${LR:-1e-4}; WARMUP=${WARMUP:-30}
# A pass over the data: one caption per image (8,973 samples, the default) or every caption (CAPTIONS=all:
# 44,865 samples).
CAPTIONS=${CAPTIONS:-one}
CONFIG=${CONFIG:-bench/pretrained/lite0-minilm-l6-160.json}
declare -A FLAGS
FLAGS[both]=""
FLAGS[lock-text]="--lock-text"
FLAGS[lock-image]="--lock-image --lock-image-freeze-bn-stats"
FLAGS[lock-image-4]="--lock-image --lock-image-unlocked-groups 4 --lock-image-freeze-bn-stats"
# The image trunk and the text tower's embeddings (11.7 M of MiniLM's 22.7 M parameters) stay the
# packages': open_clip's --lock-text with all 6 layers unlocked freezes exactly the embeddings.
FLAGS[lock-image-emb]="--lock-image --lock-image-freeze-bn-stats --lock-text --lock-text-unlocked-layers 6"
mkdir -p "$LOGS"
row() {
  local r=$1 run="$1-e$EPOCHS-lr$LR-$CAPTIONS"
  local per_image=--one-caption-per-image
  [ "$CAPTIONS" = one ] || per_image=""
  rm -rf "${LOGS:?}/$run"
  # shellcheck disable=SC2086
  /usr/bin/time -f '%e' -o "$LOGS/$run.time" "$BIN" train --model "$CONFIG" --pretrained-image ${FLAGS[$r]} \
    --train-data "$A/dataset_rsicd_aid150.json" --images-dir "$A/images" --train-split train,val \
    $per_image --batch-size 64 --epochs "$EPOCHS" --lr "$LR" --wd 0.2 --warmup "$WARMUP" \
    --lr-scheduler cosine --aff-loss --recipe official --logs "$LOGS" --name "$run" --threads 1 --workers 1 \
    --seed 0 --log-every-n-steps 20 > "$LOGS/$run.train.txt" 2>&1
  local ck="$LOGS/$run/checkpoints/epoch_$EPOCHS.safetensors"
  "$BIN" eval --model "$CONFIG" --checkpoint "$ck" --json "$A/dataset_rsicd_aid150.json" --images-dir "$A/images" \
    --threads 1 --out "$LOGS/$run.metrics.json" --embeddings-out "$LOGS/$run.emb" > "$LOGS/$run.eval.txt" 2>&1
  "$BIN" classify --model "$CONFIG" --checkpoint "$ck" --json "$A/dataset_rsicd_aid150.json" --images-dir "$A/images" \
    --split test --threads 1 --out "$LOGS/$run.classify.json" > "$LOGS/$run.classify.txt" 2>&1
  python3 - "$r" "$run" "$LOGS" "${FLAGS[$r]}" >> "$OUT" <<'PY'
import json, sys
row, run, logs, flags = sys.argv[1:5]
m = json.load(open(f"{logs}/{run}.metrics.json"))["raw"]
c = json.load(open(f"{logs}/{run}.classify.json"))["metrics"]
t = float(open(f"{logs}/{run}.time").read().split()[-1])
print(json.dumps({"row": row, "run": run, "flags": flags, "train_s": t,
                  **{k: round(v, 2) for k, v in m.items() if k.startswith("retrieval-")},
                  "bootstrap": m.get("mean-recall-bootstrap"),
                  "zeroshot_top1": round(100 * c["acc1"], 2), "zeroshot_top5": round(100 * c["acc5"], 2)}))
PY
  echo "row $r done"
}
for r in $ROWS; do
  [ -n "${FLAGS[$r]+x}" ] || { echo "unknown row $r" >&2; exit 2; }
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  row "$r" &
done
wait
