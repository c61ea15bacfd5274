"""A CPU eval plan with folds as one call (csrc/cpu/block_cpu_py.h, written out by
fastres/nn/fast_path.py's make_cpu_eval_fast): the same bits as the plan's Python path, every
write that path sees seen (the fold check runs in C++: the fingerprint, or a frozen block's
identities, version counters and data pointers), NaN/Inf where the Python path puts them, and None
(the plan's own code then decides) wherever a check fails."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from dispatch_log import OpLog
from unit_steps import block as _block

import fastres
from fastres.backends import extension
from fastres.harness.rule import assert_close_rule, randomise_bn

_mod, _why = extension.load()
pytestmark = pytest.mark.skipif(_mod is None or not hasattr(_mod, "cpu_block_eval"),
                                reason=f"fastres._C without cpu_block_eval ({_why})")

CL = torch.channels_last
KINDS = ["bottleneck", "downsample", "basic"]


def _made(kind: str, dtype=torch.float32, freeze: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    tv = randomise_bn(_block(kind)).eval().to(dtype=dtype, memory_format=CL)
    ours = fastres.convert(copy.deepcopy(tv), freeze=freeze)
    x = torch.randn(2, tv.conv1.in_channels, 9, 9, dtype=dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        ours(x)
    plan = ours.__dict__["_eval_plan"]
    assert plan is not None and plan.folds is not None, "a CPU plan with folds"
    assert plan.fast is not None, "the CPU plan's steady state is written out"
    return tv, ours, x, plan


def _python_path(ours, x, donate=False):
    """The plan's own Python call, the written-out one set aside."""
    plan = ours.__dict__["_eval_plan"]
    fast, plan.fast = plan.fast, None
    try:
        return plan.run(ours, x, donate)
    finally:
        plan.fast = fast


@pytest.mark.parametrize("freeze", [False, True], ids=["live", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_serves_with_the_python_paths_bits(kind, dtype, freeze):
    tv, ours, x, plan = _made(kind, dtype, freeze)
    with torch.no_grad():
        got = plan.fast(ours, x)
        assert got is not None
        assert torch.equal(got, _python_path(ours, x))
        assert got.stride() == tv(x).stride()
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule(f"cpu block {kind}", got, tv(x), ref, dtype)
        # donated: the residual add written into x's buffer (fastres.ResNet's intermediates)
        want = _python_path(ours, x.clone(), donate=True)
        xd = x.clone()
        got = plan.fast(ours, xd, True)
        assert torch.equal(got, want)
        if kind != "downsample":
            assert got.data_ptr() == xd.data_ptr()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_nonfinite_input_like_the_python_path(value):
    """A NaN/Inf input fails the bound: the ReLU pass that keeps NaN, as the Python path."""
    tv, ours, x, plan = _made("bottleneck")
    x = x.clone()
    x[0, 3, 4, 4] = value
    with torch.no_grad():
        got = plan.fast(ours, x)
        want = _python_path(ours, x)
        theirs = tv(x)
    assert got is not None and got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.isnan(), theirs.isnan())


def test_zero_weights_keep_nan_from_an_infinite_input():
    """Every convolution of a block zero: its outputs are bounded whatever the input, but an Inf
    input makes 0 * Inf = NaN, which torch keeps; the bound refuses it (m_max at most the
    limit), on both paths."""
    tv = _block("downsample").eval().to(memory_format=CL)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
    ours = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        ours(x)
        plan = ours.__dict__["_eval_plan"]
        assert plan.fast is not None and plan.m_max <= 1e30
        x[0, 0, 4, 4] = float("inf")
        theirs = tv(x)
        assert theirs.isnan().any()
        for got in (plan.fast(ours, x), _python_path(ours, x)):
            assert torch.equal(got.isnan(), theirs.isnan())


def test_huge_input_like_the_python_path():
    """Past the plan's bound (m_max) the ReLU pass runs, as on the Python path."""
    tv, ours, x, plan = _made("bottleneck")
    with torch.no_grad():
        big = x * (2 * plan.m_max)
        got = plan.fast(ours, big)
        assert got is not None
        torch.testing.assert_close(got, _python_path(ours, big), rtol=0, atol=0, equal_nan=True)


def test_profile_names_the_ops():
    """A profile of the one call lists the ops it runs under their torch.ops names."""
    tv, ours, x, plan = _made("downsample")
    with torch.no_grad(), torch.profiler.profile() as prof:
        plan.fast(ours, x)
    names = [e.key for e in prof.key_averages()]
    for op in ("fastres_cpu::fingerprint", "fastres_cpu::absmax",
               "fastres_cpu::conv_bias_act_finite", "fastres_cpu::conv_bias_act_finite_into"):
        assert op in names, names


def test_live_block_sees_every_write():
    """A live block's fold check is the fingerprint: a write through .data, an in-place op, a
    new Parameter and a new buffer each make the call answer None, and the block then re-plans
    with the values as they are."""
    tv, ours, x, plan = _made("downsample")

    def change(m):
        m.conv3.weight.data.mul_(-2.0)

    writes = [
        change,
        lambda m: m.bn1.running_mean.data.add_(0.5),
        lambda m: m.downsample[1].weight.data.mul_(0.5),
        lambda m: setattr(m.conv1, "weight",
                          torch.nn.Parameter(m.conv1.weight.detach() * 0.5)),
        lambda m: m.bn2.register_buffer("running_var", m.bn2.running_var * 2.0),
    ]
    with torch.no_grad():
        for write in writes:
            plan = ours.__dict__["_eval_plan"]
            assert plan.fast(ours, x) is not None
            write(tv)
            write(ours)
            assert plan.fast(ours, x) is None, "a stale fold was served"
            got = ours(x)
            ref = copy.deepcopy(tv).double()(x.double())
            assert_close_rule("after a write", got, tv(x), ref, torch.float32)
            assert ours.__dict__["_eval_plan"] is not plan


def test_frozen_block_checks_identity_version_and_pointer():
    """A frozen block compares identities, version counters and data pointers (a .data write is
    not seen there, as fastres.freeze documents): an in-place op, a new Parameter and a moved
    tensor each make the call answer None."""
    tv, ours, x, plan = _made("bottleneck", freeze=True)
    with torch.no_grad():
        assert plan.fast(ours, x) is not None
        ours.conv2.weight.data.mul_(2.0)  # not seen: the frozen contract
        assert plan.fast(ours, x) is not None
        ours.conv2.weight.mul_(0.5)  # in place: the version counter moves
        assert plan.fast(ours, x) is None
        ours(x)
        plan = ours.__dict__["_eval_plan"]
        assert plan.fast(ours, x) is not None
        ours.conv3.weight = torch.nn.Parameter(ours.conv3.weight.detach().clone())
        assert plan.fast(ours, x) is None
        ours(x)
        plan = ours.__dict__["_eval_plan"]
        ours.bn1.running_var.set_(ours.bn1.running_var.clone())  # same object, new storage
        assert plan.fast(ours, x) is None
        fastres.freeze(ours, False)
        assert plan.fast(ours, x) is None  # frozen no more: the fingerprint's plan


def test_steps_aside():
    """Each thing the plan decided on, changed: None."""
    tv, ours, x, plan = _made("downsample")
    fast = plan.fast
    with torch.no_grad():
        assert fast(ours, x) is not None
        assert fast(ours, x.contiguous()) is None
        assert fast(ours, x.double()) is None
        h = ours.conv2.register_forward_hook(lambda m, i, o: None)
        assert fast(ours, x) is None
        h.remove()
        ours.bn3.eps = 1e-3
        assert fast(ours, x) is None
        ours.bn3.eps = 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast(ours, x) is None
        with OpLog():
            assert fast(ours, x) is None
        ours.train()
        assert fast(ours, x) is None
        ours.eval()
        assert fast(ours, x) is not None
    assert fast(ours, x.requires_grad_()) is None  # autograd needed


def _resnet(build):
    """(torchvision's model, fastres' conversion of it, an input, fastres' residual blocks), one
    planned call made."""
    torch.manual_seed(0)
    tv = randomise_bn(build()).eval().to(memory_format=CL)
    ours = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    blocks = [b for layer in (ours.layer1, ours.layer2, ours.layer3, ours.layer4) for b in layer]
    with torch.no_grad():
        ours(x)
    return tv, ours, x, blocks


def _python_body(ours, blocks, x):
    """The model's output with every block on its plan's Python path (the written-out calls
    set aside, then put back)."""
    fasts = [b.__dict__["_eval_plan"].fast for b in blocks]
    for b in blocks:
        b.__dict__["_eval_plan"].fast = None
    try:
        return ours(x)
    finally:
        for b, f in zip(blocks, fasts, strict=True):
            b.__dict__["_eval_plan"].fast = f


def test_resnet_body_runs_the_block_calls():
    """fastres.ResNet's eval body (donated intermediates) through the written-out calls: the
    same bits as through the plans' Python path."""
    import torchvision  # noqa: PLC0415

    tv, ours, x, blocks = _resnet(torchvision.models.resnet18)
    with torch.no_grad():
        fasts = [b.__dict__["_eval_plan"].fast for b in blocks]
        assert all(f is not None for f in fasts)
        served = []
        for b, f in zip(blocks, fasts, strict=True):
            def counted(block, xi, donate=False, bound=None, f=f):
                out = f(block, xi, donate, bound)
                served.append(out is not None)
                return out
            counted.bounded = True  # the body's bounded call, as the written-out function's
            b.__dict__["_eval_plan"].fast = counted
        got = ours(x)
        assert served == [True] * len(blocks)
        want = _python_body(ours, blocks, x)
    assert torch.equal(got, want)


def _absmax_reads(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "fastres_cpu::absmax")


@pytest.mark.parametrize("kind", KINDS)
def test_bound_in_bound_out(kind):
    """With a bound the call answers (output, the output's bound): the bound is at least the
    output's max |y|; a bound within m_max stands for absmax's read of x, one past it (or NaN) is
    read; the output is the same either way."""
    tv, ours, x, plan = _made(kind)
    with torch.no_grad():
        want = plan.fast(ours, x)
        m = float(x.abs().max())
        for given, reads in ((math.nan, 1), (m, 0), (2 * plan.m_max, 1)):
            got = []
            assert _absmax_reads(lambda g=given: got.append(plan.fast(ours, x, False, g))) == reads
            out, bound = got[0]
            assert torch.equal(out, want)
            assert bound >= float(out.abs().max())
        x = x.clone()
        x[0, 1, 2, 3] = float("nan")
        out, bound = plan.fast(ours, x, False, math.nan)
        assert math.isnan(bound), "nothing is proven where the ReLU pass ran"


def test_resnet_body_chains_the_bound():
    """fastres.ResNet's eval body hands each block the previous block's output bound: fewer reads
    of the block inputs than blocks, the same bits as the plans' Python path, and a NaN input
    still gives torchvision's NaN pattern (every bound unknown, every input read)."""
    import torchvision  # noqa: PLC0415

    tv, ours, x, blocks = _resnet(torchvision.models.resnet50)
    with torch.no_grad():
        got = []
        reads = _absmax_reads(lambda: got.append(ours(x)))
        assert reads < len(blocks), reads
        assert torch.equal(got[0], _python_body(ours, blocks, x))
        x[1, 0, 10, 10] = float("nan")
        theirs = tv(x)
        ours_nan = []
        assert _absmax_reads(lambda: ours_nan.append(ours(x))) >= len(blocks)
    assert torch.equal(ours_nan[0].isnan(), theirs.isnan()) and theirs.isnan().any()
