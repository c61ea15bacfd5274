"""What the training-unit tests share (test_eager_unit.py, test_triton_unit.py): small
torchvision blocks and one training step's results."""

from __future__ import annotations

import torch
import torchvision

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
