#!/usr/bin/env bash
# The GPU device check: build fastres on a fresh CUDA machine and run, each step time-boxed,
#   info -> parity harness (cuda, triton) -> op tests -> self-test (+ its speed ranking)
#   -> benchmarks [-> compile bench, Triton tests, integration GPU tests when DEVICE_CHECK_EXTRA=1]
#   -> profile of one block per backend -> ops at real sizes -> a short table.
#
#   bash bench/device_check.sh OUTDIR
#
# Made for a bare H200 machine (Python 3.12, torch CUDA build, triton, nvcc, pybind11, ninja, no
# network): nothing is downloaded; pytest-benchmark, tqdm and matplotlib are used when present
# (without them: the suite's own timer, no progress bar, no plot). The whole script stays within
# DEVICE_CHECK_BUDGET seconds (default 395: a session's GPU time is 15 minutes, start included, and
# must leave room for a rerun); a failing or timed-out step does not
# stop the later ones, and the exit status is the number of steps that failed (0: all passed).
#
# It writes at most 8 files into OUTDIR:
#   summary.txt   the step table printed last, then the benchmark table (bench/table.py)
#   steps.log     every step's console output
#   selftest.json python -m fastres.selftest's record: keep it in bench/results/ as
#                 <gpu>_<commit>_selftest.json (the backends that passed become eligible there)
#   parity.json   python -m fastres.parity --json    parity.md   its markdown table
#   parity.png    its plot (when matplotlib is here) bench.json  pytest bench/ --bench-out
#
# The commit: a copied working tree has no .git, so pass it in: FASTRES_COMMIT=<sha> bash ...
# Environment: DEVICE_CHECK_BUDGET (s), DEVICE_CHECK_EXTRA=1 (the extra steps), PYTHON (interpreter), TORCH_CUDA_ARCH_LIST (default 9.0),
# MAX_JOBS (default: the CPU count), SKIP_BUILD=1 (try the script on a tree already installed).
set -uo pipefail

OUT=${1:?usage: bash bench/device_check.sh OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"

PY=${PYTHON:-$(command -v python3 || command -v python)}
START=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET:-395}
DEADLINE=$((START + BUDGET))
LOG="$OUT/steps.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
STEPS=()
FAILED=0

# The installed package, never the source tree: the tree's fastres/ has no compiled _C and no
# fastres.triton_kernels (setup.py maps it from triton_kernels/). -P / PYTHONSAFEPATH keep the
# current directory off sys.path, here and in every child interpreter.
export PYTHONSAFEPATH=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
if [ -z "${FASTRES_COMMIT:-}" ]; then
  FASTRES_COMMIT=$(bash "$REPO/scripts/commit.sh")
fi
export FASTRES_COMMIT
export FASTRES_INSTAFAIL=1  # tests/conftest.py: failures printed as they happen

note() { echo "$*" | tee -a "$LOG"; }

# step NAME BUDGET_S RESERVE_S CMD...: run CMD under `timeout`, for at most BUDGET_S seconds and
# never into the RESERVE_S seconds kept for the steps after it. Output goes to steps.log and the
# console. Exit status 5 from pytest (nothing collected) counts as "none", not a failure.
step() {
  local name=$1 budget=$2 reserve=$3
  shift 3
  local now left t0 rc dt status
  now=$(date +%s)
  left=$((DEADLINE - now - reserve))
  [ "$left" -lt "$budget" ] && budget=$left
  if [ "$budget" -lt 5 ]; then
    note "== $name: SKIPPED (out of time)"
    STEPS+=("$(printf '%-14s %-9s %5s s  %s' "$name" "no time" 0 "")")
    FAILED=$((FAILED + 1))
    return 0
  fi
  note "== $name (at most ${budget} s): $*"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$(($(date +%s) - t0))
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; FAILED=$((FAILED + 1)) ;;
    5) status=none ;;
    *) status="FAIL($rc)"; FAILED=$((FAILED + 1)) ;;
  esac
  note "== $name: $status in ${dt} s"
  STEPS+=("$(printf '%-14s %-9s %5s s  %s' "$name" "$status" "$dt" "${STEP_NOTE:-}")")
  STEP_NOTE=""
}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

note "fastres device check: $(date -u +%FT%TZ), repo $REPO, commit $FASTRES_COMMIT"
note "python: $PY ($("$PY" -V 2>&1)), budget ${BUDGET} s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
for mod in pytest pytest_benchmark tqdm matplotlib triton; do
  if have "$mod"; then note "  $mod: yes"; else note "  $mod: MISSING"; fi
done

# 1. Build (the CUDA kernels take the longest); then check the installed module imports.
if [ "${SKIP_BUILD:-0}" = 1 ]; then  # only for trying this script on an already built tree
  note "== build: skipped (SKIP_BUILD=1)"
else
  step build 150 295 "$PY" -m pip install --no-build-isolation --no-deps --no-input .
fi
(cd /tmp && "$PY" -c "import fastres, fastres._C; print('installed:', fastres.__file__)") 2>&1 | tee -a "$LOG"

# 2. What was built and which backends are available.
step info 15 280 "$PY" -P -m fastres.info

# 3. The parity harness first (it decides what is verified): ResNet-50's 8 Bottleneck types, bf16
# and fp32, eval and train, on the GPU backends (the reference backend is the oracle's own code:
# it costs a third of the time and verifies nothing). The JSON is rewritten after every block,
# so a timeout keeps what was measured; the markdown and the plot are then made from it.
STEP_NOTE="see parity.md"
step parity 100 180 "$PY" -P -m fastres.parity --dtype bf16 fp32 --backend cuda --backend triton \
  --no-progress --json "$OUT/parity.json"
if [ -f "$OUT/parity.json" ]; then
  "$PY" -P -m fastres.parity --from-json "$OUT/parity.json" --markdown "$OUT/parity.md" \
    --plot "$OUT/parity.png" 2>&1 | tee -a "$LOG"
fi

# 4. The op tests on the GPU: every op of the contract per dtype and layout at small shapes
# (a broken CUDA kernel is named by its test id; failures print as they happen).
if have pytest; then
  step gpu-tests 30 150 "$PY" -P -m pytest tests/test_ops.py tests/test_resnet_backends.py \
    tests/test_triton_gpu.py tests/test_cuda_graphs.py \
    -m gpu -q \
    -p no:cacheprovider -rfEs
else
  note "pytest is not installed: GPU tests skipped"
  STEPS+=("$(printf '%-14s %-9s %5s s  %s' tests "no pytest" 0 "")")
  FAILED=$((FAILED + 1))
fi

# 5. The self-test a user runs on their own GPU, with its speed ranking; its record is the one
# the project keeps in bench/results/ (h200_<commit>_selftest.json).
# --time-limit: a run cut short still writes its record (its backends then "partial", not
# verified); the first Triton run on a machine JIT-compiles every kernel variant it launches.
STEP_NOTE="record: selftest.json"
step selftest 50 100 "$PY" -P -m fastres.selftest --bench --no-progress --time-limit 45 \
  --record-to "$OUT/selftest.json"

# 6. Benchmarks (--bench-quick: a representative subset of the conv, block and ResNet-50 cases),
# fused vs eager; with DEVICE_CHECK_EXTRA=1 (or a budget of 600 s or more) also the reference
# case under torch.compile(max-autotune), the Triton tests and the integration GPU tests.
if have pytest; then
  step bench 60 40 "$PY" -P -m pytest bench/bench_convs.py bench/bench_blocks.py \
    bench/bench_resnet.py -q -p no:cacheprovider --bench-quick \
    --bench-compile=none --bench-out "$OUT/bench.json" -rfE
  EXTRA=${DEVICE_CHECK_EXTRA:-$([ "$BUDGET" -ge 600 ] && echo 1 || echo 0)}
  if [ "$EXTRA" = 1 ]; then
    step bench-compile 60 50 "$PY" -P -m pytest bench/bench_blocks.py -q -p no:cacheprovider \
      -k "reference_case and compile" --bench-compile=ref --bench-out "$OUT/bench.json" \
      --bench-append -rfE
    step triton-tests 60 40 "$PY" -P -m pytest tests/test_ops.py tests/test_triton.py \
      tests/test_triton_tf32.py -k triton -m "not gpu" -q \
      -p no:cacheprovider -rfE
    step gpu-integr 120 40 "$PY" -P -m pytest tests/test_integrations.py -m gpu_integration -q \
      -p no:cacheprovider -rfEs
  fi
fi

# 7. Where each backend's time goes: one fused layer3.0 block, eval and a training step, under
# torch.profiler (device time and host time), after parity has filled Triton's kernel cache;
# then the ops at ResNet-50's real sizes (the first H200 run failed only there).
step profile 25 15 "$PY" -P bench/op_diag.py --no-diag --profile --backends cuda triton
step op-diag 15 0 "$PY" -P bench/op_diag.py --backends cuda triton

# 8. The short table, last.
{
  echo "fastres device check, commit $FASTRES_COMMIT, $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  printf '%-14s %-9s %7s  %s\n' step status time note
  for s in "${STEPS[@]}"; do echo "$s"; done
  if [ -f "$OUT/parity.json" ]; then
    "$PY" - "$OUT/parity.json" <<'EOF'
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
sp = [c for c in r["cases"] if c.get("speedup")]
for b in sorted({c["backend"] for c in sp}):
    xs = sorted(c["speedup"] for c in sp if c["backend"] == b)
    print(f"  {b}: speedup vs torchvision median {xs[len(xs) // 2]:.2f}x (min {xs[0]:.2f}x, max {xs[-1]:.2f}x, {len(xs)} cases)")
EOF
  fi
  if [ -f "$OUT/bench.json" ]; then
    "$PY" - "$OUT/bench.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
recs = d["records"]
by = {(r["group"], r["case"], r["provider"]): r["extra_info"].get("p50_ms") for r in recs}
provs = sorted({r["provider"] for r in recs} - {"eager"})
print(f"bench: {len(recs)} measured cases")
for p in provs:
    xs = sorted(by[(g, c, "eager")] / t for (g, c, q), t in by.items()
                if q == p and t and by.get((g, c, "eager")))
    if xs:
        print(f"  {p}: speedup vs eager median {xs[len(xs) // 2]:.2f}x (min {xs[0]:.2f}x, max {xs[-1]:.2f}x, {len(xs)} cases)")
EOF
  fi
  if [ -f "$OUT/selftest.json" ]; then
    "$PY" - "$OUT/selftest.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"selftest on {r['key']['name']} (sm_{str(r['key']['capability']).replace('.', '')}): "
      + ", ".join(f"{n} {b['status']} ({b['pass']} pass, {b['fail']} fail, {b['error']} error)"
                  for n, b in r["backends"].items()))
for n, c in r.get("coverage", {}).items():
    print(f"  {n}: {len(c['launched'])} kernel variants launched, {len(c['missing'])} of "
          f"{c['reachable']} reachable never launched")
EOF
  fi
  echo "total $(($(date +%s) - START)) s, $FAILED step(s) failed; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  if [ -f "$OUT/bench.json" ]; then  # the benchmark table (bench.md before: 8 files at most)
    echo
    "$PY" -P bench/table.py "$OUT/bench.json" 2>&1
  fi
} 2>&1 | tee "$SUMMARY"
exit "$FAILED"
