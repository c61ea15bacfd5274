#!/usr/bin/env bash
# Set up everything fastres needs on a fresh machine: a virtual environment with torch and
# torchvision, the test/bench tools, and fastres built against that torch (CPU kernels always,
# CUDA kernels when a CUDA toolkit is found; no GPU needed to compile).
#   FASTRES_VENV   where the environment lives (default: .venv in the repository)
#   PYTHON         the interpreter to create it with (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTRES_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
pip install --quiet pytest pytest-benchmark numpy tqdm matplotlib scikit-learn ninja pybind11 \
  setuptools wheel timm onnx onnxscript onnxruntime
# CUDA_HOME: torch's own guess follows the nvcc wrapper to /usr/local and then cannot link
# -lcudart; setup.py prefers /usr/local/cuda. Arch list: Hopper + PTX unless told otherwise.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-2}
pip install --quiet --no-build-isolation --no-deps -e .
python -m fastres.info --brief
