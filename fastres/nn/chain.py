"""Runs of conv + BatchNorm (+ ReLU) pairs inside modules that fastres does not own.

Other libraries' blocks (timm's SE, anti-aliased, pre-activation and selective-kernel blocks,
their stems, an ``nn.Sequential`` of conv, BN, ReLU, torchvision's detection stem) hold the same
conv + BN pairs as a ResNet block, with other modules between them. Their fused twins describe
their forward as a list of *items*: a :class:`Link` (conv, BN and the ReLU after it), any other
module, or :data:`ADD` (the residual add). :func:`segments` groups consecutive links into
:class:`Chain` runs; :class:`ChainMixin` runs each chain as fused ops and every other item as the
module it is:

* eval (and FrozenBatchNorm2d in training): each BN folded into its conv, one ``conv_bias_act``
  per conv, the ReLU and a residual add in its epilogue;
* training: one :func:`fastres.functional.residual_unit` per chain: batch statistics, each inner
  BN + ReLU applied as the next conv's prologue, the last BN, the residual add and the ReLU in
  one pass.

A pair whose modules carry hooks is not fused (the fused path would skip the hooks); nor is any
chain while torch.fx, torch.jit.trace or ONNX export trace it, or a global module hook exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from fastres import functional as FF
from fastres.nn import _fused as M
from fastres.nn.distributed import sync_group

__all__ = [
    "ADD",
    "Chain",
    "ChainMixin",
    "Link",
    "NORM_ACT_TYPES",
    "active",
    "chain_layers",
    "conv_add_reasons",
    "fused_or",
    "has_hooks",
    "is_relu",
    "link",
    "link_reasons",
    "links_of",
    "norm_reasons",
    "norm_relu",
    "segments",
]

#: timm-style norm + activation layers: ``nn.BatchNorm2d`` subclasses whose forward normalises and
#: then applies ``.drop`` and ``.act`` (timm's ``BatchNormAct2d``). Registered by
#: :mod:`fastres.nn.timm_families` when timm is imported.
NORM_ACT_TYPES: set[type] = set()

# A norm layer with nothing to say about it: _conv_bn_reasons then reports the conv's reasons only.
_STAND_IN_NORM = nn.BatchNorm2d(1)


class _Add:
    def __repr__(self) -> str:
        return "ADD"


#: The residual add in an item list: the shortcut (block input or downsample) added to the
#: main path.
ADD = _Add()


def has_hooks(mod: nn.Module | None) -> bool:
    """A hook on ``mod`` or inside it: the fused path would skip its call (fastres.nn._fused)."""
    return mod is not None and M._hooked((mod,))


def is_relu(mod: nn.Module | None) -> bool:
    return type(mod) is nn.ReLU and not has_hooks(mod)


def active(mod: nn.Module | None) -> bool:
    """Whether ``mod`` changes its input now: None, ``nn.Identity`` and timm's ``DropPath`` /
    ``DropBlock2d`` outside training (or with a zero rate) are the identity."""
    if mod is None or type(mod) is nn.Identity:
        return False
    if type(mod).__name__ in ("DropPath", "DropBlock2d") and type(mod).__module__.startswith(
        "timm."
    ):
        return bool(mod.training and mod.drop_prob > 0)
    return True


def norm_relu(bn: nn.Module) -> bool:
    """A norm + activation layer that applies ReLU itself."""
    return type(bn) in NORM_ACT_TYPES and type(bn.act) is nn.ReLU


def norm_reasons(bn: nn.Module, where: str) -> list[str]:
    """Why ``bn`` cannot be a fused BatchNorm; empty when it can."""
    if type(bn) in M._NORMS:
        return []
    if type(bn) in NORM_ACT_TYPES:
        name = type(bn).__name__
        reasons = []
        if type(bn.drop) is not nn.Identity:
            reasons.append(f"{where}: {name}.drop ({type(bn.drop).__name__}) is not fused")
        if type(bn.act) not in (nn.ReLU, nn.Identity):
            reasons.append(f"{where}: {name}.act {type(bn.act).__name__} is not nn.ReLU")
        return reasons
    return [
        f"{where}: {type(bn).__name__} is not nn.BatchNorm2d, nn.SyncBatchNorm or "
        "FrozenBatchNorm2d"
    ]


def link_reasons(conv: nn.Module, bn: nn.Module, where: str) -> list[str]:
    """Why ``conv`` followed by ``bn`` cannot run as one fused pair; empty when it can."""
    return M._conv_bn_reasons(conv, _STAND_IN_NORM, where) + norm_reasons(bn, where)


@dataclass(frozen=True, eq=False)
class Link:
    """A conv, the BatchNorm after it, and the ``nn.ReLU`` module after that (None: no ReLU, or
    the norm layer applies it itself). ``names``: the conv's and the norm's attribute paths
    (error messages); ``last``: the name of the last module the link stands for."""

    conv: nn.Conv2d
    bn: nn.Module
    act: nn.Module | None
    names: tuple[str, str]
    last: str = ""

    @property
    def relu(self) -> bool:
        return self.act is not None or norm_relu(self.bn)


@dataclass(frozen=True, eq=False)
class Chain:
    """Consecutive links, each but the last followed by a ReLU; ``add``: the residual add comes
    right after the last BN, then ``relu`` (the ReLU module ``post`` after the add, or the last
    link's own ReLU)."""

    links: tuple[Link, ...]
    relu: bool
    add: bool = False
    post: nn.Module | None = None


def link(conv, bn, act, names: tuple[str, str], last: str = "") -> Link | None:
    """A Link when the modules can run fused (no hooks on them, a ReLU module if any), else
    None. ``last``: the name of the last module (default: the norm's)."""
    if link_reasons(conv, bn, names[0]) or has_hooks(conv) or has_hooks(bn):
        return None
    if act is not None and (norm_relu(bn) or not is_relu(act)):
        return None
    return Link(conv, bn, act, names, last or names[1])


def fused_or(lk: Link | None, *mods: nn.Module) -> list[object]:
    """``[lk]``, or the modules it would stand for when they cannot run fused (``lk`` None)."""
    return [lk] if lk is not None else list(mods)


def links_of(
    named: Sequence[tuple[str, nn.Module]], exposed: frozenset[str] = frozenset()
) -> list[object]:
    """The items of modules run one after another (an ``nn.Sequential``'s children): a conv and
    a norm right after it (and an ``nn.ReLU`` right after those) become a Link, every other
    module stays itself. ``exposed``: names whose output the caller needs (a Link must end at
    one of them, never pass over it)."""
    items: list[object] = []
    i = 0
    while i < len(named):
        if i + 1 < len(named) and named[i][0] not in exposed:
            (cn, conv), (bn_name, bn) = named[i], named[i + 1]
            act_name, act = named[i + 2] if i + 2 < len(named) else ("", None)
            take_act = bn_name not in exposed and is_relu(act) and not norm_relu(bn)
            lk = link(conv, bn, act if take_act else None, (cn, bn_name),
                      act_name if take_act else bn_name)
            if lk is not None:
                items.append(lk)
                i += 3 if take_act else 2
                continue
        items.append(named[i][1])
        i += 1
    return items


def segments(items: Sequence[object], exposed: frozenset[str] = frozenset()) -> list[object]:
    """Group links into chains: a link with a ReLU continues into the next link (its BN + ReLU
    becomes that conv's prologue in training) unless its output is ``exposed`` or the norms'
    kinds differ; a chain whose last link has no ReLU takes a following ADD (and an ``nn.ReLU``
    after it) into its epilogue."""
    out: list[object] = []
    i = 0
    while i < len(items):
        it = items[i]
        if not isinstance(it, Link):
            out.append(it)
            i += 1
            continue
        links = [it]
        i += 1
        while (
            links[-1].relu
            and links[-1].last not in exposed
            and i < len(items)
            and isinstance(items[i], Link)
            and M._norm_kind(items[i].bn) == M._norm_kind(it.bn)
        ):
            links.append(items[i])
            i += 1
        last = links[-1]
        if not last.relu and i < len(items) and items[i] is ADD:
            i += 1
            post = items[i] if i < len(items) and is_relu(items[i]) else None
            i += post is not None
            out.append(Chain(tuple(links), post is not None, True, post))
        else:
            out.append(Chain(tuple(links), last.relu))
    return out


def chain_layers(items: Sequence[object]) -> list[nn.Module]:
    """The convs and norms that ``items`` run fused."""
    return [m for it in items if isinstance(it, Link) for m in (it.conv, it.bn)]


class ChainMixin(M._FusedMixin):
    """Runs item lists (see the module docstring) with fused chains."""

    def _run_items(
        self,
        x: Tensor,
        items: Sequence[object],
        shortcut: Callable[[], Tensor] | None = None,
        exposed: frozenset[str] = frozenset(),
    ) -> Tensor:
        """Run ``items`` on ``x``; ``shortcut`` computes the tensor ADD adds (called once, when
        the add is reached, as the plain block computes its downsample after its main path)."""
        h = x
        for seg in segments(items, exposed):
            if isinstance(seg, Chain):
                h = self._run_chain(h, seg, shortcut() if seg.add else None)
            elif seg is ADD:
                h = h + shortcut()
            else:
                h = seg(h)
        return h

    def _run_chain(self, x: Tensor, chain: Chain, shortcut: Tensor | None) -> Tensor:
        out = self._chain_fused(x, chain, shortcut)
        if out is not None:
            return out
        # As the modules run it: an empty batch, a backend that only the reference serves, or
        # BatchNorms of one chain in different modes.
        h = x
        last = len(chain.links) - 1
        for i, lk in enumerate(chain.links):
            h = lk.bn(lk.conv(h))
            if lk.act is not None and not (chain.add and i == last):
                h = lk.act(h)
        if chain.add:
            h = h + shortcut
            if chain.post is not None:
                h = chain.post(h)
        return h

    def _chain_fused(self, x: Tensor, chain: Chain, shortcut: Tensor | None) -> Tensor | None:
        links = chain.links
        first = links[0]
        where = type(self).__name__
        if M.plain_call(x) or M.global_hooks():
            return None  # traced, exported or hooked: the modules as they are
        if M._empty(x) and sync_group(first.bn) is None:
            return None
        if M._only_reference(x, first.conv, self.training):
            return None
        FF.check_input(x, first.conv.weight, where)
        for lk in links:
            M.check_pair_tensors(x, lk.conv, lk.bn, lk.names, where)
        batch = [self._use_batch_stats(lk.bn) for lk in links]
        if not any(batch):
            h = x
            for lk in links[:-1]:
                h = self._eval_conv(h, lk.conv, lk.bn, None, True)
            if shortcut is not None:
                shortcut = shortcut.contiguous(memory_format=FF.memory_format_of(h))
            return self._eval_conv(h, links[-1].conv, links[-1].bn, shortcut, chain.relu, True)
        if not all(batch):
            return None
        staged = [self._stage(lk.conv, lk.bn) for lk in links]
        return FF.residual_unit(
            x,
            [s for s, _ in staged],
            [p for _, p in staged],
            "none" if shortcut is None else "tensor",
            shortcut_tensor=shortcut,
            relu=chain.relu,
            process_group=sync_group(first.bn),
        )

    def _conv_add(self, x: Tensor, conv: nn.Conv2d, shortcut: Tensor) -> Tensor:
        """``conv(x) + shortcut`` as one fused op (the add in the conv's epilogue), for a conv
        that no BatchNorm follows (a pre-activation block's last conv)."""
        if (M.plain_call(x) or M.global_hooks() or M._empty(x)
                or M._only_reference(x, conv, self.training)):
            return conv(x) + shortcut
        FF.check_input(x, conv.weight, type(self).__name__)
        res = shortcut.contiguous(memory_format=FF.memory_format_of(x))
        return FF.conv_bias_act(
            x, conv.weight, None, res, conv.stride, conv.padding, conv.dilation, conv.groups,
            relu=False,
        )


def conv_add_reasons(conv: nn.Module, where: str) -> list[str]:
    """Why ``conv`` cannot run as a fused conv + add; empty when it can."""
    reasons = M._conv_bn_reasons(conv, _STAND_IN_NORM, where)
    return reasons + (["hooks"] if has_hooks(conv) else [])

