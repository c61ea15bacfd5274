"""fastres.convert and fastres.revert: checkpoints both ways, the converted model sharing the
plain model's Parameters and buffers, the conversion report (every conv and norm layer, fused or
why not), and revert giving back every plain class convert can replace."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision
from integration_helpers import check_rule, n_fused, randomise_bn, run_kept
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d

import fastres

# ------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_revert():
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
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

    # revert: plain torchvision blocks, same state_dict, same outputs as the original
    un = fastres.revert(ours)
    assert n_fused(un) == 0 and n_fused(ours) == 8  # new module objects by default
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
    same = fastres.revert(ours, inplace=True)
    assert same is ours and n_fused(ours) == 0
    assert ours.layer1[0].conv1.weight is w and ours.layer1[0].bn1.running_mean is rm
    # and back again
    again = fastres.convert(ours, inplace=True)
    assert again is ours and type(ours.layer1[0]) is fastres.BasicBlock


def test_revert_bottleneck_and_convbnrelu():
    model = nn.Sequential(
        Conv2dNormActivation(3, 16, 3),
        tv_resnet.Bottleneck(16, 4),
    )
    ours = fastres.convert(model)
    assert type(ours[0]) is fastres.ConvBNReLU and type(ours[1]) is fastres.BottleneckBlock
    un = fastres.revert(ours)
    assert type(un[0]) is Conv2dNormActivation and type(un[1]) is tv_resnet.Bottleneck
    un.load_state_dict(model.state_dict(), strict=True)
    # a model built from fastres blocks directly, and a block as the model itself
    direct = torchvision.models.ResNet(fastres.BottleneckBlock, [1, 1, 1, 1])
    un = fastres.revert(direct)
    assert n_fused(un) == 0 and type(un.layer1[0]) is tv_resnet.Bottleneck
    torchvision.models.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1]).load_state_dict(
        un.state_dict(), strict=True
    )
    block = fastres.BasicBlock(8, 8)
    assert type(fastres.revert(block)) is tv_resnet.BasicBlock
    # unconvert: the earlier name
    assert fastres.unconvert is fastres.revert
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fastres.revert(torch.zeros(1))



# ------------------------------------------------------------------------------- sharing


def test_convert_shares_parameters_and_buffers():
    """convert (default) returns new module objects holding the input model's own Parameter and
    buffer objects, as nn.SyncBatchNorm.convert_sync_batchnorm does: an optimizer built before
    convert trains the converted model; the input model keeps its classes and its train/eval
    flags; state_dict keys unchanged. inplace=True converts the model's own modules."""
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10))
    opt = torch.optim.SGD(tv.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in tv.named_parameters()}
    steps = int(tv.layer1[0].bn1.num_batches_tracked)
    ours, rep = fastres.convert(tv, report=True)
    assert "shared, not copied" in str(rep)
    assert ours is not tv and ours.layer1[0] is not tv.layer1[0]
    assert type(tv) is torchvision.models.ResNet and type(tv.layer1[0]) is tv_resnet.BasicBlock
    assert type(ours) is fastres.ResNet and type(ours.layer1[0]) is fastres.BasicBlock
    params, buffers = dict(tv.named_parameters()), dict(tv.named_buffers())
    assert all(p is params[n] for n, p in ours.named_parameters())
    assert all(b is buffers[n] for n, b in ours.named_buffers())
    assert list(ours.state_dict()) == list(tv.state_dict())

    ours.train()
    (ours(torch.randn(4, 3, 64, 64)) * torch.randn(4, 10)).sum().backward()
    grads = {n: p.grad.clone() for n, p in tv.named_parameters()}  # the fused model's gradients
    opt.step()
    for n, p in tv.named_parameters():  # SGD: p - lr * grad, the same arithmetic
        assert torch.equal(p, before[n].add(grads[n], alpha=-0.1)), n
        assert not torch.equal(p, before[n]), n
    assert int(tv.layer1[0].bn1.num_batches_tracked) == steps + 1  # the fused step counted

    ours.eval()
    assert tv.training and not ours.training and ours.layer1[0].bn1 is not tv.layer1[0].bn1
    same = fastres.convert(tv, inplace=True)
    assert same is tv and type(tv.layer1[0]) is fastres.BasicBlock


# ------------------------------------------------------------------------------- revert


def _every_twin() -> dict[str, nn.Module]:
    """Models holding every class convert swaps: torchvision's blocks, stem, Conv2dNormActivation
    and detection body; timm's families; an nn.Sequential of conv, BN, ReLU."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    models = {
        "resnet18": torchvision.models.resnet18(num_classes=10),
        "detection": resnet_fpn_backbone(backbone_name="resnet18", weights=None),
        "sequential": nn.Sequential(
            Conv2dNormActivation(3, 8, 3),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            tv_resnet.Bottleneck(8, 2),
        ),
        "frozen": torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d),
    }
    timm = pytest.importorskip("timm", reason="timm is not installed (scripts/setup_env.sh)")
    for name in ("resnet26d", "seresnext26d_32x4d", "resnetv2_18", "skresnet18", "skresnet50",
                 "resnest14d"):
        models[name] = timm.create_model(name, pretrained=False, num_classes=10)
    return models


def test_revert_gives_every_plain_class_back():
    """revert(convert(m)) holds m's classes, module for module, the same Parameter and buffer
    objects, the same state_dict, and pickles without a reference to fastres; convert swaps at
    least one module of every model here."""
    for name, model in _every_twin().items():
        model = randomise_bn(model)
        ours, rep = fastres.convert(model, report=True)
        assert rep.swapped and not rep.left, (name, rep)
        pairs = zip(ours.modules(), model.modules(), strict=True)
        assert any(type(a) is not type(b) for a, b in pairs)
        back = fastres.revert(ours)
        kinds = [type(m) for m in model.modules()]
        assert [type(m) for m in back.modules()] == kinds, name
        assert not any(type(m).__module__.startswith("fastres") for m in back.modules()), name
        params = dict(model.named_parameters())
        assert all(p is params[n] for n, p in back.named_parameters()), name
        assert list(back.state_dict()) == list(model.state_dict()), name
        assert b"fastres" not in pickle.dumps(back), name
        # and in place: the converted model's own modules
        same = fastres.revert(ours, inplace=True)
        assert same is ours and [type(m) for m in ours.modules()] == kinds, name


# ------------------------------------------------------------------------------- the report


def test_detection_stem_fused_and_report_counts_every_layer():
    """fasterrcnn_resnet50_fpn's backbone (BatchNorm2d without pretrained weights): the body's
    stem (IntermediateLayerGetter's conv1, bn1, relu) is fused with the blocks; the report counts
    every conv and norm layer of the model, and FPN's norm-less convs are "not a conv +
    BatchNorm pair", not a failure. Eval output and a training step's output and running
    statistics by the tolerance rule (whole-network gradients: see test_timm_table.py)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    det = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    ours, rep = fastres.convert(det, report=True)
    assert type(ours.backbone.body).__name__ == "FusedLayerGetter"
    assert not rep.left and rep.blocks == (16, 16), rep
    convs = [n for n, m in det.named_modules() if isinstance(m, nn.Conv2d)]
    norms = [n for n, m in det.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(rep.layers) == sorted(convs + norms)
    assert rep.convs == (53, len(convs)) and rep.norms == (53, 53), rep
    for path, s in rep.layers.items():
        assert s.fused == path.startswith("backbone.body."), (path, s)
        assert s.fused or "not a conv + BatchNorm pair" in s.why, (path, s)
    for path in ("backbone.body.conv1", "backbone.body.bn1"):
        assert rep.layers[path].by == "backbone.body"
    assert "not fused: not a conv + BatchNorm pair" in str(rep)

    bb = randomise_bn(det.backbone)
    ours = fastres.convert(copy.deepcopy(bb))
    ref = copy.deepcopy(bb).double()
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        k_ref = run_kept(ref, x.double(), train)
        k_theirs, k_ours = run_kept(bb, x, train), run_kept(ours, x, train)
        keep = [k for k in k_ref if not k.endswith(".grad")]
        check_rule(*({k: d[k] for k in keep} for d in (k_ours, k_theirs, k_ref)), torch.float32)
