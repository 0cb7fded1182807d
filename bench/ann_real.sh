#!/usr/bin/env bash
# Approximate search on real embeddings, the search-box case: the 10,000 RSICD-AID150 images indexed with
# the bundled model, queried by 1,000 test captions (text -> image), recall@10 against exact search, for
# the inverted lists and the graph at several search-time settings. Complements bench/ann.sh, whose
# synthetic clusters are what inverted lists partition best.
#   bench/ann_real.sh   -> bench/results/ann-real.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
BIN=${PIRCLIP:-target/release/pirclip}
DATA=${DATA:-../shared/data/rsicd-aid150}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
"$BIN" index build --images "$DATA/images" --out "$W/index" --ann off >/dev/null
.venv/bin/python - "$DATA/dataset_rsicd_aid150.json" "$W" <<'PY'
import glob, json, sys
import numpy as np
d, w = json.load(open(sys.argv[1])), sys.argv[2]
caps = [s["raw"] for im in d["images"] if im["split"] == "test" for s in im["sentences"]]
pick = np.random.default_rng(0).choice(len(caps), 1000, replace=False)
open(f"{w}/captions.txt", "w").write("\n".join(caps[i].replace("\n", " ") for i in pick) + "\n")
parts = sorted(glob.glob(f"{w}/index/img_emb/img_emb_*.npy"), key=lambda p: int(p.rsplit("_", 1)[1][:-4]))
np.save(f"{w}/base.npy", np.concatenate([np.load(p).astype(np.float32) for p in parts]))
PY
"$BIN" embed --texts "$W/captions.txt" --out "$W/q" >/dev/null
OUT=bench/results/ann-real.jsonl; : > "$OUT"
"$BIN" index bench --vectors "$W/base.npy" --queries "$W/q/text_emb.npy" --ann-kind ivf --sweep-probes 4,8,32 | tee -a "$OUT"
"$BIN" index bench --vectors "$W/base.npy" --queries "$W/q/text_emb.npy" --ann-kind hnsw --sweep-ef-search 32,64,256 | tee -a "$OUT"
