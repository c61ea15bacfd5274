"""CUDA graphs and ``torch.compile(mode="reduce-overhead")`` on converted models, on a GPU.

A replayed graph runs the kernels it captured with the pointers it captured: whatever the host
decided at capture from tensor values (a fold, a cached scale) is frozen in it. fastres keeps no
such state off the CPU (the BatchNorm runs in the convolution's epilogue from its live tensors,
tests/test_host_path.py checks the preconditions on the CPU), so a replay after the weights
change in place (``.data`` writes, ``load_state_dict``, an optimizer step) computes what an eager
call computes. Each test checks that, and that the change made a difference, so a stale replay
cannot pass. The device check (bench/device_check.sh) runs this file; here they skip.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models import resnet as tv_resnet

import fastres
from fastres.harness.rule import randomise_bn

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_integration]

BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(
        not torch.cuda.is_available() or bool(fastres.backends.BACKENDS[b].unavailable_reason()),
        reason=f"{b}: needs a CUDA device and the backend"))
    for b in ("cuda", "triton")
]
CL = torch.channels_last


def _model(arch: str) -> torch.nn.Module:
    if arch == "resnet50":
        tv = torchvision.models.resnet50(num_classes=10)
    else:  # one block per stage: identity and downsample blocks
        tv = torchvision.models.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    return fastres.convert(randomise_bn(tv)).cuda().to(memory_format=CL)


def _warm(fn, n: int = 3) -> None:
    """Run ``fn`` on a side stream before capture (kernels compiled, allocator warmed)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def _change_in_place(model: torch.nn.Module) -> None:
    """What EMA, pruning and weight surgery do: writes through ``.data`` (no version bump)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs[1].weight.data.mul_(1.5)
    bns[2].running_var.data.mul_(3.0)
    bns[3].weight.data.neg_()


@pytest.mark.parametrize("arch", ["small", "resnet50"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_graph_replay_reads_live_weights(backend, arch, monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    model = _model(arch).eval()
    static_x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    with torch.no_grad():
        _warm(lambda: model(static_x))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = model(static_x)
        g.replay()
        before = static_y.clone()
        torch.testing.assert_close(before, model(static_x), rtol=1e-5, atol=1e-5)
        _change_in_place(model)
        g.replay()
        eager = model(static_x)
    assert (before - eager).abs().max() > 1e-3, "the in-place change did not change the output"
    torch.testing.assert_close(static_y, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_graphed_callables_training_block(backend, monkeypatch):
    """A converted Bottleneck through torch.cuda.make_graphed_callables, trained with SGD: the
    graphed forward/backward and the eager twin agree after every step (parameters, gradients,
    running statistics), so the steps and BatchNorm updates between replays reach the graph."""
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    torch.manual_seed(0)
    block = fastres.convert(randomise_bn(tv_resnet.Bottleneck(256, 64))).cuda().to(memory_format=CL)
    twin = copy.deepcopy(block)
    x = torch.randn(8, 256, 28, 28, device="cuda", requires_grad=True).contiguous(memory_format=CL)
    graphed = torch.cuda.make_graphed_callables(block, (x,))
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    first = None
    for _ in range(3):
        xi = torch.randn_like(x).requires_grad_()
        proj = torch.randn(8, 256, 28, 28, device="cuda")
        for m, o in ((graphed, opt), (twin, twin_opt)):
            o.zero_grad(set_to_none=True)
            (m(xi) * proj).sum().backward()
            o.step()
        ours, theirs = block.state_dict(), twin.state_dict()
        for name, v in theirs.items():
            torch.testing.assert_close(ours[name], v, rtol=1e-4, atol=1e-5, msg=name)
        first = first if first is not None else ours["conv1.weight"].clone()
    assert (block.conv1.weight - first).abs().max() > 0, "the steps did not move the weights"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_reduce_overhead_eval_follows_weights(backend, monkeypatch):
    """torch.compile(mode="reduce-overhead") (CUDA graphs under Inductor) of a converted
    ResNet-50 in eval: equal to eager before and after in-place weight changes."""
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    torch._dynamo.reset()
    model = _model("resnet50").eval()
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=CL)
    with torch.no_grad():
        for _ in range(3):  # recorded on the second or third call
            y = compiled(x).clone()
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
        _change_in_place(model)
        eager = model(x)
        y2 = compiled(x).clone()
    assert (y - eager).abs().max() > 1e-3, "the in-place change did not change the output"
    torch.testing.assert_close(y2, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["eval", "eval-grad", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_device_sync_on_the_gpu(backend, mode, monkeypatch):
    """No call reads a tensor back to the host, the C++ paths that bypass the dispatcher
    (block_eval, the training unit) included: CUDA's sync debug mode raises on any sync."""
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    model = _model("small")
    model.train(mode == "train")
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=CL)

    def call():
        if mode == "eval":
            with torch.no_grad():
                return model(x)
        out = model(x.requires_grad_(mode == "eval-grad"))
        out.square().mean().backward()
        return out

    call()
    call()  # the plans made, the kernels compiled
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
