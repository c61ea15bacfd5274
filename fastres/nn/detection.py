"""Fused twins of PyTorch's and torchvision's containers that run conv, BN, ReLU as modules.

* :class:`FusedSequential` (``nn.Sequential``): timm's deep stems and ``avg_down`` downsample
  branches (``AvgPool2d``, conv, BN), resnetv2's stems, any ``nn.Sequential`` holding a conv
  with a BatchNorm right after it;
* :class:`FusedLayerGetter` (``torchvision.models._utils.IntermediateLayerGetter``): the body of
  torchvision's detection and segmentation backbones (``resnet_fpn_backbone``,
  ``fasterrcnn_resnet50_fpn``, ...), whose stem conv1, bn1, relu it holds as separate children.

Both keep their children, attributes and ``state_dict`` keys and run every other child as it is
(:mod:`fastres.nn.chain`).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from fastres.nn import chain as C

__all__ = ["FusedLayerGetter", "FusedSequential", "PAIRS"]


class FusedSequential(C.ChainMixin, nn.Sequential):
    """An ``nn.Sequential`` whose conv, BN (, ReLU) runs are fused (consecutive runs joined by a
    ReLU form one chain); every other child runs as it is."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._init_fused()

    def _items(self) -> list[object]:
        return C.links_of(list(self._modules.items()))

    @staticmethod
    def _twin_reasons(mod: nn.Module) -> list[str] | None:
        items = C.links_of(list(mod._modules.items()))
        return [] if any(isinstance(it, C.Link) for it in items) else None

    def _fastres_layers(self) -> list[nn.Module]:
        return C.chain_layers(self._items())

    def forward(self, x: Tensor) -> Tensor:
        return self._run_items(x, self._items())


class FusedLayerGetter(C.ChainMixin, IntermediateLayerGetter):
    """torchvision's ``IntermediateLayerGetter`` with its conv, BN (, ReLU) children fused (the
    stem of a detection backbone); a run never passes over a child whose output it returns."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _exposed(self) -> frozenset[str]:
        return frozenset(self.return_layers)

    def _items(self) -> list[object]:
        return C.links_of(list(self._modules.items()), self._exposed())

    @staticmethod
    def _twin_reasons(mod: nn.Module) -> list[str] | None:
        items = C.links_of(list(mod._modules.items()), frozenset(mod.return_layers))
        return [] if any(isinstance(it, C.Link) for it in items) else None

    def _fastres_layers(self) -> list[nn.Module]:
        return C.chain_layers(self._items())

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        names = {id(m): n for n, m in self._modules.items()}
        exposed = self._exposed()
        for seg in C.segments(self._items(), exposed):
            if isinstance(seg, C.Chain):
                x = self._run_chain(x, seg, None)
                name = seg.links[-1].last
            else:
                x = seg(x)
                name = names[id(seg)]
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


#: (plain class, fused class) pairs for fastres.convert / revert.
PAIRS = (
    (nn.Sequential, FusedSequential),
    (IntermediateLayerGetter, FusedLayerGetter),
)
