"""A residual unit's training step from C++ (:func:`unit_call`): the same ops, order and saved
tensors as fastres._autograd._ResidualUnitFn, launched by one C++ call for the forward and one
for the backward (csrc/cpu/unit_cpu.h, csrc/cuda/unit.h) instead of one torch.ops call per op,
the unit recorded in the autograd graph by one more (grad_node, csrc/grad_node.h) instead of a
``torch.autograd.Function`` (its ``apply`` over 19-25 tensors and ``save_for_backward``).

For the CPU backend, the CUDA backend (and cudasim, its kernels on the CPU) and the Triton
backend (whose ``unit_forward`` and ``unit_backward`` replay the per-op path's launches per shape
class, triton_kernels/unit.py), one process's batch statistics (no SyncBatchNorm), the identity,
downsample or no shortcut, eager calls under no dispatch mode (fastres.functional.residual_unit
decides); everything else runs _ResidualUnitFn."""

from __future__ import annotations

import torch
from torch import Tensor

from fastres._autograd import PER_STAGE, _UnitSpec

__all__ = ["SHORTCUTS", "backward", "c_spec", "unit_call"]

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


def unit_call(entry, node, spec: _UnitSpec, x: Tensor, params, cs=None) -> Tensor:
    """_ResidualUnitFn's forward as one C++ call (``entry`` = the extension's (unit_spec,
    unit_forward, unit_backward)), recorded in the autograd graph by ``node`` (grad_node,
    csrc/grad_node.h) when a gradient can flow: its inputs are ``x`` and ``params`` (six per
    stage, the running statistics among them, which get no gradient), its backward one C++ call
    (:func:`backward`). ``cs``: ``c_spec(spec, ...)`` when the caller keeps it (a training
    plan: hashing the spec per call costs ~5 µs)."""
    make, forward, backward_c = entry
    if cs is None:
        cs = c_spec(spec, make)
    n = len(spec.stages)
    res = forward(cs, x, params)
    out, yd = res[0], res[1]
    if not torch.is_grad_enabled():  # BatchNorm recalibration under no_grad: nothing to keep
        return out
    # _Saved.flat()'s layout, from the forward's results in one tuple (no per-stage objects):
    # x, out (None without the ReLU), yd, ys[n], stats[4n], (dstats[4], wd, gd), weights[n],
    # gammas[n]
    k = PER_STAGE * n
    if yd is None:
        saved = (x, out if spec.relu else None, None, *res[2 : 2 + 5 * n],
                 *params[0:k:PER_STAGE], *params[1:k:PER_STAGE])
    else:
        saved = (x, out if spec.relu else None, yd, *res[2:], params[k], params[k + 1],
                 *params[0:k:PER_STAGE], *params[1:k:PER_STAGE])
    node(backward, (backward_c, cs, n + (yd is not None), n), "ResidualUnitBackward", (out,),
         (x, *params), saved)
    return out


def backward(meta: tuple, grads: tuple, saved: tuple, needs: tuple) -> list:
    """The gradients of (x, *params) from the unit output's: one C++ call (unit_backward)."""
    backward_c, cs, n_convs, _ = meta
    grad_out = grads[0]
    if grad_out is None:
        return [None] * len(needs)
    need_x = needs[0]
    g = backward_c(cs, grad_out, saved, need_x)
    # g: dx, then per stage (dw, dgamma, dbeta); the running statistics get none.
    flat = [g[0] if need_x else None]
    for i in range(n_convs):
        flat += [*g[1 + 3 * i : 4 + 3 * i], None, None, None]
    return flat


assert PER_STAGE == 6  # (weight, gamma, beta, running_mean, running_var, num_batches_tracked)
