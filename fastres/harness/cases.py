"""The parity harness's cases: the distinct residual blocks of a ResNet at their real sizes,
built as torchvision blocks with randomised BatchNorms (the one BN randomiser of the project)."""


from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from fastres.harness.rule import randomise_bn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TINY = "tiny"  # a few small blocks (odd sizes): smoke tests of the harness itself

# --------------------------------------------------------------------------------------------
# The blocks.


@dataclass(frozen=True)
class BlockCase:
    """One distinct residual block of a model: its type, widths, stride and input size."""

    name: str  # where it first occurs, e.g. "layer2.0"
    kind: str  # "Bottleneck" | "BasicBlock"
    inplanes: int
    planes: int
    stride: int
    downsample: bool
    height: int
    width: int

    @property
    def label(self) -> str:
        ds = ",ds" if self.downsample else ""
        return (f"{self.name} {self.kind}({self.inplanes},{self.planes},s{self.stride}{ds}) "
                f"{self.height}x{self.width}")


def distinct_blocks(model: str, image_size: int = 224) -> list[BlockCase]:
    """The distinct residual blocks of a torchvision ResNet, in order of first occurrence.

    The model is built on the meta device and run once with pre-hooks on its blocks, so the widths
    and input sizes are torchvision's own (no weights are allocated)."""
    if model == TINY:
        return [
            BlockCase("tiny.0", "Bottleneck", 8, 4, 2, True, 9, 9),
            BlockCase("tiny.1", "BasicBlock", 6, 6, 1, False, 5, 7),
        ]
    import torchvision
    from torchvision.models import resnet as tv_resnet

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    with torch.device("meta"):
        net = getattr(torchvision.models, model)()
    seen: dict[tuple, BlockCase] = {}

    def hook(name):
        def pre(mod, args):
            x = args[0]
            kind = "Bottleneck" if isinstance(mod, tv_resnet.Bottleneck) else "BasicBlock"
            case = BlockCase(name, kind, mod.conv1.in_channels, _planes(mod), mod.stride,
                             mod.downsample is not None, int(x.shape[2]), int(x.shape[3]))
            key = asdict(case)
            key.pop("name")
            seen.setdefault(tuple(key.items()), case)
        return pre

    for name, mod in net.named_modules():
        if isinstance(mod, (tv_resnet.Bottleneck, tv_resnet.BasicBlock)):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        net(torch.empty(1, 3, image_size, image_size, device="meta"))
    return list(seen.values())


def _planes(block: nn.Module) -> int:
    """The ``planes`` constructor argument of a torchvision block (output channels / expansion)."""
    return block.conv2.out_channels if hasattr(block, "conv3") else block.conv1.out_channels


def quick_subset(cases: list[BlockCase]) -> list[BlockCase]:
    """A few blocks that still cover every code path: the first block (stride-1 downsample in
    ResNet-50), the first stride-2 block, the first identity block and the last block."""
    picks = [cases[0]]
    picks += [c for c in cases if c.stride == 2][:1]
    picks += [c for c in cases if not c.downsample][:1]
    picks.append(cases[-1])
    out: list[BlockCase] = []
    for c in picks:
        if c not in out:
            out.append(c)
    return out


def build_torchvision_block(case: BlockCase, seed: int) -> nn.Module:
    """The torchvision block of ``case`` in float32 on the CPU, with randomised BatchNorms."""
    from torchvision.models import resnet as tv_resnet

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the conv weights: torchvision's own (kaiming) init
    cls = tv_resnet.Bottleneck if case.kind == "Bottleneck" else tv_resnet.BasicBlock
    ds = None
    if case.downsample:
        out_ch = case.planes * cls.expansion
        ds = nn.Sequential(tv_resnet.conv1x1(case.inplanes, out_ch, case.stride),
                           nn.BatchNorm2d(out_ch))
    block = cls(case.inplanes, case.planes, case.stride, ds)
    randomise_bn(block, gen)
    return block


def in_format(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def block_inputs(block: nn.Module) -> list:
    """(kernel_size, stride) of each conv of a torchvision block, for backend capability checks."""
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)]
