#!/usr/bin/env bash
# A long fuzzing campaign: N executions (default 10 M) of each format, one process per format so that
# a crash in one (a C++ library's segfault) is reported with its input and the others still run.
#   bench/fuzz-campaign.sh [N] [format,format,...]
# Writes bench/results/fuzz-campaign-<date>.log; an input that killed its process is copied to
# target/fuzz-failures/<format>-crash.bin.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
n=${1:-10000000}
formats=${2:-index-npy,index-parquet,index-json,ivf,hnsw-sidecar,hnsw,tiff-scene,png-scene}
cargo test --release -p pirclip-data --test fuzz --no-run 2>&1 | tail -1
bin=$(cargo test --release -p pirclip-data --test fuzz --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="fuzz" and m.get("executable"): print(m["executable"])')
copy=$(mktemp /tmp/pirclip-fuzz-bin.XXXXXX); cp "$bin" "$copy"; chmod +x "$copy"  # rebuilds during the campaign leave it be
log=bench/results/fuzz-campaign-$(date +%Y%m%d-%H%M).log
mkdir -p bench/results target/fuzz-failures
status=0
for f in ${formats//,/ }; do
  start=$(date +%s)
  # Files of this run's own (two campaigns of one format must not write into each other's).
  out=$(mktemp /tmp/pirclip-fuzz-$f.XXXXXX.out); err=${out%.out}.err
  PIRCLIP_FUZZ_EXECUTIONS=$n PIRCLIP_FUZZ_FORMATS=$f "$copy" --nocapture >"$out" 2>"$err"
  rc=$?
  took=$(( $(date +%s) - start ))
  line=$(grep -a "^fuzz $f: .* no panic" "$out" | tail -1)
  if [ $rc -ne 0 ]; then
    status=1
    kept=$(ls -d /dev/shm/pirclip-fuzz-*/in-flight-$f.bin /tmp/pirclip-fuzz-*/in-flight-$f.bin 2>/dev/null | tail -1)
    [ -n "$kept" ] && cp "$kept" target/fuzz-failures/$f-crash.bin && rm -rf "$(dirname "$kept")"
    line="fuzz $f: FAILED (exit $rc) $(grep -ah "$f: input" "$err" | tail -1) ${kept:+input kept as target/fuzz-failures/$f-crash.bin}"
  fi
  echo "$line [${took} s]" | tee -a "$log"
  rm -f "$out" "$err"
done
rm -f "$copy"
exit $status
