"""``python -m fastres.selftest``: are fastres's kernels correct on this device, and faster here?

Every op of the contract (csrc/ops.cpp) on every available backend against fastres.reference, at
ResNet-18/50 shapes scaled down (the stem, 1x1 and 3x3, stride 2, odd channels; fp32, TF32 on
CUDA, bf16, fp16; channels_last and contiguous; running statistics), judged by the suite's
tolerance rule (fastres.testing); then whole converted blocks, eval and training with gradients
and running statistics (fastres.parity's harness). On a GPU the shapes are completed so that every
kernel variant and tile configuration the dispatcher can launch at real sizes is launched once
(fastres.variants); the coverage is printed.

The result is recorded per device and software (fastres.verify): a backend that passed here
becomes eligible for the dispatcher on this device; ``--bench`` also times each passing backend
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

import argparse
import contextlib
import math
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from fastres import testing, verify
from fastres.variants import Conv

PRECISION_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                   "fp16": torch.float16}
LAYOUTS = ("channels_last", "contiguous")

# ResNet shapes scaled down: (what it stands for) -> Conv(n, c, k, r, stride, h, w).
BASE_CONVS = {
    "stem 7x7 s2 (3->64 at 224)": Conv(2, 3, 16, 7, 2, 18, 18),
    "bottleneck 1x1 reduce": Conv(2, 24, 8, 1, 1, 9, 9),
    "3x3 s1, odd channels": Conv(2, 6, 10, 3, 1, 9, 11),
    "3x3 s2 (first block of a stage), odd": Conv(2, 7, 13, 3, 2, 9, 11),
    "downsample 1x1 s2": Conv(2, 16, 32, 1, 2, 9, 9),
    "bottleneck 1x1 expand": Conv(2, 8, 32, 1, 1, 7, 7),
}
QUICK_CONVS = ("stem 7x7 s2 (3->64 at 224)", "3x3 s2 (first block of a stage), odd",
               "downsample 1x1 s2")
BN_CHANNELS = (24, 13)  # a vectorisable width and an odd one


def _blocks():
    from fastres.parity import BlockCase  # noqa: PLC0415

    return [
        BlockCase("r50.layer1.0", "Bottleneck", 16, 4, 1, True, 9, 9),
        BlockCase("r50.layer2.0", "Bottleneck", 16, 8, 2, True, 9, 11),
        BlockCase("r50.layer2.1", "Bottleneck", 32, 8, 1, False, 5, 6),
        BlockCase("r18.layer2.0", "BasicBlock", 8, 13, 2, True, 9, 9),
        BlockCase("r18.layer1.0", "BasicBlock", 13, 13, 1, False, 7, 5),
    ]


# --------------------------------------------------------------------------------------------
# Operands and op cases.


class Maker:
    """Random operands, reproducible from the case's seed, on ``device`` at ``dtype``."""

    def __init__(self, device: torch.device, dtype: torch.dtype, layout: str, seed: int):
        self.device, self.dtype, self.layout = device, dtype, layout
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.gen = torch.Generator().manual_seed(seed)

    def _fmt(self, t):
        return t.contiguous(memory_format=torch.channels_last) if self.layout != "contiguous" \
            else t

    def act(self, *shape):
        return self._fmt(torch.randn(shape, generator=self.gen, dtype=torch.float64)
                         .to(self.dtype).to(self.device))

    def vec(self, c, positive=False):
        v = (torch.rand(c, generator=self.gen, dtype=torch.float64) + 0.5 if positive
             else torch.randn(c, generator=self.gen, dtype=torch.float64))
        return v.to(self.acc).to(self.device)

    def weight(self, k, c, r):
        w = torch.randn(k, c, r, r, generator=self.gen, dtype=torch.float64) / (c * r * r) ** 0.5
        return self._fmt(w.to(self.dtype).to(self.device))


@dataclass
class OpCase:
    label: str
    op: str
    precision: str
    build: Callable[[torch.device], tuple]  # the arguments, built on a device
    mutated: tuple[int, ...] = ()
    conv: Conv | None = None
    families: tuple[str, ...] = ()  # conv kernel families launched (fastres.variants)
    rows: tuple[int, int, int, int] | None = None  # (n, c, h, w) of a bandwidth op


def conv_cases(name: str, cv: Conv, precision: str, layout: str, seed: int) -> list[OpCase]:
    """conv_bias_act (bias + residual + ReLU, and bare), conv_stats (with and without the BN-ReLU
    prologue), conv_bwd (both grads with the prologue; dgrad alone; wgrad alone)."""
    dtype = PRECISION_DTYPE[precision]
    p, q = cv.out_hw
    cvargs = ([cv.stride] * 2, [cv.pad] * 2, [1, 1], 1)
    tag = f"{name} [{cv.label()}] {precision} {layout}"

    def mk(fn):
        def build(device):
            m = Maker(device, dtype, layout, seed)
            x, w = m.act(cv.n, cv.c, cv.h, cv.w), m.weight(cv.k, cv.c, cv.r)
            return fn(m, x, w)
        return build

    g = lambda m: m.act(cv.n, cv.k, p, q)  # noqa: E731
    return [
        OpCase(f"{tag} bias+res+relu", "conv_bias_act", precision,
               mk(lambda m, x, w: (x, w, m.vec(cv.k), g(m), *cvargs, True)), conv=cv,
               families=("fwd",)),
        OpCase(f"{tag} bare", "conv_bias_act", precision,
               mk(lambda m, x, w: (x, w, None, None, *cvargs, False)), conv=cv, families=("fwd",)),
        OpCase(f"{tag} stats", "conv_stats", precision,
               mk(lambda m, x, w: (x, w, None, None, False, *cvargs)), conv=cv, families=("fwd",)),
        OpCase(f"{tag} stats+prologue", "conv_stats", precision,
               mk(lambda m, x, w: (x, w, m.vec(cv.c, True), m.vec(cv.c), True, *cvargs)), conv=cv,
               families=("fwd",)),
        OpCase(f"{tag} bwd+prologue", "conv_bwd", precision,
               mk(lambda m, x, w: (g(m), x, w, m.vec(cv.c, True), m.vec(cv.c), True, *cvargs,
                                   [True, True])), conv=cv, families=("dgrad", "wgrad")),
        OpCase(f"{tag} dgrad", "conv_bwd", precision,
               mk(lambda m, x, w: (g(m), x, w, None, None, False, *cvargs, [True, False])),
               conv=cv, families=("dgrad",)),
        OpCase(f"{tag} wgrad", "conv_bwd", precision,
               mk(lambda m, x, w: (g(m), x, w, None, None, False, *cvargs, [False, True])),
               conv=cv, families=("wgrad",)),
    ]


def bn_cases(c: int, precision: str, layout: str, seed: int) -> list[OpCase]:
    """The batch-norm family: finalize (running statistics), BN-add-ReLU (identity, BN'd and
    option-A residuals), ReLU-bias backward, the BN backwards one-op and split."""
    dtype = PRECISION_DTYPE[precision]
    n, h, w = 2, 7, 5
    tag = f"bn C={c} {precision} {layout}"
    rows = (n, c, h, w)

    def case(label, op, fn, mutated=()):
        def build(device):
            m = Maker(device, dtype, layout, seed)
            x = m.act(n, c, h, w)
            return fn(m, x)
        return OpCase(f"{tag} {label}", op, precision, build, mutated, rows=rows)

    def stats(m, x):
        xs = x.to(m.acc)
        return xs.mean((0, 2, 3)), torch.rsqrt(xs.var((0, 2, 3), unbiased=False) + 1e-5)

    def sums(m, x):
        return x.to(m.acc).sum((0, 2, 3)), (x.to(m.acc) ** 2).sum((0, 2, 3))

    def running(m):
        return m.vec(c), m.vec(c, True), torch.tensor(3, device=m.device)

    out = [
        case("finalize", "bn_finalize", lambda m, x: (*sums(m, x), m.vec(c), m.vec(c),
                                                      *running(m), n * h * w, 0.1, 1e-5),
             (4, 5, 6)),
        case("finalize_count", "bn_finalize_count", lambda m, x: (
            *sums(m, x), torch.tensor([float(n * h * w)], dtype=m.acc, device=m.device),
            m.vec(c), m.vec(c), *running(m), None, 1e-5), (5, 6, 7)),
        case("add_relu identity", "bn_add_relu", lambda m, x: (
            x, m.vec(c), m.vec(c), m.act(n, c, h, w), None, None, 0, True)),
        case("add_relu bn'd residual", "bn_add_relu", lambda m, x: (
            x, m.vec(c), m.vec(c), m.act(n, c, h, w), m.vec(c), m.vec(c), 0, True)),
        case("add_relu option A", "bn_add_relu", lambda m, x: (
            x, m.vec(c), m.vec(c), m.act(n, c // 2, 2 * h, 2 * w)[:, :, ::2, ::2], None, None,
            c // 4, True)),
        case("bn only", "bn_add_relu", lambda m, x: (x, m.vec(c), m.vec(c), None, None, None, 0,
                                                     False)),
        case("relu_bias_bwd", "relu_bias_bwd", lambda m, x: (m.act(n, c, h, w), x)),
    ]
    for has_out in (True, False):
        for has_res in (True, False):
            def args(m, x, has_out=has_out, has_res=has_res):
                go, o = m.act(n, c, h, w), (m.act(n, c, h, w) if has_out else None)
                mean, invstd = stats(m, x)
                r = m.act(n, c, h, w)
                res = (r, *stats(m, r)) if has_res else (None, None, None)
                return m, go, o, x, mean, invstd, res
            sfx = f"{'out' if has_out else 'no out'}, {'res' if has_res else 'no res'}"
            out.append(case(f"add_relu_bwd {sfx}", "bn_add_relu_bwd", lambda m, x, a=args: (
                lambda m, go, o, x, mean, invstd, res: (
                    go, o, x, mean, invstd, m.vec(c), *res,
                    m.vec(c) if res[0] is not None else None))(*a(m, x))))
            out.append(case(f"add_relu_bwd_reduce {sfx}", "bn_add_relu_bwd_reduce",
                            lambda m, x, a=args: (lambda m, go, o, x, mean, invstd, res: (
                                go, o, x, mean, invstd, *res))(*a(m, x))))
            out.append(case(f"add_relu_bwd_elemt {sfx}", "bn_add_relu_bwd_elemt",
                            lambda m, x, a=args: (lambda m, go, o, x, mean, invstd, res: (
                                go, o, x, mean, invstd, m.vec(c), m.vec(c), m.vec(c), *res,
                                *((m.vec(c), m.vec(c)) if res[0] is not None else (None, None))
                            ))(*a(m, x))))
    for relu in (True, False):
        def bargs(m, x):
            return (m.act(n, c, h, w), x, *stats(m, x))
        out.append(case(f"relu_bwd relu={relu}", "bn_relu_bwd", lambda m, x, relu=relu: (
            *bargs(m, x), m.vec(c), m.vec(c), m.vec(c), relu)))
        out.append(case(f"relu_bwd_reduce relu={relu}", "bn_relu_bwd_reduce",
                        lambda m, x, relu=relu: (*bargs(m, x), m.vec(c), m.vec(c), relu)))
        out.append(case(f"relu_bwd_elemt relu={relu}", "bn_relu_bwd_elemt",
                        lambda m, x, relu=relu: (*bargs(m, x), None, m.vec(c), m.vec(c), relu,
                                                 m.vec(c), m.vec(c))))
    return out


# --------------------------------------------------------------------------------------------
# Judging one op call.


def tf32_round(a):
    """A 4-D float32 operand rounded to TF32 (10 explicit mantissa bits, to nearest even): what a
    TF32 tensor-core convolution multiplies; the yardstick of a TF32 run is the reference on
    these. Other arguments are returned as they are."""
    if not (isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.dim() == 4):
        return a
    b = a.view(torch.int32)
    r = ((b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(a), r, a)


def _clone(a):
    return a.clone() if isinstance(a, torch.Tensor) else a


def _f64(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def _as_tuple(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def judge_op(case: OpCase, ours, a_ours, theirs, a_theirs, truth, a_truth, dtype) -> list[str]:
    """Every failure of one call: placement, dtype, shape, strides, the tolerance rule (integer
    tensors exactly); empty when it passed."""
    outs = [(f"{case.op}[{i}]", o, t, r)
            for i, (o, t, r) in enumerate(zip(_as_tuple(ours), _as_tuple(theirs),
                                              _as_tuple(truth), strict=True))]
    outs += [(f"{case.op} arg {i}", a_ours[i], a_theirs[i], a_truth[i]) for i in case.mutated]
    bad = []
    for label, o, t, r in outs:
        if o.device != t.device or o.dtype != t.dtype or o.shape != t.shape:
            bad.append(f"{label}: {o.dtype} {tuple(o.shape)} on {o.device}, reference "
                       f"{t.dtype} {tuple(t.shape)} on {t.device}")
        elif o.dim() == 4 and o.stride() != t.stride():
            bad.append(f"{label}: strides {o.stride()} != reference {t.stride()}")
        elif o.is_floating_point():
            v = testing.verdict(label, o, t, r, dtype)
            if not v.ok:
                bad.append(str(v))
        elif not torch.equal(o.cpu(), t.cpu()):
            bad.append(f"{label}: {o.tolist()} != reference {t.tolist()}")
    return bad


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


def _first_line(exc: BaseException, limit: int = 300) -> str:
    from fastres.parity import _first_line as fl  # noqa: PLC0415

    return fl(exc, limit)


def run_ops(cases: list[OpCase], names: list[str], device: torch.device,
            results: dict[str, BackendResult], tick: Callable[[str], None],
            interpreted: bool, deadline: float = math.inf) -> bool:
    """Run the op cases; False when ``deadline`` (time.monotonic) cut them short."""
    from fastres import backends, variants  # noqa: PLC0415

    for case in cases:
        if time.monotonic() > deadline:
            return False
        dtype = PRECISION_DTYPE[case.precision]
        tf32 = case.precision == "tf32"
        run_on = [n for n in names if not tf32 or _tf32_applies(n, device)]
        if not run_on:
            continue
        args = case.build(device)
        fn = backends.BACKENDS["reference"].op(case.op)
        with _tf32(tf32):
            a_theirs = [tf32_round(_clone(a)) if tf32 else _clone(a) for a in args]
            a_truth = [_f64(_clone(a)) for a in args]
            theirs, truth = fn(*a_theirs), fn(*a_truth)
        for name in run_on:
            tick(f"{name}: {case.label}")
            res = results[name]
            a_ours = [_clone(a) for a in args]
            try:
                with _tf32(tf32):
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
    """Whole converted blocks through fastres.parity's harness (no timing), eval and train."""
    from fastres import parity  # noqa: PLC0415

    dtypes = list(dict.fromkeys(PRECISION_DTYPE[p] for p in precisions if p != "tf32"))
    for layout in layouts:
        def emit(line):  # one line per (block, dtype, mode, backend): the progress tick
            tick(line.split("\n")[0][:60])
        with _tf32(False):
            rows = parity.run_cases(_blocks(), dtypes, ["eval", "train"], names, device, batch=2,
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
    from fastres import backends, parity  # noqa: PLC0415

    names, skipped = parity.backend_plan(device, only or list(backends.BACKENDS))
    return names, skipped


def build_cases(device: torch.device, quick: bool, precisions: list[str], layouts: list[str],
                names: list[str], interpreted: bool, seed: int) -> tuple[list[OpCase], list]:
    """The op cases; off --quick, plus the cheapest shape launching each reachable kernel
    variant the base shapes miss (per backend with tile rules)."""
    from fastres import variants  # noqa: PLC0415

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
    if not quick:
        for b in names:
            if b not in ("cuda", "cudasim", "triton"):
                continue
            precs = [p for p in precisions if p != "tf32" or _tf32_applies(b, device)]
            covered = set()
            for c in cases:
                if c.conv is not None and c.precision in precs:
                    covered |= variants.conv_variants(b, c.precision, c.conv, c.families,
                                                      interpreted)
            for v, prec, cv in variants.completion(b, covered, precs, interpreted):
                extra.append((b, v, prec, cv))
        seen = set()
        for b, v, prec, cv in extra:
            fam = v.split(" ")[0]
            if (prec, cv, fam) in seen:
                continue
            seen.add((prec, cv, fam))
            # Only the calls that launch the variant's kernel family: each new Triton variant
            # is a JIT compilation on a first run (about a second each).
            cases += [c for c in conv_cases(f"coverage {v}", cv, prec, "channels_last", seed + i)
                      if fam in c.families and (fam != "fwd" or "bare" not in c.label)
                      and not (fam != "fwd" and "prologue" in c.label)]
            i += 1
    return cases, extra


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def run(device: str | None = None, backend: list[str] | None = None, quick: bool | None = None,
        precisions: list[str] | None = None, layouts: list[str] | None = None,
        blocks: bool = True, bench: bool = False, record: bool = True,
        record_to: str | None = None, progress: bool = True, seed: int = 0,
        time_limit: float | None = None, out: Callable[[str], None] = print) -> dict:
    """The self-test; returns the record (also stored, unless ``record`` is False)."""
    from fastres import variants  # noqa: PLC0415

    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = dev.type == "cpu" if quick is None else quick
    precisions = precisions or (["fp32", "tf32", "bf16", "fp16"] if dev.type == "cuda" or
                                not quick else ["fp32", "bf16"])
    layouts = layouts or (list(LAYOUTS) if not quick else ["channels_last"])
    names, skipped = plan(dev, backend)
    interpreted = _interpreted() and dev.type == "cpu"
    rec = verify.new_record(str(dev))
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
    cases, extra = build_cases(dev, quick, precisions, layouts, names, interpreted, seed)
    n_blocks = (len(_blocks()) * len({p for p in precisions if p != "tf32"}) * 2 * len(layouts)
                * len(names)) if blocks else 0
    n_ops = sum(sum(1 for n in names if c.precision != "tf32" or _tf32_applies(n, dev))
                for c in cases)
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
    if not complete:
        out(f"--time-limit {time_limit:g} s reached: the cases not run leave every backend "
            "'partial' (not verified)")
    # Coverage: what was launched of what the dispatcher can launch at real sizes.
    for n, r in results.items():
        if n not in ("cuda", "cudasim", "triton"):
            continue
        precs = [p for p in precisions if p != "tf32" or _tf32_applies(n, dev)]
        reach = variants.reachable(n, precs, interpreted)
        rec["coverage"][n] = {
            "launched": sorted(r.launched), "reachable": len(reach),
            "missing": sorted(reach - r.launched),
            "rule": "Triton interpreter" if n == "triton" and interpreted else
            ("Triton" if n == "triton" else "CUDA (fastres.variants mirror)"),
        }
    for n, r in results.items():
        cov = rec["coverage"].get(n)
        status = "pass" if r.ok else "fail"
        if r.ok and ((cov and cov["missing"]) or not complete):
            status = "partial"  # correct where it ran, but some variants or cases never ran
        rec["backends"][n] = {"status": status, "date": rec["date"], **r.counts, "failures": [
            {"group": g, "case": lbl, "reason": why} for g, lbl, why in r.failures[:50]],
            "more_failures": max(0, len(r.failures) - 50)}
    ok = all(r.ok for r in results.values())
    rec["summary"] = {"ok": ok, "duration_s": round(time.perf_counter() - t0, 1),
                      "complete": complete, "quick": quick, "precisions": precisions, "layouts": layouts}
    from fastres.parity import git_commit  # noqa: PLC0415

    rec["commit"], rec["commit_dirty"] = git_commit()
    report(rec, results, out)
    if bench:
        from fastres import speed  # noqa: PLC0415

        passing = [n for n, r in results.items() if r.ok and n != "reference"]
        rec["bench"] = speed.bench(dev, passing, out=out, quick=quick)
    if record:
        path = verify.save(rec)
        out(f"record: {path}")
    if record_to:
        path = verify.save(rec, record_to)
        out(f"record: {path}")
    return rec


def report(rec: dict, results: dict[str, BackendResult], out: Callable[[str], None]) -> None:
    out("")
    out(f"{'backend':9s} {'status':8s} {'pass':>6s} {'fail':>5s} {'error':>6s} {'skip':>5s}  "
        "kernel variants launched")
    for n, r in results.items():
        cov = rec["coverage"].get(n)
        cv = "-" if cov is None else (f"{len(cov['launched'])} ({cov['reachable'] - len(cov['missing'])}"
                                      f" of {cov['reachable']} reachable at ResNet sizes, "
                                      f"{cov['rule']})")
        c = r.counts
        out(f"{n:9s} {rec['backends'][n]['status']:8s} {c['pass']:6d} {c['fail']:5d} "
            f"{c['error']:6d} {c['skipped']:5d}  {cv}")
    for n, r in results.items():
        for g, lbl, why in r.failures[:20]:
            out(f"  FAIL {n} {g}: {lbl}\n      {why[:400]}")
        if len(r.failures) > 20:
            out(f"  ... {len(r.failures) - 20} more failures of {n} (in the record)")
        cov = rec["coverage"].get(n)
        if cov and cov["missing"]:
            out(f"  {n}: never launched: " + "; ".join(cov["missing"][:8])
                + (" ..." if len(cov["missing"]) > 8 else ""))
    s = rec["summary"]
    out(f"\nself-test {'PASSED' if s['ok'] else 'FAILED'} in {s['duration_s']:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastres.selftest", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--backend", action="append", metavar="NAME",
                    help="only this backend (repeatable; default every available one)")
    q = ap.add_mutually_exclusive_group()
    q.add_argument("--quick", dest="quick", action="store_true", default=None,
                   help="3 conv shapes, fp32 + bf16, channels_last, no coverage completion "
                        "(the default on a CPU)")
    q.add_argument("--full", dest="quick", action="store_false",
                   help="every shape, precision and layout (the default on a GPU)")
    ap.add_argument("--precision", action="append", choices=tuple(PRECISION_DTYPE))
    ap.add_argument("--layout", action="append", choices=LAYOUTS)
    ap.add_argument("--no-blocks", dest="blocks", action="store_false",
                    help="ops only, no whole blocks")
    ap.add_argument("--bench", action="store_true",
                    help="also time each passing backend against the reference path")
    ap.add_argument("--no-record", dest="record", action="store_false",
                    help="do not store the record in the cache")
    ap.add_argument("--record-to", metavar="PATH",
                    help="also write the record here (bench/results/<gpu>_<commit>_selftest.json)")
    ap.add_argument("--time-limit", type=float, metavar="S",
                    help="stop starting cases after S seconds and still write the record (the "
                         "backends then count as partial, not verified)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastres.selftest: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    if (on_cpu and "TRITON_INTERPRET" not in os.environ and argv is None
            and (not args.backend or "triton" in args.backend)):
        # The Triton kernels run on CPU tensors only under the interpreter, which must be chosen
        # before triton is imported, and `import fastres` imports it (through torch._dynamo):
        # start again with it chosen.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastres.selftest", *sys.argv[1:]])
    rec = run(args.device, args.backend, args.quick, args.precision, args.layout, args.blocks,
              args.bench, args.record, args.record_to, args.progress, args.seed,
              args.time_limit)
    if not rec["backends"]:
        return 2
    return 0 if rec["summary"]["ok"] else 1


class _CallableModule(types.ModuleType):
    """``fastres.selftest(...)`` is :func:`run` (the module itself is callable)."""

    def __call__(self, **kwargs) -> dict:
        return run(**kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
