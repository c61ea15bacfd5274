"""How a fused residual block's eval calls run: as its plan.

An eval call (no autocast, not traced by ``torch.compile``) runs the block's :class:`EvalPlan`
for that input signature and grad mode. :meth:`EvalPlan.build` makes it, the first time and
whenever the plan no longer applies, after every check of the block (fusability, the input and
each conv/BN tensor's dtype and device, BatchNorm modes, one dispatcher choice for the whole
block, the BN folds and whether they keep NaN/Inf where the unfolded layers put them); a call
then costs the plan's check and the ops. Why a plan: measured on the 2-CPU AMD EPYC, idle,
torchvision ResNet-50 converted, bf16, channels_last, N=1, 2 threads, at 32x32 input (kernels
~2 ms), re-checking everything per call cost ~10 ms of Python around 52 fused ops (18.7 ms per
call against eager's 20.8); with the plan 9.9 ms, and 32.3 -> 27.3 ms (p50, alternating in one
process) at 224x224.

A plan applies while everything it depends on is unchanged:

* the block is in eval mode and so is every BatchNorm of it; grad mode is the plan's; autocast is
  off for the input's device; ``torch.compile`` is not tracing;
* the input has the plan's dtype, device, shape and memory format, and ``FASTRES_BACKEND`` is
  what it was;
* the block's submodules are the same objects (a replaced conv/BN/downsample re-plans), each
  conv still has no bias;
* (a plan with folds: on the CPU, without autograd) every fold is current: one fingerprint of
  the values of every conv weight and BN tensor of the block (``fastres_cpu::fingerprint``, one
  read pass; it sees an optimizer step, ``load_state_dict``, ``.to()``, and writes through
  ``.data`` or ``.numpy()`` that leave the version counters alone) equals the plan's, and every
  BN's ``eps`` is the plan's. A frozen block (``fastres.freeze``) compares their identities,
  version counters and data pointers instead: writes through ``.data`` are not seen.

A plan whose backend has a whole-block entry (``direct``) also writes its steady-state call out
as one generated function (``fast``, fastres.nn.fast_path): the same checks, stricter, then the
direct call; where it answers None, :meth:`EvalPlan.call` checks as below. So does a CPU plan
with folds: its call (``cpu_block_eval``, csrc/cpu/block_cpu_py.h) checks the folds against the
sources, takes the NaN bound and runs :meth:`EvalPlan.run`'s ops from C++; given the previous
block's proven output bound (fastres.ResNet's body), it skips the bound's read of the input
while that bound is within ``m_max``.

Otherwise a new plan is built. Where none can serve (a fold that would move NaN/Inf, a
FrozenBatchNorm2d that promotes the output dtype, only the reference path for the input), and
for autocast and traces, the block's full path runs each convolution through ``_eval_conv``.
A plan made with autograd on is live (no folds): each convolution through its autograd
Function with the BatchNorm in its epilogue, so gradients reach the input, the weights and the
BatchNorm's affine parameters. Not re-checked per call: a conv's stride, padding, dilation and
groups (plain attributes nobody changes after construction; assign a new ``nn.Conv2d`` instead,
which re-plans). ``FASTRES_EVAL_PLAN=0`` turns plans off.

**The ReLU on the CPU.** oneDNN's ReLU post-op maps NaN to 0 where torch.relu keeps it, so the
CPU backend's conv_bias_act runs the ReLU as a separate read and write of each output
(csrc/cpu/ops_infer.cpp). A plan whose convolutions all run on the CPU backend proves per call
that no NaN can reach a ReLU instead: one read pass gives M = max |x| of the block input
(``fastres_cpu::absmax``; NaN or Inf make it non-finite), and the folded weights give each
stage's bound, pre-activation <= M * a + b, with a and b from the per-output-channel L1 norm of
each folded weight and the largest |bias| (a convolution's output is at most its input's max
times that norm, every partial sum of it too). When M is at most the plan's ``m_max`` (every
stage's bound under ``_LIMIT``, far below where anything overflows), every pre-activation is a
finite number and the convolutions take the ReLU as oneDNN's post-op
(``fastres_cpu::conv_bias_act_finite``); otherwise (a NaN/Inf input, huge values, non-finite
weights) the ReLU pass runs as before. The check reads the block input once where the passes
read and wrote every ReLU output.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fastres._autograd import _ConvBiasActFn
from fastres._autograd_block import block_call
from fastres._specs import ConvSpec
from fastres.functional import (
    check_input,
    fingerprint,
    fold_dtypes,
    fold_sources,
    memory_format_of,
    select_backend,
    versions,
)
from fastres.nn._fused import _onnx_exporting, global_hooks
from fastres.nn.fast_path import make_cpu_eval_fast, make_eval_fast

#: The largest bound a pre-activation may have for the post-op ReLU: far below float32's and
#: bfloat16's 3.4e38, so rounding (2^-8 relative per stored bf16 value, accumulation order)
#: cannot carry a bounded sum to Inf; float16 uses a quarter of its 65504.
_LIMIT = 1e30
#: Relative slack per stage for rounding the stored activations up.
_SLACK = 1.01

__all__ = ["EvalPlan", "applies", "enabled"]


def enabled() -> bool:
    """Whether fused blocks may run eval plans (``FASTRES_EVAL_PLAN``, default on)."""
    return os.environ.get("FASTRES_EVAL_PLAN", "1").strip() != "0"


def applies(block: nn.Module, x) -> bool:
    """Whether ``block``'s call on ``x`` is one that plans serve: eval (with autograd or not), no
    autocast, not traced by torch.compile, a plain tensor, plans on."""
    return (
        type(x) is Tensor
        and not block.training
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
        and enabled()
    )


class EvalPlan:
    """What one fused eval call of a residual block did, to repeat it without re-checking.

    ``steps``: the main path's (conv, bn, op) in order (the last one takes the residual);
    ``shortcut``: None (identity), ``("pair", conv, bn, op)`` (a fused conv + BN downsample) or
    ``("module", ds)`` (a downsample module run as it is)."""

    __slots__ = ("mods", "dtype", "device", "shape", "channels_last", "backend_env", "bns",
                 "convs", "steps", "shortcut", "wdt", "bdt", "fmt", "folds", "eps", "sources",
                 "frozen", "live", "grad", "m_max", "out_bound", "finite_op", "absmax", "into_op",
                 "direct", "subtree", "eager", "fast")

    def __init__(self, block: nn.Module, x: Tensor, steps, shortcut, wdt, bdt, fmt,
                 folds, all_cpu: bool) -> None:
        self.mods = tuple(block._modules.values())
        # Every module under the block: a hook on any of them sends the call to the plain forward
        # (fastres.nn._fused.inner_hooks); one flat pass instead of a walk per call.
        self.subtree = tuple(m for m in block.modules() if m is not block)
        self.dtype = x.dtype
        self.device = x.device
        self.shape = x.shape
        self.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        self.backend_env = os.environ.get("FASTRES_BACKEND")
        self.steps = tuple(steps)
        self.shortcut = shortcut
        pairs = [(c, b) for c, b, _ in self.steps]
        if shortcut is not None and shortcut[0] == "pair":
            pairs.append((shortcut[1], shortcut[2]))
        self.convs = tuple(c for c, _ in pairs)
        self.bns = tuple(b for _, b in pairs)
        self.wdt, self.bdt, self.fmt = wdt, bdt, fmt
        # None: live, the BatchNorms' scale and shift computed per call for the epilogue.
        self.folds = None if folds is None else tuple(folds)
        self.eps = tuple(float(bn.eps) for bn in self.bns)
        # Made for a call that needs autograd: live, each convolution through its autograd
        # Function (grad mode on and the input or a conv/BN tensor requiring gradients).
        self.grad = _needs_autograd(x, [t for c, b in zip(self.convs, self.bns, strict=True)
                                        for t in fold_sources(c, b)])
        # Live: where each call reads the tensors from, (dict, name) per tensor: the modules'
        # own parameter or buffer dicts (FrozenBatchNorm2d keeps its weight and bias as
        # buffers), which assignments and load_state_dict update; a dict read instead of
        # nn.Module.__getattr__'s fallback chain.
        self.live = tuple(
            (_slot(c, "weight"), _slot(b, "bias"), _slot(b, "weight"), _slot(b, "running_mean"),
             _slot(b, "running_var"), e)
            for c, b, e in zip(self.convs, self.bns, self.eps, strict=True)
        )
        # The values every fold was computed from (fastres_cpu::fingerprint), checked per call;
        # a frozen block's (fastres.convert(freeze=True)): identities and version counters.
        self.frozen = bool(block.__dict__.get("_fr_frozen"))
        self.sources = None if folds is None else _sources(self.convs, self.bns, self.frozen)
        self.m_max, self.finite_op, self.absmax, self.into_op = math.nan, None, None, None
        # The block output's bound, affine in the input's M (_stage_bounds), where m_max is known.
        self.out_bound = (math.nan, math.nan)
        self.direct = None
        self.fast = None  # the steady-state call written out (fastres.nn.fast_path)
        self.eager = False
        if all_cpu and shortcut_bound_known(shortcut):
            ns = getattr(torch.ops, "fastres_cpu", None)
            if ns is not None and hasattr(ns, "conv_bias_act_finite"):
                bounds, self.out_bound = _stage_bounds(folds, len(self.steps), shortcut)
                self.m_max = _bound_limit(bounds, x.dtype)
                self.finite_op, self.absmax = ns.conv_bias_act_finite, ns.absmax
                self.into_op = getattr(ns, "conv_bias_act_finite_into", None)

    @staticmethod
    def build(block: nn.Module, x: Tensor) -> EvalPlan | None:
        """The plan of ``block``'s eval calls on inputs like ``x``, after every check the full
        path makes (a bad input raises here, as there); None where a plan cannot serve: the
        block is not the fusable pattern, only the reference path serves ``x``, an empty batch,
        BatchNorms with batch statistics, a fold that would move NaN/Inf (run unfolded), or a
        FrozenBatchNorm2d whose dtype promotes the output. The dispatcher is asked once, for the
        whole block (one backend serves all its convolutions, as in training)."""
        from fastres.nn._fused import (  # noqa: PLC0415  (the nn layer: _fused imports us)
            _downsample_pair,
            _empty,
            _only_reference,
            check_pair_tensors,
        )

        if block._fusable_reasons():
            return None
        named = list(block._pairs)
        pairs = [(getattr(block, c), getattr(block, b)) for c, b in named]
        if _only_reference(x, pairs[0][0], False) or _empty(x):
            return None
        ds = block.downsample
        ds_pair = _downsample_pair(ds, pairs[0][1])
        if ds_pair is not None:
            named.append(("downsample.0", "downsample.1"))
        all_pairs = pairs + ([ds_pair] if ds_pair is not None else [])
        where = type(block).__name__
        check_input(x, pairs[0][0].weight, where)
        for (conv, bn), names in zip(all_pairs, named, strict=True):
            check_pair_tensors(x, conv, bn, names, where)
            if block._use_batch_stats(bn):
                return None
        wdt, bdt = fold_dtypes(x)
        for _, bn in all_pairs:
            if type(bn) is FrozenBatchNorm2d and torch.promote_types(wdt, bn.weight.dtype) != wdt:
                return None
        grad = _needs_autograd(x, [t for c, b in all_pairs for t in fold_sources(c, b)])
        backend = select_backend(x, [c.weight for c, _ in all_pairs],
                                 [ConvSpec.of(c) for c, _ in all_pairs], training=grad)
        op = _autograd_op(backend) if grad else backend.op("conv_bias_act")
        folds = None  # live: the BatchNorms in the epilogues (no cache off the CPU)
        if not grad and block._fold_cacheable(*all_pairs[0]):
            folds = [block._folded(c, b, wdt, bdt) for c, b in all_pairs]
            if not all(f[2] for f in folds):
                return None
        steps = [(c, b, op) for c, b in pairs]
        if ds_pair is not None:
            shortcut = ("pair", ds_pair[0], ds_pair[1], op)
        elif ds is not None:
            shortcut = ("module", ds)
        else:
            shortcut = None
        all_cpu = folds is not None and backend.name == "cpu"
        plan = EvalPlan(block, x, steps, shortcut, wdt, bdt, memory_format_of(x), folds, all_cpu)
        # Ops that bypass the dispatcher (Triton's eager bodies): a dispatch mode must not meet
        # them (run() steps aside then).
        plan.eager = not isinstance(op, torch._ops.OpOverloadPacket) and backend.name == "triton"
        entry = backend.eager_block()
        if (entry is not None and folds is None and shortcut_bound_known(shortcut)
                and (entry[2] is not None or not grad)):
            # The whole block in one call into the extension (csrc/cuda/block_py.h): each
            # convolution's launcher called from C++, the BatchNorms in their epilogues; with
            # autograd, recorded as one node of the autograd graph (fastres._autograd_block).
            make_spec, run, node = entry
            spec = make_spec(len(steps), shortcut is not None, tuple(
                (*c.stride, *c.padding, *c.dilation, c.groups, eps)
                for c, eps in zip(plan.convs, plan.eps, strict=True)))
            slots = tuple(s for live in plan.live for s in live[:5])
            if grad:
                convs = tuple(ConvSpec.of(c) for c in plan.convs)
                plan.direct = (block_call(run, node, spec, convs, plan.eps, len(steps),
                                          backend.name), None, slots)
            else:
                plan.direct = (run, spec, slots)
            plan.fast = make_eval_fast(plan, block, x)
        elif plan.finite_op is not None:
            plan.fast = _folded_fast(plan, block, x, backend)
        return plan

    def call(self, block: nn.Module, x, donate: bool = False) -> Tensor | None:
        """The block's output when this plan serves the call, else None (the block's forward
        then decides): the forward's checks before a plan runs (not traced, exported or
        compiled, no hook inside the block, eval without autocast) and the plan's own, in one
        pass. A submodule replaced since the plan was made fails the plan's check."""
        fast = self.fast
        if fast is not None:  # the same checks, stricter, then the direct call
            out = fast(block, x, donate)
            if out is not None:
                return out
        # plain_call's and applies' tests in one expression (autocast: _valid); ~0.2 µs per
        # call and module saved against calling them, which a 25 µs budget per block notices.
        if (type(x) is not Tensor or block.training or torch.compiler.is_compiling()
                or torch._C._is_tracing() or ("torch.onnx" in sys.modules and _onnx_exporting())
                or global_hooks() or not enabled()):
            return None
        for m in self.subtree:  # _hooked_here, inline
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or (
                    m._backward_pre_hooks):
                return None
        return self.run(block, x, donate)

    def _valid(self, block: nn.Module, x: Tensor) -> bool:
        if (
            block.training
            or x.dtype != self.dtype
            or x.device != self.device
            or x.shape != self.shape
            or x.is_contiguous(memory_format=torch.channels_last) != self.channels_last
            or torch.is_autocast_enabled(self.device.type)
            or (self.grad and not torch.is_grad_enabled())
            or os.environ.get("FASTRES_BACKEND") != self.backend_env
            or tuple(block._modules.values()) != self.mods
        ):
            return False
        if self.shortcut is not None and self.shortcut[0] == "pair":
            ds = block._modules.get("downsample")
            if ds is None or tuple(ds._modules.values()) != (self.shortcut[1], self.shortcut[2]):
                return False
        for bn, eps in zip(self.bns, self.eps, strict=True):
            if bn.training or bn.eps != eps:
                return False
        for conv in self.convs:
            if conv._parameters.get("bias") is not None:
                return False
        return True

    def _needs_autograd(self, x: Tensor) -> bool:
        """Grad mode being on: whether this call needs autograd (the input or a live tensor
        requires gradients; a Parameter assigned since the plan was made is read as it is)."""
        return x.requires_grad or any(
            t is not None and t.requires_grad
            for *slots, _ in self.live for t in map(_read, slots))

    def run(self, block, x: Tensor, donate: bool = False) -> Tensor | None:
        """The block's output, or None when the plan does not apply (run the full path).
        ``donate``: the caller owns ``x`` and no longer needs it, so an identity shortcut's
        residual add may write into it (fastres.ResNet's own intermediates); a fused
        downsample's output is the plan's own and is always written into."""
        if not self._valid(block, x):
            return None
        dispatch_mode = torch._C._len_torch_dispatch_stack()
        if self.direct is not None and not dispatch_mode:
            # No dispatch mode to see each op (a TorchDispatchMode, FakeTensorMode): the block's
            # convolutions from C++, with the tensors as they are now (read once: the autograd
            # check below and the call use the same reads).
            run, spec, slots = self.direct
            ts = [_read(s) for s in slots]
            if torch.is_grad_enabled() and (x.requires_grad or any(
                    t is not None and t.requires_grad for t in ts)) != self.grad:
                return None
            if spec is None:  # with autograd: one node of the autograd graph for the block
                return run(x, *ts)
            return run(spec, x, tuple(ts))
        if torch.is_grad_enabled() and self._needs_autograd(x) != self.grad:
            return None
        if dispatch_mode and self.eager:
            return None  # its ops skip the dispatcher: a plan of registered ops instead
        if self.folds is None:  # live: each BatchNorm in its convolution's epilogue, as it is now
            folds = [(_read(w), _read(b), (_read(g), _read(m), _read(v), eps))
                     for w, b, g, m, v, eps in self.live]
        else:
            # One read of the block's conv weights and BN tensors: the folds are current only
            # if their values are (writes through .data leave the version counters alone).
            frozen = self.frozen
            if (self.sources is None or block.__dict__.get("_fr_frozen") is not frozen
                    or _sources(self.convs, self.bns, frozen) != self.sources):
                return None
            folds = [(w, b, None) for w, b, _ in self.folds]
        relu_op = None
        if self.finite_op is not None and self.absmax(x) <= self.m_max:  # NaN: False
            relu_op = self.finite_op
        h = x
        last = len(self.steps) - 1
        for i, (conv, _, op) in enumerate(self.steps[:-1]):
            h = _conv(relu_op or op, h, folds[i], None, conv, True)
        sc = self.shortcut
        if sc is None:
            identity = x
        elif sc[0] == "pair":
            identity = _conv(sc[3], x, folds[-1], None, sc[1], False)
        else:
            identity = sc[1](x)
        identity = identity.contiguous(memory_format=self.fmt)
        conv, _, op = self.steps[last]
        owned = (sc is not None and sc[0] == "pair") or (
            sc is None and (donate or identity is not x)  # not x: .contiguous() copied it
        )
        if relu_op is not None and self.into_op is not None and owned:
            # The residual buffer is ours: the convolution accumulates into it in place.
            w, b, _ = folds[last]
            return self.into_op(identity, h, w, b, conv.stride, conv.padding, conv.dilation,
                                conv.groups, True)
        return _conv(relu_op or op, h, folds[last], identity, conv, True)


def _folded_fast(plan: EvalPlan, block: nn.Module, x: Tensor, backend):
    """The steady state of a CPU plan with folds as one generated function whose call is one
    call into the extension (fastres.nn.fast_path.make_cpu_eval_fast), or None (no such entry,
    sources without a fold check it can repeat)."""
    entry = backend.eager_folded_block()
    if entry is None or plan.sources is None:
        return None
    make_spec, run = entry
    # The sources in fold_sources' order (the fingerprint's), read as the plan reads them.
    slots = tuple(s for w, b, g, m, v, _ in plan.live for s in (w, g, b, m, v))
    fp = plan.sources if isinstance(plan.sources, int) else None
    spec = make_spec(
        len(plan.steps), plan.shortcut is not None,
        tuple((*c.stride, *c.padding, *c.dilation, c.groups) for c in plan.convs),
        tuple(t for w, b, _ in plan.folds for t in (w, b)), float(plan.m_max),
        *map(float, plan.out_bound), plan.fmt is torch.channels_last, fp,
        tuple(_read(s) for s in slots))
    return make_cpu_eval_fast(plan, block, x, run, spec, slots)


def _needs_autograd(x: Tensor, tensors) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in tensors))


def _autograd_op(backend):
    """conv_bias_act with gradients, called as the op is: the reference op is plain PyTorch,
    the others go through their autograd Function (fastres._autograd)."""
    if backend.name == "reference":
        return backend.op("conv_bias_act")
    name = backend.name

    def op(x, w, b, residual, stride, padding, dilation, groups, relu, *bn):
        spec = ConvSpec(tuple(stride), tuple(padding), tuple(dilation), groups)
        return _ConvBiasActFn.apply(x, w, b, residual, spec, relu, name, *bn)

    return op


def _slot(module: nn.Module, name: str) -> tuple[dict, str, nn.Module]:
    """Where ``module``'s tensor ``name`` lives: its parameter or its buffer dict (for _read)."""
    return (module._parameters if name in module._parameters else module._buffers), name, module


def _read(slot) -> Tensor | None:
    """``getattr(module, name)`` of a _slot by one dict read; the attribute itself when the dict
    holds no tensor (an absent affine part, or a tensor moved between parameters and buffers)."""
    t = slot[0].get(slot[1])
    return t if t is not None else getattr(slot[2], slot[1], None)


def _conv(op, x: Tensor, fold, residual, conv: nn.Conv2d, relu: bool) -> Tensor:
    """``op`` (conv_bias_act or the CPU's finite variant) with a fold (weight, bias, None) or the
    live weight, the BatchNorm's bias and (weight, running_mean, running_var, eps) for the
    epilogue."""
    w, b, bn = fold
    args = (x, w, b, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu)
    return op(*args) if bn is None else op(*args, *bn)


def _sources(convs, bns, frozen: bool):
    """fastres.functional.fingerprint of every conv weight and BN tensor of a plan, or their
    fastres.functional.versions when the block is frozen."""
    ts = [t for c, b in zip(convs, bns, strict=True) for t in fold_sources(c, b)]
    return versions(ts) if frozen else fingerprint(ts)


def shortcut_bound_known(shortcut) -> bool:
    """The identity and a fused conv + BN downsample have a bound; a downsample module not."""
    return shortcut is None or shortcut[0] == "pair"


def _norms(w: Tensor, b: Tensor | None) -> tuple[float, float]:
    """(max over output channels of sum |w|, max |b|) in float64: a conv + bias output is at
    most max|input| * the first + the second."""
    with torch.no_grad():
        a = float(w.detach().double().abs().sum(dim=(1, 2, 3)).max()) if w.numel() else 0.0
        c = float(b.detach().double().abs().max()) if b is not None and b.numel() else 0.0
    return a, c


def _stage_bounds(folds, n_steps: int, shortcut, residual: bool = True):
    """Each pre-activation's bound, affine in M = max |x| of the input as (coefficient of M,
    constant), and the output's (the last bound with the slack for storing it rounded): a ReLU
    output is at most its pre-activation's magnitude. ``residual``: the last step adds the
    shortcut (a block); without it, a chain of convolutions (the stem)."""
    bounds = []
    q = (1.0, 0.0)
    for i in range(n_steps):
        a, c = _norms(folds[i][0], folds[i][1])
        p = (q[0] * a, q[1] * a + c)
        if i == n_steps - 1 and residual:
            if shortcut is None:
                s = (1.0, 0.0)
            else:
                ad, cd = _norms(folds[-1][0], folds[-1][1])
                s = (ad, cd)
                bounds.append(s)
            p = (p[0] + s[0], p[1] + s[1])
        bounds.append(p)
        q = (p[0] * _SLACK, p[1] * _SLACK)
    return bounds, q


def _bound_limit(bounds, dtype: torch.dtype) -> float:
    """The largest M for which every bound is under the limit (NaN when one is not finite)."""
    limit = min(_LIMIT, torch.finfo(dtype).max / 4)
    # At most the limit itself: a stage with all-zero weights bounds its output whatever M is,
    # but an infinite input still makes 0 * Inf = NaN there, which the post-op would turn to 0.
    m_max = limit
    for k, c in bounds:
        if not (math.isfinite(k) and math.isfinite(c)) or c >= limit:
            return math.nan
        if k > 0:
            m_max = min(m_max, (limit - c) / (k * _SLACK))
    return m_max


def _max_input(folds, n_steps: int, shortcut, dtype: torch.dtype, residual: bool = True) -> float:
    """The largest max |x| of a block input for which every pre-activation of the block is
    bounded by the limit (NaN when a weight or bias is not finite: never). ``residual``: the
    last step adds the shortcut (a block); without it, a chain of convolutions (the stem)."""
    return _bound_limit(_stage_bounds(folds, n_steps, shortcut, residual)[0], dtype)
