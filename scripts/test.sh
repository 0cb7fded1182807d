#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every test of the workspace.
# Tests whose name starts with needs_shared read ../shared (the data folder beside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo test --release --workspace 2>&1 | tee /tmp/pirclip-test.log | grep -E '^(test |running|test result:|error|failures:|----)|panicked' || true
status=${PIPESTATUS[0]}
passed=$(grep -Eo '[0-9]+ passed' /tmp/pirclip-test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' /tmp/pirclip-test.log | awk '{s+=$1} END {print s+0}')
echo "$passed passed, $failed failed"
exit "$status"
