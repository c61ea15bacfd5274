"""A training unit's step as Triton launch plans (triton_kernels/unit.py, fastres._autograd_unit).

The Triton backend's ``eager_unit`` records the per-op path's launches once per shape class and
replays them. These tests check the replayed calls against the per-op path they replace (a
dispatch mode sends the twin there): the same output, running statistics, counters, input and
parameter gradients bit for bit (the same kernels in the same order), NaN where that path has
NaN, torchvision's block within the rule, and the variants that path serves.
"""

from __future__ import annotations

import copy

import pytest
import torch
from dispatch_log import OpLog
from unit_steps import against_torchvision
from unit_steps import block as _block
from unit_steps import step as _step
from unit_steps import variant as variant_block

import fastres
from fastres import backends
from fastres.harness.rule import allow_tf32, randomise_bn

pytestmark = pytest.mark.skipif(bool(backends.BACKENDS["triton"].unavailable_reason()),
                                reason="the Triton kernels do not run here")


def _stats() -> dict:
    from fastres.triton_kernels import unit  # noqa: PLC0415

    return dict(unit.stats)


@pytest.fixture
def triton(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "triton")


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in got:
        if want[k] is None:
            assert got[k] is None, k
        else:
            assert got[k].dtype == want[k].dtype, k
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bottleneck", "downsample"])
def test_unit_plan_is_the_per_op_path(kind, dtype, triton):
    tv = randomise_bn(_block(kind)).train()
    ours = fastres.convert(copy.deepcopy(tv)).train().to(dtype, memory_format=torch.channels_last)
    twin = copy.deepcopy(ours)  # the per-op path, from the same state
    x = torch.randn(2, tv.conv1.in_channels, 9, 9).to(dtype).contiguous(
        memory_format=torch.channels_last)
    with allow_tf32(dtype == torch.float32):  # float32: the TF32 path's launches too
        proj = torch.randn(ours(x).shape)
        twin(x)  # the same number of steps: the running statistics stay in step
        s0 = _stats()
        for need_x in (True, True, False):
            got, out = _step(ours, x, proj, need_x)
            with OpLog() as log:
                want, _ = _step(twin, x, proj, need_x)
            _same(got, want)
    s1 = _stats()
    assert out.grad_fn.name() == "ResidualUnitBackward"
    assert "fastres_triton::conv_stats" in log.seen  # the twin ran the per-op path
    # forward plan made by the first call; two backward plans (with and without dx)
    assert s1["built"] - s0["built"] == 2 and s1["ops"] == s0["ops"]
    assert s1["planned"] - s0["planned"] == 4  # the other calls replayed


@pytest.mark.parametrize("kind", ["bottleneck", "downsample"])
def test_unit_plan_propagates_nan_as_the_per_op_path(kind, triton):
    tv = randomise_bn(_block(kind)).train()
    ours = fastres.convert(copy.deepcopy(tv)).train().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(ours)
    x = torch.randn(2, tv.conv1.in_channels, 9, 9).contiguous(memory_format=torch.channels_last)
    with allow_tf32(False):
        proj = torch.randn(ours(x).shape)
        twin(x)
        _step(ours, x, proj), _step(twin, x, proj)  # the plans made
        x[1, 3, 4, 5] = float("nan")
        proj[0, 2, 1, 1] = float("inf")
        s0 = _stats()
        got, _ = _step(ours, x, proj)
        with OpLog():
            want, _ = _step(twin, x, proj)
    assert _stats()["planned"] - s0["planned"] == 2
    assert got["output"].isnan().any() and got["input"].isnan().any()
    _same(got, want)


@pytest.mark.parametrize("variant", ["momentum None", "affine False", "basic"])
def test_unit_plan_matches_torchvision(variant, triton):
    """Against torchvision's block (float64 reference): cumulative-average running statistics,
    BatchNorms without affine parameters, a basic block, over replayed steps."""
    tv = variant_block(variant)
    ours = fastres.convert(copy.deepcopy(tv)).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, tv.conv1.in_channels, 9, 9).contiguous(memory_format=torch.channels_last)
    s0 = _stats()
    out = against_torchvision(f"unit {variant}", ours, tv, x)
    assert _stats()["planned"] - s0["planned"] >= 3
    assert out.grad_fn.name() == "ResidualUnitBackward"


def test_unit_plan_steps_aside_for_a_layout_it_cannot_replay(triton):
    """A contiguous (NCHW) block: the op bodies copy its input and 3x3 weight to channels_last
    per call, which a replay of the launches would not repeat; it runs through the op bodies,
    with the per-op path's results."""
    tv = randomise_bn(_block("bottleneck")).train()
    ours = fastres.convert(copy.deepcopy(tv)).train()
    twin = copy.deepcopy(ours)
    x = torch.randn(2, 64, 9, 9)
    with allow_tf32(False):
        proj = torch.randn(ours(x).shape)
        twin(x)
        s0 = _stats()
        got, _ = _step(ours, x, proj)
        with OpLog():
            want, _ = _step(twin, x, proj)
    s1 = _stats()
    assert s1["planned"] == s0["planned"] and s1["ops"] > s0["ops"]
    _same(got, want)


def test_unit_plan_one_value_per_channel(triton):
    """A batch with one value per channel raises torch's error, as nn.BatchNorm2d does."""
    ours = fastres.convert(_block("basic")).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(torch.randn(1, 24, 1, 1))


def test_unit_plan_follows_replaced_parameters(triton):
    """A parameter replaced by one of another layout (a 3x3 weight made contiguous) is not run
    on the plan made for the first; values written in place are read as they are."""
    tv = randomise_bn(_block("bottleneck")).train()
    ours = fastres.convert(copy.deepcopy(tv)).train().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(ours)
    x = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    with allow_tf32(False):
        proj = torch.randn(ours(x).shape)
        twin(x)
        for m in (ours, twin):
            with torch.no_grad():
                m.conv2.weight.mul_(0.5)
        got, _ = _step(ours, x, proj)
        with OpLog():
            want, _ = _step(twin, x, proj)
        _same(got, want)
        for m in (ours, twin):
            m.conv2.weight = torch.nn.Parameter(m.conv2.weight.detach().contiguous())
        s0 = _stats()
        got, _ = _step(ours, x, proj)
        with OpLog():
            want, _ = _step(twin, x, proj)
    _same(got, want)
    assert _stats()["ops"] + _stats()["built"] > s0["ops"] + s0["built"]
