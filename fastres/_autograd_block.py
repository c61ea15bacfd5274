"""A residual block's eval call with autograd, as one autograd Function (:class:`BlockEvalFn`).

The forward is one call into the CUDA extension (``block_eval(..., keep=True)``, see
csrc/cuda/block_py.h): each convolution's launcher from C++, its BatchNorm (running statistics)
in the epilogue, the block's inner outputs kept for the backward. The backward chains each
convolution's gradients (fastres._autograd.conv_bias_act_grads, made of fastres ops) from the
last convolution to the first, the shortcut's into the input's. One Function per block instead
of one per convolution: the host path of grad-enabled eval (Grad-CAM, fine-tuning with frozen
BatchNorm statistics) costs one Function call and one C++ call per block.

Called by fastres/nn/eval_plan.py for eager calls under no dispatch mode; nothing here chooses a
backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastres._autograd import conv_bias_act_grads

__all__ = ["BlockEvalFn", "TENSORS_PER_CONV"]

#: Per convolution, in the plan's order (main path, then the downsample): conv weight, BN bias,
#: BN weight, running mean, running var.
TENSORS_PER_CONV = 5


class BlockEvalFn(torch.autograd.Function):
    """relu(conv_n(... relu(conv_1(x)) ...) + shortcut(x)) with eval BatchNorms, differentiable
    in ``x`` and every conv/BN tensor (the running statistics too, as torchvision's eval
    BatchNorm is)."""

    @staticmethod
    def forward(ctx, meta: tuple, x: Tensor, *ts):
        """``meta``: (block_eval, its spec, the ConvSpecs, the BatchNorms' eps, the number of
        main convolutions, the backend's name), fixed by the block's plan."""
        run, spec = meta[0], meta[1]
        outs = run(spec, x, ts, True)
        ctx.meta = meta
        ctx.save_for_backward(x, *outs, *ts)
        return outs[-1]

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        _, _, convs, eps, n_main, backend = ctx.meta
        n_convs = len(convs)
        has_ds = n_convs > n_main
        x = saved[0]
        outs = saved[1 : 1 + n_convs]  # h_1 .. h_{n_main-1}, (downsample), output
        ts = saved[1 + n_convs :]
        hs = (x, *outs[: n_main - 1])  # each main convolution's input
        nig = ctx.needs_input_grad[1:]  # x, then the tensors
        grads: list[Tensor | None] = [None] * len(ts)

        def tensor_needs(i):
            return nig[1 + TENSORS_PER_CONV * i : 1 + TENSORS_PER_CONV * (i + 1)]

        # The input of main convolution i needs a gradient when x or any earlier tensor does.
        upstream = [nig[0]]
        for i in range(n_main - 1):
            upstream.append(upstream[-1] or any(tensor_needs(i)))

        def conv_grads(i, g, inp, out, need_in, residual):
            w, b, gamma, mean, var = ts[TENSORS_PER_CONV * i : TENSORS_PER_CONV * (i + 1)]
            nw, nb, ng, nm, nv = tensor_needs(i)
            gx, gw, gb, gr, gs, gm, gv = conv_bias_act_grads(
                backend, convs[i], eps[i], g, inp, w, out, gamma, mean, var,
                (need_in, nw, nb, residual, ng, nm, nv), None if b is None else b.dtype)
            grads[TENSORS_PER_CONV * i : TENSORS_PER_CONV * (i + 1)] = [gw, gb, gs, gm, gv]
            return gx, gr

        last = n_main - 1
        g, g_res = conv_grads(last, grad_out, hs[last], outs[-1], upstream[last], nig[0] or (
            has_ds and any(tensor_needs(n_main))))
        for i in range(last - 1, -1, -1):
            if g is None:  # nothing before this convolution needs a gradient
                break
            g, _ = conv_grads(i, g, hs[i], outs[i], upstream[i], False)
        gx = g
        if g_res is not None:
            if has_ds:
                g_res, _ = conv_grads(n_main, g_res, x, None, nig[0], False)
            if nig[0] and g_res is not None:
                gx = g_res if gx is None else gx + g_res
        return (None, gx if nig[0] else None, *grads)
