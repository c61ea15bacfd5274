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

import torch
from torch import Tensor

from fastres import backends
from fastres._autograd import (
    _ConvBiasActFn,
    _ResidualUnitFn,
    _UnitSpec,
    _world_size,
    inner_relu_decisions,
    memory_format_of,
)
from fastres._autograd_unit import SHORTCUTS, unit_call
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
    "versions",
    "fold_sources",
    "bn_scale_shift",
    "inner_relu_decisions",
    "memory_format_of",
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


class Versions:
    """What a frozen model's fold check reads instead of the values (:func:`versions`): each
    tensor's identity, version counter and data pointer. It holds the tensors, so no other tensor
    can take an identity it recorded. Equal to another when every entry is."""

    __slots__ = ("key", "tensors")

    def __init__(self, tensors: Sequence[Tensor | None]) -> None:
        self.tensors = tuple(tensors)
        self.key = tuple(
            None if t is None else (id(t), t._version, t.data_ptr()) for t in self.tensors
        )

    def __eq__(self, other: object) -> bool:
        return type(other) is Versions and self.key == other.key

    __hash__ = None  # type: ignore[assignment]


def versions(tensors: Sequence[Tensor | None]) -> Versions | int | None:
    """The fold check of a model converted with ``freeze=True`` (fastres.convert): every tensor's
    identity, version counter and data pointer (a few µs per convolution, where
    :func:`fingerprint` reads every byte). It sees optimizer steps, ``load_state_dict``, in-place
    ops, ``.to()``/``.half()`` and assigned Parameters; writes through ``.data`` or ``.numpy()``
    leave all three alone and are not seen. Inference tensors have no version counter: their
    values are fingerprinted instead."""
    try:
        return Versions(tensors)
    except RuntimeError:  # an inference tensor: no version counter
        return fingerprint(tensors)


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
    scale: Tensor | None = None,
    bn_mean: Tensor | None = None,
    bn_var: Tensor | None = None,
    bn_eps: float = 0.0,
) -> Tensor:
    """``relu?(conv2d(x, weight) * scale + bias + residual)`` as one fused op (one output write).

    Args:
        x: ``(N, C, H, W)`` input, any memory format.
        weight: ``(K, C / groups, R, S)``, same dtype and device as ``x``.
        bias: ``(K,)`` or None (a BatchNorm's shift).
        residual: the output's shape ``(N, K, P, Q)`` or None.
        backend: force a backend by name (default: FASTRES_BACKEND or the dispatcher's choice).
        scale: ``(K,)`` in the accumulation dtype, given only with ``bias``: a BatchNorm's scale
            applied to the convolution in the epilogue (:func:`bn_scale_shift`), so that
            ``weight`` is the live parameter and nothing folded is kept. Without it, ``weight``
            may be a folded one (:func:`fold_bn`).
        bn_mean, bn_var, bn_eps: an eval BatchNorm's running statistics and eps, given
            together: the BatchNorm runs in the epilogue from its live tensors, ``scale`` and
            ``bias`` being its weight and bias (either may be None); see :func:`bn_scale_shift`.
            Differentiable (gamma, beta, and mean and var should they require gradients).

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
                x, weight, bias, residual, stride, padding, dilation, groups, relu, backend, scale,
                bn_mean, bn_var, bn_eps,
            )
    check_input(x, weight, "fastres.conv_bias_act")
    if (bn_mean is None) != (bn_var is None):
        raise ValueError("fastres.conv_bias_act: bn_mean and bn_var are given together")
    if scale is not None and bias is None and bn_var is None:
        raise ValueError("fastres.conv_bias_act: scale is given only with bias")
    conv = ConvSpec(tuple(_pair(stride)), tuple(_pair(padding)), tuple(_pair(dilation)), groups)
    needs_grad = _needs_grad(x, weight, bias, residual, scale, bn_mean, bn_var)
    b = backends.select(_inputs(x, weight, conv, training=needs_grad), backend)
    if b.name != "reference" and needs_grad:
        if bn_var is not None:
            return _ConvBiasActFn.apply(x, weight, bias, residual, conv, relu, b.name, scale,
                                        bn_mean, bn_var, float(bn_eps))
        return _ConvBiasActFn.apply(x, weight, bias, residual, conv, relu, b.name, scale)
    # The reference op is plain PyTorch, differentiable as it is.
    args = (x, weight, bias, residual, *conv.args(), relu)
    if bn_var is not None:
        return b.op("conv_bias_act")(*args, scale, bn_mean, bn_var, float(bn_eps))
    return b.op("conv_bias_act")(*args) if scale is None else b.op("conv_bias_act")(*args, scale)


def bn_scale_shift(
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, ``scale = gamma / sqrt(var + eps)`` and
    ``shift = beta - mean * scale``, in ``dtype`` (the accumulation dtype), from the live
    tensors: a few per-channel ops on the tensors' device, no host sync, differentiable. For
    :func:`conv_bias_act`'s ``scale`` and ``bias``."""
    def as_dtype(t: Tensor) -> Tensor:
        return t if t.dtype == dtype else t.to(dtype)  # a no-op .to still costs a dispatch

    scale = torch.rsqrt(as_dtype(running_var) + eps)
    if bn_weight is not None:
        scale = scale * as_dtype(bn_weight)
    mean = as_dtype(running_mean)
    if bn_bias is None:
        return scale, -mean * scale
    return scale, torch.addcmul(as_dtype(bn_bias), mean, scale, value=-1.0)


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


def unit_spec(x: Tensor, stages, params, shortcut: str, downsample, option_a_stride: int = 2,
              relu: bool = True, backend: str | None = None, process_group: object = None):
    """(the unit's _UnitSpec, the backend that runs it) of a residual_unit call, after checking
    the input against the first weight (fastres.nn.train_plan keeps both)."""
    weights = [p[0] for p in params]
    convs = [s.conv for s in stages]
    check_input(x, weights[0], "fastres.residual_unit")
    if downsample is not None:
        weights.append(downsample[1][0])
        convs.append(downsample[0].conv)
    b = select_backend(x, weights, convs, backend)
    if process_group is not None and _world_size(process_group) < 2:
        process_group = None  # nothing to sync with (as nn.SyncBatchNorm)
    spec = _UnitSpec(tuple(stages), downsample[0] if downsample else None, shortcut,
                     option_a_stride, relu, b.name, process_group)
    return spec, b


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
    spec, b = unit_spec(x, stages, params, shortcut, downsample, option_a_stride, relu, backend,
                        process_group)
    flat: list[Tensor | None] = [t for p in params for t in p]
    if downsample is not None:
        flat.extend(downsample[1])
    if (spec.group is None and shortcut in SHORTCUTS and not torch.compiler.is_compiling()
            and not torch._C._len_torch_dispatch_stack()):
        entry = b.eager_unit()
        if entry is not None:  # the unit's ops launched from C++ (fastres._autograd_unit)
            return unit_call(entry[:3], entry[3], spec, x, tuple(flat))
    return _ResidualUnitFn.apply(spec, x, shortcut_tensor, *flat)
