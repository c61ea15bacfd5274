"""A ResNet's eval head (global average pool and fc) as one call, ``fastres_cpu::avg_pool_linear``
(csrc/cpu/pool_linear.cpp), and fastres.ResNet's use of it: torch's numbers within the tolerance
rule (bit for bit in bf16 where the fc is at::linear), NaN and Inf as torch gives them, bad input
named, and the modules' own path wherever a user could tell the difference (hooks, autograd,
autocast, another dtype)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fastres
from fastres.backends import extension
from fastres.harness.rule import assert_close_rule
from fastres.nn import resnet as fr_resnet

CL = torch.channels_last
_WHY = extension.load()[1] if extension.load()[0] is None else None
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"no CPU extension: {_WHY}")


def _op():
    return torch.ops.fastres_cpu.avg_pool_linear


def _eager(x, fc):
    return fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _ref(x, fc):
    b = fc.bias.double() if fc.bias is not None else None
    return nn.functional.linear(x.double().mean((2, 3)), fc.weight.double(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 3, 4, 8, 9])  # 9: past the own dot products, at::linear
@pytest.mark.parametrize("c,bias", [(2048, True), (40, False), (7, True)])
def test_head_is_torch_within_the_rule(dtype, n, c, bias):
    torch.manual_seed(n * 100 + c)
    x = torch.randn(n, c, 5, 3).to(dtype).contiguous(memory_format=CL)
    fc = nn.Linear(c, 24, bias=bias).to(dtype)
    with torch.no_grad():
        got = _op()(x, fc.weight, fc.bias)
        want = _eager(x, fc)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    assert_close_rule(f"avg_pool_linear n={n} c={c}", got, want, _ref(x, fc), dtype)
    if dtype == torch.bfloat16 and n > 8:  # the same pooled bits into eager's own fc
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [2, 9])
def test_head_keeps_nan_and_inf(dtype, n):
    x = torch.randn(n, 32, 4, 4).to(dtype).contiguous(memory_format=CL)
    x[0, 3, 1, 2] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    fc = nn.Linear(32, 10).to(dtype)
    with torch.no_grad():
        fc.weight[4].zero_()  # 0 * inf: NaN, as in torch
        got, want = _op()(x, fc.weight, fc.bias), _eager(x, fc)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    assert got[0].isnan().all() and got[1].isnan()[4] and not got[2:].isnan().any()
    if n > 2:  # the finite images as torch gives them
        assert_close_rule("avg_pool_linear beside NaN", got[2:], want[2:], _ref(x[2:], fc),
                          dtype)


def test_head_names_bad_input():
    op = _op()
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=CL)
    w = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="channels_last"):
        op(torch.randn(2, 8, 3, 3), w, None)  # NCHW with C > 1
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(K, 8\\)"):
        op(x, torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="x's dtype"):
        op(x, w.bfloat16(), None)
    with pytest.raises(RuntimeError, match="bias must be a contiguous \\(4\\)"):
        op(x, w, torch.randn(5))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x.double(), w.double(), None)
    assert op(x[:0], w, None).shape == (0, 4)
    b0 = torch.randn(4)  # no channels: the bias, as torch's linear gives it
    got = op(torch.randn(2, 0, 3, 3).contiguous(memory_format=CL), torch.zeros(4, 0), b0)
    assert torch.equal(got, b0.expand(2, 4))


def _models(dtype):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    ours = fastres.convert(copy.deepcopy(tv)).eval().to(dtype, memory_format=CL)
    x = torch.randn(2, 3, 64, 64).to(dtype).contiguous(memory_format=CL)
    return tv.to(dtype, memory_format=CL), ours, x


def _count_head(monkeypatch):
    calls = []
    op = fr_resnet._head_op()
    assert op is not None
    monkeypatch.setattr(fr_resnet, "_head_op", lambda: lambda *a: calls.append(1) or op(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet_eval_runs_its_head_in_one_call(dtype, monkeypatch):
    calls = _count_head(monkeypatch)
    tv, ours, x = _models(dtype)
    with torch.no_grad():
        got = ours(x)
        want = tv(x)
        ref = copy.deepcopy(tv).double()(x.double())
    assert len(calls) == 1
    assert_close_rule("resnet18 with the one-call head", got, want, ref, dtype)
    # The fc changed through .data: read as it is on the next call (nothing cached).
    with torch.no_grad():
        ours.fc.weight.data.mul_(2.0)
        tv.fc.weight.data.mul_(2.0)
        got, want = ours(x), tv(x)
        ref = copy.deepcopy(tv).double()(x.double())
    assert_close_rule("after a .data write to the fc", got, want, ref, dtype)


def test_resnet_head_steps_aside(monkeypatch):
    """Hooks on the pool or fc fire, autograd and autocast get the modules, an fc of another
    dtype runs as the module does."""
    calls = _count_head(monkeypatch)
    tv, ours, x = _models(torch.float32)
    seen = []
    h = ours.fc.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        ours(x)
    h.remove()
    assert seen == [(2, 512)] and not calls
    h = ours.avgpool.register_forward_pre_hook(lambda m, i: seen.append("pool"))
    with torch.no_grad():
        ours(x)
    h.remove()
    assert seen[-1] == "pool" and not calls
    ours(x).sum().backward()  # grad enabled: the modules, a gradient reaches the fc
    assert ours.fc.weight.grad is not None and not calls
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    assert out.dtype == torch.bfloat16 and not calls  # autocast's fc, as the module runs it
    ours.fc.double()
    with torch.no_grad():
        with pytest.raises(RuntimeError):  # the module's own error for mixed dtypes
            ours(x)
    assert not calls
