"""The tolerance rule shared by the test suite and the parity harness (shared/STYLE.md).

Compare against a float64 reference: a fused result passes when

    err(fastres) <= 2 * err(PyTorch at the same dtype) + atol[dtype]

where err is the largest absolute difference from the float64 reference. One table for the whole
suite; no per-test magic numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_ATOL = {
    # float64 runs check semantics, not rounding: 1e-8 absolute is ~1e-11 relative to the largest
    # gradients of a whole ResNet-50 step (the stem's weight grad), far below any real bug.
    torch.float64: 1e-8,
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


def verdict(
    name: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype
) -> Verdict:
    """Judge ``ours`` against ``ref`` (float64), PyTorch's own result ``theirs`` the yardstick."""
    err = max_abs_err(ours, ref)
    torch_err = max_abs_err(theirs, ref)
    return Verdict(name, err, torch_err, 2 * torch_err + dtype_tols(dtype))


def rms_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).pow(2).mean().sqrt().item()


def verdict_rms(
    name: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype
) -> Verdict:
    """The tolerance rule with the root-mean-square error in place of the largest one.

    For the parameter gradients of a whole network trained in low precision only: there a ReLU
    decision within rounding of zero flips in our run or in PyTorch's (each at its own elements),
    and a flipped decision moves one element's gradient by its whole value, so the max-abs rule
    becomes a coin toss between two correct runs (measured: a converted ResNet-18 under CPU bf16
    autocast passed on an Intel Xeon and failed on an AMD EPYC by 7% with the same code,
    layer4.1.conv1.weight.grad 0.707 vs 0.662 allowed). A flip moves the RMS by its share of the
    tensor; a wrong kernel moves it by orders of magnitude. Blocks and ops keep the max-abs rule
    (fastres.parity judges each block against float64 with the run's own ReLU decisions)."""
    err = rms_err(ours, ref)
    torch_err = rms_err(theirs, ref)
    return Verdict(name + " (rms)", err, torch_err, 2 * torch_err + dtype_tols(dtype))


def assert_close_rule(
    name: str, ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype
) -> Verdict:
    v = verdict(name, ours, theirs, ref, dtype)
    if not v.ok:
        raise AssertionError(str(v))
    return v


def compare_all(
    ours: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> list[Verdict]:
    """One :class:`Verdict` per key of ``ref`` (everything a user keeps: output, input grad,
    parameter grads, running stats). Floating tensors follow the tolerance rule at ``dtype``;
    integer tensors (``num_batches_tracked``) must match exactly (bound 0). A key missing from
    ``ours`` or ``theirs`` is an AssertionError."""
    out = []
    for name, r in ref.items():
        if name not in ours or name not in theirs:
            raise AssertionError(f"{name}: missing from {'ours' if name not in ours else 'theirs'}")
        o, t = ours[name], theirs[name]
        if o is None or t is None or r is None:
            raise AssertionError(f"{name}: a gradient or buffer is None")
        if r.is_floating_point():
            out.append(verdict(name, o, t, r, dtype))
        else:
            out.append(Verdict(name, max_abs_err(o, r), max_abs_err(t, r), 0.0))
    return out


def verdict_own_refs(name: str, ours: torch.Tensor, ref_ours: torch.Tensor,
                     theirs: torch.Tensor, ref_theirs: torch.Tensor,
                     dtype: torch.dtype) -> Verdict:
    """The tolerance rule when each result has its own float64 reference: ours against
    ``ref_ours``, PyTorch's against ``ref_theirs``. For piecewise functions (ReLU) each reference
    takes the same discrete decisions as the result it judges (fastres.parity), so that a
    decision flipped by rounding near zero is not charged as a whole gradient value."""
    torch_err = max_abs_err(theirs, ref_theirs)
    return Verdict(name, max_abs_err(ours, ref_ours), torch_err,
                   2 * torch_err + dtype_tols(dtype))


def randomise_bn(model: torch.nn.Module, seed: int | torch.Generator = 0) -> torch.nn.Module:
    """The project's one BatchNorm randomiser: non-trivial affine parameters and running
    statistics in every BatchNorm2d (SyncBatchNorm and timm's BatchNormAct2d are subclasses) and
    FrozenBatchNorm2d of ``model``, so that folding them really matters: weight U[0.5, 1.5),
    bias and running_mean N(0, 0.2^2), running_var U[0.5, 2), num_batches_tracked U{0..999}.
    ``seed``: an int, or a generator to draw from. Returns ``model``."""
    from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: PLC0415

    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.running_mean.numel()
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=g)))
    return model


@contextlib.contextmanager
def allow_tf32(on: bool) -> Iterator[None]:
    """cuDNN's TF32 switch (which the CUDA and Triton fp32 convolutions follow) set to ``on`` for
    the block, restored after."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def run_sm90_compiler(args: list[str], timeout: int):
    """``python *args`` in a subprocess without TRITON_INTERPRET (the sm_90 AOT compile needs
    the real compiler), output captured; skips the calling test when this triton bundles no
    ptxas. For the tests that compile Triton kernels for sm_90 without a GPU."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import pytest  # noqa: PLC0415
    import triton  # noqa: PLC0415

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"this triton has no bundled ptxas ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
