#!/usr/bin/env bash
# One row of an RSICD-AID150 table (bench/ablation.sh, bench/recipe.sh): train CONFIG with the shared
# budget (batch 64, 2 epochs of 32,000 samples from train+val = 1,000 steps, AdamW lr 5e-4, wd 0.2,
# 200 warm-up steps then cosine, affiliation loss, `--recipe official`, one thread) plus EXTRA flags, evaluate the test split
# with a bootstrap interval, keep the embeddings for paired comparisons, append one JSON line to OUT.
#   bench/train_row.sh NAME CONFIG SEED OUT [EXTRA TRAIN FLAGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 config=$2 seed=$3 out=$4; shift 4
A=../shared/data/rsicd-aid150
BIN=${PIRCLIP:-target/release/pirclip}
LOGS=${LOGS:-bench/results/ablation-logs}
run="$name-seed$seed"
mkdir -p "$LOGS"
rm -rf "${LOGS:?}/$run"
/usr/bin/time -f '%e' -o "$LOGS/$run.time" "$BIN" train --model "$config" \
  --train-data "$A/dataset_rsicd_aid150.json" --images-dir "$A/images" --train-split train,val \
  --batch-size 64 --epochs 2 --train-num-samples 32000 --lr 5e-4 --wd 0.2 --warmup 200 \
  --lr-scheduler cosine --aff-loss --recipe official --logs "$LOGS" --name "$run" --threads 1 --workers 1 \
  --seed "$seed" --log-every-n-steps 50 "$@" > "$LOGS/$run.train.txt" 2>&1
"$BIN" eval --model "$config" --checkpoint "$LOGS/$run/checkpoints/epoch_2.safetensors" \
  --json "$A/dataset_rsicd_aid150.json" --images-dir "$A/images" --threads 1 \
  --out "$LOGS/$run.metrics.json" --embeddings-out "$LOGS/$run.emb" > "$LOGS/$run.eval.txt" 2>&1
python3 - "$name" "$seed" "$LOGS/$run.metrics.json" "$LOGS/$run.time" "$*" >> "$out" <<'PY'
import json, sys
name, seed, metrics, t, flags = sys.argv[1], int(sys.argv[2]), json.load(open(sys.argv[3])), open(sys.argv[4]).read().split()[-1], sys.argv[5]
raw = metrics["raw"]
row = {"row": name, "seed": seed, "train_s": float(t)}
if flags:
    row["flags"] = flags
print(json.dumps({**row, **{k: round(v, 2) for k, v in raw.items() if k.startswith("retrieval-")},
                  "bootstrap": raw.get("mean-recall-bootstrap")}))
PY
