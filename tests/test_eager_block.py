"""Eager eval of a whole block in one call: into the CUDA extension (csrc/cuda/block_py.h), or
the Triton backend's launch plan (fastres/triton_kernels/block.py).

An eval plan made on the CUDA or Triton path runs its block as one ``block_eval`` call: each
convolution's launcher called from C++ (CUDA) or from a plan of its launch kept per shape class
(Triton), with the BatchNorm in its epilogue, the tensors read from the modules on every call.
These tests run it on cudasim (the CUDA launchers and kernels on the CPU) and on the Triton
interpreter: same numbers as the per-convolution ops, torchvision's numbers within the rule,
weight writes seen, hooks and dispatch modes sent to the paths that honour them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from dispatch_log import OpLog

import fastres
from fastres import backends
from fastres.harness.rule import allow_tf32, assert_close_rule, randomise_bn
from fastres.nn._fused import _FusedMixin

tvr = torchvision.models.resnet


def _blocks():
    down = tvr.Bottleneck(32, 16, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(32, 64, 1, stride=2, bias=False), torch.nn.BatchNorm2d(64)))
    basic = tvr.BasicBlock(24, 24)
    return {"bottleneck": tvr.Bottleneck(64, 16), "downsample": down, "basic": basic}



@pytest.fixture(params=["cudasim", "triton"])
def cudasim_live(request, monkeypatch):
    """The backend (cudasim or triton), forced, with eval as on a GPU (no fold cache)."""
    why = backends.BACKENDS[request.param].unavailable_reason()
    if why:
        pytest.skip(why)
    monkeypatch.setenv("FASTRES_BACKEND", request.param)
    monkeypatch.setattr(_FusedMixin, "_fold_cacheable", staticmethod(lambda conv, bn: False))
    return request.param


class _Launches:
    """Kernel launches of a backend: cudasim's count, or the Triton launches of block plans."""

    def __init__(self, backend: str, monkeypatch) -> None:
        self.n = 0
        if backend == "cudasim":
            from fastres import _C_cudasim as sim  # noqa: PLC0415

            self.count = sim.launch_count
            return
        from fastres.triton_kernels import _common  # noqa: PLC0415

        launch = _common.launch

        def counted(*args, **kwargs):
            self.n += 1
            return launch(*args, **kwargs)

        monkeypatch.setattr(_common, "launch", counted)
        self.count = lambda: self.n


def _planned() -> int:
    """Block calls the Triton launch plans served (0 where triton is not importable)."""
    try:
        from fastres.triton_kernels import block  # noqa: PLC0415
    except ImportError:
        return 0
    return block.stats["planned"]


def _pair(kind: str, dtype: torch.dtype):
    tv = randomise_bn(_blocks()[kind]).eval()
    ours = fastres.convert(copy.deepcopy(tv)).eval().to(dtype, memory_format=torch.channels_last)
    cin = tv.conv1.in_channels
    x = torch.randn(2, cin, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    return tv.to(dtype, memory_format=torch.channels_last), ours, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bottleneck", "downsample", "basic"])
def test_block_eval_is_the_per_convolution_path(kind, dtype, cudasim_live, monkeypatch):
    """The one call gives the per-convolution ops' output bit for bit (the same launchers and
    kernels), and torchvision's within the rule; its launches are one per convolution on every
    backend (no TF32 here: no rounding launch)."""
    sim = _Launches(cudasim_live, monkeypatch)
    tv, ours, x = _pair(kind, dtype)
    with torch.no_grad(), allow_tf32(False):
        ours(x)
        plan = ours.__dict__["_eval_plan"]
        assert plan.direct is not None, "no block_eval for a live no-grad cudasim plan"
        n0, planned = sim.count(), _planned()
        direct = ours(x)
        launches = sim.count() - n0
        if cudasim_live == "triton":  # served by the block's launch plan
            assert _planned() == planned + 1
        with OpLog() as log:  # a dispatch mode sees every op: the per-convolution path
            per_op = ours(x)
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule(f"block_eval {kind}", direct, tv(x), ref, dtype)
    convs = len(plan.convs)
    # On Triton too: each convolution computes its BatchNorm's scale and shift (BN_VECTORS)
    assert launches == convs
    assert log.seen.count(f"fastres_{cudasim_live}::conv_bias_act") == convs
    assert torch.equal(direct, per_op)
    assert direct.is_contiguous(memory_format=torch.channels_last)


def test_block_eval_reads_the_tensors_now(cudasim_live):
    """.data writes, in-place changes of the running statistics and newly assigned Parameters
    reach the next call (nothing is kept but where the tensors live)."""
    tv, ours, x = _pair("downsample", torch.float32)
    with torch.no_grad(), allow_tf32(False):
        ours(x)
        plan = ours.__dict__["_eval_plan"]
        for m in (tv, ours):
            m.conv2.weight.data.mul_(-1.5)
            m.bn3.running_var.data.mul_(3.0)
            m.downsample[1].bias.data.add_(0.5)
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule("block_eval after .data writes", ours(x), tv(x), ref, torch.float32)
        for m in (tv, ours):
            m.conv1.weight = torch.nn.Parameter(m.conv1.weight.detach() * 0.25)
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule("block_eval after a new Parameter", ours(x), tv(x), ref, torch.float32)
    assert ours.__dict__["_eval_plan"] is plan  # the same plan: it read the tensors


def test_block_eval_leaves_hooked_blocks_to_their_modules(cudasim_live):
    """A hook registered after the plan was made fires: the block runs its plain forward."""
    _, ours, x = _pair("bottleneck", torch.float32)
    seen = []
    with torch.no_grad():
        ours(x)
        assert ours.__dict__["_eval_plan"].direct is not None
        h = ours.bn2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        ours(x)
        h.remove()
        ours(x)
    assert seen == [torch.Size([2, 16, 9, 9])]


def _grads(m, x, proj, frozen, need_x):
    for n, p in m.named_parameters():
        p.requires_grad_(n not in frozen)
    m.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(need_x)
    (m(xg) * proj.to(xg.dtype)).sum().backward()
    out = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    if xg.requires_grad:
        out["input"] = xg.grad
    return out


@pytest.mark.parametrize("frozen", ["none", "all but bn2.weight"])
@pytest.mark.parametrize("kind", ["bottleneck", "downsample", "basic"])
def test_block_eval_with_autograd(kind, frozen, cudasim_live):
    """A call that needs autograd runs the block as block_eval recorded as one autograd node
    (fastres._autograd_block, csrc/grad_node.h): the gradients of the input and of every
    parameter that requires one are torchvision's within the rule, and the per-convolution
    Functions' (a dispatch mode sends the call there)."""
    tv, ours, x = _pair(kind, torch.float32)
    need_x = frozen == "none"
    frozen_names = () if need_x else tuple(
        n for n, _ in ours.named_parameters() if n != "bn2.weight")
    proj = torch.randn(ours(x).shape)
    with allow_tf32(False):
        _grads(ours, x, proj, frozen_names, need_x)  # makes the plan
        plan = ours.__dict__["_eval_plan"]
        assert plan.grad and plan.direct is not None and plan.direct[1] is None
        got = _grads(ours, x, proj, frozen_names, need_x)
        with OpLog() as log:
            per_conv = _grads(ours, x, proj, frozen_names, need_x)
        want = _grads(tv, x, proj, frozen_names, need_x)
        ref = _grads(copy.deepcopy(tv).double(), x.double(), proj, frozen_names, need_x)
    assert f"fastres_{cudasim_live}::conv_bias_act" in log.seen
    assert set(got) == set(want) == set(per_conv)
    assert set(got) == ({"input", *(n for n, _ in ours.named_parameters())}
                        if frozen == "none" else {"bn2.weight"})
    for n in got:
        assert_close_rule(f"block_eval grad {n}", got[n], want[n], ref[n], torch.float32)
        torch.testing.assert_close(got[n], per_conv[n], rtol=1e-5, atol=1e-6)


def test_block_eval_node_behaves_as_autograd_does(cudasim_live):
    """The block's autograd node (csrc/grad_node.h) keeps autograd's guarantees: a second
    backward without retain_graph fails as autograd's does, retain_graph allows it, an in-place
    change of a saved tensor fails the backward instead of giving a wrong gradient,
    saved-tensor hooks see the saved tensors, and forward-mode AD is refused (not silently
    ignored)."""
    _, ours, x = _pair("downsample", torch.float32)
    xg = x.detach().clone().requires_grad_()
    ours(xg)  # makes the plan
    assert ours.__dict__["_eval_plan"].direct[1] is None
    y = ours(xg)
    assert y.grad_fn.name() == "BlockEvalBackward"
    y.sum().backward(retain_graph=True)
    first = xg.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(xg.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    y = ours(xg)
    with torch.no_grad():
        ours.conv2.weight.mul_(1.0)  # bumps the version a saved tensor was saved at
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ours(xg)
    assert len(packed) >= len(list(ours.parameters()))
    y.sum().backward()
    import torch.autograd.forward_ad as fwAD  # noqa: PLC0415

    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            ours(dual)


@pytest.mark.parametrize("kind", ["bottleneck", "downsample"])
def test_triton_block_rounds_float32_weights_in_one_launch(kind, monkeypatch):
    """Float32 on TF32 tensor cores (emulated under the interpreter): the Triton plan rounds the
    block's weights to TF32 in one launch before its convolutions, never with a round_tf32
    launch per weight, and gives the per-convolution ops' output bit for bit (they
    round each weight with round_tf32: the same bit operations)."""
    if backends.BACKENDS["triton"].unavailable_reason():
        pytest.skip(backends.BACKENDS["triton"].unavailable_reason())
    from fastres.triton_kernels import _common  # noqa: PLC0415

    monkeypatch.setenv("FASTRES_BACKEND", "triton")
    monkeypatch.setattr(_FusedMixin, "_fold_cacheable", staticmethod(lambda conv, bn: False))
    monkeypatch.setattr(_common, "EMULATE_TF32", True)
    kernels = []
    launch = _common.launch
    monkeypatch.setattr(_common, "launch",
                        lambda k, *a, **m: kernels.append(k.__name__) or launch(k, *a, **m))
    tv, ours, x = _pair(kind, torch.float32)
    with torch.no_grad(), allow_tf32(True):
        ours(x)
        kernels.clear()
        planned = _planned()
        direct = ours(x)
        assert _planned() == planned + 1
        seen = list(kernels)
        with OpLog():
            per_op = ours(x)
        ref = copy.deepcopy(tv).double()(x.double())
    convs = len(ours.__dict__["_eval_plan"].convs)
    assert seen == ["_round_weights_kernel"] + ["_conv_fwd_kernel"] * convs, seen
    assert torch.equal(direct, per_op)
    assert (direct - ref).abs().max() < 0.05 * ref.abs().max()  # TF32, not a wrong conv


def test_triton_block_plan_follows_a_weight_of_another_layout(monkeypatch):
    """A weight replaced by one of another layout (a contiguous 3x3 weight where the plan was made
    for channels_last) fails the plan's signature: the block runs through the op bodies (which
    make the channels_last copy the kernel needs) and gives torchvision's numbers; with the
    layout restored, a plan serves again."""
    if backends.BACKENDS["triton"].unavailable_reason():
        pytest.skip(backends.BACKENDS["triton"].unavailable_reason())
    from fastres.triton_kernels import block  # noqa: PLC0415

    monkeypatch.setenv("FASTRES_BACKEND", "triton")
    monkeypatch.setattr(_FusedMixin, "_fold_cacheable", staticmethod(lambda conv, bn: False))
    tv, ours, x = _pair("bottleneck", torch.float32)
    with torch.no_grad(), allow_tf32(False):
        ours(x)
        w = ours.conv2.weight.detach()
        for m in (tv, ours):
            m.conv2.weight = torch.nn.Parameter(w.contiguous() * 0.5)
        ops = block.stats["ops"]
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule("block_eval, contiguous weight", ours(x), tv(x), ref, torch.float32)
        assert block.stats["ops"] == ops + 1
        for m in (tv, ours):
            m.conv2.weight = torch.nn.Parameter(
                (w * 0.5).contiguous(memory_format=torch.channels_last))
        planned = _planned()
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule("block_eval, channels_last again", ours(x), tv(x), ref, torch.float32)
        assert _planned() == planned + 1
