"""The op suite's one table of cases (tests/test_ops.py runs each on every backend).

A case is one op at one geometry, dtype (or precision: ``tf32`` is float32 with cuDNN's TF32
switch on) and layout; it builds its calls (every fusion flag the case covers) from a Maker on
the backend's device. A backend that cannot serve a case says why through its own
``not_supported_reasons`` (fastres.backends: cuda kernels groups 1 only, no float64 on
triton, ...). Families:

* ``device``: ResNet-like convolutions (1x1, 3x3, the 7x7 stem, odd channels, the CUDA kernels'
  big tiles and split weight-gradient reduction) and the batch-norm family at every precision;
* ``flags``: every fusion flag (bias, residual, ReLU, prologue, output mask) at tiny odd shapes;
* ``geom``: odd geometries (batch 1, stride 2, the stem, a non-square and a dilated kernel);
* ``sweep``: geometry x dtype (float64 included) x layout with every option, dilated and grouped
  convolutions, every residual form of bn_add_relu, mixed memory formats.

The convolutions' cases are here, the batch-norm family's in tests/op_cases_bn.py.

Emulated backends (tests/op_check.EMULATED: cudasim, triton under its interpreter) run every
family but ``sweep``, whose cases say ``emulate=False``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from op_check import Maker, device_of, emulated

from fastres import backends

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPE_ID = {F32: "fp32", F16: "fp16", BF16: "bf16", F64: "fp64"}
LAYOUTS = ("channels_last", "contiguous")
LAYOUT_ID = {"channels_last": "cl", "contiguous": "nchw", "mixed": "mixed"}
# (name, dtype, TF32 on)
PRECISIONS = (("fp32", F32, False), ("tf32", F32, True), ("bf16", BF16, False),
              ("fp16", F16, False))


@dataclass(frozen=True)
class Geometry:
    """A convolution: input (n, c, h, w), k output channels, an r x s kernel."""

    id: str
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int = 1
    pad: tuple[int, int] = (0, 0)
    dil: int = 1
    groups: int = 1

    @property
    def conv(self):
        """stride, padding, dilation, groups as the ops take them."""
        return [self.stride] * 2, list(self.pad), [self.dil] * 2, self.groups

    @property
    def out_hw(self):
        p = (self.h + 2 * self.pad[0] - self.dil * (self.r - 1) - 1) // self.stride + 1
        q = (self.w + 2 * self.pad[1] - self.dil * (self.s - 1) - 1) // self.stride + 1
        return p, q


Call = tuple  # (args, mutated argument indices)


@dataclass(frozen=True)
class OpCase:
    op: str
    family: str
    dtype: torch.dtype
    layout: str
    calls: Callable[[Maker], list[Call]]
    geometry: Geometry | None = None
    tf32: bool = False
    tag: str = ""
    emulate: bool = True  # small enough for the emulated backends

    @property
    def id(self) -> str:
        prec = "tf32" if self.tf32 else DTYPE_ID[self.dtype]
        parts = [self.op, self.family, self.geometry.id if self.geometry else "", self.tag, prec,
                 LAYOUT_ID[self.layout]]
        return "-".join(p for p in parts if p)

    def inputs(self, device: torch.device) -> backends.Inputs:
        g = self.geometry
        conv = {} if g is None else dict(kernel_size=(g.r, g.s), stride=(g.stride, g.stride),
                                         dilation=(g.dil, g.dil), groups=g.groups)
        return backends.Inputs(device, self.dtype, channels_last=self.layout == "channels_last",
                               **conv)


def reasons(backend: str, case: OpCase) -> list[str]:
    """Why ``backend`` does not run ``case`` here: its own not_supported_reasons, and for an
    emulated backend a case too big to emulate."""
    why = backends.BACKENDS[backend].not_supported_reasons(case.inputs(device_of(backend)))
    slow = emulated(backend)
    if not case.emulate and slow:
        why.append(f"{slow}: the sweep cases run where it runs natively")
    return why


# ------------------------------------------------------------------------------------------
# Convolutions: conv_bias_act, conv_stats, conv_bwd


def _x_w(m: Maker, g: Geometry, x_offset=0.0):
    x = m.act(g.n, g.c, g.h, g.w, offset=x_offset)
    return x, m.weight(g.k, g.c // g.groups, g.r, g.s)


def _y(m: Maker, g: Geometry, layout=None):
    return m.act(g.n, g.k, *g.out_hw, layout=layout)


# (pre_scale, pre_shift, pre_relu); the shift positive so that a padded zero transformed
# (relu(shift) > 0) instead of kept zero would show
PROLOGUES = {"plain": (False, False, False), "scale": (True, False, False),
             "shift": (False, True, False), "relu": (False, False, True),
             "bn": (True, True, False), "shift-relu": (False, True, True),
             "bn-relu": (True, True, True)}


def _prologue(m: Maker, c: int, name: str):
    sc, sh, relu = PROLOGUES[name]
    return (m.pos(c) if sc else None, m.vec(c, 0.2, 1.0) if sh else None, relu)


def _conv_cases(family, geoms, precisions, layouts, variants, emulate=True):
    """conv_bias_act, conv_stats and conv_bwd at each geometry x precision x layout, with the
    calls ``variants[op](m, g)`` gives."""
    out = []
    for g, (_, dtype, tf32), layout in itertools.product(geoms, precisions, layouts):
        for op, fn in variants.items():
            out.append(OpCase(op, family, dtype, layout, lambda m, fn=fn, g=g: fn(m, g), g,
                              tf32=tf32, emulate=emulate))
    return out


# test_ops_device's geometries: N=2 at 9x11; (C, K, kernel, stride, padding)
_DEVICE = [(16, 32, 1, 1, 0), (16, 16, 3, 1, 1), (6, 10, 3, 2, 1), (3, 8, 7, 2, 3),
           # the CUDA kernels' big tiles (conv and dgrad OC > 64, wgrad K and C > 64), a partial
           # second 128-wide n-tile, and 72 channels = two 32-wide channel blocks and a masked 8
           (72, 136, 1, 1, 0)]
DEVICE_GEOMS = [Geometry(f"C{c}K{k}r{r}s{s}", 2, c, 9, 11, k, r, r, s, (p, p))
                for c, k, r, s, p in _DEVICE]


def _device_variants():
    def cba(m, g):
        x, w = _x_w(m, g)
        return [((x, w, m.vec(g.k), _y(m, g), *g.conv, True), ()),
                ((x, w, None, None, *g.conv, False), ())]

    def stats(m, g):
        x, w = _x_w(m, g)
        return [((x, w, None, None, False, *g.conv), ()),
                ((x, w, m.pos(g.c), m.vec(g.c), True, *g.conv), ())]

    def bwd(m, g):
        x, w = _x_w(m, g)
        go = _y(m, g)
        return [((go, x, w, m.pos(g.c), m.vec(g.c), True, *g.conv, [True, True]), ()),
                ((go, x, w, None, None, False, *g.conv, [True, False]), ())]

    return {"conv_bias_act": cba, "conv_stats": stats, "conv_bwd": bwd}


# conv_bwd on N*P*Q = 1024 rows: the CUDA weight gradient splits the rows over CTAs (2 splits at
# 16 bits, 4 in fp32) and sums the fp32 partials in order; the cases above fit one.
SPLIT_GEOM = Geometry("split-wgrad", 4, 16, 16, 16, 24, 3, 3, 1, (1, 1))


def _split_bwd(m, g):
    x, w = _x_w(m, g)
    return [((_y(m, g), x, w, m.pos(g.c), m.vec(g.c), True, *g.conv, [True, True]), ())]


# Tiny odd geometries (Triton's): batch 1, stride 2, the 7x7 stem, a non-square and a dilated
# kernel; an output-channel count that is no multiple of anything.
GEOM_GEOMS = [
    Geometry("3x3s1-n1", 1, 5, 7, 7, 6, 3, 3, 1, (1, 1)),
    Geometry("3x3s2-odd", 2, 7, 7, 9, 5, 3, 3, 2, (1, 1)),
    Geometry("1x1s2-down", 2, 6, 6, 6, 9, 1, 1, 2, (0, 0)),
    Geometry("7x7s2-stem", 1, 3, 11, 11, 8, 7, 7, 2, (3, 3)),
    Geometry("1x3", 1, 5, 6, 5, 3, 1, 3, 1, (0, 1)),
    Geometry("3x3-dil2", 1, 4, 9, 9, 5, 3, 3, 1, (2, 2), 2),
]


def _geom_variants():
    def cba(m, g):  # the residual in the other layout
        x, w = _x_w(m, g)
        return [((x, w, m.vec(g.k).to(m.dtype), _y(m, g, "contiguous"), *g.conv, True), ())]

    def stats(m, g):  # a nonzero mean: the statistics must not cancel it
        x, w = _x_w(m, g, x_offset=0.3)
        return [((x, w, m.pos(g.c), m.vec(g.c), True, *g.conv), ())]

    return {"conv_bias_act": cba, "conv_stats": stats, "conv_bwd": _split_bwd}


# Every fusion flag at one tiny geometry each.
FLAG_CBA = Geometry("5x7s2", 2, 5, 5, 7, 6, 3, 3, 2, (1, 1))
FLAG_STATS = Geometry("7x5s1", 2, 5, 7, 5, 7, 3, 3, 1, (1, 1))
FLAG_BWD = Geometry("7x7s2", 2, 5, 7, 7, 6, 3, 3, 2, (1, 1))
FLAG_MASK = Geometry("6x6s2", 1, 3, 6, 6, 4, 3, 3, 2, (1, 1))
# 1x1 stride 2: three of the four grad_input phases receive no tap and must be written as zeros
FLAG_PHASES = Geometry("1x1s2-phases", 1, 4, 5, 5, 3, 1, 1, 2, (0, 0))
# a folded BatchNorm's bias in the accumulation dtype (float32) with low-precision weights
ACC_BIAS = Geometry("3x3-accbias", 2, 16, 8, 8, 16, 3, 3, 1, (1, 1))


def _flag_cases():
    out = []

    def cba(m, g=FLAG_CBA):
        x, w = _x_w(m, g)
        return [((x, w, m.vec(g.k).to(m.dtype) if b else None, _y(m, g) if r else None, *g.conv,
                  relu), ())
                for b, r, relu in itertools.product((False, True), repeat=3)]

    def stats(m, g=FLAG_STATS):
        x, w = _x_w(m, g)
        return [((x, w, *_prologue(m, g.c, p), *g.conv), ()) for p in PROLOGUES]

    def bwd(m, g=FLAG_BWD):
        x, w = _x_w(m, g)
        go = _y(m, g)
        return [((go, x, w, *_prologue(m, g.c, p), *g.conv, [True, True]), ()) for p in PROLOGUES]

    def masks(m, g=FLAG_MASK):
        x, w = _x_w(m, g)  # the weight in the activations' layout: grad_weight keeps it
        return [((_y(m, g), x, w, None, None, False, *g.conv, mask), ())
                for mask in ([True, False], [False, True])]

    def phases(m, g=FLAG_PHASES):
        x, w = _x_w(m, g)
        return [((_y(m, g), x, w, None, None, False, *g.conv, [True, False]), ())]

    def acc_bias(m, g=ACC_BIAS):
        x, w = _x_w(m, g)
        return [((x, w, m.vec(g.k).float(), _y(m, g), *g.conv, True), ())]

    def bn_epilogue(m, g=ACC_BIAS):
        # The eval BatchNorm in the epilogue: its scale computed first (scale=), or the
        # BatchNorm itself from (gamma, beta, mean, var): float32 vectors, no affine part, and
        # a model.to(dtype)'s vectors in the activations' dtype.
        x, w = _x_w(m, g)
        y = _y(m, g)
        gam, bet, mean, var = m.pos(g.k), m.vec(g.k), m.vec(g.k), m.vec(g.k, 0.01, 3.0)
        low = [t.to(m.dtype) for t in (gam, bet, mean, var)]
        return [((x, w, bet, y, *g.conv, True, gam), ()),
                ((x, w, bet, y, *g.conv, True, gam, mean, var, 1e-5), ()),
                ((x, w, None, None, *g.conv, False, None, mean, var, 1e-3), ()),
                ((x, w, low[1], y, *g.conv, True, low[0], low[2], low[3], 1e-5), ())]

    for dtype in (F32, BF16, F16):
        out += [OpCase("conv_bias_act", "flags", dtype, "channels_last", cba, FLAG_CBA),
                OpCase("conv_stats", "flags", dtype, "channels_last", stats, FLAG_STATS),
                OpCase("conv_bwd", "flags", dtype, "channels_last", bwd, FLAG_BWD),
                OpCase("conv_bias_act", "flags", dtype, "channels_last", acc_bias, ACC_BIAS),
                OpCase("conv_bias_act", "flags", dtype, "channels_last", bn_epilogue, ACC_BIAS,
                       tag="bn-epilogue")]
    for layout in LAYOUTS:
        out.append(OpCase("conv_bwd", "flags", F32, layout, masks, FLAG_MASK))
    out.append(OpCase("conv_bwd", "flags", F32, "channels_last", phases, FLAG_PHASES))
    return out


# The sweep: (kernel, stride, padding, dilation, groups) at N=2, 9x11, every dtype (float64
# too) and layout; the dilated and grouped convolutions in float32 and float64.
_SWEEP = [(1, 1, 0, 1, 1), (1, 2, 0, 1, 1), (3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (7, 2, 3, 1, 1)]
_SWEEP_EXTRA = [(3, 1, 2, 2, 1), (3, 1, 1, 1, 3)]


def _sweep_geom(spec, c, k):
    r, s, p, d, grp = spec
    c, k = (c + grp - 1) // grp * grp, (k + grp - 1) // grp * grp  # divisible by groups
    gid = f"{r}x{r}s{s}p{p}" + (f"d{d}" if d > 1 else "") + (f"g{grp}" if grp > 1 else "")
    return Geometry(gid, 2, c, 9, 11, k, r, r, s, (p, p), d, grp)


def _sweep_cba(m, g):
    x, w = _x_w(m, g)
    n, k, p, q = g.n, g.k, *g.out_hw
    calls = []
    # every option with and without: oneDNN's unary (bias+ReLU) and binary (bias+add+ReLU) paths,
    # the epilogue pass after the convolution, a strided residual view
    for bias, res, relu in [(False, None, False), (True, None, True), (False, "dense", False),
                            (True, "dense", True), (True, "strided", True)]:
        r = None
        if res == "dense":
            r = m.act(n, k, p, q)
        elif res == "strided":  # every other column of a wider tensor
            r = m.act(n, k, p, 2 * q)[:, :, :, ::2]
        calls.append(((x, w, m.vec(k).to(m.dtype) if bias else None, r, *g.conv, relu), ()))
    return calls


def _sweep_stats(m, g):
    x, w = _x_w(m, g)
    return [((x, w, *_prologue(m, g.c, p), *g.conv), ())
            for p in ("plain", "scale", "shift", "relu", "bn-relu")]


def _sweep_bwd(m, g):
    x, w = _x_w(m, g)
    go = _y(m, g)
    calls = [((go, x, w, *_prologue(m, g.c, p), *g.conv, [True, True]), ())
             for p in ("plain", "scale", "shift", "relu", "bn-relu")]
    calls += [((go, x, w, *_prologue(m, g.c, "bn-relu"), *g.conv, mask), ())
              for mask in ([True, False], [False, True])]
    return calls


def _sweep_conv_cases():
    out = []
    fns = {"conv_bias_act": (_sweep_cba, 6, 7), "conv_stats": (_sweep_stats, 10, 19),
           "conv_bwd": (_sweep_bwd, 10, 9)}
    for spec, dtype, layout in itertools.product(_SWEEP + _SWEEP_EXTRA, (F32, BF16, F16, F64),
                                                 LAYOUTS):
        if spec in _SWEEP_EXTRA and dtype not in (F32, F64):
            continue
        for op, (fn, c, k) in fns.items():
            g = _sweep_geom(spec, c, k)
            out.append(OpCase(op, "sweep", dtype, layout, lambda m, fn=fn, g=g: fn(m, g), g,
                              emulate=False))

    def mixed(m):  # input contiguous, residual channels_last and vice versa: out follows input
        calls = []
        for lx, lr in (("contiguous", "channels_last"), ("channels_last", "contiguous")):
            x, w = m.act(2, 8, 7, 7, layout=lx), m.weight(12, 8, 1)
            conv = ([1, 1], [0, 0], [1, 1], 1)
            calls.append(((x, w, m.vec(12).float(), m.act(2, 12, 7, 7, layout=lr), *conv, True),
                          ()))
        return calls

    out.append(OpCase("conv_bias_act", "sweep", F32, "mixed", mixed, tag="formats",
                      emulate=False))
    return out


def _all_cases() -> list[OpCase]:
    # the batch-norm family's builders use this module's types: imported once they exist
    from op_cases_bn import device_bn_cases, flag_bn_cases, sweep_bn_cases

    cases = (_conv_cases("device", DEVICE_GEOMS, PRECISIONS, LAYOUTS, _device_variants())
             + _conv_cases("device", [SPLIT_GEOM], PRECISIONS, ["channels_last"],
                           {"conv_bwd": _split_bwd})
             + device_bn_cases()
             + _flag_cases() + flag_bn_cases()
             + _conv_cases("geom", GEOM_GEOMS, [("fp16", F16, False)], ["channels_last"],
                           {"conv_bias_act": _geom_variants()["conv_bias_act"]})
             + _conv_cases("geom", GEOM_GEOMS, [("bf16", BF16, False)], ["channels_last"],
                           {"conv_stats": _geom_variants()["conv_stats"]})
             + _conv_cases("geom", GEOM_GEOMS, [("fp32", F32, False), ("bf16", BF16, False)],
                           ["channels_last"], {"conv_bwd": _split_bwd})
             + _sweep_conv_cases() + sweep_bn_cases())
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    assert not dup, f"duplicate case ids: {dup}"
    return cases


#: The table: every case, in order.
CASES: list[OpCase] = _all_cases()
