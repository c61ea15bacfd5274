"""The backends layer: which kernels serve an op call.

* :mod:`~fastres.backends.dispatch`: the backends (``cuda``, ``triton``, ``cpu``, ``reference``,
  ``cudasim``), what each can serve, and ``select``, the dispatcher;
* :mod:`~fastres.backends.extension`: loading the compiled extensions ``fastres._C`` and
  ``fastres._C_cudasim`` (never an import crash);
* :mod:`~fastres.backends.fakes`: the compiled ops' fake kernels (torch.compile, torch.export);
* :mod:`~fastres.backends.variants`: the kernel variants each backend launches, per shape;
* :mod:`~fastres.backends.records`: the self-test's records of what passed on this device.

Layers above (``fastres.functional``, ``fastres.nn``) import from here; nothing here imports them.
"""

from __future__ import annotations

from fastres._specs import Inputs
from fastres.backends.dispatch import (
    BACKENDS,
    FLOAT_DTYPES,
    OP_NAMES,
    PRIORITY,
    Backend,
    available,
    forced,
    op,
    select,
)

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "OP_NAMES",
    "PRIORITY",
    "Backend",
    "Inputs",
    "available",
    "forced",
    "op",
    "select",
]
