#!/usr/bin/env bash
# Regression check for scripts/test.sh (run by it): with a stand-in `cargo` first in PATH, `.ci/run` must
# exit non-zero when the stand-in reports a failed test run and zero when it reports a passing one, and
# print the matching "N passed, N failed" line. (An earlier test.sh always exited 0.)
set -uo pipefail
cd "$(dirname "$0")/.."
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT
make_cargo() {  # $1: exit status of `cargo test`, $2: its result line
  cat > "$fake/cargo" <<STANDIN
#!/usr/bin/env bash
case "\$1" in
  test) echo "running 4 tests"; echo "test result: $2"; exit $1 ;;
  *) exit 0 ;;
esac
STANDIN
  chmod +x "$fake/cargo"
}
ok=1
make_cargo 101 "FAILED. 3 passed; 1 failed; 0 ignored"
out=$(PIRCLIP_TEST_SCRIPT_CHECK=1 PATH="$fake:$PATH" bash .ci/run 2>&1); rc=$?
if [ "$rc" -eq 0 ]; then echo "check-test-script: .ci/run exited 0 although cargo test failed"; ok=0; fi
grep -qx '3 passed, 1 failed' <<<"$out" || { echo "check-test-script: no '3 passed, 1 failed' line in: $out"; ok=0; }
make_cargo 0 "ok. 4 passed; 0 failed; 0 ignored"
out=$(PIRCLIP_TEST_SCRIPT_CHECK=1 PATH="$fake:$PATH" bash .ci/run 2>&1); rc=$?
if [ "$rc" -ne 0 ]; then echo "check-test-script: .ci/run exited $rc although cargo test passed: $out"; ok=0; fi
grep -qx '4 passed, 0 failed' <<<"$out" || { echo "check-test-script: no '4 passed, 0 failed' line in: $out"; ok=0; }
make_cargo 101 "FAILED. 0 passed; 0 failed; 0 ignored"  # e.g. a compile error: nothing ran, still a failure
PIRCLIP_TEST_SCRIPT_CHECK=1 PATH="$fake:$PATH" bash .ci/run >/dev/null 2>&1 && { echo "check-test-script: a failing build exited 0"; ok=0; }
if [ "$ok" -eq 1 ]; then echo "check-test-script: ok (.ci/run fails with a failing cargo, passes with a passing one)"; fi
[ "$ok" -eq 1 ]
