"""Shared test setup: seeds, the Triton interpreter on GPU-less machines, device skips."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Triton kernels run on the CPU only under the interpreter, which must be chosen before triton is
# imported; nothing imports triton before this conftest.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("FASTRES_INSTAFAIL") == "1":
    # Each failure's report printed the moment it fails (bench/device_check.sh sets it).
    from _instafail import pytest_runtest_logreport  # noqa: F401

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
