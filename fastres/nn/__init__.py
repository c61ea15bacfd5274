"""The modules layer: drop-in fused modules and the converter.

* :mod:`~fastres.nn.blocks`: ``BasicBlock``, ``BottleneckBlock`` (torchvision's blocks, fused);
  :mod:`~fastres.nn.conv`: ``ConvBNReLU``; :mod:`~fastres.nn.resnet`: ``ResNet`` (fused stem);
* :mod:`~fastres.nn._fused`: what they share (the BatchNorm fold and its values check, input
  checks, hooks and tracing); :mod:`~fastres.nn.eval_plan`: a block's eval calls repeated from a
  plan of its first one; :mod:`~fastres.nn.compile`: fused modules as opaque ops under
  ``torch.compile`` inference;
* :mod:`~fastres.nn.chain`, :mod:`~fastres.nn.timm`, :mod:`~fastres.nn.timm_families`,
  :mod:`~fastres.nn.detection`: runs of conv + BN (+ ReLU) inside other libraries' modules
  (timm's ResNet families, torchvision's detection stem);
* :mod:`~fastres.nn.distributed`: SyncBatchNorm in the fused path;
* :mod:`~fastres.nn.converter`: ``convert`` / ``revert`` and the conversion report.

Modules import from ``fastres.functional`` and ``fastres.backends``, never the other way.
"""

from __future__ import annotations

from fastres.nn.blocks import BasicBlock, BottleneckBlock, fusable_reasons
from fastres.nn.conv import ConvBNReLU
from fastres.nn.converter import ConversionReport, convert, freeze, revert, unconvert
from fastres.nn.distributed import SyncBatchNorm
from fastres.nn.resnet import ResNet

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "ConversionReport",
    "ConvBNReLU",
    "ResNet",
    "SyncBatchNorm",
    "convert",
    "freeze",
    "fusable_reasons",
    "revert",
    "unconvert",
]
