"""Drop-in ResNet blocks that run as fused ops.

``fastres.BasicBlock`` and ``fastres.BottleneckBlock`` subclass torchvision's ``BasicBlock`` and
``Bottleneck``: same constructor signature, attribute names, ``expansion`` and ``state_dict``
keys, and ``isinstance`` checks in torchvision (``zero_init_residual``) keep working. So
``torchvision.models.ResNet(fastres.BottleneckBlock, [3, 4, 6, 3])`` builds a fused ResNet-50 and
loads torchvision checkpoints strictly. ``fastres.ConvBNReLU`` likewise subclasses
``torchvision.ops.Conv2dNormActivation``.

Eval mode folds each BatchNorm into its convolution (cached; recomputed when any parameter or
buffer changes) and runs one fused op per convolution. Train mode uses batch statistics through
:func:`fastres.functional.residual_unit`.

``torchvision.ops.FrozenBatchNorm2d`` (detection backbones) is fused too: its statistics are
fixed, so a block whose norm layers are all FrozenBatchNorm2d folds them in training as well as in
eval and always runs the inference path, with gradients flowing to the conv weights through the
fold.

SyncBatchNorm (``nn.SyncBatchNorm`` or ``fastres.SyncBatchNorm``, all of a block's norm layers
over one process group) is fused too: in training with ``torch.distributed`` initialized the
block's BatchNorms use the statistics of the whole global batch (fastres.nn.distributed).

Fallbacks (documented, never silent about correctness): a block whose pieces are not the plain
``Conv2d`` + ``BatchNorm2d`` pattern (another norm layer, a conv with bias, string padding) and an
empty batch (except under SyncBatchNorm, where it takes part in the all-reduces) run
torchvision's own forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from fastres import functional as FF
from fastres.nn import compile as OP
from fastres.nn import eval_plan as EP
from fastres.nn import train_plan as TP
from fastres.nn._fused import (
    _downsample_pair,
    _empty,
    _FusedMixin,
    _only_reference,
    check_pair_tensors,
    inner_hooks,
    pair_reasons,
    plain_call,
)
from fastres.nn.distributed import sync_group

__all__ = ["BasicBlock", "BottleneckBlock", "fusable_reasons"]


def fusable_reasons(block: nn.Module) -> list[str]:
    """Why ``block`` (a torchvision BasicBlock/Bottleneck or a fastres block) cannot run fused;
    empty when it can. The downsample branch may be any module (it then runs unfused)."""
    if isinstance(block, tv_resnet.Bottleneck):
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    elif isinstance(block, tv_resnet.BasicBlock):
        pairs = [("conv1", "bn1"), ("conv2", "bn2")]
    else:
        return [f"{type(block).__name__} is not a torchvision BasicBlock or Bottleneck"]
    reasons = pair_reasons(block, pairs)
    if not isinstance(getattr(block, "relu", None), nn.ReLU):
        reasons.append("relu is not nn.ReLU")
    return reasons


class _ResidualBlockMixin(_FusedMixin):
    _pairs: tuple[tuple[str, str], ...]

    def _fusable_reasons(self) -> list[str]:
        # Adapters of other libraries' blocks (fastres.nn.timm) override this.
        return fusable_reasons(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            plan = self.__dict__.get("_train_plan")
            if plan is not None:  # the steady state of training: the C++ unit (CPU, CUDA, Triton)
                out = plan.call(self, x)
                if out is not None:
                    return out
        plan = self.__dict__.get("_eval_plan")
        if plan is not None:  # the steady state of eval: one pass of checks, then the plan
            out = plan.call(self, x)
            if out is not None:
                return out
        if plain_call(x) or inner_hooks(self):
            return super().forward(x)
        if OP.compiled_inference(self, x):
            return OP.opaque_forward(self, x)
        if EP.applies(self, x):
            out = self._run_plan(x)
            if out is not None:
                return out
        if self._fusable_reasons():
            return super().forward(x)
        pairs = [(getattr(self, c), getattr(self, b)) for c, b in self._pairs]
        if _only_reference(x, pairs[0][0], self.training):
            return super().forward(x)
        if _empty(x) and sync_group(pairs[0][1]) is None:
            # An empty batch runs as torchvision's block; under SyncBatchNorm it runs fused, so
            # that this process takes part in the same all-reduces as the others.
            return super().forward(x)
        ds = self.downsample
        ds_pair = _downsample_pair(ds, pairs[0][1])
        FF.check_input(x, pairs[0][0].weight, type(self).__name__)
        named = list(self._pairs)
        if ds_pair is not None:
            named.append(("downsample.0", "downsample.1"))
            pairs_ds = [*pairs, ds_pair]
        else:
            pairs_ds = pairs
        for (conv, bn), names in zip(pairs_ds, named, strict=True):
            check_pair_tensors(x, conv, bn, names, type(self).__name__)
        batch_stats = [self._use_batch_stats(bn) for _, bn in pairs]
        if ds_pair is not None:
            batch_stats.append(self._use_batch_stats(ds_pair[1]))
        if not any(batch_stats):
            return self._forward_eval(x, pairs, ds, ds_pair)
        if all(batch_stats):
            return self._forward_train(x, pairs, ds, ds_pair)
        # A mix of train- and eval-mode BatchNorms inside one block (rare): stay exact.
        return super().forward(x)

    def _run_plan(self, x: Tensor, donate: bool = False) -> Tensor | None:
        """The eval call as this block's plan for ``x`` runs it (fastres.nn.eval_plan), made
        first when there is none or it no longer applies; None where a plan cannot serve (the
        full path below then runs). ``donate``: see EvalPlan.run."""
        plan = self.__dict__.get("_eval_plan")
        out = None
        if plan is not None:
            fast = plan.fast  # the steady state written out (fastres.nn.fast_path)
            out = fast(self, x, donate) if fast is not None else None
            if out is None:
                out = plan.run(self, x, donate)
        if out is None:
            plan = EP.EvalPlan.build(self, x)
            self.__dict__["_eval_plan"] = plan
            out = plan.run(self, x, donate) if plan is not None else None
        return out

    def _forward_eval(self, x, pairs, ds, ds_pair) -> Tensor:
        """Eval where no plan serves (autograd through the folds, autocast, a trace, a fold that
        would move NaN/Inf, FrozenBatchNorm2d in training): each conv through _eval_conv."""
        h = x
        for conv, bn in pairs[:-1]:
            h = self._eval_conv(h, conv, bn, None, True)
        if ds_pair is not None:
            identity = self._eval_conv(x, ds_pair[0], ds_pair[1], None, False, True)
        elif ds is not None:
            identity = ds(x)
        else:
            identity = x
        conv, bn = pairs[-1]
        identity = identity.contiguous(memory_format=FF.memory_format_of(x))
        return self._eval_conv(h, conv, bn, identity, True, True)

    def _forward_train(self, x, pairs, ds, ds_pair) -> Tensor:
        staged = [self._stage(c, b) for c, b in pairs]
        stages = [s for s, _ in staged]
        params = [p for _, p in staged]
        group = sync_group(pairs[0][1])  # SyncBatchNorm: all the block's BNs share it
        if group is None and (ds is None or ds_pair is not None) and type(x) is Tensor \
                and not torch.is_autocast_enabled(x.device.type) \
                and not torch.compiler.is_compiling():
            # The next calls like this one: a plan over the C++ unit (fastres.nn.train_plan).
            down = self._stage(*ds_pair) if ds_pair is not None else None
            spec, backend = FF.unit_spec(x, stages, params,
                                         "downsample" if down is not None else "identity", down)
            plan = TP.TrainPlan.build(self, x, pairs, ds_pair,
                                      [*stages, *([down[0]] if down else [])], spec, backend)
            self.__dict__["_train_plan"] = plan
            out = plan.call(self, x) if plan is not None else None
            if out is not None:
                return out
        if ds_pair is not None:
            return FF.residual_unit(
                x,
                stages,
                params,
                "downsample",
                downsample=self._stage(*ds_pair),
                process_group=group,
            )
        if ds is not None:
            return FF.residual_unit(
                x, stages, params, "tensor", shortcut_tensor=ds(x), process_group=group
            )
        return FF.residual_unit(x, stages, params, "identity", process_group=group)


class BasicBlock(_ResidualBlockMixin, tv_resnet.BasicBlock):
    """torchvision's ``BasicBlock`` (ResNet-18/34) running as fused ops.

    Same signature: ``BasicBlock(inplanes, planes, stride=1, downsample=None, groups=1,
    base_width=64, dilation=1, norm_layer=None)``; ``expansion = 1``.
    """

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()


class BottleneckBlock(_ResidualBlockMixin, tv_resnet.Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet-50/101/152, ResNeXt, Wide ResNet) as fused ops.

    Same signature: ``BottleneckBlock(inplanes, planes, stride=1, downsample=None, groups=1,
    base_width=64, dilation=1, norm_layer=None)``; ``expansion = 4``.
    """

    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_fused()
