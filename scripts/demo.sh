#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: `pirclip demo` (bundled model, bundled images, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/pirclip demo
