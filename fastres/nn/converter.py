"""``fastres.convert`` / ``fastres.revert``: swap torchvision's and timm's ResNet modules for
their fused twins and back.

No global monkey-patching: the converter changes the class of module objects inside one model
tree. The parameters and buffers are the model's own objects, shared, never copied (as
``nn.SyncBatchNorm.convert_sync_batchnorm`` does): an optimizer built on the model before
``convert`` trains the converted model, and the ``state_dict`` has the same keys and values and
loads strictly into the plain model and back.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import misc as tv_misc

from fastres.nn import _fused as M
from fastres.nn import distributed as D
from fastres.nn.blocks import BasicBlock, BottleneckBlock, _ResidualBlockMixin, fusable_reasons
from fastres.nn.conv import ConvBNReLU
from fastres.nn.detection import FusedLayerGetter, FusedSequential
from fastres.nn.resnet import ResNet

__all__ = ["ConversionReport", "LayerStatus", "convert", "revert", "unconvert"]


@dataclass(frozen=True)
class LayerStatus:
    """One conv or norm layer of a converted model: ``fused`` by the module at ``by``, or left
    as it is for the reason ``why``."""

    kind: str  # "conv" | "norm"
    cls: str
    fused: bool
    by: str = ""
    why: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert` did.

    * ``swapped``: (path, fused class) of every module now running as a fastres twin;
    * ``left``: (path, why) of modules that have a fastres twin but were left as they are (a
      norm other than BatchNorm, an activation other than ReLU, a conv with bias, ...);
    * ``layers``: every conv and every norm layer of the model, by path: fused or why not;
    * ``blocks``: (fused, total) residual blocks (torchvision's and timm's block classes);
    * ``hooked``: (path, inner modules) of fused modules that run their plain forward for now,
      because those inner modules carry hooks (every fused module does while a global module
      hook exists: ``global_hook``); they run fused again once the hooks are removed.

    Parameters and buffers are the input model's own objects (see :func:`convert`).
    """

    swapped: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    layers: dict[str, LayerStatus] = field(default_factory=dict)
    blocks: tuple[int, int] = (0, 0)
    hooked: list[tuple[str, list[str]]] = field(default_factory=list)
    global_hook: bool = False

    def _count(self, kind: str) -> tuple[int, int]:
        mine = [s for s in self.layers.values() if s.kind == kind]
        return sum(s.fused for s in mine), len(mine)

    @property
    def convs(self) -> tuple[int, int]:
        """(fused, total) convolutions."""
        return self._count("conv")

    @property
    def norms(self) -> tuple[int, int]:
        """(fused, total) BatchNorm (and other norm) layers."""
        return self._count("norm")

    def not_fused(self) -> dict[str, list[str]]:
        """The paths of the layers left as they are, by reason."""
        out: dict[str, list[str]] = {}
        for path, s in self.layers.items():
            if not s.fused:
                out.setdefault(s.why, []).append(path)
        return out

    def __str__(self) -> str:
        (cf, ct), (nf, nt), (bf, bt) = self.convs, self.norms, self.blocks
        kinds = Counter(cls for _, cls in self.swapped)
        lines = [
            f"fastres.convert: residual blocks {bf}/{bt} fused; convs {cf}/{ct} and norm layers "
            f"{nf}/{nt} run in fused ops",
            f"  swapped {len(self.swapped)} modules: "
            + (", ".join(f"{k} x{v}" for k, v in kinds.items()) or "none"),
            "  parameters and buffers: the input model's own objects (shared, not copied)",
        ]
        lines += [f"  left {path or '<model>'}: {why}" for path, why in self.left]
        lines += [f"  runs unfused while hooks exist on {', '.join(inner)}: {path or '<model>'}"
                  for path, inner in self.hooked]
        if self.global_hook:
            lines.append("  a global module hook exists: every fused module runs unfused until "
                         "it is removed")
        for why, paths in self.not_fused().items():
            more = f", ... ({len(paths)} in all)" if len(paths) > 4 else ""
            shown = ", ".join(paths[:4]) + more
            lines.append(f"  not fused: {why}: {shown}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ the twins


def _norm_like(m: nn.Module | None) -> bool:
    return isinstance(
        m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, tv_misc.FrozenBatchNorm2d)
    )


def _conv_norm_act_reasons(mod: nn.Module) -> list[str] | None:
    """torchvision's ``Conv2dNormActivation``: None without a norm layer (FPN's convs: nothing
    to fuse), else why it cannot be a :class:`fastres.ConvBNReLU`."""
    mods = list(mod)
    if len(mods) < 2 or not _norm_like(mods[1]):
        return None
    reasons = M._conv_bn_reasons(mods[0], mods[1], "ConvBNReLU")
    if len(mods) > 3:
        reasons.append(f"{len(mods)} layers, not conv + norm + activation")
    elif len(mods) == 3 and type(mods[2]) is not nn.ReLU:
        reasons.append(f"activation {type(mods[2]).__name__} is not nn.ReLU")
    return reasons


@dataclass(frozen=True)
class _Twin:
    plain: type[nn.Module]
    fused: type[nn.Module]
    # why a plain module cannot become fused: [] it can; None: it holds nothing to fuse
    reasons: Callable[[nn.Module], list[str] | None]


_TORCHVISION = (
    _Twin(tv_resnet.Bottleneck, BottleneckBlock, fusable_reasons),
    _Twin(tv_resnet.BasicBlock, BasicBlock, fusable_reasons),
    _Twin(tv_misc.Conv2dNormActivation, ConvBNReLU, _conv_norm_act_reasons),
    _Twin(tv_resnet.ResNet, ResNet, ResNet._fusable_reasons),
    _Twin(nn.Sequential, FusedSequential, FusedSequential._twin_reasons),
    _Twin(IntermediateLayerGetter, FusedLayerGetter, FusedLayerGetter._twin_reasons),
)


def _timm_loaded() -> bool:
    # timm's twins only when timm is already imported (a model holding timm modules implies
    # it), so that convert() never pays for importing timm.
    return "timm.models.resnet" in sys.modules


def _twins() -> tuple[_Twin, ...]:
    if not _timm_loaded():
        return _TORCHVISION
    from fastres.nn import timm as integrations  # noqa: PLC0415
    from fastres.nn import timm_families as integrations_timm  # noqa: PLC0415

    timm = [_Twin(p, f, f._twin_reasons) for p, f in integrations.PAIRS + integrations_timm.PAIRS]
    return _TORCHVISION + tuple(timm)


def _block_types() -> tuple[type, ...]:
    blocks = (tv_resnet.BasicBlock, tv_resnet.Bottleneck)
    if _timm_loaded():
        from fastres.nn import timm as integrations  # noqa: PLC0415
        from fastres.nn import timm_families as integrations_timm  # noqa: PLC0415

        blocks += integrations.BLOCKS + integrations_timm.BLOCKS
    return blocks


#: Attributes a fused module holds that its plain class does not (fastres.nn._fused._FusedMixin).
_FUSED_STATE = ("_fold_cache", "_eval_plan", "_train_plan", "_fr_handle", "_stem_bound",
                "_fr_frozen")


# ------------------------------------------------------------------------------ accounting


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def _fused_layers(mod: nn.Module) -> list[nn.Module]:
    """The convs and norms that a fastres module runs in fused ops."""
    own = getattr(mod, "_fastres_layers", None)
    if own is not None:
        return own()
    if isinstance(mod, _ResidualBlockMixin):
        if mod._fusable_reasons():
            return []
        layers = [getattr(mod, n) for pair in mod._pairs for n in pair]
        ds = M._downsample_pair(getattr(mod, "downsample", None), getattr(mod, mod._pairs[0][1]))
        return layers + (list(ds) if ds is not None else [])
    if isinstance(mod, ConvBNReLU):
        parts = mod._fusable()
        return list(parts[:2]) if parts is not None else []
    if isinstance(mod, ResNet):
        return [] if mod._fusable_reasons() else [mod.conv1, mod.bn1]
    return []


def _notes(mod: nn.Module) -> dict[nn.Module, str]:
    """Why some layers of ``mod`` stay unfused, where ``mod`` knows."""
    if type(mod) is tv_misc.Conv2dNormActivation and _conv_norm_act_reasons(mod) is None:
        return {mod[0]: "not a conv + BatchNorm pair: Conv2dNormActivation without a norm layer"}
    if _timm_loaded():
        from fastres.nn import timm_families as integrations_timm  # noqa: PLC0415

        return integrations_timm.notes(mod)
    return {}


_ATTENTION_WORDS = ("SE", "Eca", "Cbam", "Attn", "Attention", "Excite", "Gate")


def _generic_why(layer: nn.Module, ancestors: list[nn.Module]) -> str:
    for a in reversed(ancestors):
        if any(w in type(a).__name__ for w in _ATTENTION_WORDS):
            return f"in an attention module ({type(a).__name__}), which runs as it is"
    if _is_conv(layer) and type(layer) is not nn.Conv2d:
        return f"{type(layer).__name__} is not a plain nn.Conv2d"
    if _is_conv(layer) and layer.bias is not None:
        return "not a conv + BatchNorm pair: a conv with a bias, no BatchNorm after it"
    if _is_conv(layer):
        return "not followed by a BatchNorm in a pattern fastres fuses"
    return "not after a conv in a pattern fastres fuses"


def _account(model: nn.Module, rep: ConversionReport, why_left: dict[int, str]) -> None:
    fused: dict[int, str] = {}
    notes: dict[int, str] = dict(why_left)
    blocks, n_blocks, n_fused = _block_types(), 0, 0
    for path, mod in model.named_modules():
        layers = _fused_layers(mod)
        for layer in layers:
            fused.setdefault(id(layer), path)
        for layer, why in _notes(mod).items():
            notes.setdefault(id(layer), why)
        if isinstance(mod, blocks):
            n_blocks += 1
            n_fused += bool(layers)
    rep.blocks = (n_fused, n_blocks)

    def walk(mod: nn.Module, path: str, ancestors: list[nn.Module]) -> None:
        conv, norm = _is_conv(mod), _norm_like(mod)
        if (conv or norm) and path not in rep.layers:
            kind = "conv" if conv else "norm"
            name = type(mod).__name__
            if id(mod) in fused:
                rep.layers[path] = LayerStatus(kind, name, True, fused[id(mod)] or "<model>")
            else:
                why = notes.get(id(mod)) or _generic_why(mod, ancestors)
                rep.layers[path] = LayerStatus(kind, name, False, why=why)
        for name, child in mod.named_children():
            walk(child, f"{path}.{name}" if path else name, [*ancestors, mod])

    walk(model, "", [])


# ------------------------------------------------------------------------------ copies


def _clone(model: nn.Module) -> nn.Module:
    """New module objects for the whole tree, sharing every parameter, buffer and other
    attribute value (hooks included); a module registered twice stays one module."""
    memo: dict[int, nn.Module] = {}

    def clone(mod: nn.Module) -> nn.Module:
        if id(mod) in memo:
            return memo[id(mod)]
        new = copy.copy(mod)  # a fused module re-registers itself (fastres.nn._fused._FusedMixin)
        memo[id(mod)] = new
        d = new.__dict__
        for k, v in d.items():
            if isinstance(v, (dict, set)):
                d[k] = copy.copy(v)  # its own registries (parameters, hooks): same contents
        d["_modules"] = type(d["_modules"])(
            (k, None if c is None else clone(c)) for k, c in d["_modules"].items()
        )
        if "_fold_cache" in d:
            d["_fold_cache"] = {}
        d.pop("_eval_plan", None)
        d.pop("_train_plan", None)
        d.pop("_stem_bound", None)
        return new

    return clone(model)


# ------------------------------------------------------------------------------ the API


def _to_sync_bn(model: nn.Module, process_group) -> nn.Module:
    if _timm_loaded():
        # timm's converter keeps BatchNormAct2d's activation (SyncBatchNormAct); PyTorch's would
        # turn it into a plain SyncBatchNorm and drop the ReLU.
        from timm.layers import convert_sync_batchnorm  # noqa: PLC0415

        return convert_sync_batchnorm(model, process_group)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def convert(
    model: nn.Module,
    inplace: bool = False,
    report: bool = False,
    verbose: bool = False,
    sync_bn: bool = False,
    process_group=None,
    freeze: bool = False,
):
    """Run ``model``'s conv + BatchNorm (+ ReLU) (+ residual add) patterns as fused ops by
    swapping its modules for fastres twins:

    * torchvision: ``BasicBlock``, ``Bottleneck``, ``Conv2dNormActivation``, ``ResNet`` (its
      stem), detection backbones' ``IntermediateLayerGetter`` (its stem);
    * any ``nn.Sequential`` holding a conv with a BatchNorm right after it;
    * timm (when timm is imported): ResNet-family blocks with SE/ECA attention, anti-aliasing,
      DropBlock and stochastic depth (the extras run as they are), stems plain and deep,
      pre-activation (``resnetv2``), selective-kernel and ResNeSt blocks, ``ConvNormAct``.

    Every ``nn.SyncBatchNorm`` becomes a :class:`fastres.nn.distributed.SyncBatchNorm` (same
    ``state_dict``; it also syncs CPU tensors over gloo), and blocks whose BatchNorms are
    SyncBatchNorms keep cross-process batch statistics in the fused path.

    The converted model holds the input model's own Parameter and buffer objects, as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does: an optimizer built before ``convert``
    trains the converted model, and the ``state_dict`` keys and values are the same.

    Args:
        model: any module tree (the model itself may be a block).
        inplace: change the classes of ``model``'s own module objects and return ``model``. By
            default ``model`` is left as it is and a new module tree is returned, made of new
            module objects that share ``model``'s parameters, buffers and hooks (to train the
            two independently, convert ``copy.deepcopy(model)``).
        report: also return a :class:`ConversionReport`: what was swapped, what was left and
            why, and every conv and norm layer, fused or why not.
        verbose: print the report.
        sync_bn: first turn every BatchNorm into a SyncBatchNorm over ``process_group``
            (default: the whole world), as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.
        freeze: serve eval calls with frozen weights, as :func:`freeze` does (for serving:
            the per-call read of every weight's values is skipped).

    Returns the converted model (and the report when ``report=True``). Modules whose layers are
    not the fusable pattern (another norm layer, a conv with bias, an activation other than
    ReLU, ...) are left as they are, with the reason in the report; subclasses of the plain
    classes are left too (their forward may differ).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.convert expects an nn.Module, got {type(model).__name__}")
    if process_group is not None and not sync_bn:
        raise ValueError("fastres.convert: process_group is used with sync_bn=True only")
    if not inplace:
        model = _clone(model)
    rep = ConversionReport()
    if sync_bn:
        model = _to_sync_bn(model, process_group)
    model, synced = D.to_fastres_sync_bn(model)
    rep.swapped += [(path, "SyncBatchNorm") for path in synced]

    by_plain = {t.plain: t for t in _twins()}
    subclassed = (tv_resnet.Bottleneck, tv_resnet.BasicBlock)
    covered: set[int] = set()  # layers a swapped module fuses (its children need no twin)
    why_left: dict[int, str] = {}

    def visit(mod: nn.Module, path: str) -> None:
        twin = by_plain.get(type(mod))
        if twin is not None:
            reasons = twin.reasons(mod)
            layers = [m for m in mod.modules() if _is_conv(m) or _norm_like(m)]
            if reasons:
                why = "; ".join(reasons)
                rep.left.append((path, why))
                for layer in layers:
                    why_left.setdefault(id(layer), f"in {type(mod).__name__}, left: {why}")
            elif reasons is not None and not all(id(m) in covered for m in layers):
                mod.__class__ = twin.fused
                mod._init_fused()
                rep.swapped.append((path, twin.fused.__name__))
                covered.update(id(m) for m in _fused_layers(mod))
        elif isinstance(mod, subclassed) and not isinstance(mod, _ResidualBlockMixin):
            name = type(mod).__name__
            why = f"{name} subclasses a torchvision block and may override its forward"
            rep.left.append((path, why))
        for name, child in mod.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    if freeze:
        _set_frozen(model, True)
    if report or verbose:
        _account(model, rep, why_left)
        rep.global_hook = M.global_hooks()
        for path, mod in model.named_modules():
            inner = M.hooked_inner_modules(mod) if "_fr_handle" in mod.__dict__ else []
            if inner:
                rep.hooked.append((path, inner))
    if verbose:
        print(rep)
    return (model, rep) if report else model


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Serve ``model``'s fused eval calls on the CPU with frozen weights (``frozen=False``: live
    again, the default of :func:`convert`); returns ``model``.

    Eval folds each BatchNorm into its convolution and keeps the fold and its packed weight.
    Live, every call first reads the values of every conv weight and BatchNorm tensor (one pass
    over ResNet-50's 102 MB of float32 weights, ~3 ms on a 2-core CPU: about 5% of a batch-1
    call), so that no write can leave a stale fold. Frozen, a call checks each tensor's identity,
    version counter and data pointer instead (microseconds), as a model handed to OpenVINO,
    ONNX Runtime or Inductor's freezing is taken as constant: optimizer steps,
    ``load_state_dict``, in-place ops, ``.to()``/``.half()`` and assigned Parameters are still
    seen, but writes through ``.data`` or ``.numpy()`` (which leave the version counter alone)
    are not. After such a write call ``fastres.freeze(model)`` again: it drops every kept fold,
    so the next call folds the values as they are. Training calls and calls on a GPU do not
    keep folds and are unaffected."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.freeze expects an nn.Module, got {type(model).__name__}")
    return _set_frozen(model, frozen)


def _set_frozen(model: nn.Module, frozen: bool) -> nn.Module:
    for mod in model.modules():
        if "_fr_handle" in mod.__dict__:  # a fused module
            mod.__dict__["_fr_frozen"] = bool(frozen)
            mod.__dict__["_fold_cache"] = {}
            mod.__dict__.pop("_eval_plan", None)
            mod.__dict__.pop("_stem_bound", None)
    return model


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`convert`: every fastres twin becomes the plain torchvision / timm /
    PyTorch class it stands for, and every fastres ``SyncBatchNorm`` an ``nn.SyncBatchNorm``.

    The result holds the same Parameter and buffer objects, so its ``state_dict`` is the
    converted model's, key for key. ``inplace`` as in :func:`convert`: by default new module
    objects sharing the parameters, buffers and hooks; ``inplace=True`` changes ``model``'s own
    modules. Use it to save a whole-model checkpoint or export a model that must not depend on
    fastres (the result pickles without any reference to fastres). Subclasses of fastres blocks
    (e.g. ``fastres.models.CifarBasicBlock``) are not touched: they have no plain twin.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.revert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _clone(model)
    model = D.to_plain_sync_bn(model)
    by_fused = {t.fused: t.plain for t in _twins()}
    for mod in model.modules():
        plain = by_fused.get(type(mod))
        if plain is not None:
            mod.__class__ = plain
            for k in _FUSED_STATE:
                mod.__dict__.pop(k, None)
    return model


#: The earlier name of :func:`revert`.
unconvert = revert
