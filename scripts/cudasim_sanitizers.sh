#!/usr/bin/env bash
# cudasim under AddressSanitizer + UndefinedBehaviorSanitizer: builds fastres._C_cudasim (the CUDA
# launchers and kernels on the CPU, csrc/cuda/cudasim) with -fsanitize=address,undefined into a
# temporary package overlay, then runs the cudasim op and model tests (tests/test_ops.py and
# tests/test_resnet_backends.py -k cudasim, ResNet-50 left out: tens of minutes under ASan) and the harness self-test with the
# sanitizer runtimes preloaded into Python. Any report fails the run (halt_on_error).
# Run from an environment where fastres is built (scripts/setup_env.sh).
#   bash scripts/cudasim_sanitizers.sh [extra pytest args]
# Writes the log to ${OUT:-/tmp/fr_cudasim_san}/run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fr_cudasim_san}
CXX=${CXX:-g++}
rm -rf "$OUT"
mkdir -p "$OUT/obj" "$OUT/pkg"
PY=${PYTHON:-python}
INC=$("$PY" -c "import sysconfig, torch.utils.cpp_extension as c; \
print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
FLAGS="-std=c++20 -O1 -g -fPIC -ffp-contract=off -Wno-unknown-pragmas -D_GLIBCXX_USE_CXX11_ABI=$ABI"
start=$(date +%s)
# two compiles at a time (the CI machine has 2 cores)
ls csrc/cuda/cudasim/*.cpp | grep -v harness.cpp | xargs -P 2 -I{} sh -c \
  "$CXX $FLAGS $SAN -Icsrc/cuda/cudasim/include $INC -c {} -o $OUT/obj/\$(basename {} .cpp).o"
SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
TORCH_LIB=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
$CXX -shared $SAN "$OUT"/obj/*.o -L"$TORCH_LIB" -lc10 -ltorch -ltorch_cpu -o "$OUT/_C_cudasim$SUFFIX"
echo "sanitizer build: $(( $(date +%s) - start )) s"
# The overlay: fastres' Python files and its _C from the tree, the sanitized _C_cudasim.
cp -r fastres "$OUT/pkg/fastres"
rm -f "$OUT"/pkg/fastres/_C_cudasim*.so
cp "$OUT/_C_cudasim$SUFFIX" "$OUT/pkg/fastres/"
PRELOAD="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
start=$(date +%s)
set +e
PYTHONPATH="$OUT/pkg" LD_PRELOAD="$PRELOAD" "$PY" -m pytest tests/test_ops.py tests/test_resnet_backends.py \
  -k "cudasim and not resnet50" \
  -p no:cacheprovider -q "$@" 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
set -e
echo "sanitized device tests: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/run.log"
# The standalone harness (the conv kernel and the simulator's own checks) under both sanitizers.
$CXX -std=c++17 -O1 -g -ffp-contract=off -Wno-unknown-pragmas $SAN -Icsrc/cuda/cudasim/include \
  csrc/cuda/cudasim/harness.cpp csrc/cuda/cudasim/runtime_*.cpp -o "$OUT/harness"
"$OUT/harness" | tee -a "$OUT/run.log"
if grep -q "ERROR: AddressSanitizer\|runtime error:" "$OUT/run.log"; then
  echo "sanitizer reports found" | tee -a "$OUT/run.log"
  exit 1
fi
exit "$rc"
