"""``fastres.ResNet``: torchvision's ``ResNet`` with its stem (conv1, bn1, relu) fused, and its
body (stem, max-pool, the four layers) as one opaque op under ``torch.compile`` inference."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.models import resnet as tv_resnet

from fastres import backends
from fastres import functional as FF
from fastres.functional import ConvSpec
from fastres.nn import compile as OP
from fastres.nn import eval_plan as EP
from fastres.nn._fused import _FusedMixin, _hooked, global_hooks, pair_reasons, plain_call
from fastres.nn.blocks import _ResidualBlockMixin

__all__ = ["ResNet"]


class ResNet(_FusedMixin, tv_resnet.ResNet):
    """torchvision's ``ResNet`` with its stem (``conv1``, ``bn1``, ``relu``) run as one fused op.

    ``fastres.convert`` swaps a ``torchvision.models.ResNet`` for this class as well as its
    blocks: same attributes and ``state_dict`` keys. Unfused, the stem is a convolution, a
    BatchNorm pass and a ReLU pass over the 64 x 112 x 112 output at 224 x 224 (two more reads and
    writes of it per image) and, on the CPU, one weight reorder per call. When ``conv1``/``bn1``
    are not the fusable pattern or ``relu`` is not ``nn.ReLU``, the stem runs as torchvision's.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()

    def _fusable_reasons(self) -> list[str]:
        reasons = pair_reasons(self, [("conv1", "bn1")])
        if type(getattr(self, "relu", None)) is not nn.ReLU:
            reasons.append("relu is not nn.ReLU")
        return reasons

    def _hook_scope(self) -> list[tuple[str, nn.Module]]:
        """The modules the fused stem skips; a hook on one runs the stem as torchvision's."""
        return [("conv1", self.conv1), ("bn1", self.bn1), ("relu", self.relu)]

    def _stem(self, x: Tensor) -> Tensor:
        if plain_call(x) or global_hooks() or _hooked((self.conv1, self.bn1, self.relu)):
            return self.relu(self.bn1(self.conv1(x)))
        if OP.compiled_inference(self, x, (self.bn1,)):
            return OP.opaque_forward(self, x, stem=True)
        out = None
        if not self._fusable_reasons():
            out = self._stem_finite(x)
            if out is None:
                out = self._conv_bn_act(x, self.conv1, self.bn1, True, ("conv1", "bn1"), "ResNet")
        return self.relu(self.bn1(self.conv1(x))) if out is None else out

    def _may_donate(self, x, layers) -> bool:
        """Inference without autograd, tracing or any hook on the path (a hook could keep a
        block's input; a hook inside a block runs its plain forward), every layer a plain
        Sequential of fused residual blocks."""
        if (
            self.training
            or plain_call(x)
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or not EP.enabled()
            or global_hooks()
        ):
            return False
        for layer in layers:
            if type(layer) is not nn.Sequential or _hooked((layer,)):  # any hook inside too
                return False
            if not all(isinstance(blk, _ResidualBlockMixin) for blk in layer):
                return False
        return True

    def _stem_finite(self, x: Tensor) -> Tensor | None:
        """The CPU stem with oneDNN's ReLU post-op when max |x| bounds the pre-activation (the
        eval plan's proof, fastres.nn.eval_plan), once a full call has folded the BatchNorm; else
        None. The ReLU pass over the stem's output is the largest of the network's (64 x 112 x
        112 per image at 224 x 224)."""
        conv, bn = self.conv1, self.bn1
        if (
            type(x) is not Tensor
            or x.dim() != 4
            or x.shape[1] != conv.in_channels  # the full path names the mismatch
            or x.device.type != "cpu"
            or self.training
            or bn.training
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
            or not EP.enabled()
        ):
            return None
        ns = getattr(torch.ops, "fastres_cpu", None)
        if ns is None or not hasattr(ns, "conv_bias_act_finite"):
            return None
        wdt, bdt = FF.fold_dtypes(x)
        f = self._fold_hit(conv, bn, wdt, bdt)
        if f is None or not f[2]:
            return None
        spec = ConvSpec.of(conv)
        if backends.select(FF._inputs(x, conv.weight, spec, False)).name != "cpu":
            return None
        bound = self.__dict__.get("_stem_bound")
        if bound is None or bound[0] is not f[0]:
            bound = (f[0], EP._max_input([f], 1, None, x.dtype, residual=False))
            self.__dict__["_stem_bound"] = bound
        if not ns.absmax(x) <= bound[1]:  # NaN: not <=
            return None
        return ns.conv_bias_act_finite(x, f[0], f[1], None, *spec.args(), True)

    def _forward_impl(self, x: Tensor) -> Tensor:
        # torchvision's ResNet._forward_impl, with the stem fused; under torch.compile in
        # inference the body is one opaque op (fastres.nn.compile.opaque_body).
        if OP.compiled_inference(self, x) and OP.body_traceable(self):
            x = OP.opaque_body(self, x)
        else:
            x = self._body(x)
        head = self._head(x)
        if head is not None:
            return head
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def _head(self, x: Tensor) -> Tensor | None:
        """The average pool and fc as one call, ``fastres_cpu::avg_pool_linear``, on a CPU
        channels_last float32/bfloat16 call without autograd, autocast, trace, compile,
        dispatch mode or hook, the fc's weight and bias of the input's dtype; else None (the
        modules run). Not an eval plan's: FASTRES_EVAL_PLAN=0 keeps it, so the plans' outputs
        stay bitwise those of the path without them."""
        pool, fc = self.avgpool, self.fc
        if not (
            type(pool) is nn.AdaptiveAvgPool2d
            and _pair(pool.output_size) == (1, 1)
            and type(fc) is nn.Linear
            and not torch.compiler.is_compiling()  # first: Dynamo traces no further
            and not self.training
            and not torch.is_grad_enabled()
            and not plain_call(x)
            and not torch.jit.is_tracing()
            and not global_hooks()
            and type(x) is Tensor
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_autocast_enabled("cpu")
            and not torch._C._len_torch_dispatch_stack()
            and not _hooked((pool, fc))
        ):
            return None
        w, b = fc.weight, fc.bias
        if (type(w) not in (nn.Parameter, Tensor) or w.dtype != x.dtype or not w.is_contiguous()
                or w.device.type != "cpu"
                or (b is not None and (type(b) not in (nn.Parameter, Tensor) or b.dtype != x.dtype
                                       or not b.is_contiguous()
                                       or b.device.type != "cpu"))):
            return None
        op = _head_op()
        return op(x, w, b) if op is not None else None

    def _max_pool(self, x: Tensor) -> Tensor:
        """The stem's max-pool: ``fastres_cpu::max_pool2d_cl`` (no argmax indices, ATen's
        computes them) on a CPU channels_last float32/bfloat16 call without autograd, trace,
        dispatch mode or hook; else the module itself."""
        pool = self.maxpool
        if (
            type(pool) is nn.MaxPool2d
            and self._may_donate(x, ())  # first: false under torch.compile, which traces no further
            and type(x) is Tensor
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not pool.ceil_mode
            and not pool.return_indices
            and _pair(pool.dilation) == (1, 1)
            and not torch._C._len_torch_dispatch_stack()
            and not _hooked((pool,))
        ):
            op = _max_pool_op()
            if op is not None:
                return op(x, _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding))
        return pool(x)

    def _body(self, x: Tensor) -> Tensor:
        """Stem, max-pool and the four layers."""
        x = self._stem(x)
        x = self._max_pool(x)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if self._may_donate(x, layers):
            # The activations between blocks are this forward's own (no hook can see them): a
            # planned block may write its residual add into its input (fastres.nn.eval_plan),
            # and a block run by one call into the extension hands the next its output's proven
            # bound, which stands for the next NaN bound's read of it (csrc/cpu/block_cpu_py.h).
            bound = math.nan
            for layer in layers:
                for blk in layer:
                    plan = blk.__dict__.get("_eval_plan")
                    fast = plan.fast if plan is not None else None
                    if fast is not None and getattr(fast, "bounded", False):
                        got = fast(blk, x, True, bound)
                        if got is not None:
                            x, bound = got
                            continue
                    bound = math.nan
                    out = blk._run_plan(x, donate=True) if EP.applies(blk, x) else None
                    x = blk(x) if out is None else out
        else:
            for layer in layers:
                x = layer(x)
        return x


_MAX_POOL: list = []  # [op or None], looked up once
_HEAD: list = []


def _head_op():
    """torch.ops.fastres_cpu.avg_pool_linear, or None without the CPU extension."""
    if not _HEAD:
        from fastres.backends import extension  # noqa: PLC0415

        ns = getattr(torch.ops, "fastres_cpu", None) if extension.load()[0] is not None else None
        _HEAD.append(getattr(ns, "avg_pool_linear", None) if ns is not None else None)
    return _HEAD[0]


def _max_pool_op():
    """torch.ops.fastres_cpu.max_pool2d_cl, or None without the CPU extension."""
    if not _MAX_POOL:
        from fastres.backends import extension  # noqa: PLC0415

        ns = getattr(torch.ops, "fastres_cpu", None) if extension.load()[0] is not None else None
        _MAX_POOL.append(getattr(ns, "max_pool2d_cl", None) if ns is not None else None)
    return _MAX_POOL[0]
