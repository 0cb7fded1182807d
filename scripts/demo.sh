#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=$(mktemp -d)
target/release/pirclip inspect tests/fixtures/parity/model.safetensors
target/release/pirclip embed --model tests/fixtures/parity/config.json --checkpoint tests/fixtures/parity/model.safetensors \
  --images tests/fixtures/parity/images --texts <(printf 'many planes parked at an airport\na beach with the sea\n') --out "$out"
echo "embeddings in $out: $(ls "$out" | tr '\n' ' ')"
