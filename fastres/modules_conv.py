"""Fused modules around one convolution: ``fastres.ConvBNReLU`` (torchvision's
``Conv2dNormActivation``) and ``fastres.ResNet`` (torchvision's ``ResNet`` with its stem fused).
The residual blocks and the machinery they share are in :mod:`fastres.modules`."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import misc as tv_misc

from fastres import opaque as OP
from fastres.modules import _conv_bn_reasons, _FusedMixin, pair_reasons

__all__ = ["ConvBNReLU", "ResNet"]


class ConvBNReLU(_FusedMixin, tv_misc.Conv2dNormActivation):
    """torchvision's ``Conv2dNormActivation`` (conv, BatchNorm, ReLU) as one fused op.

    Same signature: ``ConvBNReLU(in_channels, out_channels, kernel_size=3, stride=1,
    padding=None, groups=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, dilation=1,
    inplace=True, bias=None)`` and ``state_dict`` keys (``0.weight``, ``1.running_mean``, ...).
    Fused when it is conv + BatchNorm2d/FrozenBatchNorm2d + ReLU (or no activation); otherwise
    it runs as the ``nn.Sequential`` it is.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _fusable(self) -> tuple[nn.Conv2d, nn.BatchNorm2d, bool] | None:
        mods = list(self)
        if len(mods) not in (2, 3) or _conv_bn_reasons(mods[0], mods[1], "ConvBNReLU"):
            return None
        if len(mods) == 3 and type(mods[2]) is not nn.ReLU:
            return None
        return mods[0], mods[1], len(mods) == 3

    def forward(self, x: Tensor) -> Tensor:
        if OP.compiled_inference(self, x):
            return OP.opaque_forward(self, x)
        parts = self._fusable()
        if parts is None:
            return super().forward(x)
        conv, bn, relu = parts
        out = self._conv_bn_act(x, conv, bn, relu, ("0", "1"), "ConvBNReLU")
        return super().forward(x) if out is None else out


class ResNet(_FusedMixin, tv_resnet.ResNet):
    """torchvision's ``ResNet`` with its stem (``conv1``, ``bn1``, ``relu``) run as one fused op.

    ``fastres.convert`` swaps a ``torchvision.models.ResNet`` for this class as well as its
    blocks: same attributes and ``state_dict`` keys. Unfused, the stem is a convolution, a
    BatchNorm pass and a ReLU pass over the 64 x 112 x 112 output at 224 x 224 (two more reads and
    writes of it per image) and, on the CPU, one weight reorder per call. When ``conv1``/``bn1``
    are not the fusable pattern or ``relu`` is not ``nn.ReLU``, the stem runs as torchvision's.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _fusable_reasons(self) -> list[str]:
        reasons = pair_reasons(self, [("conv1", "bn1")])
        if type(getattr(self, "relu", None)) is not nn.ReLU:
            reasons.append("relu is not nn.ReLU")
        return reasons

    def _stem(self, x: Tensor) -> Tensor:
        if OP.compiled_inference(self, x, (self.bn1,)):
            return OP.opaque_forward(self, x, stem=True)
        out = None
        if not self._fusable_reasons():
            out = self._conv_bn_act(x, self.conv1, self.bn1, True, ("conv1", "bn1"), "ResNet")
        return self.relu(self.bn1(self.conv1(x))) if out is None else out

    def _forward_impl(self, x: Tensor) -> Tensor:
        # torchvision's ResNet._forward_impl, with the stem fused.
        x = self._stem(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)
