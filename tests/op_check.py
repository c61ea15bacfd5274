"""One op call on one backend, judged against fastres.reference in float64 by the suite's
tolerance rule (fastres.harness.rule), and the backends the op tests run on.

``check(backend, op_name, args, dtype)`` runs the op three times, each on its own copy of the
arguments: as ``backend`` implements it (ours), as the reference at ``dtype`` (PyTorch's own
error, the yardstick) and as the reference on float64 copies (the truth). Every output and every
mutated argument must have the reference's device, dtype, shape and (4-D) strides, and meet
err(ours) <= 2 * err(PyTorch) + atol[dtype]; integer tensors must be equal.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastres import backends, reference
from fastres.harness.rule import allow_tf32, assert_close_rule
from fastres.harness.selftest_cases import tf32_round

#: Every backend of the op set (fastres.backends.BACKENDS), in the order the suite runs them.
BACKEND_NAMES = ("cpu", "reference", "cudasim", "triton", "cuda")

#: Backends that run emulated on a machine without a GPU (thousands of times slower than eager):
#: they run the cases marked ``emulate`` (small shapes, every fusion flag), not the sweeps.
EMULATED = {
    "cudasim": "cudasim runs every CUDA thread as a CPU fiber",
    "triton": "triton runs under its interpreter (TRITON_INTERPRET=1)",
}


def device_of(backend: str) -> torch.device:
    """The device a backend's operands live on: Triton's on the CPU under its interpreter."""
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return torch.device("cuda")
    return torch.device("cpu")


def emulated(backend: str) -> str | None:
    """Why ``backend`` is emulated here (see EMULATED), or None when it runs natively."""
    return EMULATED.get(backend) if device_of(backend).type == "cpu" else None


def unavailable(backend: str) -> str | None:
    return backends.BACKENDS[backend].unavailable_reason()


def backend_params(names=BACKEND_NAMES) -> list:
    """pytest params, one per backend: skipped with the backend's own unavailable_reason() where
    it cannot run; ``cuda`` marked ``gpu`` (the device check selects those)."""
    out = []
    for name in names:
        why = unavailable(name)
        marks = [pytest.mark.gpu] if name == "cuda" else []
        if why:
            marks.append(pytest.mark.skip(reason=f"{name}: {why}"))
        out.append(pytest.param(name, id=name, marks=marks))
    return out


class Maker:
    """Random operands on a backend's device at one dtype and layout, reproducible per test (the
    autouse seed of conftest.py)."""

    def __init__(self, backend: str, dtype: torch.dtype, layout: str = "channels_last"):
        self.device, self.dtype, self.layout = device_of(backend), dtype, layout
        self.acc = reference.acc_dtype(dtype)

    def fmt(self, t: torch.Tensor, layout: str | None = None) -> torch.Tensor:
        cl = (layout or self.layout) == "channels_last"
        return t.contiguous(memory_format=torch.channels_last) if cl else t

    def act(self, *shape, layout=None, scale=1.0, offset=0.0):
        """An activation: N(offset, scale^2) values rounded to the dtype."""
        t = torch.randn(shape, dtype=torch.float64) * scale + offset
        return self.fmt(t.to(self.dtype).to(self.device), layout)

    def vec(self, c, lo=None, hi=None):
        """A per-channel vector in the accumulation dtype: N(0, 1), or U[lo, hi)."""
        v = torch.randn(c, dtype=torch.float64) if lo is None else \
            torch.rand(c, dtype=torch.float64) * (hi - lo) + lo
        return v.to(self.acc).to(self.device)

    def pos(self, c):
        """A positive per-channel vector (a scale or invstd), U[0.5, 1.5)."""
        return self.vec(c, 0.5, 1.5)

    def weight(self, k, c, r, s=None, layout=None, shift=0.0):
        s = r if s is None else s
        w = torch.randn(k, c, r, s, dtype=torch.float64) / (c * r * s) ** 0.5 + shift
        return self.fmt(w.to(self.dtype).to(self.device), layout)

    def stats(self, x):
        """Batch mean and invstd of x (eps 1e-5) in the accumulation dtype."""
        xs = x.to(torch.float64)
        var = xs.var((0, 2, 3), unbiased=False)
        return xs.mean((0, 2, 3)).to(self.acc), torch.rsqrt(var + 1e-5).to(self.acc)

    def sums(self, x):
        xs = x.to(self.acc)
        return xs.sum((0, 2, 3)), (xs * xs).sum((0, 2, 3))


def _clone(a):
    return a.detach().clone() if isinstance(a, torch.Tensor) else a


def _f64(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().clone().to(torch.float64)
    return _clone(a)


def _as_tuple(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def check(backend: str, op_name: str, args, dtype: torch.dtype, mutated=(), tf32: bool = False):
    """Run ``op_name`` as ``backend`` implements it, as the reference at ``dtype`` and in float64;
    judge every output and every mutated argument (indices into ``args``). cuDNN's TF32 switch,
    which the CUDA and Triton fp32 convolutions follow, is pinned to ``tf32``; with it on,
    PyTorch's yardstick is the reference on TF32-rounded operands (what a TF32 convolution
    multiplies; a CPU reference cannot run TF32 itself). Returns our outputs as a tuple."""
    op = backends.BACKENDS[backend].op(op_name)
    fn = getattr(reference, op_name)
    # ours on the arguments themselves (a cache keyed by the weight sees the weight), copies
    # of the mutated ones; the reference's copies are taken first
    a_ours = [_clone(a) if i in mutated else a for i, a in enumerate(args)]
    a_theirs = [tf32_round(_clone(a)) if tf32 else _clone(a) for a in args]
    a_truth = [_f64(a) for a in args]
    with allow_tf32(tf32):
        ours = _as_tuple(op(*a_ours))
    theirs, truth = _as_tuple(fn(*a_theirs)), _as_tuple(fn(*a_truth))
    assert len(ours) == len(theirs), f"{op_name}: {len(ours)} outputs, reference {len(theirs)}"
    judged = [(f"{op_name}[{i}]", o, t, r)
              for i, (o, t, r) in enumerate(zip(ours, theirs, truth, strict=True))]
    judged += [(f"{op_name} arg {i}", a_ours[i], a_theirs[i], a_truth[i])
               for i in mutated if args[i] is not None]
    for label, o, t, r in judged:
        assert o.device == t.device, f"{label}: on {o.device}, reference on {t.device}"
        assert o.dtype == t.dtype, f"{label}: dtype {o.dtype} != reference {t.dtype}"
        assert o.shape == t.shape, f"{label}: shape {tuple(o.shape)} != {tuple(t.shape)}"
        if o.dim() == 4:
            want = _strides(op_name, label, args, t)
            assert o.stride() == want, f"{label}: strides {o.stride()} != {want}"
        if o.is_floating_point():
            assert_close_rule(f"{backend} {label}", o, t, r, dtype)
        else:
            assert torch.equal(o.cpu(), t.cpu()), f"{label}: {o.tolist()} != {t.tolist()}"
    return ours


def _strides(op_name, label, args, theirs):
    """The strides a 4-D output must have: the reference's, except conv_bwd's grad_weight, which
    takes the weight's own (the fake: empty_like(weight)); the reference returns whatever
    convolution_backward picked."""
    if op_name == "conv_bwd" and label.endswith("[1]") and theirs.numel():
        return args[2].stride()
    return theirs.stride()
