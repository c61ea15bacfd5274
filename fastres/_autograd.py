"""The autograd Functions of the fused paths, their backward made of fastres ops.

* :class:`_ConvBiasActFn`: ``conv_bias_act`` (inference op) with gradients: ``relu_bias_bwd``
  then ``conv_bwd``;
* :class:`_ResidualUnitFn`: a residual unit in training: a chain of convolutions with batch
  statistics (``conv_stats``, ``bn_finalize``; each inner BN + ReLU applied as the next
  convolution's prologue and never stored), the last BN + shortcut + ReLU in one pass
  (``bn_add_relu``), and the backward family (``bn_add_relu_bwd``, ``bn_relu_bwd``,
  ``conv_bwd``); under SyncBatchNorm the statistics and gradient sums are all-reduced between
  the split ops.

Called by :mod:`fastres.functional`, which picks the backend; nothing here chooses one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastres import backends
from fastres._specs import ConvSpec, Stage
from fastres.reference import _prologue

__all__ = ["PER_STAGE", "StageParams", "inner_relu_decisions", "memory_format_of"]


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is channels_last-contiguous and not contiguous, else contiguous:
    the format every op's output takes from its input."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_batch_stats_count(x_shape: Sequence[int], count: int) -> None:
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(x_shape)}"
        )


class _ConvBiasActFn(torch.autograd.Function):
    """conv_bias_act with a backward made of fastres ops (relu_bias_bwd, conv_bwd).

    With ``scale`` (out = act(conv(x, W) * s + b + r), a BatchNorm not folded into W), one
    conv_bwd with the weight W * s gives both gradients: the data gradient is linear in the
    weight (dgrad(g, W * s) = dgrad(g * s, W)), and the weight gradient G = wgrad(g, x) does not
    depend on it; then dW = s * G and ds[k] = sum(W[k] * G[k]) (conv(x, W) is linear in W, so
    sum over the output of g * conv(x, W) = <G, W>): no extra convolution, nothing saved but x.

    With ``bn`` = (mean, var, eps) the BatchNorm itself is in the forward's epilogue (one launch):
    ``scale`` and ``bias`` are its gamma and beta, s = gamma / sqrt(var + eps) and t = beta -
    mean * s. The backward recomputes s from the saved tensors and chains ds and dt = db to
    dgamma = (ds - mean * dt) / sqrt(var + eps), dbeta = dt (and to mean and var, should they
    require gradients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, conv: ConvSpec, relu: bool, backend: str,
                scale=None, bn_mean=None, bn_var=None, bn_eps: float = 0.0):
        op = backends.op(backend, "conv_bias_act")
        args = (x, weight, bias, residual, *conv.args(), relu)
        if bn_var is not None:
            out = op(*args, scale, bn_mean, bn_var, float(bn_eps))
        else:
            out = op(*args) if scale is None else op(*args, scale)
        ctx.conv, ctx.relu, ctx.backend, ctx.bn_eps = conv, relu, backend, bn_eps
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, out if relu else None, scale, bn_mean, bn_var)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out, scale, bn_mean, bn_var = ctx.saved_tensors
        nig = (*ctx.needs_input_grad, *(False,) * 11)  # a call without the bn arguments
        grads = conv_bias_act_grads(
            ctx.backend, ctx.conv, ctx.bn_eps, grad_out, x, weight, out, scale, bn_mean, bn_var,
            (nig[0], nig[1], ctx.has_bias and nig[2], ctx.has_residual and nig[3], nig[7],
             nig[8], nig[9]), ctx.bias_dtype)
        gx, gw, gb, gr, gs, gm, gv = grads
        return gx, gw, gb, gr, None, None, None, gs, gm, gv, None


def conv_bias_act_grads(be: str, conv: ConvSpec, bn_eps: float, grad_out: Tensor, x: Tensor,
                        weight: Tensor, out: Tensor | None, scale: Tensor | None,
                        bn_mean: Tensor | None, bn_var: Tensor | None, needs,
                        bias_dtype: torch.dtype | None) -> tuple:
    """The gradients of ``out = act(conv(x, weight) * s + t + residual)`` (see _ConvBiasActFn):
    ``needs`` says which of (x, weight, bias, residual, scale, bn_mean, bn_var) are wanted;
    ``out``: the output when a ReLU was applied (its mask), else None. Returns those seven, None
    where not wanted."""
    need_x, need_w, need_b, need_r, need_scale, need_mean, need_var = needs
    grad_z, grad_bias = backends.op(be, "relu_bias_bwd")(
        grad_out.contiguous(memory_format=memory_format_of(x)), out
    )
    bn = bn_var is not None
    # ds is needed for the scale, or (BatchNorm) for gamma, mean or var
    need_s = (scale is not None and need_scale) or (bn and (need_mean or need_var))
    acc = grad_bias.dtype
    s = scale
    if bn:
        inv = torch.rsqrt(bn_var.to(acc) + bn_eps)
        s = inv * scale.to(acc) if scale is not None else inv
    grad_x = grad_w = grad_s = None
    if need_x or need_w or need_s:
        w = weight
        if s is not None:
            s4 = s.reshape(-1, 1, 1, 1)
            w = (weight.to(s.dtype) * s4).to(weight.dtype).contiguous(
                memory_format=memory_format_of(weight))
        gx, gw = backends.op(be, "conv_bwd")(
            grad_z, x, w, None, None, False, *conv.args(), [need_x, need_w or need_s]
        )
        grad_x = gx if need_x else None
        if s is None:
            grad_w = gw if need_w else None
        else:
            g = gw.to(s.dtype)
            grad_w = (g * s4).to(weight.dtype) if need_w else None
            grad_s = (g * weight.to(s.dtype)).sum(dim=(1, 2, 3)) if need_s else None
    grad_b = grad_bias.to(bias_dtype) if need_b and bias_dtype is not None else None
    grad_r = grad_z if need_r else None
    grad_scale = grad_mean = grad_var = None
    if not bn:
        grad_scale = grad_s
    elif grad_s is not None:
        mean = bn_mean.to(acc)
        ds = grad_s - mean * grad_bias  # t = beta - mean * s also depends on s
        if scale is not None and need_scale:
            grad_scale = (ds * inv).to(scale.dtype)
        if need_mean:
            grad_mean = (-s * grad_bias).to(bn_mean.dtype)
        if need_var:  # ds/dvar = -s / (2 (var + eps))
            grad_var = (ds * s * inv * inv * -0.5).to(bn_var.dtype)
    return grad_x, grad_w, grad_b, grad_r, grad_scale, grad_mean, grad_var


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


#: What ``_ResidualUnitFn.apply`` takes per stage (and the downsample), flattened so that autograd
#: sees every tensor: the conv weight, then the BatchNorm's weight, bias, running_mean,
#: running_var and num_batches_tracked (None where the layer has none).
PER_STAGE = 6


class StageParams(NamedTuple):
    weight: Tensor
    gamma: Tensor | None
    beta: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    @staticmethod
    def of(params: Sequence[Tensor | None], i: int) -> StageParams:
        return StageParams(*params[PER_STAGE * i : PER_STAGE * (i + 1)])

    def bn(self) -> tuple:
        """What bn_finalize takes of the BatchNorm: (weight, bias, running_mean, running_var,
        num_batches_tracked)."""
        return tuple(self[1:])


@dataclass
class _Saved:
    """What a unit's forward saves for its backward (ctx.save_for_backward takes a flat list):
    the input, the block output (its ReLU mask; None without the final ReLU), the downsample's
    conv output, each stage's conv output and (mean, invstd, scale, shift), the downsample's
    statistics, the conv and BN weights (and the downsample's)."""

    x: Tensor
    out: Tensor | None
    yd: Tensor | None
    ys: list[Tensor]
    stats: list[tuple[Tensor, Tensor, Tensor, Tensor]]
    dstats: tuple[Tensor, Tensor, Tensor, Tensor] | None
    weights: list[Tensor]
    gammas: list[Tensor | None]
    wd: Tensor | None = None
    gd: Tensor | None = None

    def flat(self) -> list[Tensor | None]:
        out = [self.x, self.out, self.yd, *self.ys, *(t for st in self.stats for t in st)]
        if self.yd is not None:
            out += [*self.dstats, self.wd, self.gd]
        return out + [*self.weights, *self.gammas]

    @staticmethod
    def unflat(saved: Sequence[Tensor | None], n: int) -> _Saved:
        it = iter(saved)
        x, out, yd = next(it), next(it), next(it)
        ys = [next(it) for _ in range(n)]
        stats = [tuple(next(it) for _ in range(4)) for _ in range(n)]
        dstats = wd = gd = None
        if yd is not None:
            dstats = tuple(next(it) for _ in range(4))
            wd, gd = next(it), next(it)
        weights = [next(it) for _ in range(n)]
        gammas = [next(it) for _ in range(n)]
        return _Saved(x, out, yd, ys, stats, dstats, weights, gammas, wd, gd)


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
            return (y, s, q, StageParams.of(params, i).bn(), st.bn)

        for i, st in enumerate(spec.stages):
            w = StageParams.of(params, i).weight
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
                x, StageParams.of(params, n_stages).weight, None, None, False, *st.conv.args()
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
        stage_params = [StageParams.of(params, i) for i in range(n_stages)]
        ds = StageParams.of(params, n_stages) if yd is not None else None
        saved = _Saved(
            x,
            out if spec.relu else None,
            yd,
            ys,
            stats,
            dstats,
            [p.weight for p in stage_params],
            [p.gamma for p in stage_params],
            ds.weight if ds is not None else None,
            ds.gamma if ds is not None else None,
        )
        ctx.save_for_backward(*saved.flat())
        ctx.n_stages = n_stages
        ctx.has_gamma = [p.gamma is not None for p in stage_params]
        ctx.counts = counts  # SyncBatchNorm: stages' global counts, then the downsample's
        return out

    @staticmethod
    def backward(ctx, grad_out):
        spec: _UnitSpec = ctx.spec
        be = spec.backend
        n = ctx.n_stages
        sv = _Saved.unflat(ctx.saved_tensors, n)
        x, out, yd, ys, stats, dstats = sv.x, sv.out, sv.yd, sv.ys, sv.stats, sv.dstats
        weights, gammas, wd, gd = sv.weights, sv.gammas, sv.wd, sv.gd

        fmt = memory_format_of(ys[-1])
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
        # Per stage (and the downsample): [conv weight, BN weight, BN bias] gradients; the
        # running statistics get none.
        grads = [[None, None, None] for _ in range(n + (1 if yd is not None else 0))]
        grads[n - 1][1:] = [dgamma if ctx.has_gamma[-1] else None, dbeta]
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
            grads[i][0] = dw
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
            grads[i - 1][1:] = [dgamma if ctx.has_gamma[i - 1] else None, dbeta]
        need_x = ctx.needs_input_grad[1]
        dx, dw0 = backends.op(be, "conv_bwd")(
            dy, x, weights[0], None, None, False, *spec.stages[0].conv.args(), [need_x, True]
        )
        grads[0][0] = dw0
        grad_shortcut = None
        if spec.shortcut == "downsample":
            dxd, dwd = backends.op(be, "conv_bwd")(
                dres, x, wd, None, None, False, *spec.downsample.conv.args(), [need_x, True]
            )
            grads[n] = [dwd, dgd if gd is not None else None, dbd]
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
        flat = [g for stage in grads for g in (*stage, None, None, None)]
        # None for an input that needs none (a BatchNorm without affine parameters has no bias
        # to give dbeta to; a frozen parameter)
        flat = [g if need else None
                for g, need in zip(flat, ctx.needs_input_grad[3:], strict=True)]
        return (None, dx if need_x else None, grad_shortcut, *flat)


def inner_relu_decisions(out: Tensor) -> list[Tensor] | None:
    """The decisions (``> 0`` masks) of the ReLUs between the convolutions of the training-mode
    unit that produced ``out``, as the fused path takes them (``not dtype(y*scale + shift) <= 0``,
    the prologue's and bn_relu_bwd's mask), recomputed from what its backward saved; None when
    ``out`` did not come from :func:`residual_unit`. For the parity harness: judging a run
    against float64 math that takes the run's own decisions (``fastres.parity``)."""
    fn = out.grad_fn
    if fn is None:
        return None
    if type(fn).__name__ == "_ResidualUnitFnBackward":
        saved, n = fn.saved_tensors, fn.n_stages
    else:  # fastres._autograd_unit.unit_call's node (the same saved layout)
        state = _grad_node_state(fn)
        if state is None or state[0] != "ResidualUnitBackward":
            return None
        saved, n = state[2], state[1][3]
    sv = _Saved.unflat(saved, n)
    return [
        ~(_prologue(sv.ys[i], sv.stats[i][2], sv.stats[i][3], relu=False).detach() <= 0)
        for i in range(n - 1)
    ]


def _grad_node_state(fn):
    """(name, ctx, saved) of a node recorded by an extension's grad_node (csrc/grad_node.h),
    asked of each loaded extension (a node answers to the module that made it), else None."""
    import sys  # noqa: PLC0415

    for name in ("fastres._C", "fastres._C_cudasim"):
        mod = sys.modules.get(name)
        state = getattr(mod, "grad_node_state", lambda fn: None)(fn) if mod else None
        if state is not None:
            return state
    return None


