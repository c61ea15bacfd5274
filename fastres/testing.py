"""The tolerance rule shared by the test suite and the parity harness (shared/STYLE.md).

Compare against a float64 reference: a fused result passes when

    err(fastres) <= 2 * err(PyTorch at the same dtype) + atol[dtype]

where err is the largest absolute difference from the float64 reference. One table for the whole
suite; no per-test magic numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def dtype_tols(dtype: torch.dtype) -> float:
    """The additive slack atol[dtype] of the tolerance rule."""
    try:
        return _ATOL[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype}") from None


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


@dataclass
class Verdict:
    name: str
    err: float
    torch_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.err <= self.bound

    def __str__(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        return (
            f"{self.name}: err {self.err:.3g} vs PyTorch {self.torch_err:.3g}, "
            f"bound {self.bound:.3g} [{mark}]"
        )


def verdict(name: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
            dtype: torch.dtype) -> Verdict:
    """Judge ``ours`` against ``ref`` (float64) with PyTorch's own result ``theirs`` as the yardstick."""
    err = max_abs_err(ours, ref)
    torch_err = max_abs_err(theirs, ref)
    return Verdict(name, err, torch_err, 2 * torch_err + dtype_tols(dtype))


def assert_close_rule(name: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
                      dtype: torch.dtype) -> Verdict:
    v = verdict(name, ours, theirs, ref, dtype)
    if not v.ok:
        raise AssertionError(str(v))
    return v
