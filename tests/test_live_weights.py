"""Nothing stale: the eval path computes with the parameters and buffers as they are now.

Everyday scripts change weights in ways that leave a tensor's version counter alone: an EMA or a
pruning script writes ``p.data.copy_(...)`` / ``p.data.mul_(...)``, a checkpoint loader writes
through ``.numpy()``. Each test converts a model, runs it once in eval without autograd (the fold
cache, the prepacked weights and the eval plan are made), changes a weight the way a script
does, and compares the next call with torchvision's model changed the same way, by the project's
tolerance rule against float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from weight_changes import load_other_state_then_step

import fastres
from fastres import backends
from fastres.harness.rule import assert_close_rule, randomise_bn

CPU_BACKENDS = [
    b for b in ("cpu", "reference") if backends.BACKENDS[b].unavailable_reason() is None
]


def _pair(model: nn.Module):
    """(torchvision model, converted model with its own copy of the weights)."""
    model = randomise_bn(model).eval()
    return model, fastres.convert(copy.deepcopy(model)).eval()


def _check(tv: nn.Module, ours: nn.Module, x: torch.Tensor, name: str) -> None:
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule(name, ours(x), tv(x), ref, torch.float32)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_parameters(), **dict(model.named_buffers()))[name]


# Writes as scripts make them; none of them bumps the written tensor's version counter.
WRITES = {
    "data.mul_": lambda t: t.data.mul_(1.5),
    "data.copy_ (EMA)": lambda t: t.data.copy_(t.data * 0.5 + 0.25),
    "numpy": lambda t: t.detach().numpy().__imul__(2.0),
    "data = new": lambda t: setattr(t, "data", t.data * 3.0),
}

TARGETS = [
    "conv1.weight",  # the fused stem
    "layer1.0.conv2.weight",
    "layer2.0.downsample.0.weight",  # a fused downsample pair
    "layer3.1.bn1.weight",
    "layer3.1.bn2.bias",
    "layer4.0.bn1.running_mean",
    "layer4.1.bn2.running_var",
    "bn1.running_var",  # the stem's BN
]


# The CPU backend prepacks weights for channels_last input only; the reference path folds too.
SETUPS = [(b, fmt) for b in CPU_BACKENDS for fmt in ("channels_last", "contiguous")
          if b == "cpu" or fmt == "contiguous"]


@pytest.mark.parametrize(("backend", "layout"), SETUPS)
@pytest.mark.parametrize("write", list(WRITES))
def test_writes_that_leave_the_version_alone_are_seen(backend, layout, write, monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    tv, ours = _pair(torchvision.models.resnet18(num_classes=10))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    tv, ours = tv.to(memory_format=fmt), ours.to(memory_format=fmt)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
    _check(tv, ours, x, "first call")
    _check(tv, ours, x, "planned call")  # the eval plans run now
    for target in TARGETS:
        for m in (tv, ours):
            t = _tensor(m, target)
            if write == "numpy" and t.dtype != torch.float32:
                continue
            WRITES[write](t)
        _check(tv, ours, x, f"after {write} on {target}")


def test_writes_are_seen_by_a_bare_block_conv_bn_relu_and_frozen_bn():
    """The fused blocks outside a ResNet, ConvBNReLU, and FrozenBatchNorm2d (folded in training
    too) see .data writes as well."""
    x = torch.randn(2, 16, 9, 9)
    models = [
        torchvision.models.resnet.Bottleneck(16, 4),
        torchvision.ops.Conv2dNormActivation(16, 8),
        torchvision.models.resnet.BasicBlock(16, 16, norm_layer=FrozenBatchNorm2d),
    ]
    for model in models:
        with torch.no_grad():
            for b in model.modules():
                if isinstance(b, FrozenBatchNorm2d):
                    b.running_var.uniform_(0.5, 1.5)
                    b.weight.uniform_(0.5, 1.5)
        tv, ours = _pair(model)
        _check(tv, ours, x, "first call")
        _check(tv, ours, x, "planned call")
        for m in (tv, ours):
            for name, t in list(m.named_parameters()) + list(m.named_buffers()):
                if t.is_floating_point() and name.endswith(("weight", "running_var")):
                    t.data.mul_(1.25)
        _check(tv, ours, x, f"{type(model).__name__} after .data writes")


def test_load_state_dict_and_an_optimizer_step_between_calls():
    tv, ours = _pair(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 40, 40)
    _check(tv, ours, x, "first call")
    load_other_state_then_step(tv, ours, lambda name: _check(tv, ours, x, name))


def test_no_grad_and_grad_enabled_eval_agree_after_a_data_write():
    tv, ours = _pair(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ours(x)
    for m in (tv, ours):
        m.layer2[1].conv1.weight.data.mul_(2)
        m.layer2[1].bn1.running_var.data.mul_(3)
    with torch.no_grad():
        planned = ours(x)
    graded = ours(x).detach()  # grad enabled: the fold is part of the autograd graph
    torch.testing.assert_close(planned, graded, rtol=1e-5, atol=1e-5)
    _check(tv, ours, x, "no_grad after .data writes")


def test_compiled_inference_sees_data_writes():
    """torch.compile runs a fused module as one opaque op in inference (fastres.nn.compile), the
    module's eager path with its caches: the values check runs there too."""
    tv, ours = _pair(torchvision.models.resnet.BasicBlock(8, 8))
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        compiled(x)
        for m in (tv, ours):
            m.conv2.weight.data.mul_(-2)
            m.bn1.running_mean.data.add_(1)
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule("compiled after .data writes", compiled(x), tv(x), ref, torch.float32)


def test_unchanged_weights_keep_their_fold():
    """The check does not refold or repack when nothing changed."""
    _, ours = _pair(torchvision.models.resnet.BasicBlock(8, 8))
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        ours(x)
        first = dict(ours._fold_cache)
        ours(x)
        ours(x)
    assert {k: v[1][0] for k, v in ours._fold_cache.items()} == {
        k: v[1][0] for k, v in first.items()
    }


def test_fingerprint_sees_every_kind_of_change():
    """fastres_cpu::fingerprint: one element's last bit, a permutation, a dtype, a layout."""
    fp = fastres.functional.fingerprint
    if fp([torch.zeros(1)]) is None:
        pytest.skip("the CPU kernels are not built")
    w = torch.randn(64, 64, 3, 3)
    base = fp([w, None, torch.ones(3)])
    assert base == fp([w.clone(), None, torch.ones(3)])
    v = w.clone()
    v.view(torch.int32)[5, 3, 1, 1] ^= 1  # the last mantissa bit
    assert fp([v, None, torch.ones(3)]) != base
    assert fp([w.flip(0).contiguous(), None, torch.ones(3)]) != base
    assert fp([w[:, :, :, :1].contiguous()]) != fp([w[:, :, :, 1:2].contiguous()])
    assert fp([w.double()]) != fp([w])
    assert fp([w.contiguous(memory_format=torch.channels_last)]) != fp([w])
    assert fp([w, torch.ones(3), None]) != base
    assert fp([torch.ones(3)]) != fp([torch.ones(3), None])
    odd = torch.arange(7, dtype=torch.uint8)  # bytes past the last whole word
    assert fp([odd]) != fp([odd + (torch.arange(7) == 6).to(torch.uint8)])


def test_fingerprint_split_over_threads():
    """fastres_cpu::fingerprint splits a list's words evenly over the threads, across tensor
    boundaries: one thread and two give the same hash, and a one-bit change anywhere (the first
    word, the middle of a big tensor, a small tensor, the last word) changes it."""
    fp = fastres.functional.fingerprint
    if fp([torch.zeros(1)]) is None:
        pytest.skip("the CPU kernels are not built")
    # big and small tensors mixed, ~1.3 MB: over the size hashed on one thread
    ts = [torch.randn(3), torch.randn(256, 256, 3, 3), torch.randn(5), torch.randn(64, 64),
          torch.randn(1000, 17), torch.randn(2)]
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fp(ts)
        torch.set_num_threads(2)
        assert fp(ts) == one
        for k, i in [(0, 0), (1, 300_000), (1, 589_823), (3, 7), (4, 16_999), (5, 1)]:
            changed = [t.clone() for t in ts]
            changed[k].view(-1).view(torch.int32)[i] ^= 1
            assert fp(changed) != one, (k, i)
            torch.set_num_threads(1)
            assert fp(changed) != one, (k, i)
            torch.set_num_threads(2)
    finally:
        torch.set_num_threads(prev)
