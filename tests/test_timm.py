"""timm's ResNet family converted: plain, SE / ECA, anti-aliased (blur), DropBlock and stochastic
depth, deep stems, pre-activation (resnetv2), selective-kernel and ResNeSt blocks.

Blocks by the tolerance rule (fastres.harness.rule) in float32 on everything a user keeps (outputs,
input and parameter gradients, running statistics), and in float64 against float64 timm (the
rule's float64 bar: the semantics, rounding aside). Whole models: test_timm_table.py. The tests
need timm (skipped with a reason when it is missing; scripts/setup_env.sh installs it).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from integration_helpers import check_rule, randomise_bn, run_kept
from torch import nn

import fastres

timm = pytest.importorskip("timm", reason="timm is not installed (scripts/setup_env.sh)")

from timm.layers import (  # noqa: E402
    BatchNormAct2d,
    BlurPool2d,
    DropBlock2d,
    DropPath,
    create_conv2d,
    get_attn,
)
from timm.models import resnest as timm_resnest  # noqa: E402
from timm.models import resnet as timm_resnet  # noqa: E402
from timm.models import resnetv2 as timm_v2  # noqa: E402
from timm.models import sknet as timm_sk  # noqa: E402


def _ds(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _avg_ds(cin: int, cout: int, stride: int) -> nn.Module:
    return timm_resnet.downsample_avg(cin, cout, 1, stride=stride)


# name: (block, its fused class, input channels, random layers)
BLOCKS = {
    "bottleneck-se": (
        lambda: timm_resnet.Bottleneck(24, 8, 2, _ds(24, 32, 2), attn_layer=get_attn("se")),
        "TimmBottleneck", 24, False,
    ),
    "basic-eca": (
        lambda: timm_resnet.BasicBlock(16, 16, attn_layer=get_attn("eca")),
        "TimmBasicBlock", 16, False,
    ),
    "bottleneck-blur-avgdown": (
        lambda: timm_resnet.Bottleneck(24, 8, 2, _avg_ds(24, 32, 2), aa_layer=BlurPool2d),
        "TimmBottleneck", 24, False,
    ),
    "basic-aa-avgpool": (
        lambda: timm_resnet.BasicBlock(16, 24, 2, _ds(16, 24, 2), aa_layer=nn.AvgPool2d),
        "TimmBasicBlock", 16, False,
    ),
    "bottleneck-drop-path": (
        lambda: timm_resnet.Bottleneck(32, 8, drop_path=DropPath(0.3)),
        "TimmBottleneck", 32, True,
    ),
    "basic-drop-block": (
        lambda: timm_resnet.BasicBlock(
            16, 16, drop_block=partial(DropBlock2d, drop_prob=0.3, block_size=3)
        ),
        "TimmBasicBlock", 16, True,
    ),
    "preact-bottleneck": (
        lambda: timm_v2.PreActBottleneck(
            24, 32, stride=2, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
            proj_layer=timm_v2.DownsampleConv,
        ),
        "TimmPreActBottleneck", 24, False,
    ),
    "preact-basic": (
        lambda: timm_v2.PreActBasic(16, 16, conv_layer=create_conv2d, norm_layer=BatchNormAct2d),
        "TimmPreActBasic", 16, False,
    ),
    "sk-basic": (lambda: timm_sk.SelectiveKernelBasic(16, 16), "TimmSKBasic", 16, False),
    "sk-bottleneck": (
        lambda: timm_sk.SelectiveKernelBottleneck(24, 8, 2, _ds(24, 32, 2)),
        "TimmSKBottleneck", 24, False,
    ),
    "resnest": (
        lambda: timm_resnest.ResNestBottleneck(
            24, 8, 2, _avg_ds(24, 32, 2), radix=2, avd=True, avd_first=False
        ),
        "TimmResNestBottleneck", 24, False,
    ),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_timm_block_fused(name):
    """Every conv + BN of the block runs fused (except those inside an attention module), in
    eval and in a training step; float32 by the tolerance rule, float64 to float64's bar. Layers
    with random masks (stochastic depth, DropBlock) draw the same masks in every run (seeded)."""
    make, cls, cin, random = BLOCKS[name]
    tm = randomise_bn(make())
    ours, rep = fastres.convert(copy.deepcopy(tm), report=True)
    assert type(ours).__name__ == cls and ("", cls) in rep.swapped and not rep.left, rep
    for path, s in rep.layers.items():
        assert s.fused or "attention" in s.why or "pre-activation" in s.why, (path, s)
    assert list(ours.state_dict()) == list(tm.state_dict())
    ref = copy.deepcopy(tm).double()
    ours64 = fastres.convert(copy.deepcopy(ref))
    x = torch.randn(4, cin, 12, 12)
    seed = 7 if random else None
    for train in (True, False):
        k_ref = run_kept(ref, x.double(), train, seed=seed)
        check_rule(run_kept(ours64, x.double(), train, seed=seed), k_ref, k_ref, torch.float64)
        k_theirs = run_kept(tm, x, train, seed=seed)
        check_rule(run_kept(ours, x, train, seed=seed), k_theirs, k_ref, torch.float32)


@pytest.mark.parametrize("name", ["bottleneck-se", "bottleneck-blur-avgdown", "preact-bottleneck",
                                  "sk-bottleneck", "resnest"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_block_autocast(name, train):
    """Under torch.autocast("cpu", bfloat16) a fused twin returns what timm's block returns
    under the same autocast (dtypes included), by the rule against float64 without autocast."""
    make, _, cin, _ = BLOCKS[name]
    tm = randomise_bn(make())
    ours = fastres.convert(copy.deepcopy(tm))
    # 16x16, N=4: enough ReLU-mask flips for bf16 gradient errors to be an average
    x = torch.randn(4, cin, 16, 16)
    k_ref = run_kept(copy.deepcopy(tm).double(), x.double(), train)
    k_theirs = run_kept(tm, x, train, autocast=torch.bfloat16)
    k_ours = run_kept(ours, x, train, autocast=torch.bfloat16)
    check_rule(k_ours, k_theirs, k_ref, torch.bfloat16)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnet(name):
    """timm's plain ResNets: every block and the stem swapped for the fused twins, state_dict
    keys kept (strict loads both ways, revert back to timm's classes), and by the tolerance rule:
    eval output; for resnet18 a training step too (outputs, grads, running stats; ResNet-50's
    training path is the same code as resnet18's and test_timm_bottleneck_train's)."""
    from fastres.nn.timm import TimmBasicBlock, TimmBottleneck

    tm = randomise_bn(timm.create_model(name, pretrained=False, num_classes=10))
    ours, rep = fastres.convert(copy.deepcopy(tm), report=True)
    cls = TimmBasicBlock if name == "resnet18" else TimmBottleneck
    n_blocks = 8 if name == "resnet18" else 16
    assert [c for _, c in rep.swapped] == ["TimmResNet"] + [cls.__name__] * n_blocks, rep
    assert not rep.left and rep.blocks == (n_blocks, n_blocks), rep
    assert rep.convs[0] == rep.convs[1] and rep.norms[0] == rep.norms[1], rep
    assert list(ours.state_dict()) == list(tm.state_dict())
    fresh = fastres.convert(timm.create_model(name, pretrained=False, num_classes=10))
    fresh.load_state_dict(tm.state_dict(), strict=True)
    tm_again = timm.create_model(name, pretrained=False, num_classes=10)
    tm_again.load_state_dict(ours.state_dict(), strict=True)
    un = fastres.revert(ours)
    assert type(un) is type(tm) and type(un.layer1[0]) is type(tm.layer1[0])
    assert type(ours.layer1[0]) is cls
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
    tm = randomise_bn(timm_resnet.Bottleneck(24, 8, stride=2, downsample=_ds(24, 32, 2)))
    ours = fastres.convert(copy.deepcopy(tm))
    assert type(ours).__name__ == "TimmBottleneck"
    ref = copy.deepcopy(tm).double()
    x = torch.randn(4, 24, 15, 15)
    for train in (True, False):
        k_ref = run_kept(ref, x.double(), train)
        k_theirs = run_kept(tm, x, train)
        k_ours = run_kept(ours, x, train)
        check_rule(k_ours, k_theirs, k_ref, torch.float32)


@pytest.mark.parametrize("stem", ["", "deep", "deep_tiered"])
def test_timm_stems_fused(stem):
    """timm's stems: the 7x7 conv + bn1 + act1, and the deep stems' three conv + BN + ReLU (one
    chain: in training one fused unit); with the avg-pool downsample branches (resnetd) fused
    too. A small ResNet (one block per stage), eval and a training step, float32 by the rule and
    float64 to float64's bar."""
    kw = dict(stem_type=stem, stem_width=16, avg_down=bool(stem)) if stem else {}
    tm = randomise_bn(
        timm_resnet.ResNet(timm_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10, **kw)
    )
    ours, rep = fastres.convert(copy.deepcopy(tm), report=True)
    assert type(ours).__name__ == "TimmResNet" and not rep.left, rep
    assert rep.convs == (rep.convs[1], rep.convs[1]) and rep.norms[0] == rep.norms[1], rep
    for path in ("conv1", "conv1.0", "conv1.3", "conv1.6", "bn1"):
        if path in rep.layers:
            assert rep.layers[path].by == "<model>", (path, rep.layers[path])  # its own stem
    ref = copy.deepcopy(tm).double()
    ours64 = fastres.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 64, 64)
    for train in (True, False):
        k_ref = run_kept(ref, x.double(), train)
        check_rule(run_kept(ours64, x.double(), train), k_ref, k_ref, torch.float64)
        check_rule(run_kept(ours, x, train), run_kept(tm, x, train), k_ref, torch.float32)


def test_timm_left_with_reasons():
    """Another activation than ReLU: the blocks and the stem are left with the reason (their
    conv + BN downsample branches, run as modules, are fused), and the model computes what
    timm's does. Layers inside attention modules are reported as such."""
    tm = randomise_bn(timm.create_model("resnet18", pretrained=False, act_layer=nn.SiLU))
    ours, rep = fastres.convert(copy.deepcopy(tm).eval(), report=True)
    assert rep.swapped == [(f"layer{i}.0.downsample", "FusedSequential") for i in (2, 3, 4)]
    assert rep.blocks == (0, 8) and rep.convs == (3, 20), rep
    assert all("SiLU is not nn.ReLU" in why for _, why in rep.left), rep
    assert len(rep.left) == 9  # the stem and 8 blocks
    for path, _ in rep.left:
        assert type(ours.get_submodule(path)) is type(tm.get_submodule(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        k_ref = {"out": copy.deepcopy(tm).double().eval()(x.double())}
        check_rule({"out": ours(x)}, {"out": tm.eval()(x)}, k_ref, torch.float32)
    _, rep = fastres.convert(timm.create_model("seresnet18", pretrained=False), report=True)
    assert rep.blocks == (8, 8) and not rep.left, rep
    se = {p: s for p, s in rep.layers.items() if ".se." in p}
    assert len(se) == 16 and not any(s.fused for s in se.values())
    assert all(s.why == "in an attention module (SEModule), which runs as it is"
               for s in se.values())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_twins_compile_without_graph_breaks(train):
    """Dynamo traces converted timm models with the new twins (deep stem, avg-down branches, SE
    and blur blocks; pre-activation blocks) as one graph, in eval and in training."""
    models = [
        timm_resnet.ResNet(
            timm_resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, stem_type="deep",
            stem_width=16, avg_down=True, aa_layer=BlurPool2d,
            block_args=dict(attn_layer=get_attn("se")),
        ),
        timm.create_model("resnetv2_18", pretrained=False, num_classes=10),
    ]
    for m in models:
        ours = fastres.convert(m).train(train)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(ours)(torch.randn(2, 3, 32, 32))
        assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
