"""Fused twins of other libraries' ResNet blocks: timm's ``BasicBlock`` and ``Bottleneck``.

``fastres.convert`` swaps ``timm.models.resnet.BasicBlock``/``Bottleneck`` instances for
:class:`TimmBasicBlock`/:class:`TimmBottleneck` when they compute what a fastres block computes:
conv + BatchNorm2d (or FrozenBatchNorm2d) pairs, ReLU activations, and none of timm's extras. Those
are subclasses of timm's classes (same attributes, ``state_dict`` keys and constructor), running the
fused path of :mod:`fastres.modules`. timm is optional: this module imports it, and ``convert``
imports this module only when timm is already imported (a model holding timm blocks implies it).

What is left unfused, with the reason in the conversion report:

* ``se`` (``attn_layer``: SE, ECA, CBAM, ...): the attention acts between the last BN and the add;
* ``aa`` (``aa_layer``, anti-aliased downsampling): a pooling layer inside the conv chain;
* ``drop_block`` and ``drop_path`` (stochastic depth): random masks inside the block;
* an activation other than ``nn.ReLU`` (timm's ``act_layer``), or norm/conv layers that are not
  the fusable pattern.
"""

from __future__ import annotations

from timm.models import resnet as timm_resnet
from torch import nn

from fastres.modules import _ResidualBlockMixin, pair_reasons

__all__ = ["TimmBasicBlock", "TimmBottleneck", "timm_fusable_reasons", "PAIRS"]


def timm_fusable_reasons(block: nn.Module) -> list[str]:
    """Why a timm ``BasicBlock``/``Bottleneck`` cannot run fused; empty when it can."""
    if isinstance(block, timm_resnet.Bottleneck):
        pairs, acts = TimmBottleneck._pairs, TimmBottleneck._acts
    elif isinstance(block, timm_resnet.BasicBlock):
        pairs, acts = TimmBasicBlock._pairs, TimmBasicBlock._acts
    else:
        return [f"{type(block).__name__} is not a timm BasicBlock or Bottleneck"]
    reasons = pair_reasons(block, pairs)
    for a in acts:
        act = getattr(block, a, None)
        if type(act) is not nn.ReLU:
            reasons.append(f"{a}: {type(act).__name__} is not nn.ReLU")
    se = getattr(block, "se", None)
    if se is not None:
        reasons.append(f"se: attention layer {type(se).__name__} is not fused")
    for name in ("aa", "drop_block"):
        mod = getattr(block, name, None)
        if mod is not None and not isinstance(mod, nn.Identity):
            what = "anti-aliasing layer" if name == "aa" else "DropBlock"
            reasons.append(f"{name}: {what} {type(mod).__name__} is not fused")
    if getattr(block, "drop_path", None) is not None:
        reasons.append(
            f"drop_path: stochastic depth ({type(block.drop_path).__name__}) is not fused"
        )
    return reasons


class TimmBasicBlock(_ResidualBlockMixin, timm_resnet.BasicBlock):
    """timm's ``BasicBlock`` (resnet18/34 and variants) running as fused ops; same signature,
    attributes and ``state_dict`` keys. Blocks with the extras listed in the module docstring run
    timm's own forward."""

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))
    _acts = ("act1", "act2")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _fusable_reasons(self) -> list[str]:
        return timm_fusable_reasons(self)


class TimmBottleneck(_ResidualBlockMixin, timm_resnet.Bottleneck):
    """timm's ``Bottleneck`` (resnet50/101/152, ResNeXt, ...) running as fused ops; same
    signature, attributes and ``state_dict`` keys."""

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _acts = ("act1", "act2", "act3")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _fusable_reasons(self) -> list[str]:
        return timm_fusable_reasons(self)


#: (plain class, fused class) pairs for fastres.convert / unconvert.
PAIRS = (
    (timm_resnet.Bottleneck, TimmBottleneck),
    (timm_resnet.BasicBlock, TimmBasicBlock),
)
