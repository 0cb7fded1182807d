# Source this to build by hand: `source scripts/env.sh && cargo build --release`.
# torch-sys finds libtorch through the project's venv (LIBTORCH_USE_PYTORCH=1 runs its python).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export VIRTUAL_ENV="$_root/.venv"
export PATH="$_root/.venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset _root
