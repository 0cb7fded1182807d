#!/usr/bin/env bash
# Approximate search: pirclip's inverted lists (the default) and graph (usearch HNSW), both through
# `pirclip index bench`, beside faiss's HNSW (what clip-retrieval uses) on the same vectors, same machine,
# same run. Issue #13's data: 1 M clustered unit vectors (1,000 Gaussian centres, sigma 0.5), 256-d and
# 512-d, 1,000 queries, recall@10 against exact search, single-query p50/p99, build time with 2 threads,
# index file size. The text-query column times tokenise + encode (bundled model) + search.
#   bench/ann.sh [N=1000000] [Q=1000] [DIMS="256 512"]   -> bench/results/ann.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}; Q=${2:-1000}; DIMS=${3:-"256 512"}; THREADS=2
.venv/bin/python -c "import faiss" 2>/dev/null || .venv/bin/pip install --quiet --disable-pip-version-check faiss-cpu numpy
source scripts/env.sh
BIN=${PIRCLIP:-target/release/pirclip}
# ANN_DATA=dir keeps the generated vectors there (several GB) for reruns of the pirclip side.
if [ -n "${ANN_DATA:-}" ]; then W=$ANN_DATA; mkdir -p "$W"; else W=$(mktemp -d); trap 'rm -rf "$W"' EXIT; fi
OUT=bench/results/ann.jsonl; : > "$OUT"
export OMP_NUM_THREADS=$THREADS
QUANTS=${QUANTS:-"f16"}
for D in $DIMS; do
  .venv/bin/python bench/ann.py "$D" "$N" "$Q" "$W" "$THREADS" | tee -a "$OUT"
  "$BIN" index bench --vectors "$W/base.npy" --queries "$W/queries.npy" --truth "$W/truth.npy" \
    --threads "$THREADS" --ann-kind ivf --sweep-probes 1,2,4,32 $( [ "$D" = 512 ] && echo --model ViT-B-32 ) | tee -a "$OUT"
  for QUANT in $QUANTS; do
    "$BIN" index bench --vectors "$W/base.npy" --queries "$W/queries.npy" --truth "$W/truth.npy" \
      --threads "$THREADS" --ann-kind hnsw --ann-quantization "$QUANT" $( [ "$D" = 512 ] && echo --model ViT-B-32 ) | tee -a "$OUT"
  done
done
