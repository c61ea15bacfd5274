#!/usr/bin/env bash
# The GPU device check, one prepared script for a 15-minute lease (start ~2-4 min, this script
# <= 6 min on its first run, build included, room for a rerun):
#
#   FASTRES_COMMIT=<sha> bash bench/device_check.sh OUTDIR
#
# Cheap facts first, then the tables; each step time-boxed, skipped with its reason when the
# budget is spent or the machine lacks what it needs:
#   build -> info -> parity (quick, per GPU backend, bf16 and fp32, no timing)
#   -> graphs (one graphed block and model per backend: tests/test_cuda_graphs.py,
#      tests/test_triton_gpu.py) -> self-test (verdicts, record, ranking in kernel time)
#   -> timing table (bench/gpu_timing.py: ResNet-50 blocks by provider, N=32 and 256, device /
#      host / eager / graph time) -> whole ResNet-50 (bench/resnet50_throughput.py: img/s beside
#      MLPerf, kernel classes against the roofline, bare convs) -> profile (bench/op_diag.py)
#   [-> with DEVICE_CHECK_EXTRA=1 or a budget of 600 s or more: the op tests, torch.compile
#      providers in the timing table, the largest batch that fits]
#
# Made for a bare H100/H200 machine (Python 3.12, torch CUDA build, triton, nvcc, pybind11, ninja,
# no network): nothing is downloaded. The whole script stays within DEVICE_CHECK_BUDGET seconds
# (default 360). A failure is printed the moment it happens (FAIL lines, pytest's instant
# failures); a failing step does not stop the later ones; the exit status is the number of steps
# that failed (steps skipped for want of time or of a GPU are listed, not counted).
#
# It writes at most 8 files into OUTDIR, named <gpu>_<commit>_<what> (<gpu>: h100 or h200 from
# nvidia-smi, else the device name in lower case, "cpu" without a GPU; DEVICE_CHECK_PREFIX
# overrides), ready to copy into bench/results/:
#   summary.txt    the step table, parity and self-test totals, the timing and ResNet-50 tables
#   steps.log      every step's console output
#   parity.json    python -m fastres.parity --json (markdown: --from-json)
#   selftest.json  python -m fastres.selftest's record (the backends that passed, the ranking)
#   timing.json    bench/gpu_timing.py --json          resnet50.json  bench/resnet50_throughput.py
#   profile.txt    bench/op_diag.py --profile: one block per backend, device time vs host time
#
# The commit: a copied working tree has no .git, so pass it in: FASTRES_COMMIT=<sha> bash ...
# Environment: DEVICE_CHECK_BUDGET (s), DEVICE_CHECK_EXTRA=1, DEVICE_CHECK_PREFIX, PYTHON,
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: the CPU count), SKIP_BUILD=1 (try the
# script on a tree already installed or on PYTHONPATH, e.g. on a CPU machine).
set -uo pipefail

OUTARG=${1:?usage: bash bench/device_check.sh OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTARG"
OUT=$(cd "$OUTARG" && pwd)
cd "$REPO"

PY=${PYTHON:-$(command -v python3 || command -v python)}
START=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET:-360}
DEADLINE=$((START + BUDGET))
EXTRA=${DEVICE_CHECK_EXTRA:-$([ "$BUDGET" -ge 600 ] && echo 1 || echo 0)}
STEPS=()
FAILED=0
SKIPPED=0

# The installed package, never the source tree: the tree's fastres/ has no compiled _C and no
# fastres.triton_kernels (setup.py maps it from triton_kernels/). -P / PYTHONSAFEPATH keep the
# current directory off sys.path, here and in every child interpreter.
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
if [ -z "${FASTRES_COMMIT:-}" ]; then
  FASTRES_COMMIT=$(bash "$REPO/scripts/commit.sh")
fi
export FASTRES_COMMIT
export FASTRES_INSTAFAIL=1  # tests/conftest.py: failures printed as they happen
# The self-test's record goes to a cache of this run's own, which the later steps' dispatcher
# reads; nothing is left in the user's ~/.cache/fastres (other processes' dispatchers read it).
FASTRES_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/fastres-device-check.XXXXXX")
export FASTRES_CACHE_DIR
trap 'rm -rf "$FASTRES_CACHE_DIR"' EXIT

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$GPU_NAME" in
  *H100*) GPU=h100 ;;
  *H200*) GPU=h200 ;;
  "") GPU=cpu ;;
  *) GPU=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//' | cut -c1-24) ;;
esac
PREFIX=${DEVICE_CHECK_PREFIX:-${GPU}_$(echo "$FASTRES_COMMIT" | cut -c1-12)}
LOG="$OUT/${PREFIX}_steps.log"
SUMMARY="$OUT/${PREFIX}_summary.txt"
: >"$LOG"

note() { echo "$*" | tee -a "$LOG"; }
row() { STEPS+=("$(printf '%-10s %-10s %5s s  %s' "$1" "$2" "$3" "$4")"); }

# step NAME CAP RESERVE CMD...: run CMD under `timeout` for at most CAP seconds and never into
# the RESERVE seconds kept for the steps after it. "@B@" in CMD becomes the seconds the step got
# minus 15 (for scripts with their own --budget-s, so they write their table before the kill),
# "@T@" two thirds of that (the self-test's --time-limit, whose timing gets half of it again).
# pytest's exit status 5 (nothing collected) counts as "none", not a failure.
step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local now left budget t0 rc dt status args=()
  now=$(date +%s)
  left=$((DEADLINE - now - reserve))
  budget=$cap
  [ "$left" -lt "$budget" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    note "== $name: SKIPPED, out of time (${left} s left of the budget after the reserve)"
    row "$name" "no time" 0 "${BUDGET} s budget spent"
    SKIPPED=$((SKIPPED + 1))
    return 0
  fi
  for a in "$@"; do
    a=${a//@B@/$((budget - 15))}
    args+=("${a//@T@/$(((budget - 15) * 2 / 3))}")
  done
  note "== $name (at most ${budget} s): ${args[*]}"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$budget" "${args[@]}" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; FAILED=$((FAILED + 1)) ;;
    5) status=none ;;
    *) status="FAIL($rc)"; FAILED=$((FAILED + 1)) ;;
  esac
  [ "$status" != ok ] && [ "$status" != none ] && note "!! FAILED: $name ($status after ${dt} s)"
  note "== $name: $status in ${dt} s"
  row "$name" "$status" "$dt" "${STEP_NOTE:-}"
  STEP_NOTE=""
}

# skip NAME WHY: a step that cannot run on this machine, with the reason.
skip() {
  note "== $1: SKIPPED, $2"
  row "$1" skipped 0 "$2"
  SKIPPED=$((SKIPPED + 1))
}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

note "fastres device check: $(date -u +%FT%TZ), repo $REPO, commit $FASTRES_COMMIT"
note "python: $PY ($("$PY" -V 2>&1)), budget ${BUDGET} s, extra steps: $EXTRA, files: $OUT/${PREFIX}_*"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
for mod in pytest pytest_benchmark triton; do
  if have "$mod"; then note "  $mod: yes"; else note "  $mod: MISSING"; fi
done

# 1. Build (the CUDA kernels take the longest: 62 s on a 16-core H200 machine).
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  note "== build: skipped (SKIP_BUILD=1)"
else
  step build 150 200 "$PY" -m pip install --no-build-isolation --no-deps --no-input .
fi
(cd /tmp && "$PY" -c "import fastres, fastres._C; print('installed:', fastres.__file__)") 2>&1 | tee -a "$LOG"
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_GPU" = 1 ]; then
  BACKENDS="cuda triton"
else
  BACKENDS=cpu
  note "no CUDA device here: the GPU steps are skipped with that reason; the others run at CPU sizes"
fi

# 2. What was built and which backends are available.
step info 25 190 "$PY" -P -m fastres.info

# 3. Parity per backend (what decides "verified"): ResNet-50's 4 covering Bottleneck types, bf16
# and fp32, eval and train, no timing (the tables below time). The JSON is rewritten after every
# block, so a timeout keeps what was checked; failures print as they come.
STEP_NOTE="${PREFIX}_parity.json"
PARITY_ARGS=(--quick --no-timing --no-progress --json "$OUT/${PREFIX}_parity.json")
for b in $BACKENDS; do PARITY_ARGS+=(--backend "$b"); done
if [ "$HAS_GPU" = 1 ]; then
  step parity 60 150 "$PY" -P -m fastres.parity --dtype bf16 fp32 "${PARITY_ARGS[@]}"
else
  step parity 60 150 "$PY" -P -m fastres.parity --dtype fp32 --mode eval "${PARITY_ARGS[@]}"
fi

# 4. One graphed block and model per backend: CUDA-graph replay, make_graphed_callables and
# reduce-overhead after in-place weight changes; Triton's GPU-only checks.
if [ "$HAS_GPU" != 1 ]; then
  skip graphs "no CUDA device: tests/test_cuda_graphs.py and tests/test_triton_gpu.py need one"
elif have pytest; then
  step graphs 45 130 "$PY" -P -m pytest tests/test_cuda_graphs.py tests/test_triton_gpu.py \
    -m gpu -q -p no:cacheprovider -rfEs
else
  skip graphs "pytest is not installed"
fi

# 5. The self-test a user runs, with its ranking timed in kernel time (the record names the
# kind); --time-limit T (two thirds of the step's time less a margin): the checks stop starting
# cases after T seconds and the timing after T/2 more; the verdicts are written before the timing.
STEP_NOTE="${PREFIX}_selftest.json"
SELFTEST_ARGS=(--bench --no-progress --time-limit @T@ --record-to "$OUT/${PREFIX}_selftest.json")
[ "$HAS_GPU" = 1 ] || SELFTEST_ARGS+=(--quick --backend cpu)  # CPU sizes: the C++ backend only
step selftest 45 100 "$PY" -P -m fastres.selftest "${SELFTEST_ARGS[@]}"

# 6. The timing table: ResNet-50 blocks by provider, every kind named.
STEP_NOTE="${PREFIX}_timing.json"
if [ "$HAS_GPU" = 1 ]; then
  PROVIDERS=torchvision,fastres-cuda,fastres-triton
  [ "$EXTRA" = 1 ] && PROVIDERS=$PROVIDERS,compile-default,compile-max-autotune,compile-reduce-overhead,fastres-cuda+compile
  step timing 60 50 "$PY" -P bench/gpu_timing.py --batch 32 256 --blocks quick \
    --providers "$PROVIDERS" --budget-s @B@ --json "$OUT/${PREFIX}_timing.json"
else
  step timing 60 50 "$PY" -P bench/gpu_timing.py --blocks first \
    --providers torchvision,fastres-cpu --budget-s @B@ --json "$OUT/${PREFIX}_timing.json"
fi

# 7. The whole ResNet-50 beside MLPerf, its kernel classes, every conv bare.
STEP_NOTE="${PREFIX}_resnet50.json"
if [ "$HAS_GPU" = 1 ]; then
  LARGEST=()
  [ "$EXTRA" = 1 ] && LARGEST=(--largest)
  step resnet50 60 10 "$PY" -P bench/resnet50_throughput.py --batch 256 --repeats 5 \
    "${LARGEST[@]}" --convs --budget-s @B@ --json "$OUT/${PREFIX}_resnet50.json"
else
  step resnet50 90 10 "$PY" -P bench/resnet50_throughput.py --dtypes fp32 --batch 2 \
    --image-size 32 --providers fastres-cpu --repeats 1 --convs --conv-shapes 3 --budget-s @B@ \
    --json "$OUT/${PREFIX}_resnet50.json"
fi

# 8. Where each backend's time goes in one fused block (device time against host time).
STEP_NOTE="${PREFIX}_profile.txt"
if [ "$HAS_GPU" = 1 ]; then
  step profile 20 0 bash -c "\"$PY\" -P bench/op_diag.py --no-diag --profile --backends cuda triton 2>&1 | tee \"$OUT/${PREFIX}_profile.txt\""
else
  skip profile "no CUDA device: bench/op_diag.py --profile profiles the GPU backends"
fi

# 9. Extra steps (a longer lease): the op tests on the GPU at small shapes, then the GPU
# integration tests (fused SyncBatchNorm under DDP, CUDA graph capture, CUDA autocast).
if [ "$EXTRA" = 1 ] && [ "$HAS_GPU" = 1 ] && have pytest; then
  step op-tests 90 60 "$PY" -P -m pytest tests/test_ops.py tests/test_resnet_backends.py -m gpu -q \
    -p no:cacheprovider -rfEs
  step gpu-integr 120 0 "$PY" -P -m pytest tests/test_integrations.py -m gpu_integration -q \
    -p no:cacheprovider -rfEs
fi

# 10. The summary, last.
{
  echo "fastres device check, commit $FASTRES_COMMIT, ${GPU_NAME:-no GPU} ($PREFIX)"
  printf '%-10s %-10s %7s  %s\n' step status time note
  for s in "${STEPS[@]}"; do echo "$s"; done
  if [ -f "$OUT/${PREFIX}_parity.json" ]; then
    "$PY" - "$OUT/${PREFIX}_parity.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["summary"]
print(f"parity: {s['pass']} pass, {s['fail']} fail, {s['error']} error, {s['skipped']} skipped"
      + (" (PARTIAL)" if s.get("partial") else ""))
for c in r["cases"]:
    if c["status"] in ("fail", "error"):
        w = c.get("worst") or {}
        print(f"  {c['status'].upper():5s} {c['block']} {c['dtype']} {c['mode']} {c['backend']}: "
              + (c["error"] or f"{w.get('name')} err {w.get('err', 0):.3g} bound {w.get('bound', 0):.3g}")[:150])
EOF
  fi
  if [ -f "$OUT/${PREFIX}_selftest.json" ]; then
    "$PY" - "$OUT/${PREFIX}_selftest.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"selftest on {r['key']['name']} (commit {r.get('commit')}): "
      + ", ".join(f"{n} {b['status']} ({b['pass']} pass, {b['fail']} fail, {b['error']} error)"
                  for n, b in r["backends"].items()))
if r.get("bench"):
    print(f"  ranking timed in: {r['bench'].get('kind')} ({r['bench'].get('timer')})")
EOF
  fi
  echo "total $(($(date +%s) - START)) s of ${BUDGET}, $FAILED step(s) failed, $SKIPPED skipped; files: $(cd "$OUT" && ls | tr '\n' ' ')"
  for t in timing:gpu_timing resnet50:resnet50_throughput; do
    f="$OUT/${PREFIX}_${t%%:*}.json"
    if [ -f "$f" ]; then
      echo
      "$PY" -P "bench/${t##*:}.py" --from-json "$f" 2>&1
    fi
  done
} 2>&1 | tee "$SUMMARY"
exit "$FAILED"
