"""``python -m fastres.selftest``: are fastres's kernels correct on this device, and faster here?

Every op of the contract (fastres/_opset.py) on every available backend against fastres.reference, at
ResNet-18/50 shapes scaled down (the stem, 1x1 and 3x3, stride 2, odd channels; fp32, TF32 on
CUDA, bf16, fp16; channels_last and contiguous; running statistics), judged by the suite's
tolerance rule (fastres.harness.rule); then whole converted blocks, eval and training with gradients
and running statistics (fastres.harness.run). On a GPU the shapes are completed so that every
kernel variant and tile configuration the dispatcher can launch at real sizes is launched once
(fastres.backends.variants); on a CPU's --quick run, those of the CUDA kernels under cudasim. The
coverage is printed, and every variant not launched is named with the reason (the record's coverage,
"not_reached").

The result is recorded per device and software (fastres.backends.records): a backend that passed
here becomes eligible for the dispatcher on this device; ``--bench`` also times each passing backend
against the reference path per shape class, and the dispatcher then prefers the fastest verified
backend per class, never one slower than the reference.

    python -m fastres.selftest                  # this device (CUDA when present), every backend
    python -m fastres.selftest --device cpu --backend cpu --backend reference
    python -m fastres.selftest --bench          # and the speedup report
    python -m fastres.selftest --record-to bench/results/h200_<commit>_selftest.json

Exit status: 0 when every backend run passed, 1 on any failure, 2 when nothing could run.
``fastres.selftest(...)`` takes the same options as keyword arguments and returns the record.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastres.backends import records
from fastres.harness.rule import allow_tf32
from fastres.harness.selftest_cases import (  # noqa: F401  (BASE_CONVS, Maker, ...: re-exported)
    BASE_CONVS,
    BN_CHANNELS,
    LAYOUTS,
    PRECISION_DTYPE,
    QUICK_CONVS,
    Maker,
    OpCase,
    _clone,
    _f64,
    bn_cases,
    conv_cases,
    judge_op,
    tf32_round,
)


def _blocks():
    from fastres.harness.cases import BlockCase

    return [
        BlockCase("r50.layer1.0", "Bottleneck", 16, 4, 1, True, 9, 9),
        BlockCase("r50.layer2.0", "Bottleneck", 16, 8, 2, True, 9, 11),
        BlockCase("r50.layer2.1", "Bottleneck", 32, 8, 1, False, 5, 6),
        BlockCase("r18.layer2.0", "BasicBlock", 8, 13, 2, True, 9, 9),
        BlockCase("r18.layer1.0", "BasicBlock", 13, 13, 1, False, 7, 5),
    ]


# --------------------------------------------------------------------------------------------
# The run.


@dataclass
class BackendResult:
    name: str
    device: str
    counts: dict = field(default_factory=lambda: {"pass": 0, "fail": 0, "error": 0,
                                                  "skipped": 0})
    failures: list = field(default_factory=list)  # (group, label, reason)
    launched: set = field(default_factory=set)
    worst: float = 0.0  # largest err / bound of the op checks that passed

    def add(self, status: str, group: str = "", label: str = "", reason: str = "") -> None:
        self.counts[status] += 1
        if status in ("fail", "error"):
            self.failures.append((group, label, reason))

    @property
    def ok(self) -> bool:
        return self.counts["fail"] == 0 and self.counts["error"] == 0 and self.counts["pass"] > 0


def _tf32_applies(backend: str, device: torch.device) -> bool:
    """TF32 changes what a backend computes only for the CUDA kernels (on a GPU or cudasim) and
    for Triton on a GPU; elsewhere a TF32 case would repeat the fp32 one."""
    return backend == "cudasim" or (device.type == "cuda" and backend != "reference")


def _runs_on(case: OpCase, names: list[str], device: torch.device) -> list[str]:
    """The backends of ``names`` that run ``case``: those it names (all when it names none),
    less those for which a TF32 case would repeat the fp32 one."""
    return [n for n in names if (not case.only or n in case.only)
            and (case.precision != "tf32" or _tf32_applies(n, device))]


def _first_line(exc: BaseException, limit: int = 300) -> str:
    from fastres.harness.run import _first_line as fl

    return fl(exc, limit)


def run_ops(cases: list[OpCase], names: list[str], device: torch.device,
            results: dict[str, BackendResult], tick: Callable[[str], None],
            interpreted: bool, deadline: float = math.inf) -> bool:
    """Run the op cases; False when ``deadline`` (time.monotonic) cut them short."""
    from fastres import backends  # noqa: PLC0415
    from fastres.backends import variants  # noqa: PLC0415

    for case in cases:
        if time.monotonic() > deadline:
            return False
        dtype = PRECISION_DTYPE[case.precision]
        tf32 = case.precision == "tf32"
        run_on = _runs_on(case, names, device)
        if not run_on:
            continue
        args = case.build(device)
        fn = backends.BACKENDS["reference"].op(case.op)
        with allow_tf32(tf32):
            a_theirs = [tf32_round(_clone(a)) if tf32 else _clone(a) for a in args]
            a_truth = [_f64(_clone(a)) for a in args]
            theirs, truth = fn(*a_theirs), fn(*a_truth)
        for name in run_on:
            tick(f"{name}: {case.label}")
            res = results[name]
            a_ours = [_clone(a) for a in args]
            try:
                with allow_tf32(tf32):
                    ours = backends.BACKENDS[name].op(case.op)(*a_ours)
                bad = judge_op(case, ours, a_ours, theirs, a_theirs, truth, a_truth, dtype)
            except Exception as exc:  # a backend that raises fails the case; the run goes on
                res.add("error", "ops", case.label, _first_line(exc))
                continue
            if bad:
                res.add("fail", "ops", case.label, "; ".join(bad))
                continue
            res.add("pass")
            if case.conv is not None:
                res.launched |= variants.conv_variants(name, case.precision, case.conv,
                                                       case.families, interpreted)
            if case.rows is not None:
                res.launched |= variants.rows_variants(name, case.precision, *case.rows,
                                                       interpreted=interpreted)
    return True


def run_blocks(names: list[str], device: torch.device, precisions: list[str], layouts: list[str],
               results: dict[str, BackendResult], tick: Callable[[str], None]) -> None:
    """Whole converted blocks through the parity harness (no timing), eval and train."""
    from fastres.harness.run import run_cases  # noqa: PLC0415

    dtypes = list(dict.fromkeys(PRECISION_DTYPE[p] for p in precisions if p != "tf32"))
    for layout in layouts:
        def emit(line):  # one line per (block, dtype, mode, backend): the progress tick
            tick(line.split("\n")[0][:60])
        with allow_tf32(False):
            rows = run_cases(_blocks(), dtypes, ["eval", "train"], names, device, batch=2,
                                    channels_last=layout == "channels_last", warmup=0, repeats=1,
                                    timing=False, progress=False, emit=emit)
        for r in rows:
            label = f"block {r['block']} {r['dtype']} {r['mode']} {layout}"
            res = results[r["backend"]]
            if r["status"] == "pass":
                res.add("pass")
            elif r["status"] == "skipped":
                res.add("skipped")
            elif r["status"] == "error":
                res.add("error", "blocks", label, r["error"])
            else:
                bad = [c for c in r["checks"] if not c["ok"]]
                res.add("fail", "blocks", label, "; ".join(
                    f"{c['name']}: err {c['err']:.3g} > bound {c['bound']:.3g} (PyTorch "
                    f"{c['torch_err']:.3g})" for c in bad))


class _Counter:
    """A plain progress counter on stderr when tqdm is missing."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.n, self.enabled, self.last = total, 0, enabled, 0.0

    def update(self, desc: str) -> None:
        self.n += 1
        now = time.monotonic()
        if self.enabled and (now - self.last > 1.0 or self.n == self.total):
            self.last = now
            print(f"\r[{self.n}/{self.total}] {desc[:70]:70s}", end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bar = tqdm(total=total, unit="case", leave=False, file=sys.stderr,
                       dynamic_ncols=True)

            class _T:
                def update(self, desc):
                    bar.set_postfix_str(desc[:50], refresh=False)
                    bar.update(1)

                def close(self):
                    bar.close()
            return _T()
        except ImportError:
            pass
    return _Counter(total, enabled)


def plan(device: torch.device, only: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The backends to self-test on ``device`` (every available one that runs on its tensors,
    cudasim and the Triton interpreter included on a CPU) and why each other one is not."""
    from fastres import backends  # noqa: PLC0415
    from fastres.harness.run import backend_plan  # noqa: PLC0415

    names, skipped = backend_plan(device, only or list(backends.BACKENDS))
    return names, skipped


# The backends whose every reachable variant a --quick run still launches: their tiles follow
# the CUDA launchers' rule (fastres.backends.variants), 18 variants over 4 precisions, of which
# the quick shapes miss 12 (TF32, fp16, the big tiles past 64 channels), each launched by a 1x1
# shape of at most 1x72x9x9 -> 72: 20 more calls, run by that backend alone. The Triton
# interpreter's 96 take --full: their shapes are larger and every call is interpreted.
QUICK_COMPLETION = ("cuda", "cudasim")


def build_cases(device: torch.device, quick: bool, precisions: list[str], layouts: list[str],
                names: list[str], interpreted: bool, seed: int,
                coverage_precisions: list[str] | None = None) -> tuple[list[OpCase], list]:
    """The op cases, plus the cheapest shape launching each reachable kernel variant the base
    shapes miss (per backend with tile rules): off --quick for cuda, cudasim and triton in the
    run's precisions; on --quick for QUICK_COMPLETION only, in ``coverage_precisions`` (default:
    the run's), run by that backend alone."""
    from fastres.backends import variants  # noqa: PLC0415

    convs = {k: v for k, v in BASE_CONVS.items() if not quick or k in QUICK_CONVS}
    cases: list[OpCase] = []
    i = 0
    for layout in layouts:
        for prec in precisions:
            for name, cv in convs.items():
                cases += conv_cases(name, cv, prec, layout, seed + i)
                i += 1
            if prec != "tf32":
                for c in BN_CHANNELS[: 1 if quick else None]:
                    cases += bn_cases(c, prec, layout, seed + i)
                    i += 1
    extra = []
    for b in names:
        if b not in (QUICK_COMPLETION if quick else ("cuda", "cudasim", "triton")):
            continue
        wanted = (coverage_precisions or precisions) if quick else precisions
        precs = [p for p in wanted if p != "tf32" or _tf32_applies(b, device)]
        covered = set()
        for c in cases:
            if c.conv is not None and c.precision in precs and (not c.only or b in c.only):
                covered |= variants.conv_variants(b, c.precision, c.conv, c.families, interpreted)
        for v, prec, cv in variants.completion(b, covered, precs, interpreted):
            extra.append((b, v, prec, cv))
    seen = set()
    for b, v, prec, cv in extra:
        fam = v.split(" ")[0]
        only = (b,) if quick else ()
        if (prec, cv, fam, only) in seen:
            continue
        seen.add((prec, cv, fam, only))
        # Only the calls that launch the variant's kernel family: each new Triton variant is a
        # JIT compilation on a first run (about a second each).
        for c in conv_cases(f"coverage {v}", cv, prec, "channels_last", seed + i):
            if (fam in c.families and (fam != "fwd" or "bare" not in c.label)
                    and not (fam != "fwd" and "prologue" in c.label)):
                c.only = only
                cases.append(c)
        i += 1
    return cases, extra


def not_reached(backend: str, missing: list[str], quick: bool, precisions: list[str],
                complete: bool, interpreted: bool) -> dict[str, list[str]]:
    """The kernel variants ``backend`` never launched in this run, grouped by why.
    ``precisions``: those its cases ran in (for QUICK_COMPLETION on --quick, those of its
    coverage cases)."""
    out: dict[str, list[str]] = {}
    for v in missing:
        prec = v.split(" ")[1]
        if not complete:
            why = "the --time-limit stopped the run before the case that launches it"
        elif prec not in precisions:
            why = (f"{prec} is not among this run's precisions ({', '.join(precisions)}; "
                   f"--precision {prec} runs it)")
        elif quick and backend not in QUICK_COMPLETION:
            why = ("--quick adds no shapes for kernel-variant coverage"
                   + (": the Triton interpreter picks its tile from the shape (up to 256 rows, "
                      "128 output and 128 input channels per program), and ResNet's 64-2048 "
                      "channels give tiles that the 3 quick shapes (3-32 channels) do not; "
                      "--full adds the cheapest shape for each (minutes under the interpreter)"
                      if backend == "triton" and interpreted else "; --full adds them"))
        else:
            why = "no case of this run launches it (a gap in the self-test's shapes)"
        out.setdefault(why, []).append(v)
    return out


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def run(device: str | None = None, backend: list[str] | None = None, quick: bool | None = None,
        precisions: list[str] | None = None, layouts: list[str] | None = None,
        blocks: bool = True, bench: bool = False, record: bool = True,
        record_to: str | None = None, progress: bool = True, seed: int = 0,
        time_limit: float | None = None, out: Callable[[str], None] = print) -> dict:
    """The self-test; returns the record (also stored, unless ``record`` is False)."""
    from fastres.backends import variants  # noqa: PLC0415

    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = dev.type == "cpu" if quick is None else quick
    asked = precisions
    precisions = precisions or (["fp32", "tf32", "bf16", "fp16"] if dev.type == "cuda" or
                                not quick else ["fp32", "bf16"])
    layouts = layouts or (list(LAYOUTS) if not quick else ["channels_last"])
    names, skipped = plan(dev, backend)
    interpreted = _interpreted() and dev.type == "cpu"
    rec = records.new_record(str(dev))
    key = rec["key"]
    out(f"fastres self-test on {key['name']} ({dev}"
        + (f", sm_{key['capability'].replace('.', '')}, driver {key['driver']}, CUDA "
           f"{key['cuda']}" if dev.type == "cuda" else "")
        + f"): torch {key['torch']}, triton {key['triton']}, fastres {key['fastres']}")
    out(f"backends: {', '.join(names) or 'none'}"
        + "".join(f"\n  not run: {n}: {why}" for n, why in skipped.items()))
    if not names:
        rec["summary"] = {"ok": False, "reason": "no backend to run"}
        return rec
    cov_precisions = asked or list(variants.PRECISIONS)
    cases, extra = build_cases(dev, quick, precisions, layouts, names, interpreted, seed,
                               cov_precisions)
    n_blocks = (len(_blocks()) * len({p for p in precisions if p != "tf32"}) * 2 * len(layouts)
                * len(names)) if blocks else 0
    n_ops = sum(len(_runs_on(c, names, dev)) for c in cases)
    out(f"{len(cases)} op cases ({len(extra)} added for kernel-variant coverage), "
        f"{n_blocks // max(1, len(names))} block cases per backend; precisions "
        f"{', '.join(precisions)}; layouts {', '.join(layouts)}"
        + ("; --quick" if quick else ""))
    bar = _progress(n_ops + n_blocks, progress)
    results = {n: BackendResult(n, str(dev)) for n in names}
    deadline = time.monotonic() + time_limit if time_limit else math.inf
    try:
        complete = run_ops(cases, names, dev, results, bar.update, interpreted, deadline)
        if blocks and complete and time.monotonic() < deadline:
            run_blocks(names, dev, precisions, layouts, results, bar.update)
        elif blocks:
            complete = False
    finally:
        bar.close()
    # On a GPU, where a pass makes a backend eligible, only a full run verifies: every dtype and
    # TF32, both layouts, the blocks (a CPU backend is eligible without any record).
    full = dev.type != "cuda" or (set(precisions) >= {"fp32", "tf32", "bf16", "fp16"}
                                  and set(layouts) >= set(LAYOUTS) and blocks)
    if not full:
        out("not a full run (--precision/--layout/--no-blocks): the backends that pass count as "
            "'partial', not verified on this GPU")
    if not complete:
        out(f"--time-limit {time_limit:g} s reached: the cases not run leave every backend "
            "'partial' (not verified)")
    # Coverage: what was launched of what the dispatcher can launch at real sizes.
    for n, r in results.items():
        if n not in ("cuda", "cudasim", "triton"):
            continue
        # Every precision, whatever this run was asked for: a bf16-only run verifies no fp32.
        precs = [p for p in variants.PRECISIONS if p != "tf32" or _tf32_applies(n, dev)]
        reach = variants.reachable(n, precs, interpreted)
        missing = sorted(reach - r.launched)
        rec["coverage"][n] = {
            "launched": sorted(r.launched), "reachable": len(reach), "missing": missing,
            "not_reached": not_reached(
                n, missing, quick, sorted(set(precisions) | set(
                    cov_precisions if quick and n in QUICK_COMPLETION else [])),
                complete, interpreted),
            "rule": "Triton interpreter" if n == "triton" and interpreted else
            ("Triton" if n == "triton" else "CUDA (fastres.backends.variants mirror)"),
        }
    for n, r in results.items():
        cov = rec["coverage"].get(n)
        status = "pass" if r.ok else "fail"
        if r.ok and ((cov and cov["missing"]) or not complete or not full):
            status = "partial"  # correct where it ran, but some variants or cases never ran
        rec["backends"][n] = {"status": status, "date": rec["date"], **r.counts, "failures": [
            {"group": g, "case": lbl, "reason": why} for g, lbl, why in r.failures[:50]],
            "more_failures": max(0, len(r.failures) - 50)}
    ok = all(r.ok for r in results.values())
    rec["summary"] = {"ok": ok, "duration_s": round(time.perf_counter() - t0, 1),
                      "complete": complete, "quick": quick, "precisions": precisions,
                      "layouts": layouts}
    from fastres.harness.environment import commit

    rec["commit"], rec["commit_dirty"] = commit()
    report(rec, results, out)
    if bench:
        from fastres.harness import speed  # noqa: PLC0415

        passing = [n for n, r in results.items() if r.ok and n != "reference"]
        if record_to:  # the verdicts are kept even if the timing is cut short from outside
            records.save(rec, record_to)
        # The timing gets half the time limit again: its classes stop starting after that.
        rec["bench"] = speed.bench(dev, passing, out=out, quick=quick, deadline=(
            time.monotonic() + time_limit / 2 if time_limit else math.inf))
    if record:
        path = records.save(rec)
        out(f"record: {path}")
    if record_to:
        path = records.save(rec, record_to)
        out(f"record: {path}")
    return rec


def report(rec: dict, results: dict[str, BackendResult], out: Callable[[str], None]) -> None:
    out("")
    out(f"{'backend':9s} {'status':8s} {'pass':>6s} {'fail':>5s} {'error':>6s} {'skip':>5s}  "
        "kernel variants launched")
    for n, r in results.items():
        cov = rec["coverage"].get(n)
        cv = "-" if cov is None else (
            f"{len(cov['launched'])} ({cov['reachable'] - len(cov['missing'])} of "
            f"{cov['reachable']} reachable at ResNet sizes, {cov['rule']})")
        c = r.counts
        out(f"{n:9s} {rec['backends'][n]['status']:8s} {c['pass']:6d} {c['fail']:5d} "
            f"{c['error']:6d} {c['skipped']:5d}  {cv}")
    for n, r in results.items():
        for g, lbl, why in r.failures[:20]:
            out(f"  FAIL {n} {g}: {lbl}\n      {why[:400]}")
        if len(r.failures) > 20:
            out(f"  ... {len(r.failures) - 20} more failures of {n} (in the record)")
        cov = rec["coverage"].get(n)
        for why, vs in (cov or {}).get("not_reached", {}).items():
            out(f"  {n}: {len(vs)} variant(s) not launched: {why}: " + "; ".join(vs[:4])
                + (" ..." if len(vs) > 4 else ""))
    s = rec["summary"]
    out(f"\nself-test {'PASSED' if s['ok'] else 'FAILED'} in {s['duration_s']:.1f} s")
