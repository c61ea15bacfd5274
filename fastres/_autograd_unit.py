"""A residual unit's training step from C++ (:class:`UnitDirectFn`): the same ops, order and
saved tensors as fastres._autograd._ResidualUnitFn, launched by one C++ call for the forward and
one for the backward (csrc/cuda/unit.h) instead of one torch.ops call per op.

For the CUDA backend (and cudasim, its kernels on the CPU), one process's batch statistics (no
SyncBatchNorm), the identity, downsample or no shortcut, eager calls under no dispatch mode
(fastres.functional.residual_unit decides); everything else runs _ResidualUnitFn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastres._autograd import PER_STAGE, StageParams, _Saved, _UnitSpec

__all__ = ["SHORTCUTS", "UnitDirectFn", "c_spec"]

#: The shortcuts the C++ unit runs, by its code.
SHORTCUTS = {"none": 0, "identity": 1, "downsample": 2}

_SPECS: dict = {}


def c_spec(spec: _UnitSpec, make):
    """The C++ unit spec of ``spec`` (``make`` = the extension's unit_spec), made once."""
    cs = _SPECS.get(spec)
    if cs is None:
        stages = (*spec.stages, *((spec.downsample,) if spec.downsample is not None else ()))
        cs = make(len(spec.stages), SHORTCUTS[spec.shortcut], spec.relu, tuple(
            (*st.conv.stride, *st.conv.padding, *st.conv.dilation, st.conv.groups, st.bn.eps,
             st.bn.momentum) for st in stages))
        _SPECS[spec] = cs
    return cs


class UnitDirectFn(torch.autograd.Function):
    """_ResidualUnitFn's forward and backward, each one C++ call (``entry`` = the extension's
    (unit_spec, unit_forward, unit_backward))."""

    @staticmethod
    def forward(ctx, entry, spec: _UnitSpec, x: Tensor, *params):
        make, forward, _ = entry
        cs = c_spec(spec, make)
        n = len(spec.stages)
        res = forward(cs, x, params)
        out, yd = res[0], res[1]
        ys = list(res[2 : 2 + n])
        flat_stats = res[2 + n : 2 + 5 * n]
        stats = [tuple(flat_stats[4 * i : 4 * i + 4]) for i in range(n)]
        dstats = tuple(res[2 + 5 * n :]) if yd is not None else None
        sp = [StageParams.of(params, i) for i in range(n)]
        ds = StageParams.of(params, n) if yd is not None else None
        saved = _Saved(x, out if spec.relu else None, yd, ys, stats, dstats,
                       [p.weight for p in sp], [p.gamma for p in sp],
                       ds.weight if ds is not None else None,
                       ds.gamma if ds is not None else None)
        ctx.save_for_backward(*saved.flat())
        ctx.entry, ctx.cs, ctx.n_stages = entry, cs, n
        ctx.has_ds = yd is not None
        ctx.has_gamma = [p.gamma is not None for p in sp]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need_x = ctx.needs_input_grad[2]
        g = ctx.entry[2](ctx.cs, grad_out, tuple(ctx.saved_tensors), need_x)
        # g: dx, then per stage (dw, dgamma, dbeta); the running statistics get none.
        flat = []
        for i in range(ctx.n_stages + ctx.has_ds):
            flat += [*g[1 + 3 * i : 4 + 3 * i], None, None, None]
        flat = [g if need else None
                for g, need in zip(flat, ctx.needs_input_grad[3:], strict=True)]
        return (None, None, g[0] if need_x else None, *flat)


assert PER_STAGE == 6  # (weight, gamma, beta, running_mean, running_var, num_batches_tracked)
