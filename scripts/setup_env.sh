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
# fastres' own oneDNN primitives for the CPU convolutions need oneDNN's headers and library
# (Debian's libdnnl-dev, 2.6): installed here when missing, where apt-get exists and we are root;
# otherwise the build leaves that path off and the CPU ops reach oneDNN through ATen.
if [ ! -e /usr/include/oneapi/dnnl/dnnl.hpp ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get install -y -qq libdnnl-dev >/dev/null 2>&1 ||
           { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libdnnl-dev >/dev/null 2>&1; }; }; then
      echo "setup_env: apt-get install libdnnl-dev failed: the own-primitive CPU path is off"
    fi
  else
    echo "setup_env: no oneDNN headers (/usr/include/oneapi/dnnl/dnnl.hpp) and no root apt-get:" \
      "the own-primitive CPU path is off (install libdnnl-dev and rerun to turn it on)"
  fi
fi
# CUDA_HOME: torch's own guess follows the nvcc wrapper to /usr/local and then cannot link
# -lcudart; setup.py prefers /usr/local/cuda. Arch list: Hopper + PTX unless told otherwise.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-2}
pip install --quiet --no-build-isolation --no-deps -e .
python -m fastres.info --brief
