"""Fake (meta) kernels of the compiled ops, so torch.compile and torch.export see through them.

Each returns empty tensors with the shapes, dtypes and memory formats the real kernels produce.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastres._opset import OP_NAMES
from fastres.reference import acc_dtype

#: op name -> its fake. register_fakes(namespace) registers them for the ops of one namespace
#: with these schemas: fastres (fastres._C, fastres/_ext.py) and fastres_cudasim (the CUDA
#: launchers on CPU tensors, fastres._C_cudasim), each once its extension has loaded.
FAKES: dict = {}


def _fake(name: str):
    def deco(fn):
        FAKES[name] = fn
        return fn

    return deco


def register_fakes(namespace: str) -> None:
    """Register every fake above for ``namespace::<op>`` too (its schemas must be loaded)."""
    missing = set(OP_NAMES) ^ set(FAKES)
    assert not missing, f"fakes and the op set differ: {sorted(missing)}"
    for name, fn in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}")(fn)


def _conv_out_shape(input: Tensor, weight: Tensor, stride, padding, dilation) -> list:
    n, _, h, w = input.shape
    k, _, r, s = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return [n, k, ho, wo]


def _like_format(shape, ref: Tensor, dtype=None) -> Tensor:
    fmt = (
        torch.channels_last
        if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous()
        else torch.contiguous_format
    )
    return torch.empty(shape, dtype=dtype or ref.dtype, device=ref.device, memory_format=fmt)


def _vec(ref: Tensor, c: int) -> Tensor:
    return torch.empty(c, dtype=acc_dtype(ref.dtype), device=ref.device)


@_fake("conv_bias_act")
def _(input, weight, bias, residual, stride, padding, dilation, groups, relu, scale=None,
      bn_mean=None, bn_var=None, bn_eps=0.0):
    return _like_format(_conv_out_shape(input, weight, stride, padding, dilation), input)


@_fake("relu_bias_bwd")
def _(grad_out, out):
    return _like_format(grad_out.shape, grad_out), _vec(grad_out, grad_out.shape[1])


@_fake("conv_stats")
def _(input, weight, pre_scale, pre_shift, pre_relu, stride, padding, dilation, groups):
    out = _like_format(_conv_out_shape(input, weight, stride, padding, dilation), input)
    k = weight.shape[0]
    return out, _vec(input, k), _vec(input, k)


def _finalize_outputs(sum: Tensor) -> tuple[Tensor, ...]:
    """(mean, invstd, scale, shift): one value per channel, in the sums' dtype."""
    return tuple(torch.empty(sum.shape[0], dtype=sum.dtype, device=sum.device) for _ in range(4))


@_fake("bn_finalize")
def _(sum, sumsq, *args):
    return _finalize_outputs(sum)


@_fake("bn_add_relu")
def _(input, scale, shift, residual, res_scale, res_shift, res_channel_offset, relu):
    return _like_format(input.shape, input)


@_fake("bn_add_relu_bwd")
def _(grad_out, out, input, mean, invstd, weight, res_input, res_mean, res_invstd, res_weight):
    c = input.shape[1]
    grad_input = _like_format(input.shape, input)
    if res_input is None:
        # two distinct empty tensors: outputs of a non-aliasing schema must not alias each other
        return (
            grad_input,
            mean.new_empty(c),
            mean.new_empty(c),
            _like_format(grad_out.shape, grad_out),
            mean.new_empty(0),
            mean.new_empty(0),
        )
    cr = res_input.shape[1]
    return (
        grad_input,
        mean.new_empty(c),
        mean.new_empty(c),
        _like_format(res_input.shape, res_input),
        mean.new_empty(cr),
        mean.new_empty(cr),
    )


@_fake("bn_relu_bwd")
def _(grad_out, input, mean, invstd, weight, scale, shift, relu):
    c = input.shape[1]
    return _like_format(input.shape, input), mean.new_empty(c), mean.new_empty(c)


@_fake("conv_bwd")
def _(
    grad_out,
    input,
    weight,
    pre_scale,
    pre_shift,
    pre_relu,
    stride,
    padding,
    dilation,
    groups,
    output_mask,
):
    gi = _like_format(input.shape, input) if output_mask[0] else input.new_empty(0)
    gw = torch.empty_like(weight) if output_mask[1] else weight.new_empty(0)
    return gi, gw


@_fake("bn_finalize_count")
def _(sum, sumsq, count, *args):
    return _finalize_outputs(sum)


@_fake("bn_add_relu_bwd_reduce")
def _(grad_out, out, input, mean, invstd, res_input, res_mean, res_invstd):
    c = input.shape[1]
    cr = res_input.shape[1] if res_input is not None else 0
    return mean.new_empty(c), mean.new_empty(c), mean.new_empty(cr)


@_fake("bn_add_relu_bwd_elemt")
def _(
    grad_out,
    out,
    input,
    mean,
    invstd,
    weight,
    mean_g,
    mean_g_xhat,
    res_input,
    res_mean,
    res_invstd,
    res_weight,
    res_mean_g_xhat,
):
    grad_res = (
        _like_format(grad_out.shape, grad_out)
        if res_input is None
        else _like_format(res_input.shape, res_input)
    )
    return _like_format(input.shape, input), grad_res


@_fake("bn_relu_bwd_reduce")
def _(grad_out, input, mean, invstd, scale, shift, relu):
    c = input.shape[1]
    return mean.new_empty(c), mean.new_empty(c)


@_fake("bn_relu_bwd_elemt")
def _(grad_out, input, mean, invstd, weight, scale, shift, relu, mean_g, mean_g_xhat):
    return _like_format(input.shape, input)
