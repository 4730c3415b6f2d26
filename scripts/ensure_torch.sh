#!/usr/bin/env bash
# Install torch only if it is missing, and never an unpinned one on a machine without a GPU:
# there, `pip install torch==2.13.0` takes the local CPU wheel; plain `torch` would pull gigabytes
# of CUDA packages.
set -euo pipefail
PY=${PY:-python3}
if "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -c "import torch; print('torch', torch.__version__, 'already installed')"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU found and no torch: installing the CUDA build of torch"
  "$PY" -m pip install torch
else
  echo "no GPU: installing the pinned CPU wheel torch==2.13.0"
  "$PY" -m pip install "torch==2.13.0"
fi
