#!/usr/bin/env bash
# CI compile check of the CUDA extension on a machine without a GPU.
#
# Builds fastres._C with the CUDA sources (csrc/cuda/*.cu) into /tmp, never touching the in-tree
# build other engineers use, then checks that
#   * the extension loads and registers all 8 fastres ops for the CUDA dispatch key,
#   * the conv kernels use tensor cores (HMMA), ldmatrix (LDSM) and cp.async (LDGSTS) in SASS,
#   * (--ptxas) no kernel spills registers to local memory (ptxas -v of the kernel-only files).
# Prints the build time. Usage: .ci/build_cuda.sh [--incremental] [--ptxas]
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${FASTRES_CUDA_BUILD_OUT:-/tmp/fr_cuda_out}
TMP=${FASTRES_CUDA_BUILD_TMP:-/tmp/fr_cuda_tmp}
PY=${PYTHON:-python}
INCREMENTAL=0
PTXAS=0
for arg in "$@"; do
  case "$arg" in
    --incremental) INCREMENTAL=1 ;;
    --ptxas) PTXAS=1 ;;
    *) echo "usage: $0 [--incremental] [--ptxas]" >&2; exit 2 ;;
  esac
done
export FASTRES_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0+PTX}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ "$INCREMENTAL" = 1 ] || rm -rf "$OUT" "$TMP"

start=$(date +%s)
"$PY" setup.py build_ext -b "$OUT" -t "$TMP"
end=$(date +%s)
echo "fastres: CUDA build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST) took $((end - start)) s" \
     "on $(nproc) cores"

SO=$(ls "$OUT"/fastres/_C.*.so)
"$PY" - "$SO" <<'PYEOF'
import importlib.util
import sys

import torch

from fastres import _opset

so = sys.argv[1]
_opset.define("fastres")  # the schemas; the extension registers kernels for them
spec = importlib.util.spec_from_file_location("fastres._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # registers torch.ops.fastres.* kernels (no GPU needed)
info = mod.build_info()
assert info["cuda"], f"built without CUDA: {info}"
ops = _opset.OP_NAMES
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key("fastres::" + op, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"fastres: {so} loads; {len(ops)} ops registered for CUDA; build_info {info}")
PYEOF

# SASS: the tensor-core kernels must really use HMMA / LDSM / LDGSTS.
CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] || [ ! -x "$CUDA_HOME/bin/cuobjdump" ] || CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ -z "$CUOBJDUMP" ]; then  # the toolkit here has none; triton ships one
  CUOBJDUMP=$("$PY" -c "import os, triton; p = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'); print(p if os.path.exists(p) else '')" 2>/dev/null || true)
fi
if [ -n "$CUOBJDUMP" ]; then
  for obj in conv_fwd_bf16 conv_fwd_f16 conv_wgrad; do
    sass=$("$CUOBJDUMP" -sass "$TMP/csrc/cuda/$obj.o")
    for insn in HMMA LDSM LDGSTS; do
      n=$(grep -c "$insn" <<<"$sass" || true)
      [ "$n" -gt 0 ] || { echo "fastres: no $insn in $obj SASS" >&2; exit 1; }
      printf 'fastres: %-14s %-6s x%s\n' "$obj" "$insn" "$n"
    done
    if grep -qE "\b(STL|LDL)\b" <<<"$sass"; then
      echo "fastres: local-memory traffic (spills) in $obj SASS" >&2; exit 1
    fi
  done
else
  echo "fastres: no cuobjdump found, SASS check skipped"
fi

# ptxas -v of the kernel-only files (they include no torch headers, so this is quick).
if [ "$PTXAS" = 1 ]; then
  for cu in csrc/cuda/conv_fwd_bf16.cu csrc/cuda/conv_fwd_f16.cu csrc/cuda/conv_fwd_f32.cu \
            csrc/cuda/conv_wgrad.cu csrc/cuda/bn.cu; do
    log=$("$CUDA_HOME/bin/nvcc" -std=c++20 -O3 --expt-relaxed-constexpr -gencode \
          arch=compute_90,code=sm_90 -Xptxas -v -c "$cu" -o /dev/null 2>&1)
    echo "$log" | grep -E "registers|spill" | sort | uniq -c | sed "s|^|$cu: |"
    if echo "$log" | grep -E "[1-9][0-9]* bytes spill" >/dev/null; then
      echo "fastres: register spills in $cu" >&2; exit 1
    fi
  done
fi
echo "fastres: CUDA compile check passed"
