"""The fastres op set on Triton kernels, registered as ``torch.ops.fastres_triton.<op>``.

Same schemas as ``fastres/_opset.py`` (namespace ``fastres_triton``) and the same semantics as
``fastres/reference.py``. On a GPU each op is a ``torch.library.triton_op`` whose kernels are
launched through ``wrap_triton``, so ``torch.compile(fullgraph=True)`` traces through to the
kernels. Under ``TRITON_INTERPRET=1`` the kernels are interpreted Python that torch cannot trace,
so there the ops are plain custom ops (opaque to the compiler, still no graph break), with the same
body as fake implementation (kernel launches on fake tensors are skipped, see ``_common.launch``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from fastres import _opset

from . import bn as _bn
from . import bn_eval as _bn_eval
from . import conv as _conv
from ._common import INTERPRETED
from .bn_bwd import bn_bwd_apply, bn_bwd_reduce

NAMESPACE = "fastres_triton"

# The contract's schemas (fastres._opset): same names, same argument names, same mutations.
SCHEMAS = _opset.SCHEMAS
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")
MUTATES = {"bn_finalize": _RUNNING, "bn_finalize_count": _RUNNING}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL = 7  # R and S are constexprs; tested 1x1, 3x3, 7x7 and 1x3


#: Channel offsets (channel index * channel stride, and the weight's output-channel offsets)
#: are int32 in the kernels (conv.py, bn.py); row offsets are int64. A tensor whose largest channel
#: offset passes 2^31 - 1 (an NCHW image of 2^31 elements, e.g. 64 x 5793 x 5793) would wrap
#: around to a wrong address, so it is refused with its size.
INT32_MAX = 2**31 - 1


def check_offsets(name: str, label: str, shape, strides, dims=(1,)) -> None:
    """Raise a ValueError naming ``label`` and its size when an int32 offset would overflow."""
    for d in dims:
        top = (shape[d] - 1) * abs(strides[d])
        if top > INT32_MAX:
            raise ValueError(
                f"fastres_triton.{name}: {label} of size {tuple(shape)} has offsets up to {top} "
                f"along dim {d}, past 2^31 - 1 (the kernels index channels in int32): use "
                "channels_last (channel stride 1) or the cpu/cuda backend")


def _check_conv_out(name: str, input: Tensor, weight: Tensor, stride, padding, dilation) -> None:
    """The convolution's output follows the input's memory format: NCHW, its channel stride is
    P*Q."""
    p, q = _conv.out_hw(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3],
                        stride, padding, dilation)
    cl = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    shape = (input.shape[0], weight.shape[0], p, q)
    check_offsets(name, "output", shape, (0, 1 if cl else p * q, 0, 0))


def _check_act(name: str, *tensors: Tensor | None) -> None:
    ref = tensors[0]
    for t in tensors:
        if t is None:
            continue
        if t.dim() != 4:
            raise ValueError(f"fastres_triton.{name}: expected 4-D (N, C, H, W), got "
                             f"{tuple(t.shape)}")
        check_offsets(name, "an activation", t.shape, t.stride())
        if t.dtype not in DTYPES:
            raise TypeError(f"fastres_triton.{name}: dtype {t.dtype} not supported "
                            "(float32, float16, bfloat16)")
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(f"fastres_triton.{name}: tensors must share dtype and device, got "
                            f"{ref.dtype}/{ref.device} and {t.dtype}/{t.device}")


def _check_conv(name: str, input: Tensor, weight: Tensor, groups: int, dilation) -> None:
    _check_act(name, input, weight)
    check_offsets(name, "weight", weight.shape, weight.stride(), (0, 1))
    if groups != 1:
        raise NotImplementedError(f"fastres_triton.{name}: groups={groups} (only groups=1)")
    if weight.shape[1] != input.shape[1]:
        raise ValueError(f"fastres_triton.{name}: weight {tuple(weight.shape)} does not match "
                         f"input channels {input.shape[1]}")
    if max(weight.shape[2], weight.shape[3]) > MAX_KERNEL:
        raise NotImplementedError(f"fastres_triton.{name}: kernel {tuple(weight.shape[2:])} > 7x7")


def _check_vecs(name: str, ref: Tensor, k: int, **vecs: Tensor | None) -> None:
    """Per-channel vectors: 1-D with ``k`` elements, floating, on ``ref``'s device (a short one
    would be read past its end: the kernels mask by the channel count, not the vector's)."""
    for label, v in vecs.items():
        if v is None:
            continue
        if v.dim() != 1 or v.shape[0] != k:
            raise ValueError(f"fastres_triton.{name}: {label} must be 1-D with {k} elements (one "
                             f"per output channel of weight), got size {tuple(v.shape)}")
        if not v.is_floating_point() or v.device != ref.device:
            raise TypeError(f"fastres_triton.{name}: {label} must be a floating tensor on "
                            f"{ref.device}, got {v.dtype} on {v.device}")


def _vec(v: Tensor | None) -> Tensor | None:
    """Per-channel vectors go to the kernels as contiguous float32 (the accumulation dtype): the
    vectors the ops make (statistics, scale, shift) already are, and pass through untouched."""
    if v is None or (v.dtype is torch.float32 and v.is_contiguous()):
        return v
    return v.to(torch.float32).contiguous()


def check_conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups, scale,
                        bn_mean, bn_var) -> None:
    """conv_bias_act's checks of its arguments (also the block plans', triton_kernels/block.py)."""
    _check_conv("conv_bias_act", input, weight, groups, dilation)
    _check_conv_out("conv_bias_act", input, weight, stride, padding, dilation)
    _check_act("conv_bias_act", input, residual)
    if residual is not None:
        p, q = _conv.out_hw(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3],
                            stride, padding, dilation)
        if tuple(residual.shape) != (input.shape[0], weight.shape[0], p, q):
            raise ValueError(f"fastres_triton.conv_bias_act: residual {tuple(residual.shape)} "
                             f"does not match the output {(input.shape[0], weight.shape[0], p, q)}")
    if (bn_mean is None) != (bn_var is None):
        raise ValueError("fastres_triton.conv_bias_act: bn_mean and bn_var are given together")
    if scale is not None and bias is None and bn_var is None:
        raise ValueError("fastres_triton.conv_bias_act: scale is given only with bias")
    _check_vecs("conv_bias_act", input, weight.shape[0], bias=bias, scale=scale, bn_mean=bn_mean,
                bn_var=bn_var)


def conv_bias_act(
    input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
    scale: Tensor | None = None,
    bn_mean: Tensor | None = None,
    bn_var: Tensor | None = None,
    bn_eps: float = 0.0,
) -> Tensor:
    check_conv_bias_act(input, weight, bias, residual, stride, padding, dilation, groups, scale,
                        bn_mean, bn_var)
    bn = None
    if bn_var is not None and scale is not None and bias is not None:
        # The convolution computes the BatchNorm's scale and shift itself (BN_VECTORS) into
        # this buffer, then reads them in its epilogue.
        bn = (*(t.contiguous() for t in (scale, bias, bn_mean, bn_var)), bn_eps)
        vecs = torch.empty((2, weight.shape[0]), dtype=torch.float32, device=input.device)
        scale, bias = vecs[0], vecs[1]
    elif bn_var is not None:  # no affine part: its scale and shift first, one small launch
        scale, bias = _bn_eval.bn_eval_vectors(*(None if t is None else t.contiguous()
                                            for t in (scale, bias, bn_mean, bn_var)), bn_eps)
    out, _, _ = _conv.conv_forward(input, weight, bias, residual, relu, None, None, False, False,
                                   stride, padding, dilation, _vec(scale), bn)
    return out


def relu_bias_bwd(grad_out: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
    _check_act("relu_bias_bwd", grad_out, out)
    from ._common import empty_like_format  # noqa: PLC0415

    g = empty_like_format(grad_out.shape, grad_out)
    gsum, _, _ = bn_bwd_reduce(grad_out, out, None, None, None, None, None, None, None, None,
                               g, 1 if out is not None else 0, False)
    return g, gsum


def conv_stats(
    input: Tensor, weight: Tensor, pre_scale: Tensor | None, pre_shift: Tensor | None,
    pre_relu: bool, stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_conv("conv_stats", input, weight, groups, dilation)
    _check_conv_out("conv_stats", input, weight, stride, padding, dilation)
    out, s, ss = _conv.conv_forward(input, weight, None, None, False, _vec(pre_scale),
                                    _vec(pre_shift), pre_relu, True, stride, padding, dilation)
    return out, s, ss


def conv_stats_partials(input, weight, pre_scale, pre_shift, pre_relu, stride, padding, dilation,
                        groups, weight_rounded: bool = False) -> tuple[Tensor, Tensor]:
    """conv_stats' checks and launch, the statistics left as partials (the training unit's:
    bn.bn_finalize_partials sums and finalizes them in one launch); ``weight_rounded``: a
    float32 weight comes rounded to TF32 already."""
    _check_conv("conv_stats", input, weight, groups, dilation)
    _check_conv_out("conv_stats", input, weight, stride, padding, dilation)
    return _conv.conv_forward_partials(input, weight, _vec(pre_scale), _vec(pre_shift), pre_relu,
                                       stride, padding, dilation, weight_rounded)


def bn_finalize(
    sum: Tensor, sumsq: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, count: int, momentum: float | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if sum.dtype != torch.float32:
        raise TypeError(f"fastres_triton.bn_finalize: statistics must be float32, got {sum.dtype}")
    return _bn.bn_finalize(sum, sumsq, weight, bias, running_mean, running_var,
                           num_batches_tracked, count, momentum, eps)


def bn_finalize_count(
    sum: Tensor, sumsq: Tensor, count: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, momentum: float | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # bn_finalize's kernel, reading the count on the device: no host sync (nor a check that the
    # count exceeds 1, which would need one; the contract leaves that to the caller).
    if sum.dtype != torch.float32:
        raise TypeError("fastres_triton.bn_finalize_count: statistics must be float32, got "
                        f"{sum.dtype}")
    if count.numel() != 1 or count.device != sum.device:
        raise ValueError("fastres_triton.bn_finalize_count: count must be one element on "
                         f"{sum.device}, got {tuple(count.shape)} on {count.device}")
    return _bn.bn_finalize(sum, sumsq, weight, bias, running_mean, running_var,
                           num_batches_tracked, count, momentum, eps)


def bn_add_relu(
    input: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
    res_scale: Tensor | None, res_shift: Tensor | None, res_channel_offset: int, relu: bool,
) -> Tensor:
    _check_act("bn_add_relu", input, residual)
    if residual is not None:
        if residual.shape[0] != input.shape[0] or residual.shape[2:] != input.shape[2:]:
            raise ValueError(f"fastres_triton.bn_add_relu: residual {tuple(residual.shape)} does "
                             f"not match input {tuple(input.shape)}")
        if res_channel_offset < 0 or res_channel_offset + residual.shape[1] > input.shape[1]:
            raise ValueError("fastres_triton.bn_add_relu: residual channels "
                             f"[{res_channel_offset}, {res_channel_offset + residual.shape[1]}) "
                             f"outside [0, {input.shape[1]})")
    return _bn.bn_add_relu(input, _vec(scale), _vec(shift), residual, _vec(res_scale),
                           _vec(res_shift), res_channel_offset, relu)


def _check_bn_bwd(name: str, grad_out: Tensor, out: Tensor | None, input: Tensor,
                  res_input: Tensor | None, *res_vectors: Tensor | None) -> None:
    _check_act(name, grad_out, out, input, res_input)
    if res_input is not None and any(v is None for v in res_vectors):
        need = ("res_mean, res_invstd and res_mean_g_xhat" if len(res_vectors) > 2
                else "res_mean and res_invstd")
        raise ValueError(f"{name}: res_input needs {need}")
    if res_input is not None and res_input.shape != input.shape:
        raise ValueError(f"{name}: res_input {tuple(res_input.shape)} must match input "
                         f"{tuple(input.shape)}")


def bn_add_relu_bwd(
    grad_out: Tensor, out: Tensor | None, input: Tensor, mean: Tensor, invstd: Tensor,
    weight: Tensor | None, res_input: Tensor | None, res_mean: Tensor | None,
    res_invstd: Tensor | None, res_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_bn_bwd("bn_add_relu_bwd", grad_out, out, input, res_input, res_mean, res_invstd)
    mean, invstd = _vec(mean), _vec(invstd)
    res_mean, res_invstd = _vec(res_mean), _vec(res_invstd)
    mask = 1 if out is not None else 0
    from ._common import empty_like_format  # noqa: PLC0415

    # Identity residual: grad_res = g, written by the reduction pass that computes g anyway.
    g = empty_like_format(grad_out.shape, grad_out) if res_input is None else None
    gsum, gxsum, grsum = bn_bwd_reduce(grad_out, out, input, None, None, mean, invstd,
                                       res_input, res_mean, res_invstd, g, mask, True)
    gi, gr = bn_bwd_apply(grad_out, out, input, None, None, mean, invstd, _vec(weight),
                          gsum, gxsum, res_input, res_mean, res_invstd, _vec(res_weight),
                          grsum, mask)
    if res_input is None:  # two empty outputs (outputs may not alias each other)
        return gi, gxsum, gsum, g, mean.new_empty(0), mean.new_empty(0)
    # grad_res_bias is sum(g) again: a copy, as outputs may not alias each other.
    return gi, gxsum, gsum, gr, grsum, gsum.clone()


def bn_relu_bwd(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    scale: Tensor, shift: Tensor, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_act("bn_relu_bwd", grad_out, input)
    mean, invstd, scale, shift = _vec(mean), _vec(invstd), _vec(scale), _vec(shift)
    mask = 2 if relu else 0
    gsum, gxsum, _ = bn_bwd_reduce(grad_out, None, input, scale, shift, mean, invstd,
                                   None, None, None, None, mask, True)
    gi, _ = bn_bwd_apply(grad_out, None, input, scale, shift, mean, invstd, _vec(weight),
                         gsum, gxsum, None, None, None, None, None, mask)
    return gi, gxsum, gsum


# SyncBatchNorm: the two BN backwards split into their reduction (pass 1, this process's sums)
# and elementwise (pass 2, given the global means of those sums) kernels, the very kernels the
# single-process ops above run back to back, so that an all-reduce can go between them.


def bn_add_relu_bwd_reduce(
    grad_out: Tensor, out: Tensor | None, input: Tensor, mean: Tensor, invstd: Tensor,
    res_input: Tensor | None, res_mean: Tensor | None, res_invstd: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_bn_bwd("bn_add_relu_bwd_reduce", grad_out, out, input, res_input, res_mean,
                  res_invstd)
    mean, invstd = _vec(mean), _vec(invstd)
    gsum, gxsum, grsum = bn_bwd_reduce(grad_out, out, input, None, None, mean, invstd,
                                       res_input, _vec(res_mean), _vec(res_invstd), None,
                                       1 if out is not None else 0, True)
    return gsum, gxsum, (grsum if grsum is not None else mean.new_empty(0))


def bn_add_relu_bwd_elemt(
    grad_out: Tensor, out: Tensor | None, input: Tensor, mean: Tensor, invstd: Tensor,
    weight: Tensor | None, mean_g: Tensor, mean_g_xhat: Tensor, res_input: Tensor | None,
    res_mean: Tensor | None, res_invstd: Tensor | None, res_weight: Tensor | None,
    res_mean_g_xhat: Tensor | None,
) -> tuple[Tensor, Tensor]:
    _check_bn_bwd("bn_add_relu_bwd_elemt", grad_out, out, input, res_input, res_mean,
                  res_invstd, res_mean_g_xhat)
    from ._common import empty_like_format  # noqa: PLC0415

    # Identity residual: grad_res = g, written by this pass (the split reduction writes nothing).
    g = empty_like_format(grad_out.shape, grad_out) if res_input is None else None
    gi, gr = bn_bwd_apply(grad_out, out, input, None, None, _vec(mean), _vec(invstd),
                          _vec(weight), _vec(mean_g), _vec(mean_g_xhat), res_input,
                          _vec(res_mean), _vec(res_invstd), _vec(res_weight),
                          _vec(res_mean_g_xhat), 1 if out is not None else 0, means=True,
                          g_out=g)
    return gi, (g if res_input is None else gr)


def bn_relu_bwd_reduce(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
    relu: bool,
) -> tuple[Tensor, Tensor]:
    _check_act("bn_relu_bwd_reduce", grad_out, input)
    gsum, gxsum, _ = bn_bwd_reduce(grad_out, None, input, _vec(scale), _vec(shift),
                                   _vec(mean), _vec(invstd), None, None, None, None,
                                   2 if relu else 0, True)
    return gsum, gxsum


def bn_relu_bwd_elemt(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    scale: Tensor, shift: Tensor, relu: bool, mean_g: Tensor, mean_g_xhat: Tensor,
) -> Tensor:
    _check_act("bn_relu_bwd_elemt", grad_out, input)
    gi, _ = bn_bwd_apply(grad_out, None, input, _vec(scale), _vec(shift), _vec(mean),
                         _vec(invstd), _vec(weight), _vec(mean_g), _vec(mean_g_xhat),
                         None, None, None, None, None, 2 if relu else 0, means=True)
    return gi


def conv_bwd(
    grad_out: Tensor, input: Tensor, weight: Tensor, pre_scale: Tensor | None,
    pre_shift: Tensor | None, pre_relu: bool, stride: list[int], padding: list[int],
    dilation: list[int], groups: int, output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    return conv_bwd_body(grad_out, input, weight, pre_scale, pre_shift, pre_relu, stride,
                         padding, dilation, groups, output_mask)


def conv_bwd_body(grad_out, input, weight, pre_scale, pre_shift, pre_relu, stride, padding,
                  dilation, groups, output_mask, grad_rounded: bool = False, defer=None,
                  rounded_weight=None):
    """conv_bwd's body; ``grad_rounded``: a float32 grad_out comes rounded to TF32 already
    (the training unit's, from bn_bwd_apply), else rounded here where the dots run TF32.
    ``defer``: a list to which the weight gradient's split sum is appended instead of launched
    (conv.conv_wgrad's ``defer``; the training unit runs it in a later launch).
    ``rounded_weight``: the float32 weight rounded to TF32 already, for the data gradient (the
    training unit rounds its weights in one launch)."""
    _check_conv("conv_bwd", input, weight, groups, dilation)
    _check_act("conv_bwd", input, grad_out)
    grad_out = _conv.grad_out_nhwc(grad_out, grad_rounded)
    if output_mask[0]:
        gi = _conv.conv_dgrad(grad_out, input,
                              weight if rounded_weight is None else rounded_weight, stride,
                              padding, dilation, rounded_weight is not None)
    else:
        gi = input.new_empty(0)
    if output_mask[1]:
        gw = _conv.conv_wgrad(grad_out, input, weight, _vec(pre_scale), _vec(pre_shift), pre_relu,
                              stride, padding, dilation, defer is not None)
        if defer is not None:
            gw, pending = gw
            if pending is not None:
                defer.append(pending)
    else:
        gw = weight.new_empty(0)
    return gi, gw


_IMPLS = {
    "conv_bias_act": conv_bias_act,
    "relu_bias_bwd": relu_bias_bwd,
    "conv_stats": conv_stats,
    "bn_finalize": bn_finalize,
    "bn_add_relu": bn_add_relu,
    "bn_add_relu_bwd": bn_add_relu_bwd,
    "bn_relu_bwd": bn_relu_bwd,
    "conv_bwd": conv_bwd,
    "bn_finalize_count": bn_finalize_count,
    "bn_add_relu_bwd_reduce": bn_add_relu_bwd_reduce,
    "bn_add_relu_bwd_elemt": bn_add_relu_bwd_elemt,
    "bn_relu_bwd_reduce": bn_relu_bwd_reduce,
    "bn_relu_bwd_elemt": bn_relu_bwd_elemt,
}


def _register() -> None:
    for name, fn in _IMPLS.items():
        qualname = f"{NAMESPACE}::{name}"
        mutates = MUTATES.get(name, ())
        if INTERPRETED:
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates,
                                         schema=SCHEMAS[name])
            op.register_fake(fn)
        else:
            torch.library.triton_op(qualname, fn, mutates_args=mutates, schema=SCHEMAS[name])


_register()


def _bumping(fn, mutated: tuple[str, ...]):
    """fn, then the version counters of the tensors it wrote in place bumped, as the dispatcher
    does for an op that declares the mutation (autograd's saved-tensor checks and anything keyed
    on ``_version`` see the write)."""
    import inspect  # noqa: PLC0415

    names = list(inspect.signature(fn).parameters)
    where = [names.index(m) for m in mutated]
    bump = torch.autograd.graph.increment_version

    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        for i, m in zip(where, mutated, strict=True):
            t = args[i] if i < len(args) else kwargs.get(m)
            if t is not None:
                bump(t)
        return out

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def eager_namespace() -> SimpleNamespace:
    """The op bodies as plain functions (see triton_kernels.eager_ops)."""
    return SimpleNamespace(**{name: (_bumping(fn, MUTATES[name]) if name in MUTATES else fn)
                              for name, fn in _IMPLS.items()})


def op_namespace() -> SimpleNamespace:
    ns = getattr(torch.ops, NAMESPACE)
    return SimpleNamespace(**{name: getattr(ns, name) for name in _IMPLS})
