"""fastres: fused conv-BN-ReLU-add kernels and drop-in ResNet blocks for PyTorch.

    import torchvision, fastres
    model = torchvision.models.ResNet(fastres.BottleneckBlock, [3, 4, 6, 3])
    model = fastres.convert(torchvision.models.resnet50())   # same Parameters, fused modules
    plain = fastres.revert(model)                              # torchvision's classes again

The compiled extension fastres._C is loaded lazily by the backends; a missing or broken build is
reported by ``python -m fastres.info`` and makes the dispatcher fall back to the reference
backend, never an import error here.
"""

from __future__ import annotations

from fastres import backends, functional, models, reference
from fastres._version import __version__
from fastres.nn import distributed
from fastres.nn.blocks import BasicBlock, BottleneckBlock
from fastres.nn.conv import ConvBNReLU
from fastres.nn.converter import ConversionReport, convert, freeze, revert, unconvert
from fastres.nn.distributed import SyncBatchNorm
from fastres.nn.resnet import ResNet


def __getattr__(name: str):
    # fastres.selftest(...) runs the self-test (the module is callable); imported on first use,
    # so that `python -m fastres.selftest` does not find it imported already.
    if name == "selftest":
        import importlib  # noqa: PLC0415

        return importlib.import_module("fastres.selftest")
    raise AttributeError(f"module 'fastres' has no attribute {name!r}")


__all__ = [
    "__version__",
    "BasicBlock",
    "BottleneckBlock",
    "ConvBNReLU",
    "ConversionReport",
    "ResNet",
    "SyncBatchNorm",
    "backends",
    "convert",
    "distributed",
    "freeze",
    "functional",
    "models",
    "reference",
    "revert",
    "unconvert",
]
