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


def _replayed_launches(kind: str, tf32: bool, monkeypatch, name=lambda k, a: k.__name__):
    """A fresh unit's replayed steps (with and without dx) against the per-op path's from the
    same state, bit for bit; returns (the unit's module, per step the launches of the replayed
    step, each as ``name(kernel, args)`` gives it). The unit specs, which carry the recorded
    plans and are shared by structure, stay in a table of the calling test's own: a plan
    recorded under the test's patched configs would be replayed by later tests."""
    from fastres import _autograd_unit  # noqa: PLC0415
    from fastres.triton_kernels import _common  # noqa: PLC0415

    monkeypatch.setattr(_autograd_unit, "_SPECS", {})
    tv = randomise_bn(_block(kind)).train()
    ours = fastres.convert(copy.deepcopy(tv)).train().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(ours)
    x = torch.randn(2, tv.conv1.in_channels, 9, 9).contiguous(memory_format=torch.channels_last)
    kernels: list = []
    launch = _common.launch
    monkeypatch.setattr(_common, "launch",
                        lambda k, *a, **m: kernels.append(name(k, a)) or launch(k, *a, **m))
    steps = []
    with allow_tf32(tf32):
        proj = torch.randn(ours(x).shape)
        twin(x)
        for need_x in (True, False):
            _step(ours, x, proj, need_x)  # the plans made
            with OpLog():
                _step(twin, x, proj, need_x)  # the running statistics kept in step
            kernels.clear()
            s0 = _stats()
            got, _ = _step(ours, x, proj, need_x)
            steps.append(list(kernels))
            s1 = _stats()
            assert s1["planned"] - s0["planned"] == 2 and s1["ops"] == s0["ops"]  # replayed
            with OpLog():
                want, _ = _step(twin, x, proj, need_x)
            _same(got, want)
    return ours, steps


@pytest.mark.parametrize("kind", ["bottleneck", "downsample"])
def test_unit_rounds_float32_weights_in_one_launch_per_direction(kind, triton, monkeypatch):
    """Float32 on TF32 tensor cores (emulated under the interpreter): the unit rounds its
    weights to TF32 in one launch for the forward and one for the data gradients, no round_tf32
    launch of a weight, and gives the per-op path's results bit for bit (which rounds each
    weight with round_tf32 per convolution: the same bit operations)."""
    from fastres.triton_kernels import _common  # noqa: PLC0415

    monkeypatch.setattr(_common, "EMULATE_TF32", True)
    ours, steps = _replayed_launches(kind, True, monkeypatch, lambda k, a: (
        k.__name__, a[1].numel() if k.__name__ == "_round_tf32_kernel" else None))
    weights = {p.numel() for p in ours.parameters() if p.dim() == 4}
    for seen in steps:
        assert [k for k, _ in seen].count("_round_weights_kernel") == 2, seen
        assert not [n for k, n in seen if k == "_round_tf32_kernel" and n in weights], seen


@pytest.mark.parametrize("kind", ["bottleneck", "downsample"])
def test_unit_split_weight_gradients_summed_as_the_per_op_path(kind, triton, monkeypatch):
    """Split-K weight gradients (forced: the interpreter's config has one split): each split sum
    runs in a later launch, the next BatchNorm backward's reduction or, for the first
    convolution's and the downsample's, one launch of both (reduce.sum_rows_pair); the per-op
    path sums each at once. The same bits."""
    from fastres.triton_kernels import _common, conv  # noqa: PLC0415

    monkeypatch.setattr(conv, "wgrad_config",
                        lambda *a, **kw: _common.WgradConfig(16, 16, 16, 3, 4, 1))
    _, steps = _replayed_launches(kind, False, monkeypatch)
    for seen in steps:
        assert seen.count("_sum_rows_pair_kernel") == (kind == "downsample"), seen


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unit_plan_without_shortcut_or_relu(dtype, triton):
    """fastres.functional.residual_unit with no shortcut and no final ReLU (the unit's other
    codes), replayed, against the per-op path."""
    from fastres import functional  # noqa: PLC0415
    from fastres._specs import BNSpec, ConvSpec, Stage  # noqa: PLC0415

    stages = [Stage(ConvSpec((1, 1), (1, 1)), BNSpec()),
              Stage(ConvSpec((2, 2), (0, 0)), BNSpec(momentum=None))]
    shapes = [(16, 8, 3, 3), (12, 16, 1, 1)]

    def params():
        ps = []
        for k, c, r, s in shapes:
            w = torch.randn(k, c, r, s).to(dtype).contiguous(memory_format=torch.channels_last)
            ps.append((w.requires_grad_(), torch.rand(k).to(dtype).requires_grad_(),
                       torch.randn(k).to(dtype).requires_grad_(), torch.randn(k).to(dtype),
                       torch.rand(k).to(dtype) + 0.5, torch.tensor(3)))
        return ps

    ours = params()
    twin = [tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in p) for p in ours]
    x = torch.randn(2, 8, 7, 7).to(dtype).contiguous(memory_format=torch.channels_last)

    def run(ps):
        xg = x.detach().clone().requires_grad_()
        out = functional.residual_unit(xg, stages, ps, "none", relu=False)
        out.float().square().sum().backward()
        return [out.detach(), xg.grad, *[t.grad if t.requires_grad else t.clone()
                                         for p in ps for t in p]]

    with allow_tf32(False):
        s0 = _stats()
        for _ in range(2):
            got = run(ours)
            with OpLog():
                want = run(twin)
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=str(i))
            for p in (*ours, *twin):
                for t in p:
                    t.grad = None
    assert _stats()["planned"] - s0["planned"] == 2


def test_recording_refuses_torch_work_besides_launches():
    """The recorder (triton_kernels/_replay.py) replays only runs whose torch calls allocate,
    view or return their inputs: a computed tensor, an in-place write, a fill or a write into a
    given tensor makes it refuse (the unit then runs its op bodies)."""
    from fastres.triton_kernels import _replay  # noqa: PLC0415

    x = torch.randn(8)
    bad = {
        "in place": lambda t: (t.add_(1),),
        "computed": lambda t: (t * 2,),
        "fill": lambda t: (torch.zeros_like(t),),
        "copy": lambda t: (t.clone(),),
        "out=": lambda t: (torch.mul(t, 2, out=torch.empty_like(t)),),
        "item write": lambda t: (t.__setitem__(0, 1.0), t)[1:],
    }
    for name, fn in bad.items():
        _, seg = _replay.record(fn, (x.clone(),))
        assert seg is None, name
    _, seg = _replay.record(lambda t: (torch.empty_like(t), t.contiguous()), (x,))
    assert seg is not None
    out, same = seg.run((x,)) if not seg.direct else (None, None)
    assert same is x and out.shape == x.shape
