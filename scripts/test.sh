#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every test of the workspace; exits with the test runner's status.
# Tests whose name starts with needs_shared read ../shared (the data folder beside the repository).
#   PIRCLIP_FUZZ_LONG=1 scripts/test.sh   also runs the long fuzzing pass (minutes per format)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev  # --dev: open_clip for the PyTorch DDP reference test (crates/cli/tests/ddp.rs)
# The web page's test drives Debian's Chromium headless; install it on a machine that lacks it.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "test: installing chromium (browser test of pirclip serve's page)"
  (apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }) \
    || echo "test: chromium could not be installed; the browser test will fail"
fi
source scripts/env.sh
log=$(mktemp /tmp/pirclip-test.XXXXXX.log)
# `|| true` belongs to the filter alone: PIPESTATUS[0] must stay cargo's status (grep exits 1 when it
# matches nothing, which is not a test failure).
set +e
cargo test --release --workspace 2>&1 | tee "$log" \
  | { grep -E '^(test |running|test result:|error|failures:|----)|panicked' || true; }
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
# This script's own check (a stand-in cargo that fails must make it fail); skipped inside that check.
if [ -z "${PIRCLIP_TEST_SCRIPT_CHECK:-}" ]; then
  if scripts/check-test-script.sh; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    [ "$status" -ne 0 ] || status=1
  fi
fi
[ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || failed=1  # a build error runs no test but fails
echo "$passed passed, $failed failed"
exit "$status"
