"""What the training-unit tests share (test_eager_unit.py, test_triton_unit.py): small
torchvision blocks and one training step's results."""

from __future__ import annotations

import copy

import torch
import torchvision

from fastres.harness.rule import allow_tf32, assert_close_rule, randomise_bn

tvr = torchvision.models.resnet


def block(kind: str, norm=None):
    """A small torchvision block: "bottleneck" (identity), "downsample" (stride 2) or "basic"."""
    kw = {} if norm is None else {"norm_layer": norm}
    if kind == "downsample":
        nl = norm or torch.nn.BatchNorm2d
        return tvr.Bottleneck(32, 16, stride=2, downsample=torch.nn.Sequential(
            torch.nn.Conv2d(32, 64, 1, stride=2, bias=False), nl(64)), **kw)
    if kind == "basic":
        return tvr.BasicBlock(24, 24, **kw)
    return tvr.Bottleneck(64, 16, **kw)


def step(m, x, proj, need_x: bool = True):
    """One training step's results: output, input and parameter gradients, BN buffers
    (``need_x``: whether the input requires a gradient)."""
    m.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(need_x)
    out = m(xg)
    (out * proj.to(out.dtype)).sum().backward()
    res = {"output": out.detach(), "input": xg.grad}
    res.update({f"grad {n}": p.grad for n, p in m.named_parameters()})
    res.update({n: b.clone() for n, b in m.named_buffers()})
    return res, out


def variant(name: str):
    """A torchvision block in training mode for a BatchNorm variant: "momentum None"
    (cumulative-average running statistics), "affine False" (no BatchNorm weight and bias, the
    running statistics randomised), or a block kind of :func:`block` with randomised
    BatchNorms."""
    if name == "momentum None":
        tv = block("bottleneck", lambda c: torch.nn.BatchNorm2d(c, momentum=None))
    elif name == "affine False":
        tv = block("basic", lambda c: torch.nn.BatchNorm2d(c, affine=False))
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        return tv.train()
    else:
        tv = block(name)
    return randomise_bn(tv).train()


def against_torchvision(label: str, ours, tv, x, steps: int = 2):
    """``steps`` training steps of ``ours`` (a converted ``tv``), ``tv`` and a float64 copy of
    ``tv`` from the same state, float32 without TF32; every result of the last step of ``ours``
    within the rule (num_batches_tracked equal). Returns the last output of ``ours``."""
    ref = copy.deepcopy(tv).double()
    with allow_tf32(False):
        proj = torch.randn(ours(x).shape)
        tv(x), ref(x.double())
        for _ in range(steps):
            got, out = step(ours, x, proj)
            want, _ = step(tv, x, proj)
            exact, _ = step(ref, x.double(), proj)
    for k in got:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], want[k]), k
        elif got[k] is None:
            assert want[k] is None, k
        else:
            assert_close_rule(f"{label}: {k}", got[k], want[k], exact[k], torch.float32)
    return out
