#!/usr/bin/env bash
# Times pirclip against open_clip (PyPI open_clip_torch, same torch, same thread count) on the same model
# weights, images and captions: end-to-end retrieval eval wall time (process start to metrics), image
# encode images/s, text encode captions/s, peak RSS. Runs alternate, REPS times each; prints medians and
# pirclip/open_clip ratios.
#   bench/compare.sh [MODEL=ViT-B-32] [N_IMAGES=256] [REPS=3]
# Needs ../shared/data/rsicd-aid150 and `scripts/setup.sh --dev` (open_clip in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-ViT-B-32}; N=${2:-256}; REPS=${3:-3}; THREADS=2
scripts/setup.sh --dev >/dev/null
W=$(mktemp -d)
A=../shared/data/rsicd-aid150
.venv/bin/python - "$A/dataset_rsicd_aid150.json" "$N" "$W/subset.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = int(sys.argv[2])
test = sorted([im for im in d["images"] if im["split"] == "test"], key=lambda im: im["filename"])[:n]
json.dump({"dataset": "rsicd_aid150_subset", "images": test}, open(sys.argv[3], "w"))
PY
target/release/pirclip init --model "$MODEL" --out "$W/weights.safetensors" --seed 0 2>/dev/null
export OMP_NUM_THREADS=$THREADS
for r in $(seq "$REPS"); do
  /usr/bin/time -f '%e %M' -o "$W/p$r.time" target/release/pirclip eval --model "$MODEL" --checkpoint "$W/weights.safetensors" \
    --json "$W/subset.json" --images-dir "$A/images" --out "$W/p$r.json" > /dev/null 2> "$W/p$r.err"
  /usr/bin/time -f '%e %M' -o "$W/o$r.time" .venv/bin/python bench/openclip_eval.py "$MODEL" "$W/weights.safetensors" "$W/subset.json" "$A/images" "$THREADS" > "$W/o$r.json" 2>/dev/null
done
.venv/bin/python - "$W" "$REPS" "$MODEL" <<'PY'
import json, re, statistics as st, sys
w, reps, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def med(xs): return st.median(xs)
p_wall, p_rss, p_img, p_txt, o_wall, o_rss, o_img, o_txt = [], [], [], [], [], [], [], []
for r in range(1, reps + 1):
    e, m = open(f"{w}/p{r}.time").read().split(); p_wall.append(float(e)); p_rss.append(int(m) / 1024)
    err = open(f"{w}/p{r}.err").read()
    p_img.append(float(re.search(r"images ([0-9.]+)/s", err).group(1)))
    p_txt.append(float(re.search(r"texts ([0-9.]+)/s", err).group(1)))
    e, m = open(f"{w}/o{r}.time").read().split(); o_wall.append(float(e)); o_rss.append(int(m) / 1024)
    j = json.loads(open(f"{w}/o{r}.json").read()); o_img.append(j["images_per_s"]); o_txt.append(j["captions_per_s"])
n = json.load(open(f"{w}/p1.json"))["settings"]
print(f"model {model}, {n['images']} images, {n['texts']} captions, {reps} alternating runs each, medians")
print(f"{'':24}{'pirclip':>12}{'open_clip':>12}{'ratio':>10}")
for name, a, b, better in [("eval wall (s)", p_wall, o_wall, "lower"), ("image encode (img/s)", p_img, o_img, "higher"),
                           ("text encode (cap/s)", p_txt, o_txt, "higher"), ("peak RSS (MB)", p_rss, o_rss, "lower")]:
    print(f"{name:24}{med(a):12.2f}{med(b):12.2f}{med(a) / med(b):10.2f}  ({better} is better)")
PY
