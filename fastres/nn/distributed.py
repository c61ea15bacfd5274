"""SyncBatchNorm in the fused path, on any device and any ``torch.distributed`` backend.

A fused block whose BatchNorms are ``nn.SyncBatchNorm`` (all of them, one process group) computes
each BatchNorm's statistics over the whole global batch: the forward all-reduces the per-channel
(sum, sum of squares, count) between ``conv_stats`` and ``bn_finalize_count``, the backward the two
per-channel gradient sums between ``bn_*_bwd_reduce`` and ``bn_*_bwd_elemt`` (fastres/_opset.py). The
BN weight and bias gradients are each process's own sums, as ``nn.SyncBatchNorm`` returns them
(DDP averages them).

``nn.SyncBatchNorm`` itself refuses CPU tensors (and DDP refuses CPU modules holding one);
:class:`SyncBatchNorm` (same attributes and ``state_dict``) does not: with the gloo backend it
syncs CPU tensors through the same ops. :func:`fastres.convert` swaps every ``nn.SyncBatchNorm``
of a model for it, and
``fastres.convert(model, sync_bn=True)`` first turns every BatchNorm into one (as
``nn.SyncBatchNorm.convert_sync_batchnorm`` does).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import _autograd as AG
from fastres import backends, reference
from fastres import functional as FF
from fastres.backends import Inputs
from fastres.functional import BNSpec

__all__ = ["SyncBatchNorm", "sync_batch_norm", "sync_group"]


def sync_group(bn: nn.Module):
    """The process group ``bn`` syncs its batch statistics over in a call now, or None: an
    ``nn.SyncBatchNorm`` in training mode with ``torch.distributed`` initialized and a group of
    two or more processes (exactly when ``nn.SyncBatchNorm`` would sync)."""
    if not isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm)) or not bn.training:
        return None
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _SyncBNFn(torch.autograd.Function):
    """A standalone BatchNorm over the global batch (no convolution to fuse with)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, nbt, bn: BNSpec, group, be):
        # per-channel sums accumulated in float64, as the ops' own statistics are
        xs = x.to(reference.acc_dtype(x.dtype))
        s, q = reference._channel_sum(xs), reference._channel_sum(xs * xs)
        part = (x, s, q, (weight, bias, running_mean, running_var, nbt), bn)
        mean, invstd, scale, shift, count = AG._finalize(be, group, [part])[0]
        out = backends.op(be, "bn_add_relu")(x, scale, shift, None, None, None, 0, False)
        ctx.save_for_backward(x, weight, mean, invstd, scale, shift, count)
        ctx.group, ctx.backend = group, be
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, scale, shift, count = ctx.saved_tensors
        be = ctx.backend
        g = grad_out.contiguous(memory_format=FF.memory_format_of(x))
        grad_x, sum_g_xhat, sum_g = AG._bn_relu_backward(
            be, ctx.group, count, g, x, mean, invstd, weight, scale, shift, False
        )
        grad_w = sum_g_xhat.to(weight.dtype) if weight is not None else None
        grad_b = sum_g.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def sync_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    process_group,
    backend: str | None = None,
) -> Tensor:
    """Training-mode BatchNorm of ``x`` (``(N, C, ...)``) with statistics over every process of
    ``process_group``, as ``nn.SyncBatchNorm``; updates the running statistics in place. ``x``
    may be an empty batch (this process adds zero sums and a zero count)."""
    if x.dim() < 2:
        raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")
    shape = x.shape
    x4 = x if x.dim() == 4 else x.reshape(shape[0], shape[1], math.prod(shape[2:]), 1)
    be = backends.select(Inputs.of(x4), backend).name
    out = _SyncBNFn.apply(
        x4,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        BNSpec(float(eps), momentum),
        process_group,
        be,
    )
    return out if x.dim() == 4 else out.reshape(shape)


class SyncBatchNorm(_BatchNorm):
    """``nn.SyncBatchNorm`` that also syncs CPU tensors (gloo), through fastres' ops.

    Same constructor, attributes (``process_group``) and ``state_dict`` as ``nn.SyncBatchNorm``.
    Not a subclass of it: DDP refuses a CPU module holding an ``nn.SyncBatchNorm``. When it does
    not sync (eval mode, a single process, ``torch.distributed`` not initialized) it is
    BatchNorm's forward. Inside a fused block it is not called at all: the block computes its
    BatchNorms itself."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        group = sync_group(self)
        if group is None:
            # nn.SyncBatchNorm's forward without the device check (on the CPU, nn.SyncBatchNorm
            # raises as soon as torch.distributed is initialized).
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        track = self.track_running_stats and self.running_mean is not None
        return sync_batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.num_batches_tracked if track else None,
            self.momentum,
            self.eps,
            group,
        )


def _swap(bn: nn.SyncBatchNorm, cls: type[nn.Module]) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__ = bn.__dict__.copy()
    return new


def to_fastres_sync_bn(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Swap every ``nn.SyncBatchNorm`` of ``model`` (in place) for :class:`SyncBatchNorm`, sharing
    parameters, buffers and hooks. Returns the model (itself swapped if it is one) and the paths."""
    paths = []
    if type(model) is nn.SyncBatchNorm:
        return _swap(model, SyncBatchNorm), [""]
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is nn.SyncBatchNorm:
                setattr(mod, cname, _swap(child, SyncBatchNorm))
                paths.append(f"{name}.{cname}" if name else cname)
    return model, paths


def to_plain_sync_bn(model: nn.Module) -> nn.Module:
    """The inverse of :func:`to_fastres_sync_bn` (in place)."""
    if type(model) is SyncBatchNorm:
        return _swap(model, nn.SyncBatchNorm)
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if type(child) is SyncBatchNorm:
                setattr(mod, cname, _swap(child, nn.SyncBatchNorm))
    return model
