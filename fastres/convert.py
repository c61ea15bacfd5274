"""``fastres.convert``: swap torchvision's (and timm's) residual blocks for fused fastres blocks.

No global monkey-patching: the converter replaces block instances inside one model (a copy by
default) and keeps every parameter and buffer, so the converted model's ``state_dict`` has the same
keys and values and loads strictly into the plain model and back.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import misc as tv_misc

from fastres import distributed as D
from fastres import modules as M

__all__ = ["convert", "unconvert", "ConversionReport"]


@dataclass
class ConversionReport:
    """What :func:`convert` swapped and what it left, with the reason."""

    swapped: list[tuple[str, str]] = field(default_factory=list)  # (path, new class)
    left: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def __str__(self) -> str:
        lines = [f"fastres.convert: swapped {len(self.swapped)} blocks, left {len(self.left)}"]
        lines += [f"  left {path}: {why}" for path, why in self.left]
        return "\n".join(lines)


_PAIRS = (
    (tv_resnet.Bottleneck, M.BottleneckBlock),
    (tv_resnet.BasicBlock, M.BasicBlock),
    (tv_misc.Conv2dNormActivation, M.ConvBNReLU),
    (tv_resnet.ResNet, M.ResNet),
)

#: Swapped classes whose children are converted too (a ResNet's stem is fused by the ResNet
#: itself, its blocks by their own swaps).
_CONTAINERS = (M.ResNet,)


def _pairs() -> tuple[tuple[type[nn.Module], type[nn.Module]], ...]:
    # timm's blocks: only when timm is already imported (a model holding them implies it), so
    # that convert() never pays for importing timm.
    if "timm.models.resnet" in sys.modules:
        from fastres import integrations  # noqa: PLC0415

        return _PAIRS + integrations.PAIRS
    return _PAIRS


def _reasons(mod: nn.Module, cls: type[nn.Module]) -> list[str]:
    """Why ``mod`` cannot become a ``cls``; empty when it can."""
    if cls is M.ConvBNReLU:
        tmp = _swap(mod, cls)
        return [] if tmp._fusable() is not None else ["not conv + BatchNorm2d + ReLU/none"]
    if cls in (M.BasicBlock, M.BottleneckBlock):
        return M.fusable_reasons(mod)
    return _swap(mod, cls)._fusable_reasons()


def _target(mod: nn.Module) -> type[nn.Module] | None:
    for src, dst in _pairs():
        if type(mod) is src:
            return dst
    return None


def _swap(mod: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A fused block sharing ``mod``'s submodules, parameters, buffers and hooks."""
    new = cls.__new__(cls)
    new.__dict__ = mod.__dict__.copy()
    new._init_fused()
    return new


def convert(
    model: nn.Module,
    inplace: bool = False,
    report: bool = False,
    verbose: bool = False,
    sync_bn: bool = False,
    process_group=None,
):
    """Replace torchvision ``BasicBlock``/``Bottleneck``/``Conv2dNormActivation`` instances in
    ``model`` by their fastres counterparts, and timm's ``BasicBlock``/``Bottleneck`` by
    :mod:`fastres.integrations`' (when timm is imported).

    Every ``nn.SyncBatchNorm`` becomes a :class:`fastres.distributed.SyncBatchNorm` (same
    ``state_dict``; it also syncs CPU tensors over gloo), and blocks whose BatchNorms are
    SyncBatchNorms keep cross-process batch statistics in the fused path.

    Args:
        model: any module tree (the model itself may be a block).
        inplace: modify ``model`` itself; by default a deep copy is converted and returned.
        report: also return a :class:`ConversionReport` of what was swapped and what was left.
        verbose: print the report.
        sync_bn: first turn every BatchNorm into a SyncBatchNorm over ``process_group``
            (default: the whole world), as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.

    Returns the converted model (and the report when ``report=True``). Blocks whose layers are
    not the fusable pattern (another norm layer, a conv with bias, ...) are left as they are, with
    the reason in the report; subclasses of torchvision's blocks are left too (their forward may
    differ).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.convert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    rep = ConversionReport()
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    elif process_group is not None:
        raise ValueError("fastres.convert: process_group is used with sync_bn=True only")
    model, synced = D.to_fastres_sync_bn(model)
    rep.swapped += [(path, "SyncBatchNorm") for path in synced]

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            cls = _target(child)
            if cls is None:
                if isinstance(
                    child, (tv_resnet.Bottleneck, tv_resnet.BasicBlock)
                ) and not isinstance(child, (M.BottleneckBlock, M.BasicBlock)):
                    rep.left.append(
                        (
                            path,
                            f"{type(child).__name__} subclasses a torchvision "
                            "block and may override its forward",
                        )
                    )
                visit(child, path + ".")
                continue
            reasons = _reasons(child, cls)
            if reasons:
                rep.left.append((path, "; ".join(reasons)))
                visit(child, path + ".")
                continue
            new = _swap(child, cls)
            setattr(parent, name, new)
            rep.swapped.append((path, cls.__name__))
            if cls in _CONTAINERS:
                visit(new, path + ".")

    if _target(model) is not None:
        cls = _target(model)
        reasons = _reasons(model, cls)
        if not reasons:
            # The model object itself changes class (convert(m, inplace=True) returns m).
            model.__class__ = cls
            model._init_fused()
            rep.swapped.append(("", cls.__name__))
        else:
            rep.left.append(("", "; ".join(reasons)))
        if cls in _CONTAINERS:
            visit(model, "")
    else:
        visit(model, "")
    if verbose:
        print(rep)
    return (model, rep) if report else model


def _plain_class(mod: nn.Module) -> type[nn.Module] | None:
    """The plain class a fastres block was swapped from (None for anything else)."""
    for src, dst in _pairs():
        if type(mod) is dst:
            return src
    return None


def _unswap(mod: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A plain block sharing ``mod``'s submodules, parameters, buffers and hooks."""
    new = cls.__new__(cls)
    new.__dict__ = {
        k: v
        for k, v in mod.__dict__.items()
        if k not in ("_fold_cache", "_eval_plan", "_fr_handle", "_stem_bound")
    }
    return new


def unconvert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`convert`: replace every fastres block by the plain block it stands
    for (torchvision ``BasicBlock``/``Bottleneck``/``Conv2dNormActivation``), and every fastres
    ``SyncBatchNorm`` by ``nn.SyncBatchNorm``.

    The plain blocks share the fused blocks' submodules, parameters, buffers and hooks, so the
    result's ``state_dict`` is the converted model's, key for key. With ``inplace=False`` (the
    default) a deep copy is unconverted and returned, as :func:`convert` does. Use it to save a
    checkpoint or export a model that must not depend on fastres.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.unconvert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model = D.to_plain_sync_bn(model)
    cls = _plain_class(model)
    if cls is not None:
        container = type(model) in _CONTAINERS
        model.__class__ = cls  # the object itself (unconvert(m, inplace=True) returns m)
        for k in ("_fold_cache", "_eval_plan", "_fr_handle", "_stem_bound"):
            model.__dict__.pop(k, None)
        if not container:
            return model

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            plain = _plain_class(child)
            if plain is not None:
                setattr(parent, name, _unswap(child, plain))
            if plain is None or type(child) in _CONTAINERS:
                visit(getattr(parent, name))

    visit(model)
    return model
