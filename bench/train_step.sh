#!/usr/bin/env bash
# Training-step time on CPU (fp32, 2 threads, batch B, real RSICD-AID150 images), pirclip against PyTorch:
#  - full-size PIR with the affiliation loss against bench/pir_train_step.py, the same computation built
#    from the open_clip 2.24 modules the official PIR-CLIP code uses; the PyTorch side runs twice, with
#    glibc's default malloc (what the official code gets) and with the malloc settings pirclip train makes
#    (`retain_freed_memory`, as GLIBC_TUNABLES), so the allocator's share of the difference is visible;
#  - ViT-B-32 against open_clip's own step (bench/openclip_train_step.py, synthetic tensors).
# Runs alternate, REPS rounds; each line is the median step time of the steps after the first, and the
# process's peak RSS.   bench/train_step.sh [BATCH=16] [STEPS=5] [REPS=2]   (needs ../shared, setup --dev)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-16}; STEPS=${2:-5}; REPS=${3:-2}
scripts/setup.sh --dev >/dev/null
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT; A=../shared/data/rsicd-aid150
SAME_MALLOC=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rss() { awk '/Maximum resident/ {printf "%.2f GB", $6 / 1048576}' "$1"; }

pirclip_step() {  # MODEL RUN-NAME
  /usr/bin/time -v -o "$W/$2.time" target/release/pirclip train --model "$1" --train-data $A/dataset_rsicd_aid150.json \
    --images-dir $A/images --batch-size "$B" --epochs 1 --warmup 10 --aff-loss --max-steps $((STEPS + 1)) \
    --log-every-n-steps 1 --threads 2 --recipe official --logs "$W" --name "$2" >/dev/null 2>&1
  t=$(grep -o 'Batch (t): [0-9.]*' "$W/$2/out.log" | tail -n "$STEPS" | awk '{print $3}' | median)
  echo "pirclip $1 batch $B: $t s/step, peak $(rss "$W/$2.time")"
}

torch_pir_step() {  # LABEL [GLIBC_TUNABLES]
  env ${2:+GLIBC_TUNABLES=$2} /usr/bin/time -v -o "$W/py.time" .venv/bin/python bench/pir_train_step.py \
    $A/dataset_rsicd_aid150.json $A/images "$B" "$STEPS" 2 2>/dev/null \
    | .venv/bin/python -c "import json,sys; print(f\"{json.load(sys.stdin)['step_s']:.3f}\")" > "$W/py.out"
  echo "PyTorch PIR ($1) batch $B: $(cat "$W/py.out") s/step, peak $(rss "$W/py.time")"
}

for r in $(seq "$REPS"); do
  echo "round $r"
  pirclip_step PIR "pir-$r"
  torch_pir_step "default malloc"
  torch_pir_step "pirclip's malloc settings" "$SAME_MALLOC"
  pirclip_step ViT-B-32 "vit-$r"
  .venv/bin/python bench/openclip_train_step.py ViT-B-32 "$B" "$STEPS" 2 2>/dev/null \
    | .venv/bin/python -c "import json,sys; j=json.load(sys.stdin); print(f\"open_clip {j['model']} batch {j['batch']}: {j['step_s']:.3f} s/step\")"
done
