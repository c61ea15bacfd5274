"""``fastres.ConvBNReLU``: torchvision's ``Conv2dNormActivation`` (conv, BatchNorm, ReLU) as one
fused op."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import misc as tv_misc

from fastres.nn import compile as OP
from fastres.nn._fused import _conv_bn_reasons, _FusedMixin, inner_hooks, plain_call

__all__ = ["ConvBNReLU"]


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
        if plain_call(x) or inner_hooks(self):
            return super().forward(x)
        if OP.compiled_inference(self, x):
            return OP.opaque_forward(self, x)
        parts = self._fusable()
        if parts is None:
            return super().forward(x)
        conv, bn, relu = parts
        out = self._conv_bn_act(x, conv, bn, relu, ("0", "1"), "ConvBNReLU")
        return super().forward(x) if out is None else out
