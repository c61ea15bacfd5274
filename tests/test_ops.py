"""Every op of the contract (fastres/_opset.py) on every backend, against fastres.reference.

One table of cases (tests/op_cases.py) x the backends (tests/op_check.py): ``cpu`` (the C++ CPU
kernels), ``reference`` (the oracle at the case's dtype), ``cudasim`` (the CUDA kernels' own
source on the CPU execution harness), ``triton`` (under TRITON_INTERPRET=1 without a GPU) and
``cuda`` (a GPU; the device check runs ``-m gpu``). A backend that cannot run here is skipped
with its unavailable_reason(); one that cannot serve a case, with its not_supported_reasons().

Each output and mutated argument: the reference's device, dtype, shape and 4-D strides, and the
tolerance rule against the reference run in float64 (fastres.harness.rule). One test id per
backend, op, geometry, dtype and layout, so that a broken kernel is named by the failing id.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import CASES, reasons
from op_check import BACKEND_NAMES, Maker, check, unavailable

from fastres import backends


def _params():
    out = []
    for backend in BACKEND_NAMES:
        down = unavailable(backend)
        for case in CASES:
            marks = [pytest.mark.gpu] if backend == "cuda" else []
            why = [down] if down else reasons(backend, case)
            if why:
                marks.append(pytest.mark.skip(reason=f"{backend}: {'; '.join(why)}"))
            out.append(pytest.param(backend, case, id=f"{backend}-{case.id}", marks=marks))
    return out


_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread: the shapes are small, and OpenMP fork/join on a busy 2-core machine costs
    milliseconds per oneDNN call (tests/test_ops_cpu.py checks the threaded paths)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_THREADS)


@pytest.mark.parametrize(("backend", "case"), _params())
def test_op(backend, case):
    m = Maker(backend, case.dtype, case.layout)
    for args, mutated in case.calls(m):
        check(backend, case.op, args, case.dtype, mutated, tf32=case.tf32)


def test_every_op_has_cases_in_every_family():
    """A new op of the contract needs cases here; the device and flags families cover every op
    (they run on every backend, emulated ones included)."""
    for family in ("device", "flags"):
        missing = set(backends.OP_NAMES) - {c.op for c in CASES if c.family == family}
        assert not missing, f"ops without a {family} case: {sorted(missing)}"
