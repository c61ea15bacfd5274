"""The eval fast path (fastres.nn.eval_plan), the CPU ReLU post-op it proves safe, and the fused
ResNet stem (fastres.ResNet)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from dispatch_log import OpLog
from torch import Tensor, nn

import fastres
from fastres import backends
from fastres.harness.rule import randomise_bn
from fastres.nn import eval_plan as EP

pytestmark = pytest.mark.skipif(
    backends.available()["cpu"] is not None, reason="needs the C++ CPU kernels"
)

CL = torch.channels_last


def _model(dtype=torch.float32, seed=0) -> nn.Module:
    m = torchvision.models.resnet18(num_classes=10)
    randomise_bn(m, seed)
    return m.eval().to(dtype).to(memory_format=CL)


def _x(n=2, dtype=torch.float32, seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype).contiguous(memory_format=CL)


def _plans(m: nn.Module) -> list:
    return [mod.__dict__["_eval_plan"] for mod in m.modules() if "_eval_plan" in mod.__dict__]


def _full_path(m: nn.Module, x, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setenv("FASTRES_EVAL_PLAN", "0")
        return m(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plan_is_bitwise_the_full_path(dtype, monkeypatch):
    """Once planned, a call gives exactly the full path's output, and every block has a plan
    whose ReLUs went to oneDNN's post-op (the input is finite and small)."""
    m = fastres.convert(_model(dtype))
    x = _x(dtype=dtype)
    used = []
    with torch.no_grad():
        full = _full_path(m, x, monkeypatch)
        m(x)  # makes the plans
        plans = _plans(m)
        assert len(plans) == 8
        one_call = m(x)  # each block one call into the extension (csrc/cpu/block_cpu_py.h)
        for p in plans:
            assert p.finite_op is not None and p.m_max > 1e6, p.m_max
            op, into = p.finite_op, p.into_op
            p.fast = None  # the plan's Python path, its ops counted
            p.finite_op = lambda *a, _op=op: used.append("out") or _op(*a)
            p.into_op = lambda *a, _op=into: used.append("into") or _op(*a)
        fast = m(x)
    assert torch.equal(fast, full) and torch.equal(one_call, full)
    # two ReLU convs per BasicBlock; the residual ones write into fastres.ResNet's own
    # intermediates (or a fused downsample's output)
    assert used.count("out") == 8 and used.count("into") == 8


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_plan_keeps_nan_and_inf_like_torchvision(bad):
    """A non-finite block input fails the bound, so the ReLUs keep NaN as torch.relu does: the
    NaN/Inf pattern of every block's output is torchvision's (oneDNN's post-op would give 0)."""
    tv = _model()
    m = fastres.convert(tv)
    x = _x()
    with torch.no_grad():
        m(x)
        m(x)  # planned
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        h[0, 3, 2, 2] = bad
        h[1, 5, 0, 1] = bad
        ours, theirs = m.layer1(h), tv.layer1(h)
    assert _plans(m)
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
    assert ours.isnan().any() or ours.isinf().any()
    fin = ~(theirs.isnan() | theirs.isinf())
    torch.testing.assert_close(ours[fin], theirs[fin])


def test_plan_bound_refuses_huge_inputs():
    """An input past the plan's m_max runs the ReLU pass (not the post-op)."""
    m = fastres.convert(_model())
    blk = m.layer1[0]
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=CL)
    with torch.no_grad():
        blk(x)
        p = blk._eval_plan
        p.fast = None  # the plan's Python path (tests/test_cpu_block_fast.py: the C++ call's)
        calls = []
        op = p.finite_op
        p.finite_op = lambda *a: calls.append(1) or op(*a)
        blk(x)
        assert calls == [1, 1]
        blk(x * (2 * p.m_max))
        assert calls == [1, 1]


def test_plan_follows_changes(monkeypatch):
    """Whatever the plan depends on, changed, re-plans: new weights (load_state_dict, an
    in-place update), a replaced submodule, another dtype, batch size or layout, train mode."""
    tv = _model()
    m = fastres.convert(tv)
    x = _x()
    with torch.no_grad():
        m(x)
        m(x)
        # in-place weight update: the fold cache misses, the full path refolds
        m.layer1[0].conv1.weight.mul_(0.5)
        tv.layer1[0].conv1.weight.mul_(0.5)
        torch.testing.assert_close(m(x), tv(x), rtol=1e-4, atol=1e-4)
        # load_state_dict of other values
        other = _model(seed=5)
        m.load_state_dict(other.state_dict())
        torch.testing.assert_close(m(x), other(x), rtol=1e-4, atol=1e-4)
        # a replaced BatchNorm
        bn = copy.deepcopy(other.layer2[0].bn2)
        bn.running_mean.add_(1.0)
        m.layer2[0].bn2 = copy.deepcopy(bn)
        other.layer2[0].bn2 = bn
        torch.testing.assert_close(m(x), other(x), rtol=1e-4, atol=1e-4)
        # another batch size and layout
        for y in (_x(n=3), _x().contiguous()):
            torch.testing.assert_close(m(y), other(y), rtol=1e-4, atol=1e-4)
        # another dtype
        m16 = copy.deepcopy(m).bfloat16()
        xb = x.bfloat16()
        m16(xb)
        assert torch.equal(m16(xb), _full_path(m16, xb, monkeypatch))
    # train mode: batch statistics, never the plan: exactly a fresh converted model's output
    fresh = fastres.convert(copy.deepcopy(other)).train()
    m.train()
    assert _plans(m)
    assert torch.equal(m(x), fresh(x))


def test_plan_not_pickled_and_off_switch(monkeypatch):
    m = fastres.convert(_model())
    x = _x()
    with torch.no_grad():
        m(x)
        assert _plans(m)
        c = copy.deepcopy(m)
        assert not _plans(c)
        assert torch.equal(c(x), m(x))
        monkeypatch.setenv("FASTRES_EVAL_PLAN", "0")
        assert not EP.enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_absmax(dtype):
    absmax = torch.ops.fastres_cpu.absmax
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 7, 11, generator=g) * 3).to(dtype)
    want = float(x.double().abs().max())
    assert absmax(x) == want
    assert absmax(x.contiguous(memory_format=CL)) == want
    assert absmax(x[:, ::2]) == float(x[:, ::2].double().abs().max())  # not dense
    big = torch.randn(70001, generator=g).to(dtype)  # several chunks and a tail
    assert absmax(big) == float(big.double().abs().max())
    y = x.clone()
    y[1, 2, 3, 4] = -math.inf
    assert absmax(y) == math.inf
    y[0, 0, 0, 0] = math.nan
    assert math.isnan(absmax(y))
    for pos in range(1024, 1024 + 128):  # every lane of the kernel's four interleaved maxima
        z = big.clone()
        z[pos] = math.nan
        assert math.isnan(absmax(z)), f"a NaN at {pos} was lost"
        z[pos] = -1e4
        assert absmax(z) == float(z[pos].double().abs()), f"the maximum at {pos} was lost"
    assert absmax(torch.zeros(0, dtype=dtype)) == 0.0
    with pytest.raises(RuntimeError, match="absmax: x has dtype"):
        absmax(torch.ones(3, dtype=torch.int32))


def test_max_input_bound():
    """m_max is where the largest stage bound reaches the limit, NaN for non-finite weights."""
    w = torch.full((4, 2, 1, 1), 0.5)
    b = torch.full((4,), 1.0)
    # one conv, identity shortcut: bound = M * (1 + 1) + 1 (norm 1, bias 1, plus M)
    got = EP._max_input([(w, b, True)], 1, None, torch.float32)
    assert got == pytest.approx((EP._LIMIT - 1.0) / (2.0 * EP._SLACK))
    wn = w.clone()
    wn[0, 0, 0, 0] = math.nan
    assert math.isnan(EP._max_input([(wn, b, True)], 1, None, torch.float32))
    # float16: a quarter of its range
    assert EP._max_input([(w, b, True)], 1, None, torch.float16) < 65504 / 4


def test_resnet_stem_fused_and_round_trip():
    tv = _model()
    m, rep = fastres.convert(tv, report=True)
    assert type(m) is fastres.ResNet and ("", "ResNet") in rep.swapped
    assert list(m.state_dict()) == list(tv.state_dict())
    x = _x()
    calls = []
    orig = fastres.ResNet._conv_bn_act

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    with torch.no_grad():
        fastres.ResNet._conv_bn_act = spy
        try:
            out = m(x)
        finally:
            fastres.ResNet._conv_bn_act = orig
    assert calls == [1]
    torch.testing.assert_close(out, tv(x), rtol=1e-4, atol=1e-4)
    plain = fastres.unconvert(m)
    assert type(plain) is torchvision.models.ResNet
    assert type(plain.layer1[0]) is torchvision.models.resnet.BasicBlock
    same = fastres.convert(tv, inplace=True)
    assert same is tv and type(tv) is fastres.ResNet
    assert fastres.unconvert(tv, inplace=True) is tv and type(tv) is torchvision.models.ResNet


def test_resnet_stem_left_when_not_fusable():
    tv = torchvision.models.resnet18(num_classes=10)
    tv.relu = nn.ReLU6()
    m, rep = fastres.convert(tv, report=True)
    assert type(m) is torchvision.models.ResNet
    assert ("", "relu is not nn.ReLU") in rep.left
    assert type(m.layer1[0]) is fastres.BasicBlock  # the blocks are still converted


def _fastres_nodes(m: nn.Module, x: Tensor) -> list[str]:
    """The fastres ops in the graph torch.compile (fullgraph, inference) captures for m(x)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend=backend, fullgraph=True, dynamic=False)(x)
    torch._dynamo.reset()
    return [str(n.target) for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and "fastres" in str(n.target)]


def test_compiled_resnet_body_is_one_opaque_op():
    """A converted torchvision ResNet compiles (inference) to ONE fastres::_resnet_body node (its
    stem, max-pool and layers, run as the converted model runs them) with Inductor's pool and fc
    around it; fused modules elsewhere are one fastres::_module_forward node each. The op's
    output shape comes from the modules alone: checked at odd sizes, both layouts, and a
    ceil_mode max-pool."""
    m = fastres.convert(_model())
    assert _fastres_nodes(m, _x()) == ["fastres._resnet_body.default"]
    seq = nn.Sequential(*[fastres.convert(_model()).layer1[i] for i in range(2)]).eval()
    assert _fastres_nodes(seq, torch.randn(1, 64, 8, 8)) == ["fastres._module_forward.default"] * 2
    for x, ceil in ((_x(size=37), False), (torch.randn(1, 3, 45, 51), False), (_x(size=41), True)):
        m.maxpool.ceil_mode = ceil
        with torch.no_grad():
            want = m(x)
            torch._dynamo.reset()
            got = torch.compile(m, fullgraph=True, dynamic=False)(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_inference_runs_fused_modules_opaque():
    """torch.compile (fullgraph) of a converted model in inference: the fused modules run their
    eager fused path inside an opaque node (their eval plans, their prepacked weights: no new
    packing per call), with the converted model's numbers."""
    torch._dynamo.reset()
    m = fastres.convert(_model())
    x = _x()
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True, dynamic=False)
        out = compiled(x)
        packed = torch.ops.fastres_cpu.weight_cache_size()
        out2 = compiled(x)
        assert torch.ops.fastres_cpu.weight_cache_size() == packed
    assert len(_plans(m)) == 8
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)  # Inductor's pool/fc round
    assert torch.equal(out, out2)
    # training still traces the fused ops (no opaque node: it would hide the statistics update)
    from fastres.nn import compile as OP  # noqa: PLC0415

    assert not OP.compiled_inference(m, x)  # not tracing here
    m.train()
    torch.testing.assert_close(torch.compile(m, dynamic=False)(x), m(x), rtol=1e-4, atol=1e-4)


def test_stem_relu_post_op_keeps_nan(monkeypatch):
    """The CPU stem takes oneDNN's ReLU post-op for a bounded input (bitwise the full path's
    output) and the ReLU pass for an input holding NaN/Inf (torchvision's pattern)."""
    tv = _model()
    m = fastres.convert(tv)
    x = _x()
    with torch.no_grad():
        full = _full_path(m, x, monkeypatch)
        m(x)
        assert m._stem_finite(x) is not None
        assert torch.equal(m._stem(x), m._stem_finite(x))
        assert torch.equal(m(x), full)
        bad = x.clone()
        bad[0, 1, 5, 5] = math.nan
        bad[1, 2, 7, 3] = math.inf
        assert m._stem_finite(bad) is None
        ours, theirs = m._stem(bad), tv.relu(tv.bn1(tv.conv1(bad)))
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eval_call_keeps_channels_last_end_to_end(dtype):
    """A converted ResNet's eval call on a channels_last input converts no layout anywhere: no
    copy, clone or contiguous from the stem through the blocks to the head (each would be a
    read and a write of an activation), and the body's output is channels_last. At 64x64
    (layer4's maps 2x2): at 32x32 layer4's 3x3 convolutions see 1x1 maps, which the own oneDNN
    primitives do not serve, and ATen's path copies its outputs."""
    m = fastres.convert(_model(dtype))
    x = _x(dtype=dtype, size=64)
    with torch.no_grad():
        m(x)
        m(x)
        with OpLog() as log:
            m(x)
        body = m._body(x)
    moved = [op for op in log.seen if op.split("::")[1] in
             ("copy_", "clone", "_to_copy", "contiguous", "to", "_copy_from")]
    assert not moved, f"layout conversions in an eval call: {moved}"
    assert any("conv_bias_act" in op for op in log.seen), log.seen
    assert body.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("cl", [True, False], ids=["channels_last", "contiguous"])
def test_conv_bias_act_finite_into(cl):
    """The result written into the residual is the out-of-place op's, bitwise (the in-place
    oneDNN kernel in channels_last, a copy otherwise), and the residual itself is returned."""
    g = torch.Generator().manual_seed(0)
    fmt = CL if cl else torch.contiguous_format
    x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=fmt)
    w = torch.randn(16, 8, 3, 3, generator=g).contiguous(memory_format=fmt) * 0.1
    b = torch.randn(16, generator=g)
    r = torch.randn(2, 16, 9, 9, generator=g).contiguous(memory_format=fmt)
    ns = torch.ops.fastres_cpu
    want = ns.conv_bias_act_finite(x, w, b, r, [1, 1], [1, 1], [1, 1], 1, True)
    r2 = r.clone()
    got = ns.conv_bias_act_finite_into(r2, x, w, b, [1, 1], [1, 1], [1, 1], 1, True)
    assert got.data_ptr() == r2.data_ptr() and torch.equal(r2, want)
    # a residual that is the input itself (1x1, same channels): the out-of-place result, copied
    x1 = torch.randn(2, 16, 9, 9, generator=g).contiguous(memory_format=fmt)
    w1 = torch.randn(16, 16, 1, 1, generator=g).contiguous(memory_format=fmt) * 0.1
    want1 = ns.conv_bias_act_finite(x1, w1, b, x1, [1, 1], [0, 0], [1, 1], 1, True)
    ns.conv_bias_act_finite_into(x1, x1, w1, b, [1, 1], [0, 0], [1, 1], 1, True)
    assert torch.equal(x1, want1)
    with pytest.raises(RuntimeError, match="residual must have the output's size"):
        ns.conv_bias_act_finite_into(r2[:, :8], x, w, b, [1, 1], [1, 1], [1, 1], 1, True)


def test_resnet_donates_its_own_intermediates_only():
    """fastres.ResNet lets planned blocks write the residual add into their input (bitwise the
    same output), but never with a forward hook on the path: a hook's tensor stays intact."""
    m = fastres.convert(_model())
    x = _x()
    x0 = x.clone()
    with torch.no_grad():
        m(x)
        m(x)
        assert m._may_donate(x, (m.layer1, m.layer2, m.layer3, m.layer4))
        donated = m(x)
        seen = []
        h = m.layer1[1].register_forward_hook(lambda mod, inp, out: seen.append(
            (inp[0], inp[0].clone())))
        assert not m._may_donate(x, (m.layer1, m.layer2, m.layer3, m.layer4))
        hooked = m(x)
        h.remove()
    assert torch.equal(donated, hooked)
    kept, copy_then = seen[0]
    assert torch.equal(kept, copy_then)  # not overwritten by layer1[1]'s residual add
    assert torch.equal(x, x0)  # the caller's input is never written


def test_planned_paths_keep_clear_errors():
    """Once planned, a bad input still gets the full path's errors: another channel count at
    the stem and at a block."""
    m = fastres.convert(_model())
    x = _x()
    with torch.no_grad():
        m(x)
        m(x)
        with pytest.raises(ValueError, match="input has 4 channels but the convolution expects 3"):
            m(torch.randn(2, 4, 32, 32).contiguous(memory_format=CL))
        with pytest.raises(ValueError, match="input has 32 channels"):
            m.layer1[0](torch.randn(2, 32, 8, 8).contiguous(memory_format=CL))
