"""timm's ResNets converted (tests/test_integrations.py's timm section). The tests need timm
(skipped with a reason when it is missing; scripts/setup_env.sh installs it)."""

from __future__ import annotations

import copy

import pytest
import torch
from integration_helpers import check_rule, randomise_norm, run_kept
from torch import nn

import fastres

# ------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnet(name):
    """timm's plain ResNets: every block swapped for the fused adapter, state_dict keys kept
    (strict loads both ways, unconvert back to timm's classes), and by the tolerance rule: eval
    output; for resnet18 a training step too (outputs, grads, running stats; ResNet-50's training
    path is the same code as resnet18's and test_timm_bottleneck_train's)."""
    timm = pytest.importorskip("timm", reason="timm is not installed (scripts/setup_env.sh)")
    from fastres.integrations import TimmBasicBlock, TimmBottleneck

    tm = randomise_norm(timm.create_model(name, pretrained=False, num_classes=10))
    ours, rep = fastres.convert(tm, report=True)
    cls = TimmBasicBlock if name == "resnet18" else TimmBottleneck
    n_blocks = 8 if name == "resnet18" else 16
    assert [c for _, c in rep.swapped] == [cls.__name__] * n_blocks and not rep.left, rep
    assert list(ours.state_dict()) == list(tm.state_dict())
    fresh = fastres.convert(timm.create_model(name, pretrained=False, num_classes=10))
    fresh.load_state_dict(tm.state_dict(), strict=True)
    tm_again = timm.create_model(name, pretrained=False, num_classes=10)
    tm_again.load_state_dict(ours.state_dict(), strict=True)
    un = fastres.unconvert(ours)
    assert type(un.layer1[0]) is type(tm.layer1[0]) and type(ours.layer1[0]) is cls
    ref = copy.deepcopy(tm).double()
    modes = [(False, torch.randn(2, 3, 32, 32))]
    if name == "resnet18":
        # N=4 at 64x64: layer4's BatchNorms see 16 values per channel (see test_blocks)
        modes.append((True, torch.randn(4, 3, 64, 64)))
    for train, x in modes:
        k_ref = run_kept(ref, x.double(), train)
        k_theirs = run_kept(tm, x, train)
        k_ours = run_kept(ours, x, train)
        check_rule(k_ours, k_theirs, k_ref, torch.float32)


def test_timm_bottleneck_train():
    """A timm Bottleneck with a stride-2 conv + BN downsample, training step and eval."""
    pytest.importorskip("timm", reason="timm is not installed (scripts/setup_env.sh)")
    from timm.models import resnet as timm_resnet

    ds = nn.Sequential(nn.Conv2d(24, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    tm = randomise_norm(timm_resnet.Bottleneck(24, 8, stride=2, downsample=ds))
    ours = fastres.convert(tm)
    assert type(ours).__name__ == "TimmBottleneck"
    ref = copy.deepcopy(tm).double()
    x = torch.randn(4, 24, 15, 15)
    for train in (True, False):
        k_ref = run_kept(ref, x.double(), train)
        k_theirs = run_kept(tm, x, train)
        k_ours = run_kept(ours, x, train)
        check_rule(k_ours, k_theirs, k_ref, torch.float32)


def test_timm_blocks_with_extras_are_left_with_reasons():
    """SE attention, anti-aliasing, drop_path and another activation: left unfused, with the
    reason, and the model computes what timm's does."""
    timm = pytest.importorskip("timm", reason="timm is not installed (scripts/setup_env.sh)")

    se = timm.create_model("seresnet18", pretrained=False, num_classes=10)
    _, rep = fastres.convert(se, report=True)
    assert not rep.swapped and len(rep.left) == 8
    assert all("se: attention layer SEModule is not fused" in why for _, why in rep.left), rep
    for kwargs, why in (
        (dict(aa_layer=nn.AvgPool2d), "aa: anti-aliasing layer AvgPool2d"),
        (dict(drop_path_rate=0.1), "drop_path: stochastic depth"),
        (dict(act_layer=nn.SiLU), "act1: SiLU is not nn.ReLU"),
    ):
        # aa acts on stride-2 blocks only, drop_path is None where its rate is 0: the others fuse
        tm = randomise_norm(timm.create_model("resnet18", pretrained=False, **kwargs)).eval()
        ours, rep = fastres.convert(tm, report=True)
        assert rep.left and all(why in w for _, w in rep.left), (kwargs, rep)
        for path, _ in rep.left:
            assert type(ours.get_submodule(path)) is type(tm.get_submodule(path))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            k_ref = {"out": copy.deepcopy(tm).double()(x.double())}
            check_rule({"out": ours.eval()(x)}, {"out": tm(x)}, k_ref, torch.float32)

