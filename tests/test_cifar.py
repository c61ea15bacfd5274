"""The paper's CIFAR networks (fastres.models): block parity with the eager twin, training steps,
parameter counts, bad depths.

Runs on whatever backend the dispatcher picks (FASTRES_BACKEND unset) and with
FASTRES_BACKEND=reference. Every comparison uses the tolerance rule (fastres.harness.rule): the fused
result at dtype vs the eager twin in float64, with the eager twin at dtype as the yardstick.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from fastres import functional as FF
from fastres import models
from fastres.harness.rule import assert_close_rule
from fastres.harness.run import judge, output_relu_decisions
from fastres.nn.eval_plan import EvalPlan
from fastres.nn.train_plan import TrainPlan

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
    assert (
        fused.shortcut_kind == eager.shortcut_kind == ("none" if kind.startswith("plain") else kind)
    )
    ref = copy.deepcopy(eager).double()
    blocks = (fused.to(dtype), eager.to(dtype), ref)
    for b in blocks:
        b.train(train)
    return blocks


def _kept(block: nn.Module, x: torch.Tensor, g: torch.Tensor, backward: bool,
          decide: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Everything a user keeps from one call of ``block`` (a fresh copy of it): output, input
    grad, every parameter grad, the buffers. ``decide``: the output-ReLU decisions to take."""
    block = copy.deepcopy(block)
    x = x.detach().clone().requires_grad_(backward)  # clone keeps the memory format
    ctx = output_relu_decisions(block, decide) if decide is not None else nullcontext()
    with ctx:
        out = block(x)
    kept = {"out": out.detach()}
    if backward:
        out.backward(g.to(out.dtype))
        kept["grad.input"] = x.grad
        kept.update({f"grad.{n}": p.grad for n, p in block.named_parameters()})
    kept.update({f"buffer.{n}": b.detach() for n, b in block.named_buffers()})
    return kept


# bf16 (forward only) for the paths this module adds; identity and projection blocks are
# fastres.BasicBlock as is, covered in every dtype by tests/test_blocks.py.
KIND_DTYPES = [
    pytest.param(kind, dtype, id=f"{kind}-{name}")
    for kind in KINDS
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    if dtype == torch.float32 or kind not in ("identity", "projection")
]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind,dtype", KIND_DTYPES)
def test_block_parity(kind, dtype, train, fmt, monkeypatch):
    fused, eager, ref = _blocks(kind, dtype, train)
    calls = []  # the fused block must take the fused path, not an eager fallback
    for name in ("residual_unit", "conv_bias_act"):
        real = getattr(FF, name)

        def spy(*a, _f=real, _n=name, **k):
            calls.append(_n)
            return _f(*a, **k)

        monkeypatch.setattr(FF, name, spy)
    plan_run = EvalPlan.run

    def plan_spy(self, *a, **k):  # an eval call may run as the block's plan (its fused ops)
        out = plan_run(self, *a, **k)
        if out is not None:
            calls.append("plan")
        return out

    monkeypatch.setattr(EvalPlan, "run", plan_spy)
    train_call = TrainPlan.call

    def train_spy(self, *a, **k):  # a training call may run as the block's plan (the C++ unit)
        out = train_call(self, *a, **k)
        if out is not None:
            calls.append("train plan")
        return out

    monkeypatch.setattr(TrainPlan, "call", train_spy)
    inplanes, planes, stride, _ = KINDS[kind]
    # Odd spatial size: the stride-2 subsampling of option A must match the conv's output size.
    x64 = torch.randn(4, inplanes, 9, 9, dtype=torch.float64)
    x64 = x64.contiguous(memory_format=FORMATS[fmt])
    out_hw = (9 - 1) // stride + 1
    g64 = torch.randn(4, planes, out_hw, out_hw, dtype=torch.float64)
    backward = dtype == torch.float32  # bf16: forward only
    x = x64.to(dtype)
    got = _kept(fused, x, g64, backward)
    n_convs = 3 if kind == "projection" else 2
    fused_calls = ([["residual_unit"], ["train plan"]] if train
                   else [["conv_bias_act"] * n_convs, ["plan"]])
    assert calls in fused_calls, calls
    yard = _kept(eager, x, g64, backward)
    assert got["out"].is_contiguous(memory_format=FORMATS[fmt])
    # Each run against a float64 reference that takes its own output-ReLU decisions: an element
    # within rounding of zero may go either way, and its whole gradient would otherwise count.
    ref_got = _kept(ref, x64, g64, backward, decide=got["out"] > 0)
    ref_yard = _kept(ref, x64, g64, backward, decide=yard["out"] > 0)
    assert set(got) == set(yard) == set(ref_got)
    if not train:  # eval mode leaves the buffers alone
        assert all(torch.equal(got[k], ref_got[k].to(got[k].dtype)) for k in got
                   if k.startswith("buffer."))
    bad = [str(v) for v in judge(got, ref_got, yard, ref_yard, dtype) if not v.ok]
    assert not bad, "\n".join(bad)


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
    """Three SGD steps of a whole ResNet-20 (or plain-20), fused vs eager, in float64.

    float64 because a float32 gradient of a 20-layer ReLU network is a coin flip away from its
    float64 reference: one block-output element within rounding of zero (float64 value 1.9e-6,
    fused float32 value 0 in a plain-20 with CPU kernels) changes the gradients by 1e-2, and the
    eager float32 run flips other elements with the same odds. In float64 no decision flips, so the
    bound is atol[float64]. float32 gradients are judged block by block above (with each run's
    own output-ReLU decisions) and float32 networks by their forward below."""
    shortcut, plain = ("A", True) if variant == "plain" else (variant, False)
    eager = models.cifar_resnet(20, shortcut, plain, fused=False).double()
    fused = models.cifar_resnet(20, shortcut, plain).double()
    fused.load_state_dict(eager.state_dict(), strict=True)
    steps = 3
    xs = torch.randn(steps, 8, 3, 12, 12, dtype=torch.float64)
    ys = torch.randint(0, 10, (steps, 8))
    got, fused = _train_losses(fused, xs, ys, steps)
    want, eager = _train_losses(eager, xs, ys, steps)
    f64 = torch.float64
    for i in range(steps):  # the eager run is the reference: the bound is atol[float64]
        assert_close_rule(f"loss {i}", got[i], want[i], want[i], f64)
    # What a user keeps after training: the weights and the BN statistics.
    sd_got = fused.state_dict()
    for name, t in eager.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert sd_got[name].item() == t.item() == steps, name
        else:
            assert_close_rule(name, sd_got[name], t, t, f64)
    fused.eval(), eager.eval()
    x = torch.randn(4, 3, 12, 12, dtype=f64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close_rule("eval logits", fused(x), eager(x), eager(x), f64)


@pytest.mark.parametrize("variant", ["A", "B", "plain"])
def test_resnet20_fp32_forward_matches_eager(variant):
    """The float32 network, forward (continuous: no decision flip moves it by more than the
    flipped element's own value): train-mode logits and eval-mode logits in channels_last."""
    shortcut, plain = ("A", True) if variant == "plain" else (variant, False)
    eager = models.cifar_resnet(20, shortcut, plain, fused=False)
    fused = models.cifar_resnet(20, shortcut, plain)
    fused.load_state_dict(eager.state_dict(), strict=True)
    ref = copy.deepcopy(eager).double()
    x64 = torch.randn(8, 3, 12, 12, dtype=torch.float64)
    for mode in ("train", "eval"):
        for m in (fused, eager, ref):
            m.train(mode == "train")
        x = x64 if mode == "train" else x64.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            outs = [m(x.to(m.fc.weight.dtype)) for m in (fused, eager, ref)]
        assert_close_rule(f"{mode} logits", *outs, torch.float32)


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
