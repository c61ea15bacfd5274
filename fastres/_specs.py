"""The vocabulary every layer shares: what a convolution, a BatchNorm and an op call are, and the
errors a fused module raises for a caller's mistake. Plain data, no torch ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BNSpec", "ConvSpec", "DtypeError", "Inputs", "ShapeError", "Stage"]


@dataclass(frozen=True)
class ConvSpec:
    """A bias-free 2-D convolution's hyper-parameters (as nn.Conv2d stores them)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @staticmethod
    def of(conv: torch.nn.Conv2d) -> ConvSpec:
        if isinstance(conv.padding, str):
            raise ValueError(f"fastres needs numeric padding, got padding={conv.padding!r}")
        return ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)

    def args(self) -> tuple[list[int], list[int], list[int], int]:
        return list(self.stride), list(self.padding), list(self.dilation), self.groups


@dataclass(frozen=True)
class BNSpec:
    """A BatchNorm's hyper-parameters: eps, momentum (None: cumulative average)."""

    eps: float = 1e-5
    momentum: float | None = 0.1

    @staticmethod
    def of(bn: torch.nn.BatchNorm2d) -> BNSpec:
        return BNSpec(float(bn.eps), None if bn.momentum is None else float(bn.momentum))


@dataclass(frozen=True)
class Stage:
    """One convolution followed by one BatchNorm (the unit of :func:`residual_unit`)."""

    conv: ConvSpec
    bn: BNSpec


@dataclass(frozen=True)
class Inputs:
    """What a backend needs to know about a call to decide whether it can serve it."""

    device: torch.device
    dtype: torch.dtype
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    channels_last: bool = False
    #: A training call (batch statistics, gradients) rather than inference: the recorded GPU
    #: speed of a backend differs between the two).
    training: bool = False
    #: Input channels and batch size, for the shape classes of the self-test's speed ranking
    #: (fastres.backends.records); None when unknown (a dynamic batch under torch.compile).
    channels: int | None = None
    batch: int | None = None

    @staticmethod
    def of(x: Tensor, conv: torch.nn.Conv2d | None = None) -> Inputs:
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        if conv is None:
            return Inputs(x.device, x.dtype, channels_last=cl)
        return Inputs(
            x.device,
            x.dtype,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            dilation=tuple(conv.dilation),
            groups=conv.groups,
            channels_last=cl,
            channels=conv.in_channels,
            batch=static_size(x.shape[0]),
        )


def static_size(n) -> int | None:
    """A size as a plain int, or None when symbolic (a dynamic dimension under torch.compile:
    using it would guard on it)."""
    return n if isinstance(n, int) else None




class ShapeError(RuntimeError, ValueError):
    """A rank or channel-count mistake in a fused module's input: a RuntimeError, as torch's
    conv2d raises for it (code that catches RuntimeError around a model keeps working), and a
    ValueError, as BatchNorm2d raises for a wrong rank."""


class DtypeError(RuntimeError, TypeError):
    """A dtype mistake (input, weight or BatchNorm tensors that cannot go together): a
    RuntimeError, as torch's conv2d and batch_norm raise for it, and a TypeError."""
