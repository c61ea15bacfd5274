"""A residual unit's training step as launch plans: ``unit_spec``, ``unit_forward`` and
``unit_backward``, the Triton backend's ``eager_unit`` (the contract of csrc/cuda/unit.h's, which
fastres/_autograd_unit.py and fastres/nn/train_plan.py call).

    spec = unit_spec(n, shortcut, relu, ((sh, sw, ph, pw, dh, dw, groups, eps, momentum), ...))
    (out, yd, *ys, *stats, *dstats) = unit_forward(spec, x, params)
    (dx, dw_1, dgamma_1, dbeta_1, ...) = unit_backward(spec, grad_out, saved, need_x)

``shortcut``: 0 none, 1 identity, 2 a conv + BN downsample (its stage last); ``params``: six per
stage (conv weight, BN weight, BN bias, running mean, running var, num_batches_tracked);
``stats``: (mean, invstd, scale, shift) per main BatchNorm, ``dstats`` the downsample's, the
scale and shift None where only the forward reads them (the last BatchNorm's and the
downsample's, applied by bn_add_relu); ``saved``: fastres._autograd._Saved.flat()'s layout.
The ops, their order and their kernels are fastres._autograd._ResidualUnitFn's (one process's
batch statistics) through the op bodies of ``_ops``: the forward conv_stats, bn_finalize per
BatchNorm (the running statistics and num_batches_tracked updated in place by its kernel, their
version counters bumped), bn_add_relu; the backward bn_add_relu_bwd, then per inner convolution
conv_bwd and bn_relu_bwd, conv_bwd of the first convolution and of the downsample, the
shortcut's gradient added into dx.

Why plans: through the op bodies a training step cost ~1 ms of Python per block on the fake sm_90
driver (bench/host_overhead_triton.py), ~40 launches each with its checks, configs and argument
tuple. All of that depends only on the shape class of the call (the input's dtype, shape, strides
and alignment, each parameter's, and whether float32 may use TF32). Per shape class the first call
runs the op bodies while ``_replay.record`` keeps their launches; later calls replay them
(``_replay.Segment``): the outputs and the workspace allocated, each compiled kernel's launcher
called with this call's pointers. What the op bodies do besides launching stays out of the recorded
part and runs per call here: the version counters, the downsample's bias gradient (a copy: two
parameters never share a gradient tensor), dx's in-place add. The BatchNorm backward kernels take
each BatchNorm weight in its own dtype where the op bodies give them a float32 copy (a copy and a
launch per weight and call): both are converted exactly on load, so the results are the same bits. A
16-bit model's BatchNorm gradients come from one more column-sum launch per BatchNorm in its dtype
where the op bodies return float32 sums that the autograd engine converts (two conversions per
BatchNorm): the same rounding of the same sums. Float32 on TF32 tensor cores: the forward's
weights rounded to TF32 in one launch and the data gradients' in another (bn_eval.round_weights)
where the op bodies round each weight per convolution: the same bits. Where a recorded run cannot
be replayed (a layout copy or a padding the op bodies make per call) the unit runs through the op
bodies on every call.
Under the interpreter the replay goes through ``_common.launch``.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import _common, _direct, _ops
from . import block as _block
from . import bn as _bn
from . import bn_bwd as _bn_bwd
from . import bn_eval as _bn_eval
from ._common import empty_like_format, memory_format_of
from ._replay import record
from .block import _signature
from .reduce import sum_rows, sum_rows_pair

__all__ = ["stats", "unit_backward", "unit_forward", "unit_spec"]

PER_STAGE = 6
#: Counters for tests: calls replayed, plans made, calls through the op bodies.
stats = {"planned": 0, "built": 0, "ops": 0}
MAX_PLANS = 8  # shape classes kept per unit spec and direction


class _Spec:
    """unit_spec's result: the unit's structure and its plans by shape class."""

    __slots__ = ("n", "shortcut", "relu", "geo", "bn", "fwd", "bwd", "ops", "running")

    def __init__(self, n: int, shortcut: int, relu: bool, stages) -> None:
        self.n, self.shortcut, self.relu = int(n), int(shortcut), bool(relu)
        if self.shortcut not in (0, 1, 2):
            raise ValueError(f"unit_spec: shortcut {shortcut} (0 none, 1 identity, 2 downsample)")
        if self.n < 1 or len(stages) != self.n + (self.shortcut == 2):
            raise ValueError(f"unit_spec: {len(stages)} stages for {self.n} convolutions"
                             + (" and a downsample" if self.shortcut == 2 else ""))
        # per stage: (stride, padding, dilation, groups) as conv_stats / conv_bwd take them
        self.geo = tuple(([sh, sw], [ph, pw], [dh, dw], int(g))
                         for sh, sw, ph, pw, dh, dw, g, _, _ in stages)
        self.bn = tuple((float(eps), None if m is None else float(m))
                        for *_, eps, m in stages)
        # the running statistics and num_batches_tracked among the parameters
        self.running = operator.itemgetter(
            *(PER_STAGE * i + j for i in range(len(stages)) for j in (3, 4, 5)))
        self.fwd: dict = {}  # plans by shape class
        self.bwd: dict = {}
        # the op-body runs: the forward; the backward by (need_x, the BatchNorm gradients' dtype)
        self.ops = {"fwd": _forward_ops(self)}


def unit_spec(n: int, shortcut: int, relu: bool, stages) -> _Spec:
    """The spec of a unit of ``n`` convolutions (see the module docstring)."""
    return _Spec(n, shortcut, relu, tuple(tuple(s) for s in stages))


class _Plan:
    """One shape class of one direction: its replay (None: the op bodies every call) and the
    pointers and signature of the tensors that stay from call to call (the parameters). A
    forward plan also keeps the dtype its backward writes the BatchNorm gradients in
    (``grad_dtype``)."""

    __slots__ = ("seg", "ptrs", "sig", "grad_dtype")

    def __init__(self, seg, ptrs, sig) -> None:
        self.seg, self.ptrs, self.sig = seg, ptrs, sig
        self.grad_dtype = None


def _grad_dtype(params) -> torch.dtype | None:
    """The dtype every BatchNorm weight and bias of the unit has when it is not float32 (a 16-bit
    model), else None. The backward then writes their gradients in it, each the float32 sum
    rounded once, as the autograd engine's conversion of the float32 sums would: no conversion
    (an allocation and a launch each) per gradient and step."""
    dts = {t.dtype if t is not None else None
           for i in range(0, len(params), PER_STAGE) for t in params[i + 1: i + 3]}
    if len(dts) != 1:
        return None
    dt = dts.pop()
    return dt if dt in (torch.float16, torch.bfloat16) else None


_increment_version = torch._C._increment_version
_is_contiguous = Tensor.is_contiguous
_allow_tf32 = torch._C._get_cudnn_allow_tf32  # torch.backends.cudnn.allow_tf32, from C


def _key(x: Tensor) -> tuple:
    """The shape class of a call: ``x``'s, and what decides float32's dot precision
    (_common.dot_precision); the parameters' are checked against the plan (_find)."""
    return _block._input_sig(x), _allow_tf32(), _common.EMULATE_TF32


def _find(plans: dict, key: tuple, stable) -> _Plan | None:
    """The plan of ``key`` if the tensors ``stable`` still fit it."""
    plan = plans.get(key)
    if plan is not None:
        ptrs = _block._pointers(stable)
        if ptrs is None or ptrs != plan.ptrs:
            if _signature(stable) != plan.sig:
                return None
            plan.ptrs = ptrs
    return plan


def _keep(plans: dict, key: tuple, seg, stable) -> _Plan:
    if len(plans) >= MAX_PLANS:
        plans.clear()
    plan = plans[key] = _Plan(seg, _block._pointers(stable), _signature(stable))
    return plan


def _replay(seg, ins):
    """The segment's outputs for ``ins``: straight to the compiled kernels where it can, else
    each launch through ``_common.launch`` (a launch hook, another device, the interpreter, a
    recorded run that did not go direct); None where it cannot run at all (no segment, a
    dispatch mode: the op bodies run instead)."""
    if seg is None or _common._dispatch_modes():
        return None
    stats["planned"] += 1
    if seg.direct:
        drv = _direct._driver.active
        device = drv.get_current_device()
        rt = _direct.knobs.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if device == seg.device and not _direct._hooked(enter) and not _direct._hooked(leave):
            return seg.run(ins, drv.get_current_stream(device), enter, leave)
    return seg.checked(ins)


def _run(plans: dict, key, stable, ops, ins):
    """(the outputs, the plan that served the call)."""
    plan = _find(plans, key, stable)
    if plan is None:
        stats["built"] += 1
        outs, seg = record(ops, ins)
        return outs, _keep(plans, key, seg, stable)
    outs = _replay(plan.seg, ins)
    if outs is None:
        stats["ops"] += 1
        outs = ops(*ins)
    return outs, plan


# ---- forward ----


def _check_count(y: Tensor) -> None:
    if y.numel() // y.shape[1] <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(y.shape)}")


def _forward_ops(spec: _Spec):
    """The forward through the op bodies: ``f(x, *params) -> (out, yd, *ys, *stats,
    *dstats)``."""
    n, ds = spec.n, spec.shortcut == 2

    def forward(x, *params):
        ys, st = [], []
        inp, pre = x, (None, None, False)
        # Float32 on TF32 tensor cores: every weight rounded in one launch (not one per
        # convolution, as the op bodies do): the same bits.
        rounded = _round_weights([params[PER_STAGE * i] for i in range(n + ds)])

        def stage(i, inp, pre):
            """Convolution i and its BatchNorm's (mean, invstd, scale, shift): the column sums
            and the finalize in one launch (bn_finalize_partials)."""
            w = params[PER_STAGE * i] if rounded is None else rounded[i]
            y, part = _ops.conv_stats_partials(inp, w, *pre, *spec.geo[i],
                                               weight_rounded=rounded is not None)
            _check_count(y)
            eps, momentum = spec.bn[i]
            four = _bn.bn_finalize_partials(part, *params[PER_STAGE * i + 1: PER_STAGE * (i + 1)],
                                            y.numel() // y.shape[1], momentum, eps)[2:]
            return y, four

        for i in range(n):
            y, four = stage(i, inp, pre)
            ys.append(y)
            if i < n - 1:
                st += four
            inp, pre = y, (four[2], four[3], True)
        yd = dst = None
        res, rsc, rsh = (x if spec.shortcut == 1 else None), None, None
        if ds:
            yd, dst = stage(n, x, (None, None, False))
            res, rsc, rsh = yd, dst[2], dst[3]
        out = _ops.bn_add_relu(ys[-1], four[2], four[3], res, rsc, rsh, 0, spec.relu)
        # The last BatchNorm's and the downsample's scale and shift only serve bn_add_relu: not
        # returned, so a replay keeps them in its workspace instead of allocating them.
        st += (four[0], four[1], None, None)
        return (out, yd, *ys, *st, *((dst[0], dst[1], None, None) if ds else ()))

    return forward


def _round_weights(weights) -> list | None:
    """The float32 weights rounded to TF32 in one launch (bn_eval.round_weights) where the
    convolutions' dots run TF32 and there are at most four; else None (each convolution rounds
    its own, or none)."""
    if (not 1 <= len(weights) <= 4 or any(w.dtype != torch.float32 for w in weights)
            or _common.dot_precision(torch.float32) != "tf32"):
        return None
    return _bn_eval.round_weights(weights)


def unit_forward(spec: _Spec, x: Tensor, params) -> tuple:
    """The unit's forward (see the module docstring), the running statistics updated."""
    params = tuple(params)
    if len(params) != PER_STAGE * (spec.n + (spec.shortcut == 2)):
        raise ValueError(f"unit_forward: {len(params)} parameters for {spec.n} convolutions")
    outs, plan = _run(spec.fwd, _key(x), params, spec.ops["fwd"], (x, *params))
    if plan.grad_dtype is None:  # the plan's parameters have its dtypes (_find checks them)
        plan.grad_dtype = _grad_dtype(params) or False
    running = spec.running(params)  # written in place by bn_finalize's kernel
    try:
        _increment_version(running)
    except RuntimeError:  # an absent one (a BatchNorm without running statistics)
        _increment_version([t for t in running if t is not None])
    return outs


# ---- backward ----


def _backward_ops(spec: _Spec, need_x: bool, grad_dtype: torch.dtype | None):
    """The backward through the op bodies: ``f(grad_out, *saved, *gammas) -> (dx or None,
    the shortcut's gradient into x or None, *per stage (dw, dgamma, dbeta))``, ``gammas``
    each BatchNorm weight, contiguous (the main ones, then the downsample's), which the
    BatchNorm backward kernels take in place of the op bodies' float32 copies. ``grad_dtype``:
    the BatchNorm gradients in it (see _grad_dtype), written by the column-sum launch beside the
    float32 sums, else the float32 sums."""
    n, ds = spec.n, spec.shortcut == 2

    def sums(part, planes, res):
        """bn_bwd_reduce's float32 sums, and the gradients: those or their grad_dtype copies."""
        return _bn_bwd.bn_bwd_grads(part, planes, res, grad_dtype)
    n_saved = 3 + 5 * n + (6 if ds else 0) + 2 * n

    def backward(go, *rest):
        saved, gams = rest[:n_saved], rest[n_saved:]
        x, out, yd = saved[0], saved[1], saved[2]
        ys = saved[3: 3 + n]
        st = saved[3 + n: 3 + 5 * n]
        k = 3 + 5 * n
        dst = wd = None
        if ds:
            dst, wd = saved[k: k + 4], saved[k + 4]
            k += 6
        weights = saved[k: k + n]
        mean, invstd = st[4 * (n - 1)], st[4 * (n - 1) + 1]
        res_mean, res_invstd = (dst[0], dst[1]) if ds else (None, None)
        # The gradients each conv_bwd reads come rounded to TF32 from bn_bwd_apply where its
        # dots run TF32 (float32): no rounding launch per convolution.
        rnd = go.dtype == torch.float32 and _common.dot_precision(go.dtype) == "tf32"
        # bn_add_relu_bwd's body (the weights given as they are)
        _ops._check_bn_bwd("bn_add_relu_bwd", go, out, ys[-1], yd, res_mean, res_invstd)
        mask = 1 if out is not None else 0
        g = empty_like_format(go.shape, go) if yd is None else None
        part, planes = _bn_bwd.bn_bwd_partials(go, out, ys[-1], None, None, mean, invstd, yd,
                                               res_mean, res_invstd, g, mask, True)
        (gsum, gxsum, grsum), last = sums(part, planes, ds)
        dy, gr = _bn_bwd.bn_bwd_apply(go, out, ys[-1], None, None, mean, invstd, gams[n - 1],
                                      gsum, gxsum, yd, res_mean, res_invstd,
                                      gams[n] if ds else None, grsum, mask, round_tf32=rnd)
        dres = g if yd is None else gr
        grads: list = [None] * (3 * (n + ds))
        grads[3 * (n - 1) + 1: 3 * n] = [last[1], last[0]]
        # The weights the data gradients read, rounded to TF32 in one launch (float32).
        dg = list(range(n - 1, 0, -1)) + ([0] if need_x else [])
        dgw = [weights[i] for i in dg] + ([wd] if ds and need_x else [])
        rw = _round_weights(dgw) if rnd else None
        rounded = dict(zip(dg + ([n] if ds and need_x else []), rw)) if rw is not None else {}
        # Each weight gradient's split sum runs in the next BatchNorm backward's reduction
        # launch (bn_bwd_partials' wsum); the last ones in launches of their own.
        pending: list = []
        for i in range(n - 1, 0, -1):
            mean_p, invstd_p, scale_p, shift_p = st[4 * (i - 1): 4 * i]
            da, grads[3 * i] = _ops.conv_bwd_body(dy, ys[i - 1], weights[i], scale_p, shift_p,
                                                  True, *spec.geo[i], [True, True], rnd, pending,
                                                  rounded.get(i))
            # bn_relu_bwd's body (the weight given as it is)
            _ops._check_act("bn_relu_bwd", da, ys[i - 1])
            part, planes = _bn_bwd.bn_bwd_partials(da, None, ys[i - 1], scale_p, shift_p,
                                                   mean_p, invstd_p, None, None, None, None, 2,
                                                   True, pending.pop(0) if pending else None)
            (gs, gx, _), inner = sums(part, planes, False)
            dy, _ = _bn_bwd.bn_bwd_apply(da, None, ys[i - 1], scale_p, shift_p, mean_p,
                                         invstd_p, gams[i - 1], gs, gx, None, None, None, None,
                                         None, 2, round_tf32=rnd)
            grads[3 * (i - 1) + 1: 3 * i] = [inner[1], inner[0]]
        dx, grads[0] = _ops.conv_bwd_body(dy, x, weights[0], None, None, False, *spec.geo[0],
                                          [need_x, True], rnd, pending, rounded.get(0))
        dsx = dres if spec.shortcut == 1 else None
        if ds:
            dsx, grads[3 * n] = _ops.conv_bwd_body(dres, x, wd, None, None, False,
                                                   *spec.geo[n], [need_x, True], rnd, pending,
                                                   rounded.get(n))
            grads[3 * n + 1: 3 * n + 3] = [last[2], last[3]]
        if len(pending) == 2:  # the first convolution's and the downsample's: one launch
            sum_rows_pair(*pending[0], *pending[1])
        else:
            for ws, out in pending:
                sum_rows(ws, out=out)
        if not need_x:
            dx = dsx = None
        return (dx, dsx, *grads)

    return backward


def unit_backward(spec: _Spec, grad_out: Tensor, saved, need_x: bool) -> list:
    """The gradients of the unit's input (None unless ``need_x``) and, per stage, of its conv
    weight, BN weight (None where there is none) and BN bias, the downsample's last."""
    n, ds = spec.n, spec.shortcut == 2
    saved = tuple(saved)
    x, ys_last = saved[0], saved[2 + n]
    k = 3 + 5 * n
    gd = wd = None
    if ds:
        wd, gd = saved[k + 4], saved[k + 5]
        k += 6
    weights, gammas = saved[k: k + n], saved[k + n: k + 2 * n]
    # grad_out in the output's layout (ys_last has the output's shape and strides); a check of
    # the strides where memory_format_of and .contiguous() cost ~1.5 µs per step
    go = grad_out if grad_out.stride() == ys_last.stride() else grad_out.contiguous(
        memory_format=memory_format_of(ys_last))
    # The backward kernels read each BatchNorm weight in its own dtype (converted to float32 on
    # load, exactly as the op bodies' float32 copy): a 16-bit model's weights go as they are,
    # without a copy and a launch per call each; a strided one as the op bodies make it.
    gams = (*gammas, gd) if ds else gammas
    try:
        dense = all(map(_is_contiguous, gams))
    except TypeError:  # an absent one (a BatchNorm without affine parameters)
        dense = False
    if not dense:
        gams = tuple(g if g is None or g.is_contiguous() else _ops._vec(g) for g in gams)
    stable = (*weights, *gammas, *((wd, gd) if ds else ()))
    key = _key(x)
    # the forward plan of this shape class says the BatchNorm gradients' dtype (_grad_dtype)
    fplan = spec.fwd.get(key)
    grad_dtype = (fplan.grad_dtype or None) if fplan is not None else None
    if grad_dtype is not None:
        for g in gams:
            if g is None or g.dtype != grad_dtype:
                grad_dtype = None  # the parameters changed dtype since: the float32 sums
                break
    how = (bool(need_x), grad_dtype)
    ops = spec.ops.get(how)
    if ops is None:
        ops = spec.ops[how] = _backward_ops(spec, *how)
    (dx, dsx, *grads), _ = _run(spec.bwd, (*key, _block._input_sig(go), *how), stable, ops,
                                (go, *saved, *gams))
    if dx is not None and dsx is not None:
        dx.add_(dsx)  # dx is conv_bwd's fresh output: no new buffer
    if not dense:  # an absent BatchNorm weight gets no gradient
        for i, gamma in enumerate((*gammas, *((gd,) if ds else ()))):
            if gamma is None:
                grads[3 * i + 1] = None
    return [dx, *grads]
