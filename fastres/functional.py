"""Functional API of fastres: typed functions over the op set, with autograd.

Layouts: activations are 4-D ``(N, C, H, W)`` tensors in either memory format (channels_last is
the fast one on every backend); outputs keep the input's memory format. Dtypes: float32, float16,
bfloat16 (float64 on the CPU and reference backends, for gradcheck); weights must have the
activations' dtype and device. Per-channel statistics are float32 (float64 for float64 input).

Two paths:

* inference (:func:`conv_bias_act`, :func:`fold_bn`): BatchNorm folded into the convolution,
  one fused op per convolution;
* training (:func:`residual_unit`): a chain of convolutions, each followed by a BatchNorm with
  batch statistics, whose BN + ReLU is applied as the next convolution's prologue; the last BN,
  the shortcut and the final ReLU are one pass. Its backward is made of fastres ops too.

Autocast: both paths follow the rules ``torch.nn.functional.conv2d`` follows. Under
``torch.autocast(device_type, dtype)`` the activations, conv weights and residuals (floating
tensors other than float64) are cast to the autocast dtype at the entry of the fused path, which
then runs with autocast disabled; BatchNorm parameters, statistics and folded biases stay float32
and running statistics are updated in their own dtype, as ``nn.BatchNorm2d`` under autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastres import backends
from fastres._specs import (
    BNSpec,
    ConvSpec,
    DtypeError,
    Inputs,
    ShapeError,
    Stage,
    static_size,
)

__all__ = [
    "ConvSpec",
    "BNSpec",
    "Stage",
    "conv_bias_act",
    "fold_bn",
    "residual_unit",
    "check_input",
    "ShapeError",
    "DtypeError",
    "autocast_dtype",
    "compute_dtype",
    "fold_dtypes",
    "fingerprint",
    "fold_sources",
]


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


# --------------------------------------------------------------------------------------------
# Autocast. The casts are explicit here rather than autocast kernels registered for the ops: an
# op-level autocast kernel casts every floating argument, the per-channel float32 vectors (scale,
# shift, BN weights) included, which the op contract keeps float32; and the training path is an
# autograd.Function, not one op. Running with autocast disabled inside also keeps the reference
# backend's F.conv2d from being autocast a second time.


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect for ``device_type`` ("cpu", "cuda"), or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the fused path computes ``x`` in: the autocast dtype where autocast would cast
    ``x`` for a convolution, else ``x.dtype``."""
    dt = autocast_dtype(x.device.type)
    if dt is None or not x.is_floating_point() or x.dtype == torch.float64:
        return x.dtype
    return dt


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Autocast's cast for a lower-precision op: floating tensors other than float64 only."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def fold_dtypes(x: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(weight dtype, bias dtype) to fold a BatchNorm into for input ``x``: both ``x.dtype``, but
    under autocast the weight in the autocast dtype and the bias (the BN shift, a per-channel
    vector) in float32, as BatchNorm keeps its parameters under autocast. A low-precision shift
    would add a per-channel error of |shift| * 2^-9 (bf16) to every output of the channel, which
    sums coherently in the weight gradients."""
    dt = compute_dtype(x)
    if dt != x.dtype or autocast_dtype(x.device.type) == x.dtype:
        from fastres.reference import acc_dtype  # noqa: PLC0415

        return dt, acc_dtype(dt)
    return dt, dt


# --------------------------------------------------------------------------------------------
# Input checks: a clear error that names the problem, before any kernel runs.


def check_input(x: Tensor, weight: Tensor, where: str = "fastres") -> None:
    """Raise a clear error when ``x`` cannot be convolved with ``weight`` (rank, channels, dtype,
    device): a :class:`ShapeError` or :class:`DtypeError`, both RuntimeErrors as torch's own for
    the same mistakes, or a RuntimeError for the device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ShapeError(
            f"{where}: expected a 4-D (N, C, H, W) input, got {x.dim()}-D input of size "
            f"{tuple(x.shape)}"
        )
    groups_cin = weight.shape[1]
    if x.shape[1] % groups_cin != 0 or x.shape[1] == 0:
        raise ShapeError(
            f"{where}: input has {x.shape[1]} channels but the convolution expects "
            f"{groups_cin} per group (weight of size {tuple(weight.shape)})"
        )
    if not x.is_floating_point():
        raise DtypeError(
            f"{where}: expected a floating-point input, got {x.dtype} (convert the input, "
            f"e.g. x.to({weight.dtype}))"
        )
    # Under autocast both are cast to the autocast dtype first (see compute_dtype).
    if compute_dtype(x) != compute_dtype(weight):
        raise DtypeError(
            f"{where}: input dtype {x.dtype} does not match weight dtype {weight.dtype} "
            f"(convert the module with .to({x.dtype}), the input with .to({weight.dtype}), or "
            "use torch.autocast)"
        )
    if x.device != weight.device:
        raise RuntimeError(
            f"{where}: input is on {x.device} but the weights are on {weight.device}"
        )


def _check_batch_stats_count(x_shape: Sequence[int], count: int) -> None:
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(x_shape)}"
        )


# --------------------------------------------------------------------------------------------
# The values check of the eval path's caches.

def fold_sources(conv: torch.nn.Module, bn: torch.nn.Module) -> list[Tensor | None]:
    """The live tensors a BatchNorm fold is computed from, in :func:`fold_bn`'s order: the conv
    weight, then the norm layer's weight, bias, running_mean and running_var (parameters or, in
    FrozenBatchNorm2d, buffers)."""
    return [
        conv.weight,
        getattr(bn, "weight", None),
        getattr(bn, "bias", None),
        bn.running_mean,
        bn.running_var,
    ]


_FINGERPRINT = []  # [op or None], looked up once


def fingerprint(tensors: Sequence[Tensor | None]) -> int | None:
    """A 64-bit hash of the values, dtypes, sizes and strides of CPU tensors (None entries
    allowed): ``fastres_cpu::fingerprint``, one read of every byte, so that a write through
    ``.data`` or ``.numpy()`` (which leaves a tensor's version counter alone) changes it. None when
    the first tensor is not on the CPU (checking a device tensor's values from the host would
    sync the two: such folds are not cached) or the CPU kernels are not built. A later tensor
    not on the CPU makes the hash new on every call (never a match)."""
    first = tensors[0] if tensors else None
    if first is not None and first.device.type != "cpu":
        return None
    if not _FINGERPRINT:
        from fastres.backends import extension  # noqa: PLC0415

        ok = extension.load()[0] is not None and hasattr(torch.ops.fastres_cpu, "fingerprint")
        _FINGERPRINT.append(torch.ops.fastres_cpu.fingerprint if ok else None)
    op = _FINGERPRINT[0]
    return None if op is None else op(list(tensors))


# --------------------------------------------------------------------------------------------
# Inference: folded BatchNorm, one fused op per convolution.


def fold_bn(
    conv_weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype | None = None,
    bias_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the preceding bias-free convolution.

    Returns ``(weight, bias)`` with ``weight = conv_weight * gamma / sqrt(var + eps)`` (per output
    channel) and ``bias = beta - mean * gamma / sqrt(var + eps)``, computed in float32 (float64 for
    float64 weights) and cast to ``dtype`` (default: the conv weight's); the bias to
    ``bias_dtype`` (default: ``dtype``). Differentiable.
    """
    acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = bn_weight.to(acc) * scale
    shift = -running_mean.to(acc) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    dtype = dtype or conv_weight.dtype
    w = (conv_weight.to(acc) * scale.reshape(-1, 1, 1, 1)).to(dtype)
    if conv_weight.is_contiguous(memory_format=torch.channels_last):
        w = w.contiguous(memory_format=torch.channels_last)
    return w, shift.to(bias_dtype or dtype)


class _ConvBiasActFn(torch.autograd.Function):
    """conv_bias_act with a backward made of fastres ops (relu_bias_bwd, conv_bwd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, conv: ConvSpec, relu: bool, backend: str):
        be = backend
        out = backends.op(be, "conv_bias_act")(x, weight, bias, residual, *conv.args(), relu)
        ctx.conv, ctx.relu, ctx.backend = conv, relu, backend
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        be = ctx.backend
        grad_z, grad_bias = backends.op(be, "relu_bias_bwd")(
            grad_out.contiguous(memory_format=_fmt(x)), out
        )
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = None
        if need_x or need_w:
            gx, gw = backends.op(be, "conv_bwd")(
                grad_z, x, weight, None, None, False, *ctx.conv.args(), [need_x, need_w]
            )
            grad_x = gx if need_x else None
            grad_w = gw if need_w else None
        grad_b = grad_bias.to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_r = grad_z if ctx.has_residual and ctx.needs_input_grad[3] else None
        return grad_x, grad_w, grad_b, grad_r, None, None, None


def _fmt(x: Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    relu: bool = True,
    backend: str | None = None,
) -> Tensor:
    """``relu?(conv2d(x, weight) + bias + residual)`` as one fused op (one output write).

    Args:
        x: ``(N, C, H, W)`` input, any memory format.
        weight: ``(K, C / groups, R, S)``, same dtype and device as ``x``.
        bias: ``(K,)`` or None (a folded BatchNorm's shift).
        residual: the output's shape ``(N, K, P, Q)`` or None.
        backend: force a backend by name (default: FASTRES_BACKEND or the dispatcher's choice).

    Returns the ``(N, K, P, Q)`` output in ``x``'s dtype and memory format (under autocast, in
    the autocast dtype, see the module docstring). Differentiable.
    """
    ac = autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if ac is not None:
        # bias (a folded BN shift, per channel) keeps its dtype: every backend takes it in the
        # activations' dtype or float32.
        x, weight, residual = (_autocast(t, ac) for t in (x, weight, residual))
        with torch.autocast(x.device.type, enabled=False):
            return conv_bias_act(
                x, weight, bias, residual, stride, padding, dilation, groups, relu, backend
            )
    check_input(x, weight, "fastres.conv_bias_act")
    conv = ConvSpec(tuple(_pair(stride)), tuple(_pair(padding)), tuple(_pair(dilation)), groups)
    needs_grad = _needs_grad(x, weight, bias, residual)
    b = backends.select(_inputs(x, weight, conv, training=needs_grad), backend)
    if b.name != "reference" and needs_grad:
        return _ConvBiasActFn.apply(x, weight, bias, residual, conv, relu, b.name)
    # The reference op is plain PyTorch, differentiable as it is.
    return b.op("conv_bias_act")(x, weight, bias, residual, *conv.args(), relu)


def _inputs(x: Tensor, weight: Tensor, conv: ConvSpec, training: bool = False) -> Inputs:
    return Inputs(
        x.device,
        x.dtype,
        kernel_size=(int(weight.shape[2]), int(weight.shape[3])),
        stride=conv.stride,
        dilation=conv.dilation,
        groups=conv.groups,
        channels_last=x.is_contiguous(memory_format=torch.channels_last),
        training=training,
        channels=int(weight.shape[1]) * conv.groups,
        batch=static_size(x.shape[0]),
    )


def select_backend(
    x: Tensor, weights: Sequence[Tensor], convs: Sequence[ConvSpec], backend: str | None = None,
    training: bool = True,
) -> backends.Backend:
    """One backend that serves every convolution of a block (the block runs on one backend).
    ``training``: a training call (the recorded GPU speed of a backend differs by mode)."""
    chosen = None
    for w, c in zip(weights, convs, strict=True):
        b = backends.select(_inputs(x, w, c, training), backend)
        rank = list(backends.BACKENDS).index  # PRIORITY's order, then the forced-only backends
        if chosen is None or rank(b.name) > rank(chosen.name):
            chosen = b
    if chosen is None:
        raise ValueError("select_backend needs at least one convolution")
    if backend is None:
        # The weakest backend needed by one conv serves them all; make sure it really does.
        for w, c in zip(weights, convs, strict=True):
            reasons = chosen.not_supported_reasons(_inputs(x, w, c, training))
            if reasons:
                return backends.BACKENDS["reference"]
    return chosen


# --------------------------------------------------------------------------------------------
# Training: a residual unit with batch statistics.


@dataclass(frozen=True)
class _UnitSpec:
    stages: tuple[Stage, ...]
    downsample: Stage | None
    shortcut: str  # "none" | "identity" | "downsample" | "option_a" | "tensor"
    option_a_stride: int
    relu: bool
    backend: str
    # SyncBatchNorm: the torch.distributed process group whose batch statistics every BatchNorm
    # of the unit uses (all-reduced per step), or None for this process's batch alone.
    group: object = None


def _world_size(group) -> int:
    import torch.distributed as dist  # noqa: PLC0415

    return dist.get_world_size(group)


def _all_reduce_sum(t: Tensor, group) -> Tensor:
    """Sum ``t`` over the processes of ``group`` (in place; returns ``t``)."""
    import torch.distributed as dist  # noqa: PLC0415

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _finalize(be: str, group, parts) -> list[tuple]:
    """bn_finalize of several BatchNorms; under SyncBatchNorm (``group``) over the global batch,
    with ONE all-reduce for all of them.

    ``parts`` are, per BatchNorm, (conv output, sum, sumsq, (gamma, beta, running_mean,
    running_var, num_batches_tracked), BNSpec). Returns per BatchNorm (mean, invstd, scale, shift,
    global count as a one-element tensor, or None without a group)."""
    if group is None:
        out = []
        for y, s, q, bn_params, bn in parts:
            count = y.numel() // y.shape[1]
            _check_batch_stats_count(y.shape, count)
            stats = backends.op(be, "bn_finalize")(s, q, *bn_params, count, bn.momentum, bn.eps)
            out.append((*stats, None))
        return out
    packed = []
    for y, s, q, _, _ in parts:
        packed += [s, q, s.new_full((1,), float(y.numel() // y.shape[1]))]
    total = _all_reduce_sum(torch.cat(packed), group)
    out, k = [], 0
    for _, s, _, bn_params, bn in parts:
        c = s.shape[0]
        gs, gq, gn = total[k : k + c], total[k + c : k + 2 * c], total[k + 2 * c : k + 2 * c + 1]
        k += 2 * c + 1
        stats = backends.op(be, "bn_finalize_count")(gs, gq, gn, *bn_params, bn.momentum, bn.eps)
        out.append((*stats, gn))
    return out


def _bn_relu_backward(
    be: str,
    group,
    count: Tensor | None,
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of a BatchNorm (+ ReLU recomputed from scale/shift):
    the one-op ``bn_relu_bwd``, or under SyncBatchNorm (``group``, ``count`` the global count)
    this process's sums, one all-reduce of them and the elementwise pass with the global means.
    The parameter gradients are this process's sums either way."""
    if group is None:
        return backends.op(be, "bn_relu_bwd")(
            grad_out, input, mean, invstd, weight, scale, shift, relu
        )
    sum_g, sum_g_xhat = backends.op(be, "bn_relu_bwd_reduce")(
        grad_out, input, mean, invstd, scale, shift, relu
    )
    c = sum_g.shape[0]
    means = _all_reduce_sum(torch.cat([sum_g, sum_g_xhat]), group) / count
    grad_input = backends.op(be, "bn_relu_bwd_elemt")(
        grad_out, input, mean, invstd, weight, scale, shift, relu, means[:c], means[c:]
    )
    return grad_input, sum_g_xhat, sum_g


def _bn_tensors(params: Sequence[Tensor | None], i: int):
    # Flat layout per stage: weight, gamma, beta, running_mean, running_var, num_batches_tracked.
    return params[6 * i : 6 * i + 6]


class _ResidualUnitFn(torch.autograd.Function):
    """Training forward/backward of a residual unit, made of fastres ops.

    Saved for backward: x, each stage's un-normalised conv output y_i, the downsample's y_d, the
    block output (for the ReLU mask) and the per-channel statistics. The BN+ReLU activations
    between convolutions are never stored: the next convolution recomputes them on load.
    """

    @staticmethod
    def forward(ctx, spec: _UnitSpec, x: Tensor, shortcut_in: Tensor | None, *params):
        be = spec.backend
        n_stages = len(spec.stages)
        ys, stats = [], []
        inp, pre = x, (None, None, False)
        counts = []  # SyncBatchNorm: each BatchNorm's global count (a tensor), for the backward

        def part(i: int, st: Stage, y: Tensor, s: Tensor, q: Tensor):
            return (y, s, q, _bn_tensors(params, i)[1:], st.bn)

        for i, st in enumerate(spec.stages):
            w = params[6 * i]
            y, s, q = backends.op(be, "conv_stats")(inp, w, pre[0], pre[1], pre[2], *st.conv.args())
            ys.append(y)
            if i == n_stages - 1:
                # finalized below, with the downsample's BN when there is one (under
                # SyncBatchNorm: one all-reduce for both)
                parts = [part(i, st, y, s, q)]
                break
            *st4, gn = _finalize(be, spec.group, [part(i, st, y, s, q)])[0]
            stats.append(tuple(st4))
            counts.append(gn)
            inp, pre = y, (st4[2], st4[3], True)

        res, res_scale, res_shift, offset = None, None, None, 0
        yd, dstats = None, None
        if spec.shortcut == "identity":
            res = x
        elif spec.shortcut == "tensor":
            res = shortcut_in
        elif spec.shortcut == "option_a":
            s = spec.option_a_stride
            res = x[:, :, ::s, ::s] if s > 1 else x
            offset = (ys[-1].shape[1] - x.shape[1]) // 2
        elif spec.shortcut == "downsample":
            st = spec.downsample
            yd, s, q = backends.op(be, "conv_stats")(
                x, params[6 * n_stages], None, None, False, *st.conv.args()
            )
            parts.append(part(n_stages, st, yd, s, q))
        finalized = _finalize(be, spec.group, parts)
        stats.append(tuple(finalized[0][:4]))
        counts += [f[4] for f in finalized]
        if yd is not None:
            dstats = tuple(finalized[1][:4])
            res, res_scale, res_shift = yd, dstats[2], dstats[3]
        mean, invstd, scale, shift = stats[-1]
        out = backends.op(be, "bn_add_relu")(
            ys[-1], scale, shift, res, res_scale, res_shift, offset, spec.relu
        )

        ctx.spec = spec
        ctx.x_shape = x.shape
        flat_stats = [t for st in stats for t in st]
        dflat = list(dstats) if dstats is not None else []
        weights = [params[6 * i] for i in range(n_stages)]
        gammas = [params[6 * i + 1] for i in range(n_stages)]
        extra = [params[6 * n_stages], params[6 * n_stages + 1]] if yd is not None else []
        ctx.save_for_backward(
            x, out if spec.relu else None, yd, *ys, *flat_stats, *dflat, *weights, *gammas, *extra
        )
        ctx.n_stages = n_stages
        ctx.has_gamma = [g is not None for g in gammas]
        ctx.counts = counts  # SyncBatchNorm: stages' global counts, then the downsample's
        return out

    @staticmethod
    def backward(ctx, grad_out):
        spec: _UnitSpec = ctx.spec
        be = spec.backend
        n = ctx.n_stages
        saved = list(ctx.saved_tensors)
        x, out, yd = saved[0], saved[1], saved[2]
        ys = saved[3 : 3 + n]
        k = 3 + n
        stats = [tuple(saved[k + 4 * i : k + 4 * i + 4]) for i in range(n)]
        k += 4 * n
        dstats = None
        if yd is not None:
            dstats = tuple(saved[k : k + 4])
            k += 4
        weights = saved[k : k + n]
        gammas = saved[k + n : k + 2 * n]
        k += 2 * n
        wd, gd = (saved[k], saved[k + 1]) if yd is not None else (None, None)

        fmt = _fmt(ys[-1])
        grad_out = grad_out.contiguous(memory_format=fmt)
        mean, invstd, _, _ = stats[-1]
        res_mean, res_invstd = (dstats[0], dstats[1]) if dstats else (None, None)
        if spec.group is None:
            (dy, dgamma, dbeta, dres, dgd, dbd) = backends.op(be, "bn_add_relu_bwd")(
                grad_out, out, ys[-1], mean, invstd, gammas[-1], yd, res_mean, res_invstd, gd
            )
        else:
            # SyncBatchNorm: this process's sums, all-reduced, then the elementwise pass with the
            # global means. The parameter gradients are this process's sums (DDP averages them).
            dbeta, dgamma, dgd = backends.op(be, "bn_add_relu_bwd_reduce")(
                grad_out, out, ys[-1], mean, invstd, yd, res_mean, res_invstd
            )
            dbd = dbeta.clone() if yd is not None else None  # never one tensor for two grads
            c = dbeta.shape[0]
            g_means = (
                _all_reduce_sum(torch.cat([dbeta, dgamma, dgd]), spec.group) / ctx.counts[n - 1]
            )
            dy, dres = backends.op(be, "bn_add_relu_bwd_elemt")(
                grad_out,
                out,
                ys[-1],
                mean,
                invstd,
                gammas[-1],
                g_means[:c],
                g_means[c : 2 * c],
                yd,
                res_mean,
                res_invstd,
                gd,
                g_means[2 * c :] if yd is not None else None,
            )
        grads_params: list[Tensor | None] = [None] * (6 * n + (6 if yd is not None else 0))
        grads_params[6 * (n - 1) + 1] = dgamma if ctx.has_gamma[-1] else None
        grads_params[6 * (n - 1) + 2] = dbeta
        for i in range(n - 1, 0, -1):
            _, _, scale_p, shift_p = stats[i - 1]
            da, dw = backends.op(be, "conv_bwd")(
                dy,
                ys[i - 1],
                weights[i],
                scale_p,
                shift_p,
                True,
                *spec.stages[i].conv.args(),
                [True, True],
            )
            grads_params[6 * i] = dw
            mean_p, invstd_p, _, _ = stats[i - 1]
            dy, dgamma, dbeta = _bn_relu_backward(
                be,
                spec.group,
                ctx.counts[i - 1],
                da,
                ys[i - 1],
                mean_p,
                invstd_p,
                gammas[i - 1],
                scale_p,
                shift_p,
                True,
            )
            grads_params[6 * (i - 1) + 1] = dgamma if ctx.has_gamma[i - 1] else None
            grads_params[6 * (i - 1) + 2] = dbeta
        need_x = ctx.needs_input_grad[1]
        dx, dw0 = backends.op(be, "conv_bwd")(
            dy, x, weights[0], None, None, False, *spec.stages[0].conv.args(), [need_x, True]
        )
        grads_params[0] = dw0
        grad_shortcut = None
        if spec.shortcut == "downsample":
            dxd, dwd = backends.op(be, "conv_bwd")(
                dres, x, wd, None, None, False, *spec.downsample.conv.args(), [need_x, True]
            )
            grads_params[6 * n] = dwd
            grads_params[6 * n + 1] = dgd if gd is not None else None
            grads_params[6 * n + 2] = dbd
            if need_x:
                dx = dx.add_(dxd)  # dx is conv_bwd's fresh output: no new buffer
        elif spec.shortcut == "identity":
            if need_x:
                dx = dx.add_(dres)
        elif spec.shortcut == "option_a":
            if need_x:
                s = spec.option_a_stride
                c0 = (ys[-1].shape[1] - x.shape[1]) // 2
                dx = dx.clone() if dx._base is not None else dx
                sub = dx[:, :, ::s, ::s] if s > 1 else dx
                sub.add_(dres[:, c0 : c0 + x.shape[1]])
        elif spec.shortcut == "tensor":
            grad_shortcut = dres
        return (None, dx if need_x else None, grad_shortcut, *grads_params)


def inner_relu_decisions(out: Tensor) -> list[Tensor] | None:
    """The decisions (``> 0`` masks) of the ReLUs between the convolutions of the training-mode
    unit that produced ``out``, as the fused path takes them (``not dtype(y*scale + shift) <= 0``,
    the prologue's and bn_relu_bwd's mask), recomputed from what its backward saved; None when
    ``out`` did not come from :func:`residual_unit`. For the parity harness: judging a run
    against float64 math that takes the run's own decisions (``fastres.parity``)."""
    fn = out.grad_fn
    if fn is None or type(fn).__name__ != "_ResidualUnitFnBackward":
        return None
    from fastres.reference import _prologue  # noqa: PLC0415

    n = fn.n_stages
    saved = fn.saved_tensors  # x, out, yd, *ys, then (mean, invstd, scale, shift) per stage
    ys, stats = saved[3 : 3 + n], saved[3 + n : 3 + 5 * n]
    return [
        ~(_prologue(ys[i], stats[4 * i + 2], stats[4 * i + 3], relu=False).detach() <= 0)
        for i in range(n - 1)
    ]


def residual_unit(
    x: Tensor,
    stages: Sequence[Stage],
    params: Sequence[
        tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]
    ],
    shortcut: str = "identity",
    downsample: tuple[Stage, tuple] | None = None,
    shortcut_tensor: Tensor | None = None,
    option_a_stride: int = 2,
    relu: bool = True,
    backend: str | None = None,
    process_group: object = None,
) -> Tensor:
    """Training forward of ``relu?(BN_k(conv_k(... relu(BN_1(conv_1(x))) ...)) + shortcut)``.

    Every BatchNorm uses batch statistics and updates its running statistics in place (as
    ``nn.BatchNorm2d`` in training mode). Under autocast ``x``, the conv weights and
    ``shortcut_tensor`` are cast to the autocast dtype (the output has that dtype) and the BN
    tensors are used as they are. Differentiable with respect to ``x``, every conv weight
    and BN weight/bias, and ``shortcut_tensor``.

    Args:
        x: ``(N, C, H, W)`` input.
        stages: per conv+BN stage, its :class:`Stage` hyper-parameters.
        params: per stage, ``(conv_weight, bn_weight, bn_bias, running_mean, running_var,
            num_batches_tracked)`` (BN entries may be None: affine=False or no running stats).
        shortcut: ``"identity"`` (add x), ``"downsample"`` (add BN_d(conv_d(x))), ``"option_a"``
            (add x subsampled by ``option_a_stride`` with zero-padded channels), ``"tensor"``
            (add ``shortcut_tensor``, any module's output) or ``"none"``.
        downsample: ``(Stage, params)`` of the downsample branch when ``shortcut="downsample"``.
        process_group: SyncBatchNorm: a ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``) over whose processes every BatchNorm of the unit
            computes its batch statistics, as ``nn.SyncBatchNorm``: one all-reduce of the
            per-channel (sum, sum of squares, count) per BatchNorm in the forward (the last one
            and the downsample's share one) and one of the two per-channel gradient sums in the
            backward. BN weight/bias gradients are this process's, as nn.SyncBatchNorm's (DDP
            averages them). Every process of the group must call it the same number of times; a
            process may bring an empty batch (it adds zero sums and a zero count).
    """
    ac = autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if ac is not None:
        # Conv inputs and weights in the autocast dtype; BN parameters and buffers as they are.
        x, shortcut_tensor = _autocast(x, ac), _autocast(shortcut_tensor, ac)
        params = [(_autocast(p[0], ac), *p[1:]) for p in params]
        if downsample is not None:
            downsample = (downsample[0], (_autocast(downsample[1][0], ac), *downsample[1][1:]))
        with torch.autocast(x.device.type, enabled=False):
            return residual_unit(
                x,
                stages,
                params,
                shortcut,
                downsample,
                shortcut_tensor,
                option_a_stride,
                relu,
                backend,
                process_group,
            )
    if not stages:
        raise ValueError("residual_unit needs at least one stage")
    if shortcut not in ("none", "identity", "downsample", "option_a", "tensor"):
        raise ValueError(f"unknown shortcut {shortcut!r}")
    if (shortcut == "downsample") != (downsample is not None):
        raise ValueError("shortcut='downsample' and the downsample argument go together")
    if (shortcut == "tensor") != (shortcut_tensor is not None):
        raise ValueError("shortcut='tensor' and shortcut_tensor go together")
    weights = [p[0] for p in params]
    convs = [s.conv for s in stages]
    check_input(x, weights[0], "fastres.residual_unit")
    if downsample is not None:
        weights.append(downsample[1][0])
        convs.append(downsample[0].conv)
    b = select_backend(x, weights, convs, backend)
    if process_group is not None and _world_size(process_group) < 2:
        process_group = None  # nothing to sync with (as nn.SyncBatchNorm)
    flat: list[Tensor | None] = [t for p in params for t in p]
    if downsample is not None:
        flat.extend(downsample[1])
    spec = _UnitSpec(
        tuple(stages),
        downsample[0] if downsample else None,
        shortcut,
        option_a_stride,
        relu,
        b.name,
        process_group,
    )
    return _ResidualUnitFn.apply(spec, x, shortcut_tensor, *flat)
