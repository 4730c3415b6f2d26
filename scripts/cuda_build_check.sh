#!/usr/bin/env bash
# The real CUDA build of the extension, without a GPU (make cuda-build-check).
#
# `make cuda-check` compiles the device code only: this machine's CPU torch has no CUDA headers.
# Here the CUDA build of the same torch version (PyPI's wheel, e.g. 2.13.0+cu130, with the NVIDIA
# runtime wheels it depends on) goes into a separate virtual environment, and setup.py builds
# contrastive_kernels._C from it exactly as on a GPU machine: CUDAExtension, every csrc/cuda glue
# file against ATen/c10's CUDA headers, linked against libtorch_cuda. scripts/cuda_build_check.py
# then loads the result and checks that every op has CPU and CUDA kernels and that the CPU ones
# still compute (no GPU is needed to load a CUDA torch or to register CUDA kernels).
#
# Nothing in the project's own environment changes: the venv and the build live in
# $CK_CUDA_BUILD_DIR (default ~/.cache/contrastive_kernels/cuda-build-check; about 5 GB, reused by
# later runs). pip runs --isolated so that a local find-links folder holding the CPU wheel of the
# same version is not taken instead of the CUDA one. Exit status: 0 built and checked; 1 the build
# or the check failed; 0 with "SKIPPED" when nvcc is missing or the CUDA wheel cannot be
# downloaded (no network) -- CK_REQUIRE_CUDA_BUILD=1 makes those fatal too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
REQUIRE=${CK_REQUIRE_CUDA_BUILD:-0}

skip() {
  echo "cuda-build-check: SKIPPED: $*"
  if [ "$REQUIRE" = 1 ]; then exit 1; fi
  exit 0
}

command -v nvcc >/dev/null 2>&1 || skip "nvcc not found"
NVCC_BIN=$(dirname "$(command -v nvcc)")
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda; else CUDA_HOME=$(dirname "$NVCC_BIN"); fi
fi
export CUDA_HOME
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
DIR=${CK_CUDA_BUILD_DIR:-$HOME/.cache/contrastive_kernels/cuda-build-check}
VENV=$DIR/venv-torch$TORCH_VERSION
echo "cuda-build-check: torch==$TORCH_VERSION (CUDA wheel), nvcc $NVCC_VERSION at $CUDA_HOME, in $DIR"

PIP_ARGS=(--isolated -q --disable-pip-version-check)
for cert in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$cert" ] && [ -f "$cert" ]; then PIP_ARGS+=(--cert "$cert"); break; fi
done

mkdir -p "$DIR"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  if ! "$VENV/bin/python" -m pip install "${PIP_ARGS[@]}" "torch==$TORCH_VERSION" numpy ninja "setuptools>=64" wheel; then
    rm -rf "$VENV"
    skip "could not install the CUDA wheel of torch==$TORCH_VERSION from PyPI"
  fi
fi
TORCH_CUDA=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
[ -n "$TORCH_CUDA" ] || { echo "cuda-build-check: the venv's torch has no CUDA"; exit 1; }
if [ "${TORCH_CUDA%%.*}" != "${NVCC_VERSION%%.*}" ]; then
  skip "torch was built with CUDA $TORCH_CUDA but nvcc is $NVCC_VERSION (the major versions must match)"
fi

# the package is staged beside the build so that the check imports this build, not the repo's
rm -rf "$DIR/lib" && mkdir -p "$DIR/lib"
cp -r contrastive_kernels "$DIR/lib/"
find "$DIR/lib" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
echo "cuda-build-check: building (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a})"
start=$(date +%s)
CK_BUILD_EXT=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" setup.py -q build_ext \
  --build-lib "$DIR/lib" --build-temp "$DIR/build" > "$DIR/build.log" 2>&1 || {
  grep -E "error|Error" "$DIR/build.log" | head -40
  echo "cuda-build-check: FAILED to build (full log: $DIR/build.log)"
  exit 1
}
echo "cuda-build-check: built in $(( $(date +%s) - start )) s"
SO=$(ls "$DIR"/lib/contrastive_kernels/_C*.so)
PYTHONPATH="$DIR/lib" "$VENV/bin/python" scripts/cuda_build_check.py "$SO"
