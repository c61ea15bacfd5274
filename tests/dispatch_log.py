"""A dispatch mode that records the ops a call dispatches (tests of which path a call took)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """The ops a call dispatches, by qualified name (``namespace::name``). Being a dispatch
    mode, it also sends fastres' eager C++ and Triton paths to their per-op forms."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(f"{func.namespace}::{func.__name__.split('.')[0]}")
        return func(*args, **(kwargs or {}))
