"""fastres.freeze / fastres.convert(freeze=True): eval with frozen weights on the CPU.

A frozen model's fold check reads each conv weight's and BatchNorm tensor's identity, version
counter and data pointer instead of its values (fastres.functional.versions): no per-call read
of every weight (fastres_cpu::fingerprint is not called by a warm call), while everything that
bumps a version counter or replaces a tensor is still seen (optimizer steps, load_state_dict,
in-place ops, .to(), assigned Parameters). Writes through .data are not seen until
fastres.freeze(model) is called again, which is what the contract says; the default (live)
model sees them (tests/test_live_weights.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from weight_changes import load_other_state_then_step

import fastres
from fastres import backends
from fastres.harness.rule import assert_close_rule, randomise_bn

pytestmark = pytest.mark.skipif(
    backends.BACKENDS["cpu"].unavailable_reason() is not None,
    reason="the CPU backend is not built: no folds are kept")


def _pair(model: nn.Module, fmt=torch.channels_last):
    """(torchvision model, frozen converted model with its own copy of the weights)."""
    model = randomise_bn(model).eval().to(memory_format=fmt)
    return model, fastres.convert(copy.deepcopy(model), freeze=True).eval()


def _check(tv: nn.Module, ours: nn.Module, x: torch.Tensor, name: str) -> None:
    with torch.no_grad():
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule(name, ours(x), tv(x), ref, torch.float32)


def _fingerprints(model: nn.Module, x: torch.Tensor) -> int:
    """fastres_cpu::fingerprint calls in one eval call of ``model``."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)
    return sum(e.count for e in prof.key_averages() if e.key == "fastres_cpu::fingerprint")


def _x(fmt=torch.channels_last):
    return torch.randn(2, 3, 40, 40).contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format], ids=str)
def test_frozen_call_reads_no_values_and_matches(fmt):
    tv, ours = _pair(torchvision.models.resnet18(num_classes=10), fmt)
    live = fastres.convert(copy.deepcopy(tv)).eval()
    x = _x(fmt)
    _check(tv, ours, x, "first call")
    _check(tv, ours, x, "planned call")
    assert _fingerprints(ours, x) == 0, "a frozen model read its weights' values"
    assert _fingerprints(live, x) > 0, "the live model is the control: it reads them"


def test_version_bumping_changes_are_seen():
    tv, ours = _pair(torchvision.models.resnet18(num_classes=10))
    x = _x()
    _check(tv, ours, x, "first call")
    load_other_state_then_step(tv, ours, lambda name: _check(tv, ours, x, name))
    for m in (tv, ours):
        with torch.no_grad():
            m.layer2[0].bn1.running_var.mul_(2.0)  # in place: the version counter moves
    _check(tv, ours, x, "after an in-place op on a buffer")
    for m in (tv, ours):
        m.layer3[1].conv1.weight = nn.Parameter(m.layer3[1].conv1.weight.detach() * 0.5)
    _check(tv, ours, x, "after assigning a Parameter")


def test_data_writes_wait_for_freeze_again():
    """The contract: a .data write is not seen by a frozen model (its version counter stays);
    fastres.freeze(model) drops the kept folds and the next call sees the values."""
    tv, ours = _pair(torchvision.models.resnet18(num_classes=10))
    x = _x()
    with torch.no_grad():
        before = ours(x)
    for m in (tv, ours):
        m.layer1[0].conv2.weight.data.mul_(3.0)
    with torch.no_grad():
        stale = ours(x)
    assert torch.equal(stale, before), "the frozen model saw a .data write: the check is live"
    fastres.freeze(ours)
    _check(tv, ours, x, "after freeze() again")


def test_unfreeze_makes_the_model_live_again():
    tv, ours = _pair(torchvision.models.resnet.Bottleneck(16, 4))
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    _check(tv, ours, x, "frozen")
    assert fastres.freeze(ours, False) is ours
    _check(tv, ours, x, "live again")
    for m in (tv, ours):
        m.conv2.weight.data.mul_(1.5)
    _check(tv, ours, x, "live: a .data write is seen")
    assert _fingerprints(ours, x) > 0


def test_revert_drops_the_flag_and_freeze_checks_its_argument():
    _, ours = _pair(torchvision.models.resnet18(num_classes=10))
    plain = fastres.revert(ours)
    assert all("_fr_frozen" not in m.__dict__ for m in plain.modules())
    with pytest.raises(TypeError, match="fastres.freeze expects an nn.Module"):
        fastres.freeze(torch.zeros(1))
