"""Weight changes a user makes between eval calls, applied alike to a torchvision model and its
converted twin (test_live_weights.py, test_frozen_weights.py)."""

from __future__ import annotations

import torch
import torchvision

from fastres.harness.rule import randomise_bn


def load_other_state_then_step(tv, ours, check) -> None:
    """``load_state_dict`` of another ResNet-18's state, then one SGD step with momentum on
    seeded gradients; ``check(name)`` after each (it compares the two models)."""
    other = randomise_bn(torchvision.models.resnet18(num_classes=10), seed=3).state_dict()
    for m in (tv, ours):
        m.load_state_dict(other)
    check("after load_state_dict")
    for m in (tv, ours):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    check("after an optimizer step")
