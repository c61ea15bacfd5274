"""fastres_cpu::max_pool2d_cl (csrc/cpu/max_pool.cpp), the ResNet stem's max-pool on the CPU:
torch's values bit for bit (NaN where torch has NaN), the input checked, and fastres.ResNet's
eval body using it only where torch's pool would give the same tensor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastres
from fastres.backends import extension
from fastres.harness.rule import randomise_bn

_mod, _why = extension.load()
if _mod is None:
    raise ImportError(_why)
if not hasattr(torch.ops.fastres_cpu, "max_pool2d_cl"):
    pytest.skip("fastres._C without max_pool2d_cl", allow_module_level=True)

pool = torch.ops.fastres_cpu.max_pool2d_cl
CL = torch.channels_last


def _same(ours, theirs):
    assert ours.shape == theirs.shape and ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geom", [(3, 2, 1, 112, 112), (3, 2, 1, 7, 9), (2, 2, 0, 8, 8),
                                  (3, 1, 1, 5, 6), (3, 2, 1, 1, 3), (1, 1, 0, 3, 3)],
                         ids=lambda g: "k{}s{}p{}_{}x{}".format(*g))
@pytest.mark.parametrize("c", [64, 3, 17])
def test_matches_torch(dtype, geom, c):
    k, s, p, h, w = geom
    x = torch.randn(2, c, h, w).to(dtype).contiguous(memory_format=CL)
    _same(pool(x, [k, k], [s, s], [p, p]), F.max_pool2d(x, k, s, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_like_torch(dtype):
    x = torch.randn(1, 16, 9, 9).to(dtype).contiguous(memory_format=CL)
    x[0, 3, 4, 4] = float("nan")
    x[0, 5, 0, 0] = float("inf")
    x[0, 6, 8, 8] = float("-inf")
    x[0, 7] = float("-inf")  # a whole channel of -inf
    ours, theirs = pool(x, [3, 3], [2, 2], [1, 1]), F.max_pool2d(x, 3, 2, 1)
    _same(ours, theirs)
    assert ours.isnan().sum() == theirs.isnan().sum() > 0


def test_refuses_what_it_does_not_cover():
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(RuntimeError, match="channels_last"):
        pool(x.contiguous(), [3, 3], [2, 2], [1, 1])  # NCHW (not 1x1)
    xc = x.contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="dtype"):
        pool(xc.double(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="not a max-pool"):
        pool(xc, [3, 3], [2, 2], [2, 2])  # padding past half the kernel
    with pytest.raises(RuntimeError, match="not a max-pool"):
        pool(xc, [3, 3], [0, 2], [1, 1])
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        pool(torch.randn(1, 8, 2, 2).contiguous(memory_format=CL), [5, 5], [1, 1], [0, 0])


def _counted(monkeypatch):
    import fastres.nn.resnet as R  # noqa: PLC0415

    calls = []
    real = R._max_pool_op()

    def op(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(R, "_MAX_POOL", [op])
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet_eval_uses_it_with_torchs_result(dtype, monkeypatch):
    calls = _counted(monkeypatch)
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    tv = tv.to(dtype=dtype, memory_format=CL)
    ours = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(2, 3, 64, 64, dtype=dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        ours(x)
        assert calls, "the eval body did not use the pool"
        n = len(calls)
        h = ours.maxpool(ours._stem(x))  # the module itself, on the same stem output
        _same(ours._max_pool(ours._stem(x)), h)
    assert len(calls) == n + 1


def test_resnet_keeps_the_module_where_it_must(monkeypatch):
    """Autograd, a hook on the pool, another pool, NCHW input: the module's own call."""
    calls = _counted(monkeypatch)
    ours = fastres.convert(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=CL)
    ours(x)  # grad enabled
    with torch.no_grad():
        ours(x.contiguous())  # NCHW
        h = ours.maxpool.register_forward_hook(lambda m, i, o: None)
        ours(x)
        h.remove()
        ours.maxpool.ceil_mode = True
        ours(x)
        ours.maxpool.ceil_mode = False
        assert calls == []
        ours(x)
    assert calls == [1]
