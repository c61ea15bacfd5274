"""fastres.triton_kernels: the fastres op set as Triton kernels (``torch.ops.fastres_triton.*``).

The dispatcher (fastres/backends.py) calls three functions of this package:

* ``unavailable_reason()``: why these kernels cannot run here at all, or None;
* ``not_supported_reasons(inputs)``: every reason they cannot serve one call;
* ``ops()``: the ops of the contract (fastres.backends.OP_NAMES), signatures as in
  fastres/reference.py.

Eager callers that do not trace (``torch.compiler.is_compiling()`` false) may take
``eager_ops()`` instead: the same functions without the dispatcher.

Importing this package imports neither triton nor the kernels and never touches CUDA: triton is
imported and the ops are registered (``torch.ops.fastres_triton.*``, which the dispatcher looks
up by attribute) by the first call of any of the three functions. On a machine without a GPU the
kernels run under the Triton interpreter, which must be chosen (``TRITON_INTERPRET=1``) before
triton is imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from types import SimpleNamespace

MIN_TRITON = (3, 2)  # wrap_triton / triton_op arrived with torch 2.6, which ships triton 3.2


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _triton_version() -> str | None:
    try:
        if importlib.util.find_spec("triton") is None:
            return None
    except (ImportError, ValueError):  # a blocked or half-imported triton
        return None
    for dist in ("triton", "pytorch-triton", "triton-nightly"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0"


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run on this installation, or None. Read once per process:
    the versions, the interpreter switch and the device do not change, and reading a package's
    metadata costs 150-190 us, which the dispatcher's every Triton call paid."""
    version = _triton_version()
    if version is None:
        return "triton is not installed (pip install triton)"
    if version != "0" and _version_tuple(version)[:2] < MIN_TRITON:  # "0": no metadata, try it
        return f"triton {version} is too old (need >= {'.'.join(map(str, MIN_TRITON))})"
    import torch  # noqa: PLC0415

    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} has no torch.library.triton_op (need torch >= 2.6)"
    interpreted = _interpreted()
    if interpreted is None:
        return f"the triton kernels do not import: {_import_error!r}"
    if not interpreted and not torch.cuda.is_available():
        return ("no CUDA device is available and the Triton interpreter is off (set "
                "TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU)")
    return None


_import_error: Exception | None = None


@functools.lru_cache(maxsize=1)
def _interpreted() -> bool | None:
    """Whether the kernels are interpreted (decided by TRITON_INTERPRET when triton was first
    imported); None when they do not import. Registers the ops on first success. Read once: a
    failed import is not retried either."""
    global _import_error
    try:
        from . import _common, _ops  # noqa: F401, PLC0415
    except Exception as exc:  # noqa: BLE001 - reported through unavailable_reason()
        _import_error = exc
        return None
    return _common.INTERPRETED


def not_supported_reasons(inputs) -> list[str]:
    """Every reason the Triton kernels cannot serve ``inputs`` (a fastres.backends.Inputs)."""
    why = unavailable_reason()
    if why:
        return [why]
    return list(_reasons(inputs.device.type, str(inputs.device), inputs.dtype, inputs.groups,
                         tuple(inputs.kernel_size)))


@functools.lru_cache(maxsize=256)
def _reasons(dev: str, device: str, dtype, groups: int, kernel_size: tuple) -> tuple[str, ...]:
    """not_supported_reasons per class of inputs: they depend on nothing else, and the
    dispatcher asks per call."""
    import torch  # noqa: PLC0415

    reasons = []
    interpreted = _interpreted()
    if dev == "cpu":
        if not interpreted:
            reasons.append("triton runs on cpu tensors only under TRITON_INTERPRET=1")
    elif dev != "cuda":
        reasons.append(f"triton runs on cuda tensors, got {device}")
    elif interpreted:
        reasons.append("the Triton interpreter (TRITON_INTERPRET=1) runs on cpu tensors only")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"triton does not support dtype {dtype} (float32, float16, bfloat16)")
    if groups != 1:
        reasons.append(f"triton kernels support groups=1 only, got groups={groups}")
    kh, kw = kernel_size
    if max(kh, kw) > 7:
        reasons.append(f"triton kernels support kernels up to 7x7, got {kernel_size}")
    return tuple(reasons)


def ops() -> SimpleNamespace:
    """The ops as ``torch.ops.fastres_triton.*`` callables (registers them on first use)."""
    from ._ops import op_namespace  # noqa: PLC0415

    return op_namespace()


@functools.lru_cache(maxsize=1)
def eager_ops() -> SimpleNamespace:
    """The ops' Python bodies, the same names and signatures as ``ops()`` (``conv_bias_act``,
    ``conv_stats``, ``bn_finalize``, ...), called without the torch.ops dispatch (10-15 µs per
    call in eager). For eager callers only: they are not traceable by ``torch.compile`` or
    ``torch.export`` (use ``ops()`` there) and have no autograd formula (as ``ops()``: autograd
    is fastres/_autograd.py's). The ops that write running statistics in place bump those
    tensors' version counters, as the dispatcher does. Registers the ops on first use."""
    from ._ops import eager_namespace  # noqa: PLC0415

    return eager_namespace()


def eager_block():
    """(block_spec, block_eval): a residual block's eval convolutions as one launch plan per
    shape class (``block.py``), the contract of csrc/cuda/block_py.h's. For eager calls under no
    dispatch mode (fastres/nn/eval_plan.py decides); they bypass the dispatcher. Registers the
    ops on first use."""
    from ._ops import op_namespace  # noqa: PLC0415, F401  (registers the ops)
    from .block import block_eval, block_spec  # noqa: PLC0415

    return block_spec, block_eval


def eager_unit():
    """(unit_spec, unit_forward, unit_backward): a residual unit's training step as launch
    plans per shape class (``unit.py``), the contract of csrc/cuda/unit.h's. For eager calls
    under no dispatch mode (fastres.functional.residual_unit and fastres/nn/train_plan.py
    decide); they bypass the dispatcher. Registers the ops on first use."""
    from ._ops import op_namespace  # noqa: PLC0415, F401  (registers the ops)
    from .unit import unit_backward, unit_forward, unit_spec  # noqa: PLC0415

    return unit_spec, unit_forward, unit_backward


__all__ = ["unavailable_reason", "not_supported_reasons", "ops", "eager_ops", "eager_block",
           "eager_unit"]
