#!/usr/bin/env bash
# pirclip against open_clip (PyPI open_clip_torch, same torch, same thread count) on the same weights,
# images and captions. pirclip side: `pirclip bench` (fp32 and --precision int8), one JSON line per run;
# open_clip side: bench/openclip_eval.py (the official retrieval.py loop). Runs alternate, REPS times each;
# prints medians and ratios. Then PIR: pirclip's PIR image tower next to the Python reference pair
# (open_clip ViT-B-32 + RN50 image towers, bench/openclip_pir_proxy.py), one run each.
#   bench/compare.sh [MODEL=ViT-B-32] [N_IMAGES=128] [REPS=3] [PIR_IMAGES=64]
# Needs ../shared/data/rsicd-aid150 and `scripts/setup.sh --dev` (open_clip in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-ViT-B-32}; N=${2:-128}; REPS=${3:-3}; PIR_N=${4:-64}; THREADS=2
scripts/setup.sh --dev >/dev/null
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
A=../shared/data/rsicd-aid150
J=$A/dataset_rsicd_aid150.json
.venv/bin/python - "$J" "$N" "$W/subset.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = int(sys.argv[2])
test = sorted([im for im in d["images"] if im["split"] == "test"], key=lambda im: im["filename"])[:n]
json.dump({"dataset": "rsicd_aid150_subset", "images": test}, open(sys.argv[3], "w"))
PY
target/release/pirclip init --model "$MODEL" --out "$W/weights.safetensors" --seed 0 2>/dev/null
export OMP_NUM_THREADS=$THREADS
B="target/release/pirclip bench --model $MODEL --checkpoint $W/weights.safetensors --threads $THREADS --json $W/subset.json --images-dir $A/images --images $N"
for r in $(seq "$REPS"); do
  $B > "$W/p$r.json"
  $B --precision int8 > "$W/q$r.json"
  /usr/bin/time -f '%e %M' -o "$W/o$r.time" .venv/bin/python bench/openclip_eval.py "$MODEL" "$W/weights.safetensors" "$W/subset.json" "$A/images" "$THREADS" > "$W/o$r.json" 2>/dev/null
done
P="target/release/pirclip bench --model PIR --threads $THREADS --json $J --images-dir $A/images --images $PIR_N"
$P > "$W/pir.json"
$P --precision int8 > "$W/pir8.json"
.venv/bin/python bench/openclip_pir_proxy.py "$J" "$A/images" "$PIR_N" "$THREADS" > "$W/pirref.json" 2>/dev/null
.venv/bin/python - "$W" "$REPS" "$MODEL" <<'PY'
import json, statistics as st, sys
w, reps, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
load = lambda f: json.loads(open(f).read())
P = [load(f"{w}/p{r}.json") for r in range(1, reps + 1)]
Q = [load(f"{w}/q{r}.json") for r in range(1, reps + 1)]
O = [load(f"{w}/o{r}.json") for r in range(1, reps + 1)]
for r, o in enumerate(O, 1):
    e, m = open(f"{w}/o{r}.time").read().split(); o["wall"] = float(e); o["rss"] = int(m) / 1024
med = lambda xs, k: st.median(x[k] for x in xs)
print(f"model {model}, {P[0]['images']} images, {P[0]['captions']} captions, {P[0]['threads']} threads, {reps} alternating runs each, medians")
print(f"{'':24}{'pirclip':>10}{'int8':>10}{'open_clip':>11}{'ratio':>8}{'int8 ratio':>12}")
for name, pk, ok, better in [("eval wall (s)", "eval_wall_s", "wall", "lower"), ("image encode (img/s)", "images_per_s", "images_per_s", "higher"),
                             ("text encode (cap/s)", "captions_per_s", "captions_per_s", "higher"), ("peak RSS (MB)", "peak_rss_mb", "rss", "lower")]:
    p, q, o = med(P, pk), med(Q, pk), med(O, ok)
    print(f"{name:24}{p:10.2f}{q:10.2f}{o:11.2f}{p / o:8.2f}{q / o:12.2f}  ({better} is better)")
print(f"mean recall on the subset (random weights, only a consistency check): fp32 {P[0]['mean_recall']:.2f}, int8 mR {Q[0]['mean_recall']:.2f}")
pir, pir8, ref = load(f"{w}/pir.json"), load(f"{w}/pir8.json"), load(f"{w}/pirref.json")
print(f"\nPIR (188.9 M parameters, random init), {pir['images']} images, {pir['captions']} captions, one run each")
print(f"{'':24}{'pirclip':>10}{'int8':>10}{'Python ref':>11}{'ratio':>8}{'int8 ratio':>12}")
print(f"{'image encode (img/s)':24}{pir['images_per_s']:10.2f}{pir8['images_per_s']:10.2f}{ref['images_per_s']:11.2f}"
      f"{pir['images_per_s'] / ref['images_per_s']:8.2f}{pir8['images_per_s'] / ref['images_per_s']:12.2f}  (ref: open_clip ViT-B-32 + RN50 image towers)")
print(f"{'text encode (cap/s)':24}{pir['captions_per_s']:10.2f}{pir8['captions_per_s']:10.2f}")
print(f"{'eval wall (s)':24}{pir['eval_wall_s']:10.2f}{pir8['eval_wall_s']:10.2f}")
print(f"{'peak RSS (MB)':24}{pir['peak_rss_mb']:10.2f}{pir8['peak_rss_mb']:10.2f}")
PY
