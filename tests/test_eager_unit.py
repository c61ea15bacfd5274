"""A training unit's forward and backward from C++ (csrc/cuda/unit.h, csrc/cpu/unit_cpu.h,
fastres._autograd_unit).

On the CUDA path (here cudasim: the CUDA launchers and kernels on the CPU) and the CPU path a
fused block's training step runs its ops from two C++ calls instead of one torch.ops call each.
These tests check it against the per-op path it replaces (a dispatch mode sends the call there):
the same output, running statistics, counters and gradients bit for bit (the same kernels in the
same order), torchvision's within the rule, and the errors and BatchNorm variants of that path.
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
from fastres._autograd import inner_relu_decisions
from fastres.harness.rule import allow_tf32, assert_close_rule, randomise_bn

#: The backends with a C++ unit, and the op namespace of their per-op path.
UNIT_BACKENDS = {"cudasim": "fastres_cudasim", "cpu": "fastres"}


@pytest.fixture(params=list(UNIT_BACKENDS))
def backend(request, monkeypatch):
    name = request.param
    why = backends.BACKENDS[name].unavailable_reason()
    if why:
        pytest.skip(f"{name}: {why}")
    monkeypatch.setenv("FASTRES_BACKEND", name)
    return name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bottleneck", "downsample", "basic"])
def test_unit_from_cpp_is_the_per_op_path(kind, dtype, backend):
    tv = randomise_bn(_block(kind)).train()
    ours = fastres.convert(copy.deepcopy(tv)).train().to(dtype, memory_format=torch.channels_last)
    twin = copy.deepcopy(ours)  # the per-op path, from the same state
    x = torch.randn(2, tv.conv1.in_channels, 9, 9).to(dtype).contiguous(
        memory_format=torch.channels_last)
    with allow_tf32(False):
        proj = torch.randn(ours(x).shape)
        twin(x)  # the same number of steps: the running statistics stay in step
        for _ in range(2):
            got, out = _step(ours, x, proj)
            with OpLog() as log:
                want, _ = _step(twin, x, proj)
    assert out.grad_fn.name() == "ResidualUnitBackward"
    assert f"{UNIT_BACKENDS[backend]}::conv_stats" in log.seen  # the twin ran the per-op path
    assert set(got) == set(want)
    for k in got:
        assert torch.equal(got[k], want[k]), k
    assert inner_relu_decisions(ours(x)) is not None  # the parity harness reads the unit too


@pytest.mark.parametrize("variant", ["momentum None", "affine False", "downsample"])
def test_unit_from_cpp_matches_torchvision(variant, backend):
    """Against torchvision's block (float64 reference): cumulative-average running statistics,
    BatchNorms without affine parameters, a downsample's statistics."""
    tv = variant_block(variant)
    ours = fastres.convert(copy.deepcopy(tv)).train()
    x = torch.randn(2, tv.conv1.in_channels, 9, 9)
    out = against_torchvision(f"unit {variant}", ours, tv, x)
    assert out.grad_fn.name() == "ResidualUnitBackward"


def test_unit_from_cpp_one_value_per_channel(backend):
    """A batch with one value per channel raises torch's error, as nn.BatchNorm2d does."""
    ours = fastres.convert(_block("basic")).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(torch.randn(1, 24, 1, 1))


def test_train_plan_follows_the_block(backend):
    """The block's training plan (fastres.nn.train_plan) serves repeated calls and steps aside
    for what it did not decide: a new momentum, a hook, another input shape, eval mode, a dtype
    change; every call still matches torchvision's (float64 reference) training block."""
    tv = randomise_bn(_block("downsample")).train()
    ours = fastres.convert(copy.deepcopy(tv)).train()
    ref = copy.deepcopy(tv).double()
    x = torch.randn(2, 32, 9, 9)

    def check(name, xi=x):
        with allow_tf32(False):
            got, want, exact = ours(xi), tv(xi), ref(xi.double())
        assert_close_rule(name, got, want, exact, torch.float32)
        for (n, b), b_tv, b_ref in zip(ours.named_buffers(), tv.buffers(), ref.buffers(),
                                       strict=True):
            if n.endswith("num_batches_tracked"):
                assert torch.equal(b, b_tv), n
            else:
                assert_close_rule(f"{name}: {n}", b, b_tv, b_ref, torch.float32)
        return got

    check("first call")
    plan = ours.__dict__["_train_plan"]
    assert plan is not None
    out = check("planned call")
    assert ours.__dict__["_train_plan"] is plan
    assert out.grad_fn.name() == "ResidualUnitBackward"
    for m in (tv, ours, ref):
        m.bn2.momentum = 0.5
    check("new momentum")
    seen = []
    h = ours.bn1.register_forward_hook(lambda m, i, o: seen.append(1))
    check("hooked")
    h.remove()
    assert seen == [1]
    check("another shape", torch.randn(3, 32, 7, 7))
    for m in (tv, ours, ref):
        m.eval()
    check("eval")
    for m in (tv, ours, ref):
        m.train()
    check("train again")
    assert ours.__dict__["_train_plan"] is not plan  # remade for the other shape


def test_training_plan_sees_a_tensor_change_its_dtype(backend):
    """A training plan holds while its tensors keep their dtypes and devices (fastres._C's
    tensor_sig): a BatchNorm moved to float32 in a bfloat16 block is not run on the plan made
    for bfloat16 tensors."""
    ours = fastres.convert(_block("bottleneck")).train().to(
        torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 64, 9, 9).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ours(x)
    plan = ours.__dict__["_train_plan"]
    assert plan.call(ours, x) is not None
    ours.bn2.float()
    assert plan.call(ours, x) is None
