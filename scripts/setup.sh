#!/usr/bin/env bash
# Sets up everything pirclip needs on a fresh machine and builds it; fast and idempotent when done.
#   scripts/setup.sh         venv with the pinned torch (libtorch for tch), then cargo build --release
#   scripts/setup.sh --dev   also open_clip_torch, tensorboard, webdataset (goldens, benchmarks, interop checks)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0   # must match tch 0.24 (Cargo.toml)

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION from PyPI into .venv (first time only, ~2.7 GB)"
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
if [ "${1:-}" = "--dev" ]; then
  if ! .venv/bin/python -c "import open_clip" 2>/dev/null; then
    echo "setup: installing open_clip_torch 2.24.0 (development aid)"
    echo "torch==$TORCH_VERSION" > .venv/constraints.txt
    .venv/bin/pip install --quiet --disable-pip-version-check -c .venv/constraints.txt open_clip_torch==2.24.0 ftfy regex pillow numpy tensorboard webdataset
  fi
fi
# gloo's headers for distributed training (torch.distributed's CPU backend; the wheel ships none). Without
# them pirclip still builds, single-process only.
if [ ! -f /usr/include/gloo/algorithm.h ] && [ -z "${GLOO_INCLUDE_DIR:-}" ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  echo "setup: installing libgloo-dev (headers for distributed training)"
  (apt-get install -y -qq libgloo-dev >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgloo-dev >/dev/null 2>&1; }) \
    || echo "setup: libgloo-dev could not be installed; building without distributed training"
fi
source scripts/env.sh
echo "setup: cargo build --release"
cargo build --release --quiet -p pirclip
echo "setup: ready: target/release/pirclip"
