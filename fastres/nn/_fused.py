"""What every fused module shares (fastres.nn): the BatchNorm fold and its values check, the
checks of a conv/BN pair against the input, the train-mode stage description, and the calls that
run a module's plain forward instead (tracing, export, hooks inside it).

Eval folds each BatchNorm into its convolution. The fold is cached only where it can be proven
current on every call without a host-device sync: CPU tensors, checked by one read of their
values (fastres_cpu::fingerprint), so optimizer steps, ``load_state_dict`` and writes through
``.data`` or ``.numpy()`` are all seen; anything else folds on every call from the live tensors.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module
from torchvision.ops.misc import FrozenBatchNorm2d

from fastres import functional as FF
from fastres.functional import BNSpec, ConvSpec, Stage
from fastres.nn import compile as OP
from fastres.nn.distributed import SyncBatchNorm, sync_group

__all__ = [
    "check_pair_tensors",
    "global_hooks",
    "hooked_inner_modules",
    "inner_hooks",
    "pair_reasons",
    "plain_call",
]


def _conv_bn_reasons(conv: nn.Module, bn: nn.Module, where: str) -> list[str]:
    reasons = []
    if type(conv) is not nn.Conv2d:
        reasons.append(f"{where}: {type(conv).__name__} is not a plain nn.Conv2d")
    else:
        if conv.bias is not None:
            reasons.append(f"{where}: the convolution has a bias")
        if isinstance(conv.padding, str):
            reasons.append(f"{where}: padding={conv.padding!r} is not numeric")
        if conv.padding_mode != "zeros":
            reasons.append(f"{where}: padding_mode={conv.padding_mode!r}")
    if type(bn) not in _NORMS:
        reasons.append(
            f"{where}: {type(bn).__name__} is not nn.BatchNorm2d, nn.SyncBatchNorm or "
            "FrozenBatchNorm2d"
        )
    return reasons


#: The norm layers a fused block folds or normalises with batch statistics.
_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm)


def _norm_kind(bn: nn.Module) -> str:
    """What a norm layer needs of the fused path: "bn", "sync:<group>" or "frozen"."""
    if type(bn) is FrozenBatchNorm2d:
        return "frozen"
    if isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm)):
        return f"sync:{id(bn.process_group)}"
    return "bn"


def _mixed_norm_reason(bns: list[nn.Module], where: str) -> list[str]:
    # Batch statistics for some layers and frozen ones for others, or statistics over different
    # process groups, cannot share one fused path.
    if not all(type(bn) in _NORMS for bn in bns):
        return []
    kinds = {_norm_kind(bn) for bn in bns}
    if len(kinds) <= 1:
        return []
    if len({k.split(":")[0] for k in kinds}) == 1:
        return [f"{where}: SyncBatchNorm layers with different process groups"]
    names = sorted({type(bn).__name__ for bn in bns})
    return [f"{where}: mixes {' and '.join(names)}"]


def _fold_is_exact(
    conv_weight: Tensor,
    folded: Tensor,
    bn_weight: Tensor | None,
    running_var: Tensor,
    eps: float,
) -> bool:
    """Whether the folded weight gives the unfolded conv + BN's NaN/Inf pattern for every input.

    It does unless a finite nonzero weight times a finite nonzero BN scale rounds to 0 or to
    +-Inf in the folded dtype: an underflow turns Inf * w * s = +-Inf into Inf * 0 = NaN
    (measured: conv weight 1e-30, gamma 1e-15, fp32, an Inf input value: torchvision 10 +Inf
    outputs, the fold NaN there), an overflow (float16 weights past 65504, e.g. gamma 300 with
    var ~ 0) turns 0 * w * s = 0 into 0 * Inf = NaN. A zero scale (gamma 0) is exact: Inf * 0 =
    NaN both ways; NaN/Inf statistics are exact too (every output of the channel NaN/Inf both
    ways). One pass over the weight, cached with the fold."""
    with torch.no_grad():
        acc = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
        scale = torch.rsqrt(running_var.to(acc) + eps)
        if bn_weight is not None:
            scale = bn_weight.to(acc) * scale
        s = scale.reshape(-1, 1, 1, 1)
        live = (conv_weight != 0) & conv_weight.isfinite() & (s != 0) & s.isfinite()
        lost = (folded == 0) | folded.isinf()
        return not bool((live & lost).any())


def check_pair_tensors(
    x: Tensor, conv: nn.Conv2d, bn: nn.Module, names: tuple[str, str], where: str
) -> None:
    """A clear error naming the conv or norm tensor whose device or dtype cannot go with ``x``
    (torchvision raises too, e.g. "expected scalar type Float but found Double", without naming
    it; unchecked, a fused path would compute with it or fail deep inside a kernel). BatchNorm's
    parameters and buffers share one dtype: the input's, or float32 for a float16/bfloat16
    input (under autocast: the autocast dtype), as ATen's batch_norm accepts. FrozenBatchNorm2d
    computes in its buffers' dtype (promoted), so only its device is checked."""
    dev, cdt = x.device, FF.compute_dtype(x)
    w = conv.weight
    if w.device != dev:
        raise RuntimeError(f"{where}: {names[0]}.weight is on {w.device} but the input is on {dev}")
    if FF.compute_dtype(w) != cdt:
        raise FF.DtypeError(
            f"{where}: {names[0]}.weight has dtype {w.dtype} but the input has dtype {x.dtype}"
        )
    allowed = {cdt, torch.float32} if cdt in (torch.float16, torch.bfloat16) else {cdt}
    dtypes = {}
    for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        t = getattr(bn, n, None)
        if t is None:
            continue
        if t.device != dev:
            raise RuntimeError(
                f"{where}: {names[1]}.{n} is on {t.device} but the input is on {dev}"
            )
        if n != "num_batches_tracked" and type(bn) is not FrozenBatchNorm2d:
            if t.dtype not in allowed:
                raise FF.DtypeError(
                    f"{where}: {names[1]}.{n} has dtype {t.dtype}; with a {cdt} input the "
                    f"BatchNorm tensors must be {' or '.join(sorted(str(d) for d in allowed))}"
                )
            dtypes[n] = t.dtype
    if len(set(dtypes.values())) > 1:
        mix = ", ".join(f"{names[1]}.{n} {d}" for n, d in dtypes.items())
        raise FF.DtypeError(
            f"{where}: BatchNorm tensors of one layer must share a dtype, got {mix}"
        )


def plain_call(x) -> bool:
    """Calls that run a fused module's plain forward (torchvision's or timm's, op by op), so
    that what traces or exports them records standard operators: ``torch.fx.symbolic_trace``
    (``x`` is a Proxy; torchvision's ``create_feature_extractor`` uses it), ``torch.jit.trace``
    and ``torch.onnx.export``. Each is one cheap test."""
    if not isinstance(x, Tensor):
        return True
    if torch.compiler.is_compiling():  # dynamo traces these functions (not torch._C's)
        onnx = sys.modules.get("torch.onnx")
        return torch.jit.is_tracing() or (onnx is not None and onnx.is_in_onnx_export())
    return torch._C._is_tracing() or ("torch.onnx" in sys.modules and _onnx_exporting())


_ONNX_FLAGS: list = []


def _onnx_exporting() -> bool:
    """torch.onnx.is_in_onnx_export() without its two imports per call (~0.5 µs): the flags it
    reads, found once. Another torch keeps them elsewhere: then its own function."""
    if not _ONNX_FLAGS:
        try:
            from torch.onnx._internal.exporter import _flags  # noqa: PLC0415
            from torch.onnx._internal.torchscript_exporter._globals import (  # noqa: PLC0415
                GLOBALS,
            )

            _ONNX_FLAGS.append(lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting)
        except ImportError:
            _ONNX_FLAGS.append(sys.modules["torch.onnx"].is_in_onnx_export)
    return _ONNX_FLAGS[0]()


def _hooked(mods) -> bool:
    """Whether any of ``mods`` or their submodules carries a forward, forward-pre or backward
    hook: then the block runs its plain forward, which calls every inner module (conv1, bn1,
    relu, ...) with the arguments torchvision's block gives them. A few dict truth tests per
    module (~1 us for a Bottleneck), no per-call state."""
    for m in mods:
        if _hooked_here(m):
            return True
        if m._modules and _hooked(m._modules.values()):
            return True
    return False


def global_hooks() -> bool:
    """A hook registered for every module (``torch.nn.modules.module.register_module_*``): it
    expects to see the inner modules of every block called."""
    return bool(
        _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
        or _nn_module._global_backward_hooks
        or _nn_module._global_backward_pre_hooks
    )


def inner_hooks(module: nn.Module) -> bool:
    """A hook on a submodule of ``module`` (or a global module hook): its fused path would skip
    the submodule's calls, so it runs its plain forward instead."""
    return global_hooks() or _hooked(module._modules.values())


def hooked_inner_modules(module: nn.Module) -> list[str]:
    """The modules inside ``module``'s fused path that carry hooks, by name (convert's report).
    The fused path is every submodule, or what ``module._hook_scope()`` names (a ResNet: its
    stem's modules; its layers are blocks of their own)."""
    scope = module._hook_scope() if hasattr(module, "_hook_scope") else module.named_children()
    out = []
    for name, child in scope:
        for sub, m in child.named_modules(prefix=name):
            if _hooked_here(m):
                out.append(sub)
    return out


def _hooked_here(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


class _FusedMixin:
    """Shared machinery: the eval-mode fold cache and the train-mode stage description."""

    _fold_cache: dict

    def _init_fused(self) -> None:
        self._fold_cache = {}
        # fastres.convert(freeze=True): folds checked by identity and version, not by values
        self.__dict__["_fr_frozen"] = False
        self.__dict__["_fr_handle"] = OP.register(self)  # fastres.nn.compile: torch.compile

    @staticmethod
    def _use_batch_stats(bn: nn.BatchNorm2d) -> bool:
        if type(bn) is FrozenBatchNorm2d:
            return False
        return bn.training or bn.running_mean is None or bn.running_var is None

    def _folded(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        dtype: torch.dtype,
        bias_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor, bool]:
        """(weight, bias, exact) of conv with bn folded in. ``exact``: see _fold_is_exact (always
        True while compiling: no data-dependent branch in a traced graph).

        Cached only where the cache can be proven current on every call without a host-device
        sync: CPU tensors, whose values are checked by one read pass (see _fold_key). Anything
        else folds on every call, from the live tensors (so does a differentiable or traced
        call: the fold is part of the autograd graph or the compiled program)."""
        tensors = FF.fold_sources(conv, bn)
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors
        )

        def fold():
            w, b = FF.fold_bn(*tensors, bn.eps, dtype, bias_dtype)
            if torch.compiler.is_compiling():
                return w, b, True
            return w, b, _fold_is_exact(conv.weight, w, bn.weight, bn.running_var, bn.eps)

        if differentiable or torch.compiler.is_compiling():
            return fold()
        key = self._fold_key(bn, dtype, bias_dtype, tensors)
        if key is None:
            with torch.no_grad():
                return fold()
        hit = self._fold_cache.get(id(conv))
        if hit is not None and hit[0] == key:
            return hit[1]
        # A fold made under torch.inference_mode would be an inference tensor, which has no
        # version counter, so the CPU backend could never keep its packing: every call of the
        # model would reorder every weight (measured: 53 reorders per ResNet-50 call). The fold
        # is the cache's own tensor, made as a normal one whatever mode the call runs in.
        with torch.inference_mode(False), torch.no_grad():
            folded = fold()
        _allow_prepacking(folded[0])
        self._fold_cache[id(conv)] = (key, folded)
        return folded

    def _fold_key(self, bn: nn.Module, dtype, bias_dtype, tensors) -> tuple | None:
        """What a fold depends on: the conv weight's and BN tensors' values, dtypes, sizes and
        strides (one fingerprint, fastres_cpu::fingerprint: a read of every byte, so writes
        through ``.data`` or ``.numpy()``, which leave the version counter alone, are seen), eps
        and the fold's dtypes. None where it cannot be checked without a host-device sync. A
        frozen module (``fastres.convert(freeze=True)``) checks identities and version counters
        instead (FF.versions): ``.data`` writes are not seen."""
        if tensors[0] is not None and tensors[0].device.type != "cpu":
            return None
        fp = FF.versions(tensors) if self.__dict__.get("_fr_frozen") else FF.fingerprint(tensors)
        if fp is None:
            return None
        return (dtype, bias_dtype, float(bn.eps), fp)

    def _fold_hit(self, conv: nn.Conv2d, bn: nn.Module, dtype, bias_dtype):
        """The cached (weight, bias, exact) fold when it is current, else None (no refold: the
        eval plan's and the stem's check, fastres.nn.eval_plan)."""
        hit = self._fold_cache.get(id(conv))
        if hit is None:
            return None
        key = self._fold_key(bn, dtype, bias_dtype, FF.fold_sources(conv, bn))
        return hit[1] if key is not None and hit[0] == key else None

    def _eval_conv(
        self,
        x: Tensor,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        residual: Tensor | None,
        relu: bool,
        block_output: bool = False,
    ) -> Tensor:
        # Under autocast, fold straight into the autocast dtype (cached) rather than casting the
        # float32 fold on every call; the bias stays float32 then (see FF.fold_dtypes).
        wdt, bdt = FF.fold_dtypes(x)
        if not self._fold_cacheable(conv, bn):
            return self._eval_conv_live(x, conv, bn, residual, relu, block_output, wdt)
        w, b, exact = self._folded(conv, bn, wdt, bdt)
        if not exact:
            # The fold would change where NaN/Inf appear (see _fold_is_exact): run the unfolded
            # composition, as torchvision does.
            z = bn(conv(x))
            if residual is not None:
                z = z + residual
            return torch.relu(z) if relu else z
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        if block_output and type(bn) is FrozenBatchNorm2d:
            out_dt = torch.promote_types(wdt, bn.weight.dtype)
            if out_dt != wdt:
                # FrozenBatchNorm2d computes in its buffers' dtype, so under autocast torchvision's
                # block returns float32 and its residual stream stays float32 from block to block.
                # Same here: the convolution fused in the autocast dtype, then shift, residual and
                # ReLU in float32 (unfused: rounding the block output to bf16 would cost 2^-9).
                y = FF.conv_bias_act(x, w, None, None, *args, relu=False)
                z = y.to(out_dt) + b.to(out_dt).reshape(1, -1, 1, 1)
                if residual is not None:
                    z = z + residual
                return torch.relu(z) if relu else z
        return FF.conv_bias_act(x, w, b, residual, *args, relu)

    @staticmethod
    def _fold_cacheable(conv: nn.Module, bn: nn.Module) -> bool:
        """Whether eval folds this pair into a cached weight: CPU tensors (whose values the
        cache checks with one read), no autograd through it, not traced. Otherwise the
        BatchNorm's scale and shift go to the convolution's epilogue from the live tensors
        (_eval_conv_live): no fold, no cache, no host sync."""
        if conv.weight.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(t is not None and t.requires_grad for t in FF.fold_sources(conv, bn))

    def _eval_conv_live(self, x, conv, bn, residual, relu, block_output, wdt) -> Tensor:
        """relu?(conv(x) * scale + shift + residual) with the BatchNorm's scale and shift in the
        convolution's epilogue, computed there from the live tensors on every call: the weight
        is the parameter itself, so nothing can go stale, no sync asks whether a fold kept
        NaN/Inf in place (the epilogue is the BatchNorm's own arithmetic), and a
        replayed CUDA graph or a compiled program reads the tensors as they are. Autograd flows
        to the conv weight and the BatchNorm's affine parameters through it."""
        from fastres.reference import acc_dtype  # noqa: PLC0415

        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        if block_output and type(bn) is FrozenBatchNorm2d:
            out_dt = torch.promote_types(wdt, bn.weight.dtype)
            if out_dt != wdt:  # as in _eval_conv: the affine part in the buffers' dtype
                scale, shift = FF.bn_scale_shift(bn.weight, bn.bias, bn.running_mean,
                                                 bn.running_var, bn.eps, acc_dtype(wdt))
                y = FF.conv_bias_act(x, conv.weight, None, None, *args, relu=False)
                z = (y.to(out_dt) * scale.to(out_dt).reshape(1, -1, 1, 1)
                     + shift.to(out_dt).reshape(1, -1, 1, 1))
                if residual is not None:
                    z = z + residual
                return torch.relu(z) if relu else z
        # The BatchNorm in the epilogue: one kernel, its scale and shift computed there from the
        # live tensors (with autograd, computed first by differentiable ops, then the same op).
        return FF.conv_bias_act(x, conv.weight, bn.bias, residual, *args, relu, scale=bn.weight,
                                bn_mean=bn.running_mean, bn_var=bn.running_var, bn_eps=bn.eps)

    @staticmethod
    def _stage(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Stage, tuple]:
        momentum = bn.momentum
        track = bn.track_running_stats and bn.running_mean is not None
        params = (
            conv.weight,
            bn.weight,
            bn.bias,
            bn.running_mean if track else None,
            bn.running_var if track else None,
            bn.num_batches_tracked if track else None,
        )
        if not (bn.training and track):
            # Batch statistics without updating anything (track_running_stats=False, or the
            # running buffers are absent): nn.BatchNorm2d does not touch the buffers then.
            params = params[:3] + (None, None, None)
        return Stage(ConvSpec.of(conv), BNSpec(float(bn.eps), momentum)), params

    def _conv_bn_act(self, x, conv, bn, relu: bool, names: tuple[str, str], where: str):
        """relu?(bn(conv(x))) fused (eval: folded; training: batch statistics), or None where
        the module's own forward should run (an empty batch, only the reference path)."""
        if _empty(x) and sync_group(bn) is None:
            return None
        if _only_reference(x, conv, self.training):
            return None
        FF.check_input(x, conv.weight, where)
        check_pair_tensors(x, conv, bn, names, where)
        if not self._use_batch_stats(bn):
            return self._eval_conv(x, conv, bn, None, relu, True)
        stage, params = self._stage(conv, bn)
        return FF.residual_unit(
            x, [stage], [params], "none", relu=relu, process_group=sync_group(bn)
        )

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        raise RuntimeError(
            f"torch.jit.script cannot compile fastres' fused {type(self).__name__} (its forward "
            "dispatches to Python autograd Functions and custom ops). Ways that work: "
            "torch.jit.script(fastres.revert(model)) scripts the plain model with the same "
            "parameters; torch.compile(model) and torch.export.export(model, ...) trace fastres' "
            "ops; torch.jit.trace(model, x) and torch.onnx.export(model, (x,), dynamo=True) "
            "record the plain operators."
        )

    def __getstate__(self):
        # The plans hold op handles and are cheap to remake: never pickled or deep-copied.
        state = self.__dict__.copy()
        state.pop("_eval_plan", None)
        state.pop("_train_plan", None)
        state.pop("_fr_handle", None)  # a copy is another module: it gets its own
        return state

    def __setstate__(self, state):  # unpickling / deepcopy (also of older objects)
        super().__setstate__(state)
        if "_fold_cache" not in self.__dict__:
            self._fold_cache = {}
        self.__dict__["_fr_handle"] = OP.register(self)


def _allow_prepacking(w: Tensor) -> None:
    """Let the CPU backend keep a oneDNN-prepacked copy of a folded weight across calls.

    It prepacks parameters by itself, and any other tensor only when told: this one is owned by
    the fold cache and only ever replaced, never written (a buffer of a torch.compile graph may be
    rewritten in place, without a version bump, so such tensors are never prepacked)."""
    if w.device.type != "cpu":
        return
    from fastres.backends import extension  # noqa: PLC0415

    # The first fold of a model runs before its first fused op: load the extension here, or
    # torch.ops.fastres_cpu does not exist yet and the weight would stay unregistered for good.
    if extension.load()[0] is None:
        return  # not built: no CPU kernels, nothing to pack
    try:
        allow = torch.ops.fastres_cpu.weight_cache_allow
    except (AttributeError, RuntimeError):  # an older build without the op
        return
    allow(w)


def _empty(x) -> bool:
    return isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 0


def _only_reference(x, conv: nn.Conv2d, training: bool) -> bool:
    """No fused backend serves ``x`` by itself: the dispatcher would fall back to the reference
    path, the op contract composed of plain PyTorch ops. That path is the oracle, not a fast path:
    on the H200 it ran ResNet-50's blocks at 0.26-0.68x of torchvision's own block
    (bench/results/h200_1dd399b2dd3c_parity.md; it sums per-channel statistics in float64 and runs
    every op unfused), and a GPU whose fused backends are not yet verified gets exactly that. The
    block then runs torchvision's forward: PyTorch's own numbers at PyTorch's own speed. A backend
    forced with FASTRES_BACKEND (reference included) is always used."""
    from fastres import backends  # noqa: PLC0415

    if not isinstance(x, Tensor) or x.dim() != 4 or backends.forced() is not None:
        return False
    spec = ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
    try:
        return backends.select(FF._inputs(x, conv.weight, spec, training)).name == "reference"
    except (RuntimeError, ValueError, TypeError):
        return False  # nothing serves x: the fused path raises its own clear error


def _downsample_pair(
    ds: nn.Module | None, norm: nn.Module | None = None
) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
    """(conv, norm) of a conv + norm downsample branch that can be fused with a block whose
    norm layers are like ``norm`` (None: any); otherwise the branch runs as a module."""
    if (
        isinstance(ds, nn.Sequential)
        and len(ds) == 2
        and not _conv_bn_reasons(ds[0], ds[1], "downsample")
        and (norm is None or _norm_kind(ds[1]) == _norm_kind(norm))
    ):
        return ds[0], ds[1]
    return None


def pair_reasons(block: nn.Module, pairs) -> list[str]:
    """Why the (conv, norm) attribute pairs ``pairs`` of ``block`` cannot run fused: each pair's
    reasons, then a mix of norm kinds across them."""
    reasons = []
    for c, b in pairs:
        reasons += _conv_bn_reasons(getattr(block, c), getattr(block, b), f"{c}/{b}")
    return reasons + _mixed_norm_reason([getattr(block, b) for _, b in pairs], "norm layers")
