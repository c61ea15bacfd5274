"""The paper's CIFAR networks (fastres.models): block parity with the eager twin, training steps,
parameter counts, bad depths.

Runs on whatever backend the dispatcher picks (FASTRES_BACKEND unset) and with
FASTRES_BACKEND=reference. Every comparison uses the tolerance rule (fastres.testing): the fused
result at dtype vs the eager twin in float64, with the eager twin at dtype as the yardstick.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastres import functional as FF
from fastres import models
from fastres.testing import assert_close_rule

KINDS = {
    # name: (inplanes, planes, stride, shortcut argument)
    "option_a": (16, 32, 2, "A"),
    "projection": (16, 32, 2, "B"),
    "identity": (16, 16, 1, "A"),
    "plain_down": (16, 32, 2, "none"),
    "plain": (16, 16, 1, "none"),
}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _blocks(kind: str, dtype: torch.dtype, train: bool):
    """(fused at dtype, eager twin at dtype, eager twin in float64), same weights and statistics."""
    inplanes, planes, stride, shortcut = KINDS[kind]
    eager = models.CifarBasicBlockEager(inplanes, planes, stride, shortcut)
    with torch.no_grad():  # non-trivial BN parameters and running statistics
        for m in eager.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    fused = models.CifarBasicBlock(inplanes, planes, stride, shortcut)
    fused.load_state_dict(eager.state_dict(), strict=True)
    assert fused.shortcut_kind == eager.shortcut_kind == (
        "none" if kind.startswith("plain") else kind
    )
    ref = copy.deepcopy(eager).double()
    blocks = (fused.to(dtype), eager.to(dtype), ref)
    for b in blocks:
        b.train(train)
    return blocks


def _run(block: nn.Module, x: torch.Tensor, g: torch.Tensor, backward: bool):
    x = x.detach().clone().requires_grad_(backward)
    out = block(x)
    if not backward:
        return out.detach(), None, {}
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_block_parity(kind, dtype, train, fmt, monkeypatch):
    fused, eager, ref = _blocks(kind, dtype, train)
    calls = []  # the fused block must take the fused path, not an eager fallback
    for name in ("residual_unit", "conv_bias_act"):
        real = getattr(FF, name)

        def spy(*a, _f=real, _n=name, **k):
            calls.append(_n)
            return _f(*a, **k)

        monkeypatch.setattr(FF, name, spy)
    inplanes, planes, stride, _ = KINDS[kind]
    # Odd spatial size: the stride-2 subsampling of option A must match the conv's output size.
    x64 = torch.randn(4, inplanes, 9, 9, dtype=torch.float64)
    x64 = x64.contiguous(memory_format=FORMATS[fmt])
    out_hw = (9 - 1) // stride + 1
    g64 = torch.randn(4, planes, out_hw, out_hw, dtype=torch.float64)
    backward = dtype == torch.float32  # bf16: forward only
    x = x64.to(dtype)
    got = _run(fused, x, g64, backward)
    n_convs = 3 if kind == "projection" else 2
    assert calls == (["residual_unit"] if train else ["conv_bias_act"] * n_convs), calls
    yard = _run(eager, x, g64, backward)
    want = _run(ref, x64, g64, backward)

    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    assert_close_rule("out", got[0], yard[0], want[0], dtype)
    if backward:
        assert_close_rule("grad x", got[1], yard[1], want[1], dtype)
        assert set(got[2]) == set(want[2])
        for name in want[2]:
            assert_close_rule(f"grad {name}", got[2][name], yard[2][name], want[2][name], dtype)
    if train:
        bufs_got, bufs_yard = dict(fused.named_buffers()), dict(eager.named_buffers())
        for name, b in ref.named_buffers():
            if name.endswith("num_batches_tracked"):
                assert bufs_got[name].item() == b.item() == 1, name
            else:
                assert_close_rule(name, bufs_got[name], bufs_yard[name], b, dtype)


def _train_losses(model: nn.Module, xs, ys, steps: int) -> tuple[list[torch.Tensor], nn.Module]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = []
    model.train()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xs[i]), ys[i])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses, model


@pytest.mark.parametrize("variant", ["A", "B", "plain"])
def test_resnet20_sgd_steps_match_eager(variant):
    shortcut, plain = ("A", True) if variant == "plain" else (variant, False)
    eager = models.cifar_resnet(20, shortcut, plain, fused=False)
    fused = models.cifar_resnet(20, shortcut, plain)
    fused.load_state_dict(eager.state_dict(), strict=True)
    ref = copy.deepcopy(eager).double()
    steps = 3
    xs = torch.randn(steps, 8, 3, 12, 12, dtype=torch.float64)
    ys = torch.randint(0, 10, (steps, 8))
    got, fused = _train_losses(fused, xs.float(), ys, steps)
    yard, eager = _train_losses(eager, xs.float(), ys, steps)
    want, ref = _train_losses(ref, xs, ys, steps)
    for i in range(steps):
        assert_close_rule(f"loss {i}", got[i], yard[i], want[i], torch.float32)
    # What a user keeps after training: the weights and the BN statistics.
    sd_got, sd_yard = fused.state_dict(), eager.state_dict()
    for name, t in ref.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert sd_got[name].item() == t.item() == steps, name
        else:
            assert_close_rule(name, sd_got[name], sd_yard[name], t, torch.float32)
    # Eval mode (folded BN) after training, channels_last.
    fused.eval(), eager.eval(), ref.eval()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close_rule("eval logits", fused(x.float()), eager(x.float()), ref(x), torch.float32)


# The paper's Table 6 (option A): parameter counts, in millions, as printed.
PAPER_PARAMS = {20: "0.27", 32: "0.46", 44: "0.66", 56: "0.85", 110: "1.7", 1202: "19.4"}


@pytest.mark.parametrize("depth", list(PAPER_PARAMS))
def test_parameter_counts_match_paper(depth):
    printed = PAPER_PARAMS[depth]
    decimals = len(printed.split(".")[1])
    for fused in (True, False):
        model = models.cifar_resnet(depth, fused=fused)
        count = sum(p.numel() for p in model.parameters())
        assert f"{count / 1e6:.{decimals}f}" == printed, (depth, count)
        # Option A is parameter-free; plain nets have the same layers.
        plain = models.cifar_resnet(depth, plain=True, fused=fused)
        assert sum(p.numel() for p in plain.parameters()) == count
    # Option B adds two 1x1 projections + BN: 16*32 + 32*64 + 2*(32 + 64).
    b = models.cifar_resnet(depth, "B")
    assert sum(p.numel() for p in b.parameters()) == count + 16 * 32 + 32 * 64 + 2 * (32 + 64)


@pytest.mark.parametrize("depth", [0, 8 - 6, 19, 21, 100, -4, 20.0, "20"])
def test_bad_depth_raises(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.cifar_resnet(depth)


def test_bad_shortcut_raises():
    with pytest.raises(ValueError, match="'A' or 'B'"):
        models.cifar_resnet(20, "C")


def test_structure_and_state_dict_interchange():
    fused = models.cifar_resnet(32, "B", num_classes=7, in_channels=1)
    eager = models.cifar_resnet(32, "B", num_classes=7, in_channels=1, fused=False)
    assert list(fused.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(fused.state_dict(), strict=True)
    assert len(fused.layer1) == len(fused.layer2) == len(fused.layer3) == 5
    assert isinstance(fused.layer2[0], models.CifarBasicBlock)
    assert fused.layer2[0].downsample is not None and fused.layer2[1].downsample is None
    assert fused.fc.out_features == 7 and fused.stem[0].in_channels == 1
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 32  # 3x3 convs + the classifier = the depth
