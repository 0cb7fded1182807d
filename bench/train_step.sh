#!/usr/bin/env bash
# Training-step time on CPU (fp32, 2 threads): pirclip full-size PIR and ViT-B-32 at batch B on real
# RSICD-AID150 images, next to open_clip's ViT-B-32 step measured in the same run.
#   bench/train_step.sh [BATCH=16] [STEPS=3]        needs ../shared and `scripts/setup.sh --dev`
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-16}; STEPS=${2:-3}
scripts/setup.sh --dev >/dev/null
W=$(mktemp -d); A=../shared/data/rsicd-aid150
for m in PIR ViT-B-32; do
  target/release/pirclip train --model $m --train-data $A/dataset_rsicd_aid150.json --images-dir $A/images --batch-size "$B" \
    --epochs 1 --warmup 10 --aff-loss --max-steps $((STEPS + 1)) --log-every-n-steps 1 --threads 2 --logs "$W" --name "$m" >/dev/null 2>&1
  # median batch time of the steps after the first
  t=$(grep -o 'Batch (t): [0-9.]*' "$W/$m/out.log" | tail -n "$STEPS" | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "pirclip $m batch $B: ${t} s/step"
done
.venv/bin/python bench/openclip_train_step.py ViT-B-32 "$B" "$STEPS" 2 | .venv/bin/python -c "import json,sys; j=json.load(sys.stdin); print(f\"open_clip {j['model']} batch {j['batch']}: {j['step_s']:.3f} s/step\")"
