"""Fused twins of timm's ResNet family (``timm.models.resnet``): ``BasicBlock``, ``Bottleneck``
and ``ResNet`` (its stem, plain or deep).

``fastres.convert`` swaps timm's classes for :class:`TimmBasicBlock`, :class:`TimmBottleneck`
and :class:`TimmResNet`: subclasses of timm's classes (same attributes, ``state_dict`` keys and
constructor). timm is optional: this module imports it, and ``convert`` imports it only when
timm is already imported (a model holding timm blocks implies it). The other timm families
(resnetv2, SK, ResNeSt, ``ConvNormAct``) are in :mod:`fastres.nn.timm_families`; the generic
chain machinery in :mod:`fastres.nn.chain`.

A block runs fused when its conv + BN pairs are the fusable pattern (``nn.Conv2d`` without bias,
BatchNorm2d / SyncBatchNorm / FrozenBatchNorm2d) and its activations are ``nn.ReLU``
(:func:`timm_fusable_reasons`); otherwise it is left as it is, with the reason in the report.

A plain block runs the fused path of :mod:`fastres.nn.blocks` (eval plans included). A block with
timm's extras runs its conv + BN pairs fused and the extras as the modules they are:

* ``se`` (``attn_layer``: SE, ECA, CBAM, ...): acts between the last BN and the add, so the last
  conv + BN runs fused without the add; the attention module, the add and the ReLU run as timm's;
* ``aa`` (anti-aliased downsampling, e.g. ``BlurPool2d``): a pooling module between two fused
  chains; the last chain takes the residual add and ReLU into its epilogue;
* ``drop_block`` and ``drop_path`` (random masks): in training the fused chain stops before them;
  outside training they are the identity and the block runs fully fused.
"""

from __future__ import annotations

import torch
from timm.models import resnet as timm_resnet
from timm.models._manipulate import checkpoint_seq
from torch import Tensor, nn

from fastres.nn import _fused as M
from fastres.nn import chain as C
from fastres.nn._fused import pair_reasons
from fastres.nn.blocks import _ResidualBlockMixin

__all__ = [
    "PAIRS",
    "TimmBasicBlock",
    "TimmBottleneck",
    "TimmResNet",
    "timm_fusable_reasons",
]


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
    return reasons


def _link_items(block: nn.Module, conv: str, bn: str, act: str | None) -> list[object]:
    """A Link of the block's attributes, or the modules themselves where one has hooks."""
    mods = [getattr(block, conv), getattr(block, bn)] + ([getattr(block, act)] if act else [])
    lk = C.link(*mods[:2], mods[2] if act else None, (conv, bn), act or bn)
    return C.fused_or(lk, *mods)


class _TimmBlockMixin(C.ChainMixin, _ResidualBlockMixin):
    _pairs: tuple[tuple[str, str], ...]
    _acts: tuple[str, ...]

    def _fusable_reasons(self) -> list[str]:
        return timm_fusable_reasons(self)

    @staticmethod
    def _twin_reasons(mod: nn.Module) -> list[str]:
        return timm_fusable_reasons(mod)

    def _extras_active(self) -> bool:
        return self.se is not None or any(
            C.active(getattr(self, n, None)) for n in ("aa", "drop_block", "drop_path")
        )

    def _shortcut(self, x: Tensor) -> Tensor:
        ds = self.downsample
        if ds is None:
            return x
        pair = M._downsample_pair(ds, self.bn1)
        lk = None if pair is None or C.has_hooks(ds) else C.link(
            *pair, None, ("downsample.0", "downsample.1")
        )
        if lk is None:
            return ds(x)
        return self._run_chain(x, C.Chain((lk,), False), None)

    def forward(self, x: Tensor) -> Tensor:
        if not self._extras_active() or self._fusable_reasons():
            # no extras: the fused block of fastres.nn.blocks (or timm's forward when not fusable)
            return super().forward(x)
        return self._run_items(x, self._items(), lambda: self._shortcut(x))

    def _fastres_layers(self) -> list[nn.Module]:
        if self._fusable_reasons():
            return []
        if self._extras_active():
            layers = C.chain_layers(self._items())
        else:
            layers = [getattr(self, n) for p in self._pairs for n in p]
        pair = M._downsample_pair(self.downsample, self.bn1)
        return layers + (list(pair) if pair is not None else [])


class TimmBasicBlock(_TimmBlockMixin, timm_resnet.BasicBlock):
    """timm's ``BasicBlock`` (resnet18/34 and variants) running as fused ops; same signature,
    attributes and ``state_dict`` keys."""

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))
    _acts = ("act1", "act2")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _items(self) -> list[object]:
        # timm: conv1, bn1, drop_block, act1, aa, conv2, bn2, se, drop_path, + shortcut, act2
        if C.active(self.drop_block):
            items = _link_items(self, "conv1", "bn1", None) + [self.drop_block, self.act1]
        else:
            items = _link_items(self, "conv1", "bn1", "act1")
        if C.active(self.aa):
            items.append(self.aa)
        items += _link_items(self, "conv2", "bn2", None)
        if self.se is not None:
            items.append(self.se)
        if C.active(self.drop_path):
            items.append(self.drop_path)
        return items + [C.ADD, self.act2]


class TimmBottleneck(_TimmBlockMixin, timm_resnet.Bottleneck):
    """timm's ``Bottleneck`` (resnet50/101/152, ResNeXt, SE-ResNet, ECA-ResNet, ResNet-blur, ...)
    running as fused ops; same signature, attributes and ``state_dict`` keys."""

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _acts = ("act1", "act2", "act3")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _items(self) -> list[object]:
        # timm: conv1, bn1, act1, conv2, bn2, drop_block, act2, aa, conv3, bn3, se, drop_path,
        # + shortcut, act3
        items = _link_items(self, "conv1", "bn1", "act1")
        if C.active(self.drop_block):
            items += _link_items(self, "conv2", "bn2", None) + [self.drop_block, self.act2]
        else:
            items += _link_items(self, "conv2", "bn2", "act2")
        if C.active(self.aa):
            items.append(self.aa)
        items += _link_items(self, "conv3", "bn3", None)
        if self.se is not None:
            items.append(self.se)
        if C.active(self.drop_path):
            items.append(self.drop_path)
        return items + [C.ADD, self.act3]


def stem_reasons(model: nn.Module) -> list[str]:
    """Why a timm ResNet's stem (``conv1`` -- a conv or a deep-stem Sequential ending with one
    -- then ``bn1``, ``act1``) cannot run fused; empty when it can."""
    conv = model.conv1
    where = "conv1/bn1"
    if type(conv) in (nn.Sequential, _fused_sequential()) and len(conv) > 0:
        conv = conv[-1]
        where = f"conv1.{len(model.conv1) - 1}/bn1"
    reasons = C.link_reasons(conv, model.bn1, where)
    if type(model.act1) is not nn.ReLU:
        reasons.append(f"act1: {type(model.act1).__name__} is not nn.ReLU")
    return reasons


def _fused_sequential() -> type:
    from fastres.nn.detection import FusedSequential  # noqa: PLC0415

    return FusedSequential


class TimmResNet(C.ChainMixin, timm_resnet.ResNet):
    """timm's ``ResNet`` (and the SK-ResNet and ResNeSt models built on it) with its stem fused:
    the 7x7 conv, ``bn1`` and ``act1``, or a deep stem's three conv + BN + ReLU as one chain (in
    training one fused unit: each inner BN + ReLU is the next conv's prologue). Same attributes
    and ``state_dict`` keys; the blocks are swapped on their own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    @staticmethod
    def _twin_reasons(mod: nn.Module) -> list[str]:
        return stem_reasons(mod)

    def _stem_items(self) -> list[object]:
        conv1 = self.conv1
        if isinstance(conv1, nn.Sequential):
            if C.has_hooks(conv1) or len(conv1) == 0:
                return [conv1, self.bn1, self.act1]
            named = [(f"conv1.{k}", m) for k, m in conv1._modules.items()]
            items = C.links_of(named[:-1])
            conv1 = named[-1][1]
            name = named[-1][0]
        else:
            items, name = [], "conv1"
        lk = C.link(conv1, self.bn1, self.act1, (name, "bn1"), "act1")
        return items + ([lk] if lk is not None else [conv1, self.bn1, self.act1])

    def _fastres_layers(self) -> list[nn.Module]:
        return C.chain_layers(self._stem_items()) if not stem_reasons(self) else []

    def _hook_scope(self) -> list[tuple[str, nn.Module]]:
        """The stem's modules (the layers are blocks of their own; see fastres.nn._fused)."""
        return [(n, getattr(self, n)) for n in ("conv1", "bn1", "act1")]

    def forward_features(self, x: Tensor) -> Tensor:
        # timm's ResNet.forward_features with the stem fused
        if stem_reasons(self):
            x = self.act1(self.bn1(self.conv1(x)))
        else:
            x = self._run_items(x, self._stem_items())
        x = self.maxpool(x)
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(layers, x, flatten=True)
        for layer in layers:
            x = layer(x)
        return x


#: (plain class, fused class) pairs for fastres.convert / revert.
PAIRS = (
    (timm_resnet.Bottleneck, TimmBottleneck),
    (timm_resnet.BasicBlock, TimmBasicBlock),
    (timm_resnet.ResNet, TimmResNet),
)

#: Residual block classes (plain; their twins subclass them) the report counts.
BLOCKS = (timm_resnet.Bottleneck, timm_resnet.BasicBlock)
