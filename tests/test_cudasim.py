"""cudasim itself (csrc/cuda/cudasim): what the CUDA launchers do on it beyond the op results
(tests/test_ops_device.py runs those), and the planted bugs it must catch."""

from __future__ import annotations

import pytest
import torch

from fastres import backends

_WHY = backends.BACKENDS["cudasim"].unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cudasim not available: {_WHY}")


def _conv(dtype, k):
    x = torch.randn(2, 16, 9, 11).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, 16, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    return torch.ops.fastres_cudasim.conv_bias_act(x, w, None, None, [1, 1], [1, 1], [1, 1], 1,
                                                   False)


def test_smem_attribute_set_once_per_kernel():
    """cudaFuncSetAttribute(MaxDynamicSharedMemorySize) runs at the first launch of a kernel on a
    device, not at every launch (a driver call each time)."""
    from fastres import _C_cudasim

    _conv(torch.bfloat16, 128)  # CfgTcBig: 69,632 B, needs the attribute
    before = _C_cudasim.func_set_attribute_calls()
    for _ in range(3):
        _conv(torch.bfloat16, 128)
    assert _C_cudasim.func_set_attribute_calls() == before
