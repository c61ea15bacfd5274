"""Fused twins of timm's other ResNet families: pre-activation ResNets (``resnetv2``),
Selective-Kernel ResNets (``skresnet``), ResNeSt, and timm's ``ConvNormAct`` layer.

Each twin subclasses timm's class (same attributes, constructor and ``state_dict`` keys), runs
its conv + BN (+ ReLU) pairs as fused chains (:mod:`fastres.nn.chain`) and every other
module as timm does. timm's ``BatchNormAct2d`` (BatchNorm, then its ``act``) counts as a
BatchNorm with or without a ReLU.

Pre-activation blocks (``PreActBottleneck``, ``PreActBasic``): ``norm1`` (BN + ReLU of the block
input) follows the previous block's residual add, and a ReLU lies between it and ``conv1``, so in
eval no conv weight can absorb it: it runs as timm's (one elementwise pass, as in timm). The
other BNs follow a conv: ``conv1`` + ``norm2`` (+ ReLU) and ``conv2`` + ``norm3`` (+ ReLU) form
one chain (folded in eval; in training one fused unit where ``norm2`` + ReLU is ``conv2``'s
prologue), and ``conv3`` (no BN after it) runs with the residual add in its epilogue.
"""

from __future__ import annotations

from timm.layers import ConvNormAct
from timm.layers import norm_act as timm_norm_act
from timm.layers.split_attn import SplitAttn
from timm.models import resnest as timm_resnest
from timm.models import resnetv2 as timm_v2
from timm.models import sknet as timm_sk
from torch import Tensor, nn

from fastres.nn import _fused as M
from fastres.nn import chain as C

__all__ = [
    "PAIRS",
    "TimmConvNormAct",
    "TimmPreActBasic",
    "TimmPreActBottleneck",
    "TimmResNestBottleneck",
    "TimmSKBasic",
    "TimmSKBottleneck",
    "TimmSplitAttn",
    "notes",
]

C.NORM_ACT_TYPES.update({timm_norm_act.BatchNormAct2d, timm_norm_act.SyncBatchNormAct})

_NOT_PAIRED_CONV = "no BatchNorm follows it"
_PREACT_NORM = (
    "a pre-activation BatchNorm + ReLU: it follows a residual add or a pooling, not a conv, and "
    "a ReLU lies between it and the next conv, so no conv weight can absorb it; runs as timm's"
)


def _mixed(bns: list[nn.Module]) -> list[str]:
    return M._mixed_norm_reason(bns, "norm layers")


def _is_norm(m: nn.Module | None) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m) in M._NORMS


# --------------------------------------------------------------------------- ConvNormAct


def _cna_link(cna: nn.Module, name: str) -> C.Link | None:
    """A Link of a ``ConvNormAct``'s conv and norm (its own ReLU inside), None when it cannot run
    fused or has an anti-aliasing layer after the norm."""
    if C.has_hooks(cna) or getattr(cna, "aa", None) is not None:
        return None
    return C.link(cna.conv, cna.bn, None, (f"{name}.conv", f"{name}.bn"))


class TimmConvNormAct(C.ChainMixin, ConvNormAct):
    """timm's ``ConvNormAct`` (conv, ``BatchNormAct2d``, optional anti-aliasing) with the conv +
    BN (+ ReLU) fused; the anti-aliasing layer runs as timm's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    @staticmethod
    def _twin_reasons(mod: nn.Module) -> list[str] | None:
        if not _is_norm(mod.bn):
            return None  # apply_norm=False: a conv alone, nothing to fuse
        return C.link_reasons(mod.conv, mod.bn, "conv/bn")

    def _fastres_layers(self) -> list[nn.Module]:
        return [self.conv, self.bn] if self._link() is not None else []

    def _link(self) -> C.Link | None:
        return C.link(self.conv, self.bn, None, ("conv", "bn"))

    def forward(self, x: Tensor) -> Tensor:
        lk = self._link()
        if lk is None:
            return super().forward(x)
        x = self._run_items(x, [lk])
        aa = getattr(self, "aa", None)
        return aa(x) if aa is not None else x


# --------------------------------------------------------------------------- resnetv2


def _preact_reasons(mod: nn.Module, pairs, last: str) -> list[str]:
    reasons = []
    for c, b in pairs:
        reasons += C.link_reasons(getattr(mod, c), getattr(mod, b), f"{c}/{b}")
        if not C.norm_relu(getattr(mod, b)):
            reasons.append(f"{b}: applies no ReLU")
    return reasons + C.conv_add_reasons(getattr(mod, last), last) + _mixed(
        [getattr(mod, b) for _, b in pairs]
    )


class _PreActMixin(C.ChainMixin):
    _pairs: tuple[tuple[str, str], ...]
    _last: str

    @classmethod
    def _twin_reasons(cls, mod: nn.Module) -> list[str]:
        return _preact_reasons(mod, cls._pairs, cls._last)

    def _fastres_layers(self) -> list[nn.Module]:
        if self._twin_reasons(self):
            return []
        return [getattr(self, n) for p in self._pairs for n in p] + [getattr(self, self._last)]

    def _fastres_notes(self) -> dict[nn.Module, str]:
        out = {self.norm1: _PREACT_NORM}
        ds = self.downsample
        if ds is not None and not _is_norm(getattr(ds, "norm", None)):
            out[ds.conv] = f"{_NOT_PAIRED_CONV} (a pre-activation projection); runs as timm's"
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self._twin_reasons(self):
            return super().forward(x)
        # timm: x_preact = norm1(x); shortcut = downsample(x_preact) or x;
        # conv3(norm3(conv2(norm2(conv1(x_preact))))) + shortcut
        x_preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        items = []
        for c, b in self._pairs:
            conv, bn = getattr(self, c), getattr(self, b)
            items += C.fused_or(C.link(conv, bn, None, (c, b)), conv, bn)
        h = self._run_items(x_preact, items)
        last = getattr(self, self._last)
        if C.active(self.drop_path) or C.has_hooks(last):
            return self.drop_path(last(h)) + shortcut
        return self._conv_add(h, last, shortcut)


class TimmPreActBottleneck(_PreActMixin, timm_v2.PreActBottleneck):
    """timm's ``PreActBottleneck`` (resnetv2_50, ...) with conv1 + norm2 + ReLU and conv2 + norm3
    + ReLU as one fused chain and conv3 + the residual add as one fused op; norm1 as timm's."""

    _pairs = (("conv1", "norm2"), ("conv2", "norm3"))
    _last = "conv3"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()


class TimmPreActBasic(_PreActMixin, timm_v2.PreActBasic):
    """timm's ``PreActBasic`` (resnetv2_18/34) with conv1 + norm2 + ReLU fused and conv2 + the
    residual add as one fused op; norm1 as timm's."""

    _pairs = (("conv1", "norm2"),)
    _last = "conv2"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()


def _resnetv2_notes(model: nn.Module) -> dict[nn.Module, str]:
    out = {}
    if isinstance(model.norm, nn.BatchNorm2d):
        out[model.norm] = (
            "the final pre-activation BatchNorm + ReLU: it follows the last residual add, not a "
            "conv; runs as timm's"
        )
    for name, m in model.stem.named_children():
        if isinstance(m, nn.Conv2d) and name in ("conv", "conv3"):
            out[m] = (
                f"{_NOT_PAIRED_CONV} (in a pre-activation stem the next BatchNorm is the first "
                "block's norm1, after the max-pool); runs as timm's"
            )
    return out


# --------------------------------------------------------------------------- SK-ResNet


class _SKMixin(C.ChainMixin):
    """The selective-kernel conv (``SelectiveKernel``: its paths are ConvNormActs, fused on their
    own, and its attention) runs as a module; the last ConvNormAct + the residual add + ReLU is
    one fused chain when no attention or stochastic depth lies between them."""

    _last: str

    @classmethod
    def _twin_reasons(cls, mod: nn.Module) -> list[str]:
        last = getattr(mod, cls._last)
        if not isinstance(last, ConvNormAct) or not _is_norm(last.bn):
            return [f"{cls._last}: {type(last).__name__} is not a ConvNormAct with a norm layer"]
        reasons = C.link_reasons(last.conv, last.bn, f"{cls._last}.conv/{cls._last}.bn")
        if C.norm_relu(last.bn):
            reasons.append(f"{cls._last}.bn applies a ReLU before the residual add")
        if getattr(last, "aa", None) is not None:
            reasons.append(f"{cls._last}.aa: anti-aliasing before the residual add")
        if type(mod.act) is not nn.ReLU:
            reasons.append(f"act: {type(mod.act).__name__} is not nn.ReLU")
        return reasons

    def _head_items(self) -> list[object]:
        raise NotImplementedError

    def _items(self) -> list[object]:
        last = getattr(self, self._last)
        lk = _cna_link(last, self._last)
        items = self._head_items() + ([lk] if lk is not None else [last])
        if self.se is not None:
            items.append(self.se)
        if C.active(self.drop_path):
            items.append(self.drop_path)
        return items + [C.ADD, self.act]

    def _fastres_layers(self) -> list[nn.Module]:
        if self._twin_reasons(self):
            return []
        layers = C.chain_layers(self._items())
        pair = M._downsample_pair(self.downsample)
        return layers + (list(pair) if pair is not None else [])

    def _shortcut(self, x: Tensor) -> Tensor:
        return _shortcut(self, self.downsample, x)

    def forward(self, x: Tensor) -> Tensor:
        if self._twin_reasons(self):
            return super().forward(x)
        return self._run_items(x, self._items(), lambda: self._shortcut(x))


def _shortcut(block: C.ChainMixin, ds: nn.Module | None, x: Tensor) -> Tensor:
    """``ds(x)`` with a conv + BN downsample as a fused op (``x`` without one)."""
    if ds is None:
        return x
    pair = M._downsample_pair(ds)
    lk = None if pair is None or C.has_hooks(ds) else C.link(
        *pair, None, ("downsample.0", "downsample.1")
    )
    if lk is None:
        return ds(x)
    return block._run_chain(x, C.Chain((lk,), False), None)


class TimmSKBasic(_SKMixin, timm_sk.SelectiveKernelBasic):
    """timm's ``SelectiveKernelBasic`` (skresnet18/34)."""

    _last = "conv2"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _head_items(self) -> list[object]:
        return [self.conv1]


class TimmSKBottleneck(_SKMixin, timm_sk.SelectiveKernelBottleneck):
    """timm's ``SelectiveKernelBottleneck`` (skresnet50, skresnext50)."""

    _last = "conv3"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _head_items(self) -> list[object]:
        lk = _cna_link(self.conv1, "conv1")
        return [lk if lk is not None else self.conv1, self.conv2]


# --------------------------------------------------------------------------- ResNeSt


class TimmSplitAttn(C.ChainMixin, SplitAttn):
    """timm's ``SplitAttn`` (ResNeSt's split-attention conv) with its conv + ``bn0`` + ReLU
    fused; the attention (pooling, ``fc1`` + ``bn1``, ``fc2``, radix softmax) runs as timm's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    @staticmethod
    def _twin_reasons(mod: nn.Module) -> list[str] | None:
        if not _is_norm(mod.bn0):
            return None  # norm_layer=None: nothing to fuse
        reasons = C.link_reasons(mod.conv, mod.bn0, "conv/bn0")
        if type(mod.act0) is not nn.ReLU:
            reasons.append(f"act0: {type(mod.act0).__name__} is not nn.ReLU")
        return reasons

    def _items(self) -> list[object]:
        if C.active(self.drop):
            lk = C.link(self.conv, self.bn0, None, ("conv", "bn0"))
            return C.fused_or(lk, self.conv, self.bn0) + [self.drop, self.act0]
        lk = C.link(self.conv, self.bn0, self.act0, ("conv", "bn0"), "act0")
        return C.fused_or(lk, self.conv, self.bn0, self.act0)

    def _fastres_layers(self) -> list[nn.Module]:
        return C.chain_layers(self._items()) if not self._twin_reasons(self) else []

    def forward(self, x: Tensor) -> Tensor:
        if self._twin_reasons(self):
            return super().forward(x)
        x = self._run_items(x, self._items())
        # timm's SplitAttn.forward after act0
        B, RC, H, W = x.shape
        if self.radix > 1:
            x = x.reshape((B, self.radix, RC // self.radix, H, W))
            x_gap = x.sum(dim=1)
        else:
            x_gap = x
        x_gap = x_gap.mean((2, 3), keepdim=True)
        x_gap = self.act1(self.bn1(self.fc1(x_gap)))
        x_attn = self.rsoftmax(self.fc2(x_gap)).view(B, -1, 1, 1)
        if self.radix > 1:
            out = (x * x_attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)
        else:
            out = x * x_attn
        return out.contiguous()


class TimmResNestBottleneck(C.ChainMixin, timm_resnest.ResNestBottleneck):
    """timm's ``ResNestBottleneck`` (resnest14d/26d/50d, ...): conv1 + bn1 + ReLU fused, the
    split-attention conv as a module (:class:`TimmSplitAttn` fuses its conv + BN + ReLU), the
    ``avd`` pooling as timm's, conv3 + bn3 + the residual add + ReLU fused."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    @staticmethod
    def _twin_reasons(mod: nn.Module) -> list[str]:
        reasons = []
        for c, b in (("conv1", "bn1"), ("conv3", "bn3")):
            reasons += C.link_reasons(getattr(mod, c), getattr(mod, b), f"{c}/{b}")
        for a in ("act1", "act3"):
            if type(getattr(mod, a)) is not nn.ReLU:
                reasons.append(f"{a}: {type(getattr(mod, a)).__name__} is not nn.ReLU")
        return reasons + _mixed([mod.bn1, mod.bn3])

    def _items(self) -> list[object]:
        # timm: conv1, bn1, act1, avd_first, conv2 (SplitAttn, or conv2, bn2, drop_block, act2),
        # avd_last, conv3, bn3, + shortcut, act3
        items = C.fused_or(
            C.link(self.conv1, self.bn1, self.act1, ("conv1", "bn1"), "act1"),
            self.conv1, self.bn1, self.act1,
        )
        if self.avd_first is not None:
            items.append(self.avd_first)
        if type(self.conv2) is nn.Conv2d and C.active(self.drop_block):
            lk = C.link(self.conv2, self.bn2, None, ("conv2", "bn2"))
            items += C.fused_or(lk, self.conv2, self.bn2) + [self.drop_block, self.act2]
        elif type(self.conv2) is nn.Conv2d:
            lk = C.link(self.conv2, self.bn2, self.act2, ("conv2", "bn2"), "act2")
            items += C.fused_or(lk, self.conv2, self.bn2, self.act2)
        else:  # SplitAttn, after which bn2, drop_block and act2 are nn.Identity
            items += [m for m in (self.conv2, self.bn2, self.drop_block, self.act2) if C.active(m)]
        if self.avd_last is not None:
            items.append(self.avd_last)
        lk = C.link(self.conv3, self.bn3, None, ("conv3", "bn3"))
        return items + C.fused_or(lk, self.conv3, self.bn3) + [C.ADD, self.act3]

    def _fastres_layers(self) -> list[nn.Module]:
        if self._twin_reasons(self):
            return []
        layers = C.chain_layers(self._items())
        pair = M._downsample_pair(self.downsample)
        return layers + (list(pair) if pair is not None else [])

    def _shortcut(self, x: Tensor) -> Tensor:
        # timm: drop_path acts on the block input, and the downsample takes its output
        if self.drop_path is not None:
            x_dp = self.drop_path(x)
            return _shortcut(self, self.downsample, x_dp) if self.downsample is not None else x
        return _shortcut(self, self.downsample, x)

    def forward(self, x: Tensor) -> Tensor:
        if self._twin_reasons(self):
            return super().forward(x)
        return self._run_items(x, self._items(), lambda: self._shortcut(x))


# --------------------------------------------------------------------------- the report


def notes(mod: nn.Module) -> dict[nn.Module, str]:
    """Why layers of a timm module that fastres knows stay unfused (for the conversion report)."""
    if isinstance(mod, timm_v2.ResNetV2):
        return _resnetv2_notes(mod)
    if isinstance(mod, _PreActMixin):
        return mod._fastres_notes()
    return {}


#: (plain class, fused class) pairs for fastres.convert / revert.
PAIRS = (
    (ConvNormAct, TimmConvNormAct),
    (timm_v2.PreActBottleneck, TimmPreActBottleneck),
    (timm_v2.PreActBasic, TimmPreActBasic),
    (timm_sk.SelectiveKernelBasic, TimmSKBasic),
    (timm_sk.SelectiveKernelBottleneck, TimmSKBottleneck),
    (SplitAttn, TimmSplitAttn),
    (timm_resnest.ResNestBottleneck, TimmResNestBottleneck),
)

#: Residual block classes (plain and fused) the report counts.
BLOCKS = (
    timm_v2.PreActBottleneck,
    timm_v2.PreActBasic,
    timm_sk.SelectiveKernelBasic,
    timm_sk.SelectiveKernelBottleneck,
    timm_resnest.ResNestBottleneck,
)
