"""The self-test's op cases (fastres.selftest): operands, the calls of every op of the contract at
scaled-down ResNet shapes, and the judgement of one call by the suite's tolerance rule
(fastres.harness.rule)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastres.backends.variants import Conv
from fastres.harness import rule

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
    families: tuple[str, ...] = ()  # conv kernel families launched (fastres.backends.variants)
    rows: tuple[int, int, int, int] | None = None  # (n, c, h, w) of a bandwidth op
    only: tuple[str, ...] = ()  # the backends that run it (empty: every backend of the run)


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
            v = rule.verdict(label, o, t, r, dtype)
            if not v.ok:
                bad.append(str(v))
        elif not torch.equal(o.cpu(), t.cpu()):
            bad.append(f"{label}: {o.tolist()} != reference {t.tolist()}")
    return bad
