"""A residual block's eval call with autograd: one C++ call for the forward, one node in the
autograd graph (:func:`block_call`).

The forward is one call into the CUDA extension (``block_eval(..., keep=True)``, see
csrc/cuda/block_py.h): each convolution's launcher from C++, its BatchNorm (running statistics)
in the epilogue, the block's inner outputs kept for the backward. A second C++ call,
``grad_node`` (csrc/grad_node.h), records the block as one node of the autograd graph whose
backward is :func:`backward`: it chains each convolution's gradients
(fastres._autograd.conv_bias_act_grads, made of fastres ops) from the last convolution to the
first, the shortcut's into the input's. The node keeps its tensors as saved variables, so an
in-place change to one of them before the backward fails there, as it does for torchvision's
block. Why not a ``torch.autograd.Function``: its ``apply`` with a block's 15-20 tensors, its
``save_for_backward`` and the graph's teardown cost ~11 µs of host time per call (cudasim, the
2-CPU AMD EPYC), of a 25 µs budget per block for grad-enabled eval (Grad-CAM, fine-tuning with
frozen BatchNorm statistics).

Called by fastres/nn/eval_plan.py for eager calls under no dispatch mode; nothing here chooses a
backend.
"""

from __future__ import annotations

from torch import Tensor

from fastres._autograd import conv_bias_act_grads

__all__ = ["TENSORS_PER_CONV", "backward", "block_call"]

#: Per convolution, in the plan's order (main path, then the downsample): conv weight, BN bias,
#: BN weight, running mean, running var.
TENSORS_PER_CONV = 5


def block_call(run, node, spec, convs, eps, n_main: int, backend: str):
    """The block's eval call with autograd, ``call(x, *ts)``: ``run`` (block_eval) for the
    forward, ``node`` (grad_node) to record it. ``convs``: each convolution's ConvSpec (main
    path, then the downsample), ``eps`` its BatchNorm's, ``backend`` the name of the backend
    whose ops compute the gradients."""
    meta = (convs, eps, n_main, backend)

    def call(x: Tensor, *ts):
        outs = run(spec, x, ts, True)
        out = outs[-1]
        node(backward, meta, "BlockEvalBackward", (out,), (x, *ts), (x, *outs, *ts))
        return out

    call.parts = (run, node, spec, meta)  # for fastres.nn.fast_path, which writes call out
    return call


def backward(meta: tuple, grads: tuple, saved: tuple, needs: tuple) -> list:
    """The gradients of (x, *ts) from the block output's: ``saved`` is (x, h_1 .. h_{n_main-1},
    (the downsample's output), output, *ts), ``needs`` per input whether its gradient is
    wanted."""
    grad_out = grads[0]
    convs, eps, n_main, backend = meta
    if grad_out is None:
        return [None] * len(needs)
    n_convs = len(convs)
    has_ds = n_convs > n_main
    x = saved[0]
    outs = saved[1 : 1 + n_convs]  # h_1 .. h_{n_main-1}, (downsample), output
    ts = saved[1 + n_convs :]
    hs = (x, *outs[: n_main - 1])  # each main convolution's input
    nig = needs  # x, then the tensors
    grads_t: list[Tensor | None] = [None] * len(ts)

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
        grads_t[TENSORS_PER_CONV * i : TENSORS_PER_CONV * (i + 1)] = [gw, gb, gs, gm, gv]
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
    return [gx if nig[0] else None, *grads_t]
