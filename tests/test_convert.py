"""fastres.convert and fastres.unconvert: checkpoints both ways."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torchvision
from integration_helpers import n_fused, randomise_norm
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import Conv2dNormActivation

import fastres

# ------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_unconvert():
    tv = randomise_norm(torchvision.models.resnet18(num_classes=10)).eval()
    ours = fastres.convert(tv)
    assert n_fused(ours) == 8

    # converted -> plain: strict load, same values
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(ours.state_dict(), strict=True)
    # plain -> converted: strict load into a model converted before its weights were loaded
    fused = fastres.convert(torchvision.models.resnet18(num_classes=10))
    fused.load_state_dict(plain.state_dict(), strict=True)
    for k, v in tv.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
        assert torch.equal(fused.state_dict()[k], v), k

    # unconvert: plain torchvision blocks, same state_dict, same outputs as the original
    un = fastres.unconvert(ours)
    assert n_fused(un) == 0 and n_fused(ours) == 8  # a copy by default
    assert type(un.layer1[0]) is tv_resnet.BasicBlock
    assert type(un.layer2[0]) is tv_resnet.BasicBlock
    assert list(un.state_dict()) == list(tv.state_dict())
    assert all(torch.equal(un.state_dict()[k], v) for k, v in tv.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(un.eval()(x), tv(x))  # the very same torchvision code and weights
    # nothing of fastres is left in the pickled model: it loads where fastres is not installed
    assert b"fastres" not in pickle.dumps(un)
    buf = io.BytesIO()
    torch.save(un.state_dict(), buf)
    buf.seek(0)
    back = fastres.convert(torchvision.models.resnet18(num_classes=10))
    back.load_state_dict(torch.load(buf), strict=True)

    # inplace=True: the model itself, its parameters and buffers shared
    w = ours.layer1[0].conv1.weight
    rm = ours.layer1[0].bn1.running_mean
    same = fastres.unconvert(ours, inplace=True)
    assert same is ours and n_fused(ours) == 0
    assert ours.layer1[0].conv1.weight is w and ours.layer1[0].bn1.running_mean is rm
    # and back again
    again = fastres.convert(ours, inplace=True)
    assert again is ours and type(ours.layer1[0]) is fastres.BasicBlock


def test_unconvert_bottleneck_and_convbnrelu():
    model = nn.Sequential(
        Conv2dNormActivation(3, 16, 3),
        tv_resnet.Bottleneck(16, 4),
    )
    ours = fastres.convert(model)
    assert type(ours[0]) is fastres.ConvBNReLU and type(ours[1]) is fastres.BottleneckBlock
    un = fastres.unconvert(ours)
    assert type(un[0]) is Conv2dNormActivation and type(un[1]) is tv_resnet.Bottleneck
    un.load_state_dict(model.state_dict(), strict=True)
    # a model built from fastres blocks directly, and a block as the model itself
    direct = torchvision.models.ResNet(fastres.BottleneckBlock, [1, 1, 1, 1])
    un = fastres.unconvert(direct)
    assert n_fused(un) == 0 and type(un.layer1[0]) is tv_resnet.Bottleneck
    torchvision.models.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1]).load_state_dict(
        un.state_dict(), strict=True
    )
    block = fastres.BasicBlock(8, 8)
    assert type(fastres.unconvert(block)) is tv_resnet.BasicBlock
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fastres.unconvert(torch.zeros(1))

