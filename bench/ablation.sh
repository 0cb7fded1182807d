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
LOGS=${LOGS:-bench/results/ablation-logs}
OUT=bench/results/ablation-seed$SEED.jsonl
export LOGS
printf '%s\n' $ROWS | xargs -P "$JOBS" -I{} bench/train_row.sh {} bench/ablation/{}.json "$SEED" "$OUT"
cat "$OUT"
# Paired differences against the first row, every row on the same bootstrap draws of the test images.
set -- $ROWS
.venv/bin/python bench/ablation_paired.py "$LOGS/$1-seed$SEED.emb" $(shift; for r in "$@"; do echo "$LOGS/$r-seed$SEED.emb"; done) \
  | tee bench/results/ablation-paired-seed$SEED.jsonl
