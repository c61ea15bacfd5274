"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition" (2015), Sec. 4.2.

    model = fastres.models.cifar_resnet(56)                    # ResNet-56, option-A shortcuts
    twin = fastres.models.cifar_resnet(56, fused=False)        # the same network in plain PyTorch
    twin.load_state_dict(model.state_dict(), strict=True)      # same parameter names

Depth ``6n + 2``: a 3x3 stem convolution to 16 channels, three stages of ``n`` basic blocks with
16, 32 and 64 channels (the first block of stages 2 and 3 halves the resolution with a stride-2
convolution), global average pooling and a fully connected layer.

Shortcuts where a block changes shape (the paper's options):

* ``"A"`` parameter-free: the input subsampled by the stride, its channels zero-padded
  (``(planes - inplanes) // 2`` zero channels on each side, as :func:`fastres.reference.
  option_a_shortcut`). The fused training path reads it through strides and a channel offset
  inside the last ``bn_add_relu`` pass: no padded copy is made.
* ``"B"`` projection: a 1x1 convolution + BatchNorm (``downsample.0`` / ``downsample.1``, as
  torchvision), fused into the same pass.

Same-shape shortcuts are identities in both options. ``plain=True`` drops every shortcut (the
paper's plain baselines).

The fused network is made of :class:`CifarBasicBlock` (a subclass of :class:`fastres.BasicBlock`,
hence of torchvision's ``BasicBlock``) and :class:`fastres.ConvBNReLU` for the stem; the eager twin
of :class:`CifarBasicBlockEager` and torchvision's ``Conv2dNormActivation``. Both have the same
``state_dict`` keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from fastres import functional as FF
from fastres.nn.blocks import BasicBlock, fusable_reasons
from fastres.nn.conv import ConvBNReLU
from fastres.reference import option_a_shortcut

__all__ = [
    "CIFAR_DEPTHS",
    "CifarBasicBlock",
    "CifarBasicBlockEager",
    "CifarResNet",
    "cifar_resnet",
]

#: The depths of the paper's CIFAR-10 table (Table 6); any 6n + 2 >= 8 is accepted.
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)

_SHORTCUTS = ("A", "B")


def _shortcut_kind(inplanes: int, planes: int, stride: int, shortcut: str, plain: bool) -> str:
    """What a block adds to its output: "none", "identity", "option_a" or "projection"."""
    if plain:
        return "none"
    if stride == 1 and inplanes == planes:
        return "identity"
    if shortcut == "A":
        if planes < inplanes:
            raise ValueError(f"option-A shortcut cannot shrink channels: {inplanes} -> {planes}")
        return "option_a"
    return "projection"


def _projection(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


def _eager_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The plain-PyTorch forward of a CIFAR basic block (both classes share it)."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    kind = block.shortcut_kind
    if kind == "identity":
        out = out + x
    elif kind == "option_a":
        out = out + option_a_shortcut(x, out.shape[1], block.stride)
    elif kind == "projection":
        out = out + block.downsample(x)
    return block.relu(out)


class CifarBasicBlockEager(nn.Module):
    """The CIFAR basic block in plain PyTorch: the oracle and the eager twin of
    :class:`CifarBasicBlock` (same attributes and ``state_dict`` keys).

    ``shortcut``: ``"A"`` or ``"B"`` (used only where the block changes shape) or ``"none"``
    (a plain block).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.shortcut_kind = _shortcut_kind(inplanes, planes, stride, shortcut, shortcut == "none")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (
            _projection(inplanes, planes, stride) if self.shortcut_kind == "projection" else None
        )
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return _eager_forward(self, x)

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut_kind}"


class CifarBasicBlock(BasicBlock):
    """The CIFAR basic block as fused ops: a :class:`fastres.BasicBlock` (hence a torchvision
    ``BasicBlock``) that also does the paper's option-A shortcut and the plain (no-shortcut) block.

    ``CifarBasicBlock(inplanes, planes, stride=1, shortcut="A"|"B"|"none")``.

    * identity and option-B (projection) blocks are :class:`fastres.BasicBlock` as is;
    * option A, train mode: :func:`fastres.functional.residual_unit` with
      ``shortcut="option_a"``; the subsampled, channel-offset input is read in place by the last
      ``bn_add_relu`` pass;
    * option A, eval mode: two ``conv_bias_act`` calls with folded BatchNorm. ``conv_bias_act``
      takes a residual of the output's shape, so the zero-padded shortcut is materialised with
      :func:`fastres.reference.option_a_shortcut` (one extra write + read of the block output's
      size, in 2 blocks of the 3n; the alternative, the unfused conv then ``bn_add_relu`` with
      the eval scale/shift, writes and reads a full-size intermediate too and is no cheaper);
    * plain: ``residual_unit(..., shortcut="none")`` in train mode, no residual in eval mode.

    Blocks that are not conv + BatchNorm2d (after user surgery), empty batches and a mix of
    train- and eval-mode BatchNorms inside the block run the eager forward.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        kind = _shortcut_kind(inplanes, planes, stride, shortcut, shortcut == "none")
        downsample = _projection(inplanes, planes, stride) if kind == "projection" else None
        super().__init__(inplanes, planes, stride, downsample)
        self.shortcut_kind = kind

    def forward(self, x: Tensor) -> Tensor:
        kind = self.shortcut_kind
        if kind in ("identity", "projection"):
            return super().forward(x)
        if fusable_reasons(self) or (isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0):
            return _eager_forward(self, x)
        FF.check_input(x, self.conv1.weight, type(self).__name__)
        pairs = ((self.conv1, self.bn1), (self.conv2, self.bn2))
        batch_stats = [self._use_batch_stats(bn) for _, bn in pairs]
        if not any(batch_stats):
            h = self._eval_conv(x, self.conv1, self.bn1, None, True)
            res = None
            if kind == "option_a":
                # Materialised: conv_bias_act's residual has the output's full shape.
                res = option_a_shortcut(x, self.conv2.out_channels, self.stride)
                res = res.contiguous(memory_format=FF.memory_format_of(x))
            return self._eval_conv(h, self.conv2, self.bn2, res, True)
        if not all(batch_stats):
            return _eager_forward(self, x)
        staged = [self._stage(c, b) for c, b in pairs]
        stages = [s for s, _ in staged]
        params = [p for _, p in staged]
        if kind == "option_a":
            return FF.residual_unit(x, stages, params, "option_a", option_a_stride=self.stride)
        return FF.residual_unit(x, stages, params, "none")

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut_kind}"


class CifarResNet(nn.Module):
    """A CIFAR ResNet (or plain net): stem, three stages of ``n`` blocks, pooling, classifier.

    ``state_dict`` keys: ``stem.0.weight``, ``stem.1.*`` (the stem conv and BN),
    ``layer{1,2,3}.{i}.conv1.weight``, ``...bn1.*``, ``...conv2.weight``, ``...bn2.*``,
    ``...downsample.{0,1}.*`` (option B only), ``fc.weight``, ``fc.bias``.
    """

    def __init__(
        self,
        n: int,
        shortcut: str = "A",
        plain: bool = False,
        num_classes: int = 10,
        in_channels: int = 3,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.depth = 6 * n + 2
        self.shortcut = "none" if plain else shortcut
        self.fused = fused
        stem_cls = ConvBNReLU if fused else Conv2dNormActivation
        block = CifarBasicBlock if fused else CifarBasicBlockEager
        self.stem = stem_cls(in_channels, 16, kernel_size=3, stride=1, padding=1)
        layers, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, self.shortcut))
                inplanes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: He et al. (2015) normal for convolutions (std
        ``sqrt(2 / (k * k * c_in))``, the forward-pass case of their Eq. 10), BatchNorm weight 1
        and bias 0; the classifier keeps PyTorch's default ``nn.Linear`` initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.fc.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, shortcut={self.shortcut}, fused={self.fused}"


def cifar_resnet(
    depth: int,
    shortcut: str = "A",
    plain: bool = False,
    num_classes: int = 10,
    in_channels: int = 3,
    fused: bool = True,
) -> CifarResNet:
    """The paper's CIFAR ResNet-``depth`` (or plain-``depth`` with ``plain=True``).

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, 1202 in the paper).
        shortcut: ``"A"`` (zero-padding, parameter-free) or ``"B"`` (1x1 projection) where a block
            changes shape; identity elsewhere. Ignored when ``plain``.
        plain: no shortcuts at all.
        fused: fastres blocks (default) or the plain-PyTorch twin with the same ``state_dict``.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        examples = ", ".join(map(str, CIFAR_DEPTHS))
        raise ValueError(
            f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (e.g. {examples}), got {depth!r}"
        )
    if shortcut not in _SHORTCUTS:
        raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    return CifarResNet((depth - 2) // 6, shortcut, plain, num_classes, in_channels, fused)
