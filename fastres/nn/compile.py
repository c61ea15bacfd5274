"""torch.compile of a converted model, inference: each fused module as one opaque graph node.

Traced, a fused module's eval forward recomputes the BatchNorm fold inside the graph on every
call, so the folded weights are new tensors each time and the CPU backend re-packs every weight
into oneDNN's blocked layout per call (it caches packings of stable tensors only: Inductor may
reuse a buffer for another weight without a version bump). Measured on the 2-CPU AMD EPYC,
ResNet-50 fp32 N=1 (bench_peers): ``torch.compile(fastres.convert(m))`` 64.2 ms against 46.2 ms
for ``fastres.convert(m)`` itself.

So when torch.compile traces an inference call (no gradient needed: grad mode off, or neither
the input nor a parameter requiring one; the module and its BatchNorms in eval mode, no
autocast, not torch.export), a fused module becomes one call of the custom op
``fastres::_module_forward``: at run time the op runs the module's own eager forward (cached
fold, prepacked weights, eval plan), and at trace time its fake computes the output's shape from
the convolutions. No graph break, so ``fullgraph=True`` still compiles; Inductor compiles what
lies between the fused modules (max-pool, avg-pool, fc). Training, and eval calls that need
gradients, trace the fused ops. The op finds its module through a handle registered when the module becomes fused
(``register``); the op is not serialisable (a graph holding it needs the live model).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor, nn

__all__ = ["body_traceable", "compiled_inference", "opaque_body", "opaque_forward", "register"]

_HANDLES: dict[int, weakref.ref] = {}
_NEXT = itertools.count(1)


def register(module: nn.Module) -> int:
    """A new handle for ``module`` (held weakly)."""
    h = next(_NEXT)
    _HANDLES[h] = weakref.ref(module, lambda _, h=h: _HANDLES.pop(h, None))
    return h


def _lookup(handle: int) -> nn.Module:
    ref = _HANDLES.get(handle)
    mod = ref() if ref is not None else None
    if mod is None:
        raise RuntimeError(
            f"fastres::_module_forward: the fused module of handle {handle} no longer exists "
            "(a compiled graph outlived its model)"
        )
    return mod


def _exporting() -> bool:
    f = getattr(torch.compiler, "is_exporting", None)
    return bool(f()) if f is not None else False


def compiled_inference(module: nn.Module, x, bns=None) -> bool:
    """torch.compile is tracing an inference call of ``module`` that the opaque op may run:
    no gradient to compute (grad mode off, or neither ``x`` nor any parameter of ``module``
    requires one: a model with frozen parameters called without ``torch.no_grad()``, whose eager
    call keeps its folds and packed weights too; Dynamo guards on ``requires_grad``, so a
    parameter unfrozen later re-traces), ``module`` and its BatchNorms (``bns``, default: all its
    submodules) in eval mode, no autocast, not exporting."""
    if not torch.compiler.is_compiling() or _exporting():
        return False
    if not isinstance(x, Tensor) or x.dim() != 4 or torch.is_autocast_enabled(x.device.type):
        return False
    if "_fr_handle" not in module.__dict__:
        return False
    if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    mods = module.modules() if bns is None else bns
    return not any(m.training for m in mods)


def _conv_out(h, w, conv: nn.Conv2d):
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _main_convs(mod: nn.Module, stem: bool) -> list[nn.Conv2d]:
    if stem:
        return [mod.conv1]
    pairs = getattr(mod, "_pairs", None)
    if pairs is not None:
        return [getattr(mod, c) for c, _ in pairs]
    return [mod[0]]  # ConvBNReLU


def _empty_out(x: Tensor, c: int, h: int, w: int) -> Tensor:
    """The fake output: N x c x h x w in x's dtype, device and layout."""
    fmt = torch.channels_last if (
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    ) else torch.contiguous_format
    return torch.empty((x.shape[0], c, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _out_like(mod: nn.Module, x: Tensor, stem: bool) -> Tensor:
    h, w = x.shape[2], x.shape[3]
    convs = _main_convs(mod, stem)
    for conv in convs:
        h, w = _conv_out(h, w, conv)
    return _empty_out(x, convs[-1].out_channels, h, w)


@torch.library.custom_op("fastres::_module_forward", mutates_args=())
def _module_forward(x: Tensor, handle: int, stem: bool, params: list[Tensor]) -> Tensor:
    mod = _lookup(handle)
    with torch.no_grad():
        out = mod._stem(x) if stem else mod.forward(x)
    # A custom op's output may not alias its input (a fallback could return x itself).
    return out.clone() if out is x else out


@_module_forward.register_fake
def _(x: Tensor, handle: int, stem: bool, params: list[Tensor]) -> Tensor:
    return _out_like(_lookup(handle), x, stem)


def _pool_out(h, w, pool: nn.MaxPool2d):
    def one(size, k, s, p, d):
        span = size + 2 * p - d * (k - 1) - 1
        out = (-(-span // s) if pool.ceil_mode else span // s) + 1
        if pool.ceil_mode and (out - 1) * s >= size + p:
            out -= 1  # the last window must start inside the input or its left padding
        return out

    k, s, p, d = (v if isinstance(v, tuple) else (v, v) for v in
                  (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding, pool.dilation))
    return one(h, k[0], s[0], p[0], d[0]), one(w, k[1], s[1], p[1], d[1])


def body_traceable(resnet: nn.Module) -> bool:
    """A fastres.ResNet whose body (stem, max-pool, layer1-4) has a shape this module can
    compute without running it: a Conv2d stem, an nn.MaxPool2d, Sequentials of fused residual
    blocks (fused: registered here; residual: their (conv, bn) ``_pairs`` give the shape)."""
    if not isinstance(resnet.conv1, nn.Conv2d) or type(resnet.maxpool) is not nn.MaxPool2d:
        return False
    layers = (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    return all(
        type(layer) is nn.Sequential
        and len(layer) > 0
        and all("_fr_handle" in b.__dict__ and hasattr(b, "_pairs") for b in layer)
        for layer in layers
    )


def _body_out_like(resnet: nn.Module, x: Tensor) -> Tensor:
    h, w = _conv_out(x.shape[2], x.shape[3], resnet.conv1)
    h, w = _pool_out(h, w, resnet.maxpool)
    c = resnet.conv1.out_channels
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for blk in layer:
            for conv in _main_convs(blk, False):
                h, w = _conv_out(h, w, conv)
                c = conv.out_channels
    return _empty_out(x, c, h, w)


@torch.library.custom_op("fastres::_resnet_body", mutates_args=())
def _resnet_body(x: Tensor, handle: int, params: list[Tensor]) -> Tensor:
    mod = _lookup(handle)
    with torch.no_grad():
        out = mod._body(x)
    return out.clone() if out is x else out


@_resnet_body.register_fake
def _(x: Tensor, handle: int, params: list[Tensor]) -> Tensor:
    return _body_out_like(_lookup(handle), x)


def opaque_body(resnet: nn.Module, x: Tensor) -> Tensor:
    """A fastres.ResNet's stem, max-pool and four layers as ONE call of an opaque op: the
    converted model's own eager path at run time (its plans, and the inter-block activations it
    donates to the residual adds), one dispatch instead of one per fused module. Inductor
    compiles the average pool and the classifier around it."""
    mods = (resnet.conv1, resnet.bn1, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    params = [t for m in mods for t in (*m.parameters(), *m.buffers())]
    return _resnet_body(x, resnet.__dict__["_fr_handle"], params)


def opaque_forward(module: nn.Module, x: Tensor, stem: bool = False) -> Tensor:
    """``module``'s inference forward (or its stem) as one call of the opaque op."""
    params = [*module.parameters(), *module.buffers()]
    if stem:
        params = [*module.conv1.parameters(), *module.bn1.parameters(), *module.bn1.buffers()]
    return _module_forward(x, module.__dict__["_fr_handle"], stem, params)
