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

__version__ = "0.1.0"

from fastres import backends, distributed, functional, models, reference  # noqa: E402
from fastres.convert import ConversionReport, convert, revert, unconvert  # noqa: E402
from fastres.distributed import SyncBatchNorm  # noqa: E402
from fastres.modules import BasicBlock, BottleneckBlock, ConvBNReLU, ResNet  # noqa: E402


def __getattr__(name: str):
    # fastres.selftest(...) runs the self-test (the module is callable); imported on first use,
    # so that `python -m fastres.selftest` does not find it imported already.
    if name == "selftest":
        import importlib  # noqa: PLC0415

        return importlib.import_module("fastres.selftest")
    raise AttributeError(f"module 'fastres' has no attribute {name!r}")


__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "ConvBNReLU",
    "ConversionReport",
    "ResNet",
    "SyncBatchNorm",
    "backends",
    "convert",
    "distributed",
    "functional",
    "models",
    "reference",
    "revert",
    "unconvert",
]
