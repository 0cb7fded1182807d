#!/usr/bin/env bash
# Peak memory of pirclip on big scenes, the numbers of issue #23's acceptance:
#   1. `index build --tile 224` on a 20,000 × 20,000 three-band 16-bit GeoTIFF (2.4 GB of samples);
#   2. `serve` under 24 concurrent /image requests on two 64-megapixel (8,000 × 8,000) 16-bit scenes,
#      once indexed as tiles (each request a tile) and once whole (each request a preview of a scene).
# Each line of the output is JSON; peak RSS is the kernel's VmHWM (or GNU time's maximum RSS).
#   PIRCLIP (target/release/pirclip), W (a new temporary folder, removed on exit unless KEEP=1),
#   SKIP_BIG=1 (only the serve cases), CAP_MB (default 14000: a server past it is killed and reported as
#   such, so that an old binary can be measured on a shared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PIRCLIP=${PIRCLIP:-target/release/pirclip}
W=${W:-$(mktemp -d /tmp/pirclip-hostile.XXXXXX)}
[ "${KEEP:-}" = 1 ] || trap 'rm -rf "$W"' EXIT
source scripts/env.sh
cargo build --release --quiet -p pirclip-image --example synthetic_scene
SCENE=target/release/examples/synthetic_scene

CAP_MB=${CAP_MB:-14000}
mkdir -p "$W/big" "$W/pair"
if [ "${SKIP_BIG:-}" != 1 ]; then
$SCENE 20000 20000 "$W/big/scene.tif"
/usr/bin/time -f '%M %e' -o "$W/time" "$PIRCLIP" index build --images "$W/big/scene.tif" --out "$W/big-idx" \
  --tile 224 --max-image-pixels 400000000 > "$W/build.log"
read -r kb secs < "$W/time"
tiles=$(grep -o 'index holds [0-9]* tiles' "$W/build.log" | grep -o '[0-9]*')
echo "{\"case\": \"index build --tile 224, 20000x20000x3 uint16\", \"tiles\": $tiles, \"seconds\": $secs, \"peak_rss_mb\": $((kb / 1024))}"
fi

$SCENE 8000 8000 "$W/pair/a.tif"
$SCENE 8000 8000 "$W/pair/b.tif"
"$PIRCLIP" index build --images "$W/pair" --out "$W/tiles" --tile 224 > /dev/null
"$PIRCLIP" index build --images "$W/pair" --out "$W/whole" > /dev/null
port=$((20000 + RANDOM % 20000))
for kind in tiles whole; do
  "$PIRCLIP" serve --index "$W/$kind" --port $port > /dev/null 2>&1 &
  pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 0.1; done
  start=$(date +%s.%N)
  # 24 at once: tiles spread over both scenes (rows 0.. of a and 1296.. of b), or the two whole scenes.
  clients=()
  for i in $(seq 0 23); do
    if [ $kind = tiles ]; then id=$(( (i % 2) * 1296 + i * 53 )); else id=$((i % 2)); fi
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$port/image/$kind/$id" >> "$W/$kind.codes" &
    clients+=($!)
  done
  capped=""
  running() { for c in "${clients[@]}"; do kill -0 "$c" 2>/dev/null && return 0; done; return 1; }
  while running; do
    rss=$(awk '/VmRSS/ {print int($2 / 1024)}' /proc/$pid/status 2>/dev/null || echo 0)
    if [ "${rss:-0}" -gt "$CAP_MB" ]; then capped=" (killed: RSS passed $CAP_MB MB)"; kill -9 $pid; fi
    sleep 0.2
  done
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  hwm=$(awk '/VmHWM/ {print int($2 / 1024)}' /proc/$pid/status 2>/dev/null || echo "$CAP_MB+")
  kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
  codes=$(cut -d' ' -f1 "$W/$kind.codes" | sort | uniq -c | awk '{printf "%s%s: %s", (NR > 1 ? ", " : ""), $2, $1}')
  slowest=$(cut -d' ' -f2 "$W/$kind.codes" | sort -n | tail -n 1)
  echo "{\"case\": \"serve, 24 concurrent /image ($kind) on two 8000x8000x3 uint16 scenes\", \"status\": \"$codes\", \"slowest_s\": $slowest, \"all_s\": $secs, \"peak_rss_mb\": \"$hwm$capped\"}"
  port=$((port + 1))
done
