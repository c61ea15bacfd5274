"""Plain-PyTorch semantics of every fastres op and block.

This module is the oracle of the tests and the parity harness and the fallback of the dispatcher:
every backend (C++ CPU, CUDA C++, Triton) must agree with these functions within the tolerance
rule (see ``fastres.harness.rule``). Nobody redefines them elsewhere.

The functions take and return exactly what the ops in ``fastres/_opset.py`` take and return, with the
same argument names. They compute in the activations' dtype where PyTorch would (the convolution)
and in the accumulation dtype (float32, or float64 for float64 activations) for the per-channel
statistics, as ``nn.BatchNorm2d`` does; the per-channel sums are accumulated in float64 and then
rounded to it (see ``_channel_sum``).

Non-finite values (the rule of fastres/_opset.py): every function propagates NaN and Inf as the
PyTorch composition it replaces does. ReLU is ``torch.relu`` (NaN stays NaN), the ReLU masks of
the backwards are ``threshold_backward``'s (the gradient passes where the output is NaN), and the
batch statistics of a channel holding NaN or Inf are nn.BatchNorm2d's: mean NaN or +-Inf, var
NaN (Inf - Inf), and the running statistics follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres import _opset

#: The op set (fastres._opset), in its order: every backend implements each of these names.
OP_NAMES = _opset.OP_NAMES

__all__ = ["OP_NAMES", "acc_dtype", "bn_epilogue_vectors", *OP_NAMES, "option_a_shortcut"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel vectors for activations of ``dtype``: float64 or float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x: Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
        else torch.contiguous_format
    )


def _per_channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def _channel_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-channel sum over N, H, W, accumulated in float64 and rounded to ``dtype`` (default:
    the accumulation dtype of ``t``). float64 because the statistics feed var = E[x^2] - E[x]^2
    and the BN backward's means: summed in float32 by Inductor's generated loops, a compiled
    ResNet-50's training output had 3x eager's error (2.3e-4 vs 8.7e-5); in float64 it matches
    eager. The C++ CPU kernels accumulate in double too."""
    return t.sum(dim=(0, 2, 3), dtype=torch.float64).to(dtype or acc_dtype(t.dtype))


def _prologue(x: Tensor, scale: Tensor | None, shift: Tensor | None, relu: bool) -> Tensor:
    """a = relu?(x * scale[c] + shift[c]) computed in the accumulation dtype, stored as x.dtype."""
    if scale is None and shift is None and not relu:
        return x
    a = x.to(acc_dtype(x.dtype))
    if scale is not None:
        a = a * _per_channel(scale)
    if shift is not None:
        a = a + _per_channel(shift)
    if relu:
        a = torch.relu(a)
    return a.to(x.dtype)


def conv_bias_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    scale: Tensor | None = None,
    bn_mean: Tensor | None = None,
    bn_var: Tensor | None = None,
    bn_eps: float = 0.0,
) -> Tensor:
    """out = relu?(conv2d(input, weight) * scale[k] + bias[k] + residual), in input's dtype and
    format; the products and sums in the accumulation dtype, rounded once. With bn_mean and
    bn_var, scale and bias are a BatchNorm's weight and bias (or None), and the epilogue applies
    s = scale / sqrt(bn_var + bn_eps), t = bias - bn_mean * s."""
    if (bn_mean is None) != (bn_var is None):
        raise ValueError("conv_bias_act: bn_mean and bn_var are given together")
    if bn_var is not None:
        scale, bias = bn_epilogue_vectors(scale, bias, bn_mean, bn_var, bn_eps,
                                          acc_dtype(input.dtype))
    if scale is not None and bias is None:
        raise ValueError("conv_bias_act: scale is given only with bias")
    y = F.conv2d(input, weight, None, stride, padding, dilation, groups)
    z = y.to(acc_dtype(y.dtype))
    if scale is not None:
        z = z * _per_channel(scale.to(z.dtype))
    if bias is not None:
        z = z + _per_channel(bias.to(z.dtype))
    if residual is not None:
        z = z + residual.to(z.dtype)
    if relu:
        z = torch.relu(z)
    return z.to(input.dtype).contiguous(memory_format=_memory_format(input))


def bn_epilogue_vectors(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                        eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(s, t) of an eval BatchNorm in ``dtype``: s = weight / sqrt(var + eps) (weight None: 1),
    t = bias - mean * s (bias None: 0), one rounding per operation as the kernels do it."""
    s = 1.0 / torch.sqrt(var.to(dtype) + eps)
    if weight is not None:
        s = s * weight.to(dtype)
    t = -(mean.to(dtype) * s)
    if bias is not None:
        t = bias.to(dtype) + t
    return s, t


def relu_bias_bwd(grad_out: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
    """grad_z = grad_out where not out <= 0 (all of it when out is None); grad_bias = its sum
    over N, H, W."""
    g = _relu_grad(grad_out, out)
    return g.contiguous(memory_format=_memory_format(grad_out)), _channel_sum(g)


def conv_stats(
    input: Tensor,
    weight: Tensor,
    pre_scale: Tensor | None,
    pre_shift: Tensor | None,
    pre_relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """out = conv2d(relu?(input * pre_scale + pre_shift), weight); per-channel sum, sum of squares.

    Zero padding is applied after the prologue (the transformed tensor is padded), as it is when
    the previous BatchNorm + ReLU is a separate layer.
    """
    a = _prologue(input, pre_scale, pre_shift, pre_relu)
    out = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    out = out.contiguous(memory_format=_memory_format(input))
    o = out.to(acc_dtype(out.dtype))
    return out, _channel_sum(o), _channel_sum(o * o)


def bn_finalize(
    sum: Tensor,
    sumsq: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    count: int,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch statistics from (sum, sumsq) over ``count`` values per channel, as nn.BatchNorm2d.

    Returns (mean, invstd, scale, shift) with invstd = 1/sqrt(var + eps) (biased variance),
    scale = weight * invstd and shift = bias - mean * scale. Updates running_mean/running_var in
    place with the unbiased variance, with ``momentum`` or (momentum None) the cumulative average
    1/num_batches_tracked, and increments num_batches_tracked, when they are given.
    """
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} values"
        )
    return _finalize(
        sum,
        sumsq,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        count,
        momentum,
        eps,
    )


def _finalize(
    sum: Tensor,
    sumsq: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    n: int | Tensor,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_finalize's arithmetic over ``n`` values per channel (a number or a 0-dim tensor)."""
    mean = sum / n
    var = (sumsq / n - mean * mean).clamp_min(0)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None or running_var is not None:
        if momentum is None:
            if num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
            factor = 1.0 / float(num_batches_tracked.item())
        else:
            factor = momentum
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            if running_var is not None:
                unbiased = var * (n / (n - 1))
                running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return mean, invstd, scale, shift


def bn_add_relu(
    input: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None,
    res_scale: Tensor | None,
    res_shift: Tensor | None,
    res_channel_offset: int,
    relu: bool,
) -> Tensor:
    """out = relu?(input * scale[c] + shift[c] + r), r = residual (* res_scale + res_shift).

    The residual's channel j is added to output channel j + res_channel_offset; output channels it
    does not cover get no residual (the zero-padded option-A shortcut).
    """
    acc = acc_dtype(input.dtype)
    z = input.to(acc) * _per_channel(scale.to(acc)) + _per_channel(shift.to(acc))
    if residual is not None:
        r = residual.to(acc)
        if res_scale is not None:
            r = r * _per_channel(res_scale.to(acc))
        if res_shift is not None:
            r = r + _per_channel(res_shift.to(acc))
        c0, c1 = res_channel_offset, res_channel_offset + r.shape[1]
        if c0 == 0 and c1 == z.shape[1]:
            z = z + r
        else:
            z = torch.cat([z[:, :c0], z[:, c0:c1] + r, z[:, c1:]], dim=1)
    if relu:
        z = torch.relu(z)
    return z.to(input.dtype).contiguous(memory_format=_memory_format(input))


def _xhat(input: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    return (input.to(mean.dtype) - _per_channel(mean)) * _per_channel(invstd)


def _relu_grad(grad_out: Tensor, out: Tensor | None) -> Tensor:
    """grad_out where out is not <= 0: torch.ops.aten.threshold_backward(grad_out, out, 0), the
    backward of torch.relu, which passes the gradient where out is NaN (``out > 0`` would not)."""
    if out is None:
        return grad_out
    return torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)


def _prologue_grad(
    grad_out: Tensor, input: Tensor, scale: Tensor, shift: Tensor, relu: bool
) -> Tensor:
    if not relu:
        return grad_out
    z = _prologue(input, scale, shift, relu=False)
    return torch.where(z <= 0, torch.zeros_like(grad_out), grad_out)  # NaN passes, as _relu_grad


def _bn_grad_input(
    g: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_g: Tensor,
    mean_g_xhat: Tensor,
) -> Tensor:
    acc = mean.dtype
    w = invstd if weight is None else weight.to(acc) * invstd
    gi = _per_channel(w) * (
        g.to(acc)
        - _per_channel(mean_g.to(acc))
        - _xhat(input, mean, invstd) * _per_channel(mean_g_xhat.to(acc))
    )
    return gi.to(input.dtype).contiguous(memory_format=_memory_format(input))


def _bn_backward(
    g: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm's training backward of g = dL/dz, z = weight * (input - mean) * invstd + bias:
    (grad_input, grad_weight = sum(g * xhat), grad_bias = sum(g)), the two passes of the split
    ops (``*_reduce``, ``*_elemt``) with this batch's own means."""
    acc = mean.dtype
    gf = g.to(acc)
    grad_bias = _channel_sum(gf, acc)
    grad_weight = _channel_sum(gf * _xhat(input, mean, invstd), acc)
    count = g.numel() // g.shape[1]
    grad_input = _bn_grad_input(
        g, input, mean, invstd, weight, grad_bias / count, grad_weight / count
    )
    return grad_input, grad_weight, grad_bias


def bn_add_relu_bwd(
    grad_out: Tensor,
    out: Tensor | None,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    res_input: Tensor | None,
    res_mean: Tensor | None,
    res_invstd: Tensor | None,
    res_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of bn_add_relu with batch statistics (see fastres/_opset.py)."""
    g = _relu_grad(grad_out, out)
    grad_input, grad_weight, grad_bias = _bn_backward(g, input, mean, invstd, weight)
    if res_input is None:
        # Two distinct empty tensors: outputs of an op must not alias each other.
        return (
            grad_input,
            grad_weight,
            grad_bias,
            g.contiguous(memory_format=_memory_format(grad_out)),
            mean.new_empty(0),
            mean.new_empty(0),
        )
    if res_mean is None or res_invstd is None:
        raise ValueError("bn_add_relu_bwd: res_input needs res_mean and res_invstd")
    grad_res, grad_res_weight, grad_res_bias = _bn_backward(
        g, res_input, res_mean, res_invstd, res_weight
    )
    return grad_input, grad_weight, grad_bias, grad_res, grad_res_weight, grad_res_bias


def bn_relu_bwd(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of a prologue BatchNorm + ReLU; the mask is recomputed as input*scale+shift > 0."""
    g = _prologue_grad(grad_out, input, scale, shift, relu)
    return _bn_backward(g, input, mean, invstd, weight)


# --------------------------------------------------------------------------------------------
# SyncBatchNorm: bn_finalize and the BN backwards split where the cross-process all-reduce goes.


def bn_finalize_count(
    sum: Tensor,
    sumsq: Tensor,
    count: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_finalize with ``count`` a one-element tensor (the all-reduced count); no host sync
    except for momentum=None, which reads num_batches_tracked as bn_finalize does."""
    n = count.reshape(()).to(sum.dtype)
    return _finalize(
        sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked, n, momentum, eps
    )


def bn_add_relu_bwd_reduce(
    grad_out: Tensor,
    out: Tensor | None,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    res_input: Tensor | None,
    res_mean: Tensor | None,
    res_invstd: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1 of bn_add_relu_bwd: this process's sum(g), sum(g * xhat) (and the residual's)."""
    g = _relu_grad(grad_out, out).to(mean.dtype)
    sum_g = _channel_sum(g, mean.dtype)
    sum_g_xhat = _channel_sum(g * _xhat(input, mean, invstd), mean.dtype)
    if res_input is None:
        return sum_g, sum_g_xhat, mean.new_empty(0)
    if res_mean is None or res_invstd is None:
        raise ValueError("bn_add_relu_bwd_reduce: res_input needs res_mean and res_invstd")
    return sum_g, sum_g_xhat, _channel_sum(g * _xhat(res_input, res_mean, res_invstd), mean.dtype)


def bn_add_relu_bwd_elemt(
    grad_out: Tensor,
    out: Tensor | None,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_g: Tensor,
    mean_g_xhat: Tensor,
    res_input: Tensor | None,
    res_mean: Tensor | None,
    res_invstd: Tensor | None,
    res_weight: Tensor | None,
    res_mean_g_xhat: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Pass 2 of bn_add_relu_bwd with the global means of pass 1's sums."""
    g = _relu_grad(grad_out, out)
    grad_input = _bn_grad_input(g, input, mean, invstd, weight, mean_g, mean_g_xhat)
    if res_input is None:
        return grad_input, g.contiguous(memory_format=_memory_format(grad_out))
    if res_mean is None or res_invstd is None or res_mean_g_xhat is None:
        raise ValueError(
            "bn_add_relu_bwd_elemt: res_input needs res_mean, res_invstd and res_mean_g_xhat"
        )
    grad_res = _bn_grad_input(
        g, res_input, res_mean, res_invstd, res_weight, mean_g, res_mean_g_xhat
    )
    return grad_input, grad_res


def bn_relu_bwd_reduce(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """Pass 1 of bn_relu_bwd: this process's sum(g) and sum(g * xhat)."""
    g = _prologue_grad(grad_out, input, scale, shift, relu).to(mean.dtype)
    return _channel_sum(g, mean.dtype), _channel_sum(g * _xhat(input, mean, invstd), mean.dtype)


def bn_relu_bwd_elemt(
    grad_out: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    relu: bool,
    mean_g: Tensor,
    mean_g_xhat: Tensor,
) -> Tensor:
    """Pass 2 of bn_relu_bwd with the global means of pass 1's sums."""
    g = _prologue_grad(grad_out, input, scale, shift, relu)
    return _bn_grad_input(g, input, mean, invstd, weight, mean_g, mean_g_xhat)


def conv_bwd(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    pre_scale: Tensor | None,
    pre_shift: Tensor | None,
    pre_relu: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    """Gradients of conv_stats' convolution: dL/da (a = the prologue's output) and dL/dweight."""
    a = _prologue(input, pre_scale, pre_shift, pre_relu)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out,
        a,
        weight,
        None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups,
        [bool(output_mask[0]), bool(output_mask[1]), False],
    )
    if grad_input is None:
        grad_input = input.new_empty(0)
    else:
        grad_input = grad_input.contiguous(memory_format=_memory_format(input))
    if grad_weight is None:
        grad_weight = weight.new_empty(0)
    else:  # the weight's own strides, as the fake kernel and every backend return it
        grad_weight = torch.empty_like(weight).copy_(grad_weight)
    return grad_input, grad_weight


def option_a_shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """The paper's parameter-free option-A shortcut: subsample by ``stride``, zero-pad channels.

    The padding is split evenly on both sides of the channel dimension (as the common CIFAR
    implementations do: (out_channels - in_channels) // 2 zero channels before the input's).
    """
    y = x[:, :, ::stride, ::stride] if stride > 1 else x
    extra = out_channels - x.shape[1]
    if extra < 0:
        raise ValueError(
            f"option-A shortcut cannot shrink channels: {x.shape[1]} -> {out_channels}"
        )
    before = extra // 2
    return F.pad(y, (0, 0, 0, 0, before, extra - before))
