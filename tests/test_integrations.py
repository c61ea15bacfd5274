"""fastres in the rest of the ecosystem: checkpoints (unconvert), autocast, FrozenBatchNorm2d,
torch.export / torch.compile, timm and DDP.

Numerical comparisons follow the tolerance rule (fastres.testing): against a float64 run of the
plain model with the same weights, err(fastres) <= 2 * err(plain PyTorch) + atol[dtype]. The
backend is whatever FASTRES_BACKEND (or the dispatcher) picks, so the suite is run once per
backend by the caller.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d

import fastres
from fastres.testing import assert_close_rule

FUSED = (fastres.BasicBlock, fastres.BottleneckBlock, fastres.ConvBNReLU)


def randomise_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics (BatchNorm2d and FrozenBatchNorm2d),
    so that folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.running_mean.numel()
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.num_batches_tracked.fill_(3)
    return model


def n_fused(model: nn.Module) -> int:
    return sum(isinstance(m, FUSED) for m in model.modules())


def _flat(out) -> dict[str, torch.Tensor]:
    """A model's output as named tensors (a tensor, or a dict of them as detection backbones)."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    return {f"out.{k}": v for k, v in out.items()}


def run_kept(model: nn.Module, x: torch.Tensor, train: bool, autocast=None):
    """Forward (under ``autocast``, a dtype for torch.autocast("cpu")) and, for train, a backward
    of a fixed random projection outside autocast. Returns what a user keeps: outputs, input grad,
    every parameter grad and every buffer."""
    model.train(train)
    x = x.detach().clone().requires_grad_(train)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        outs = _flat(model(x))
    kept = {k: v.detach() for k, v in outs.items()}
    if train:
        g = torch.Generator().manual_seed(1)
        loss = sum(
            (v.double() * torch.randn(v.shape, generator=g, dtype=torch.float64)).sum()
            for v in outs.values()
        )
        loss.backward()
        kept["input.grad"] = x.grad.detach()
        for n, p in model.named_parameters():
            if p.requires_grad:
                kept[f"{n}.grad"] = p.grad.detach()
        for n, b in model.named_buffers():
            kept[n] = b.detach().clone()
    return kept


def check_rule(ours: dict, theirs: dict, ref: dict, dtype: torch.dtype) -> None:
    """Every kept tensor by the tolerance rule (integer buffers exactly); same keys and dtypes as
    plain PyTorch."""
    assert ours.keys() == theirs.keys() == ref.keys()
    for name, r in ref.items():
        assert ours[name].dtype == theirs[name].dtype, (name, ours[name].dtype, theirs[name].dtype)
        if not r.is_floating_point():
            assert torch.equal(ours[name], r), name
            continue
        assert_close_rule(name, ours[name], theirs[name], r, dtype)


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


# ------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet18_cpu_autocast_bf16(train):
    """A converted resnet18 under torch.autocast("cpu", bfloat16) against torchvision's under the
    same autocast: same output dtype (bfloat16), float32 parameter grads and running statistics,
    all within the tolerance rule of a float64 run without autocast."""
    tv = randomise_norm(torchvision.models.resnet18(num_classes=10))
    ref = copy.deepcopy(tv).double()
    ours = fastres.convert(tv)
    # 64x64 and N=4: layer4's BatchNorms see 16 values per channel (see test_blocks).
    x = torch.randn(4, 3, 64, 64)
    k_ref = run_kept(ref, x.double(), train)
    k_theirs = run_kept(tv, x, train, autocast=torch.bfloat16)
    k_ours = run_kept(ours, x, train, autocast=torch.bfloat16)
    assert k_ours["out"].dtype == torch.bfloat16
    if train:
        assert k_ours["layer1.0.bn1.running_mean"].dtype == torch.float32
        assert k_ours["layer1.0.conv1.weight.grad"].dtype == torch.float32
    check_rule(k_ours, k_theirs, k_ref, torch.bfloat16)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_block_autocast_float32_input(train):
    """A block fed float32 under autocast (the identity shortcut is float32, the convolutions
    bfloat16) returns what torchvision's returns: bfloat16; the same for ConvBNReLU."""
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    for tv in (
        tv_resnet.Bottleneck(16, 8, stride=2, downsample=ds),
        tv_resnet.BasicBlock(16, 16),
        Conv2dNormActivation(16, 8, 3),
    ):
        tv = randomise_norm(tv)
        ref = copy.deepcopy(tv).double()
        ours = fastres.convert(tv)
        assert n_fused(ours) == 1
        x = torch.randn(4, 16, 8, 8)
        k_ref = run_kept(ref, x.double(), train)
        k_theirs = run_kept(tv, x, train, autocast=torch.bfloat16)
        k_ours = run_kept(ours, x, train, autocast=torch.bfloat16)
        check_rule(k_ours, k_theirs, k_ref, torch.bfloat16)


# ------------------------------------------------------------------------------- FrozenBatchNorm2d


def frozen_detection_backbone() -> nn.Module:
    """The backbone fasterrcnn_resnet50_fpn builds around an ImageNet backbone: ResNet-50 with
    FrozenBatchNorm2d, layer2-4 trainable, an FPN on top. (With weights_backbone=None,
    fasterrcnn_resnet50_fpn switches to nn.BatchNorm2d, so it is built here without downloads.)"""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )


def test_frozen_bn_detection_backbone_train():
    """Train mode: FrozenBatchNorm2d is folded (its statistics never change), gradients reach
    the conv weights through the fold; outputs, input grad and every trainable parameter's grad
    by the tolerance rule."""
    tv = randomise_norm(frozen_detection_backbone())
    ours, rep = fastres.convert(tv, report=True)
    assert len(rep.swapped) == 16, rep
    # the FPN's Conv2dNormActivation have a conv bias and no norm layer: nothing to fuse
    assert all(path.startswith("fpn.") for path, _ in rep.left), rep
    assert type(ours.body.layer1[0].bn1) is FrozenBatchNorm2d
    ref = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 64, 64)
    k_ref = run_kept(ref, x.double(), True)
    k_theirs = run_kept(tv, x, True)
    k_ours = run_kept(ours, x, True)
    assert "body.layer4.2.conv3.weight.grad" in k_ours
    assert "body.layer1.0.conv1.weight.grad" not in k_ours  # frozen by trainable_layers=3
    check_rule(k_ours, k_theirs, k_ref, torch.float32)


def test_frozen_bn_blocks_and_reasons():
    """Blocks and ConvBNReLU with FrozenBatchNorm2d: fused in train and eval, also under autocast,
    where torchvision's block returns float32 (FrozenBatchNorm2d computes in its buffers' dtype);
    a block mixing BatchNorm2d and FrozenBatchNorm2d is left with the reason; a BatchNorm2d
    downsample of a frozen block runs as a module."""
    frozen_ds = nn.Sequential(nn.Conv2d(8, 32, 1, stride=2, bias=False), FrozenBatchNorm2d(32))
    bn_ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    every = [(t, ac) for t in (True, False) for ac in (None, torch.bfloat16)]
    cases = [
        (tv_resnet.Bottleneck(8, 8, 2, frozen_ds, norm_layer=FrozenBatchNorm2d), every),
        (Conv2dNormActivation(8, 8, 3, norm_layer=FrozenBatchNorm2d), every),
        # Not bf16 training: gradients through a batch-statistics BatchNorm in bf16 are so
        # ill-conditioned at this size that PyTorch's own max error changes 2x from seed to seed.
        (
            tv_resnet.BasicBlock(8, 16, 2, bn_ds, norm_layer=FrozenBatchNorm2d),
            [(True, None), (False, None), (False, torch.bfloat16)],
        ),
    ]
    # 48x48: enough ReLU-mask flips for bf16 gradient errors to be an average, not a coin toss
    x = torch.randn(4, 8, 48, 48)
    for tv, modes in cases:
        tv = randomise_norm(tv)
        ours = fastres.convert(tv)
        assert n_fused(ours) == 1
        ref = copy.deepcopy(tv).double()
        for train, ac in modes:
            k_ref = run_kept(ref, x.double(), train)
            k_theirs = run_kept(tv, x, train, autocast=ac)
            k_ours = run_kept(ours, x, train, autocast=ac)
            if ac is not None:
                assert k_ours["out"].dtype == torch.float32
            check_rule(k_ours, k_theirs, k_ref, ac or torch.float32)
    mixed = tv_resnet.BasicBlock(8, 8)
    mixed.bn2 = FrozenBatchNorm2d(8)
    _, rep = fastres.convert(mixed, report=True)
    assert not rep.swapped and "mixes BatchNorm2d and FrozenBatchNorm2d" in rep.left[0][1]
