"""How a fused residual block's training calls run on the CPU, CUDA and Triton paths: as its plan.

A training call re-checks the whole block (fusability, the input and every conv/BN tensor,
BatchNorm modes, the dispatcher's choice) and describes its stages before the unit runs: ~100 µs
of Python per block on the 2-CPU proxy (bench/host_overhead.py), against a GPU step of 40-110 µs
for a ResNet-50 block. :class:`TrainPlan` makes those decisions once per block and input
signature; a call then checks that they still hold and runs the unit's forward and backward from
C++ (fastres._autograd_unit.unit_call; csrc/cpu/unit_cpu.h, csrc/cuda/unit.h) or, on Triton, from
launch plans (triton_kernels/unit.py).

A plan is made only where that unit serves: the backend's ``eager_unit`` exists (cpu, cuda,
cudasim, triton), every norm layer is a plain ``nn.BatchNorm2d`` in training mode with running
statistics, the shortcut is the identity or a conv + BN downsample. It applies while:

* the block is in training mode, its BatchNorms too, each with the plan's eps, momentum and
  running statistics; grad mode may be on or off (BatchNorm recalibration under no_grad);
* the input has the plan's dtype, device, shape and memory format, is a plain tensor, with no
  autocast, no dispatch mode, not traced or compiled, no hook inside the block;
* the block's submodules are the same objects, every conv still has no bias, and every conv and
  BN tensor has the plan's dtype and device (``.to()`` changes a Parameter in place);
* ``FASTRES_BACKEND`` is what it was.

Otherwise the block's full training path runs (and makes a new plan when it can). The steady state
runs as one generated function per plan (``fast``, fastres.nn.fast_path): the same checks,
stricter, then the unit; where it answers None, :meth:`TrainPlan.call` checks as above.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from fastres._autograd import _UnitSpec
from fastres._autograd_unit import c_spec, unit_call
from fastres.backends import extension
from fastres.nn._fused import global_hooks, plain_call
from fastres.nn.eval_plan import _read, _slot
from fastres.nn.fast_path import make_train_fast

__all__ = ["TrainPlan"]

_SIG: list = []


def _tensor_sig():
    """fastres._C.tensor_sig (csrc/host_path.h), or the same in Python without the extension."""
    if not _SIG:
        fn = getattr(extension.load()[0], "tensor_sig", None)
        _SIG.append(fn or (lambda ts: tuple(None if t is None else (t.dtype, t.device)
                                            for t in ts)))
    return _SIG[0]


class TrainPlan:
    """One block's training call on the C++ unit, for inputs like the one it was made for."""

    __slots__ = ("mods", "subtree", "dtype", "device", "shape", "channels_last", "backend_env",
                 "bns", "convs", "bn_hyper", "slots", "tensor_sig", "spec", "entry", "node",
                 "cs", "ds_mods", "fast")

    def __init__(self, block, x, pairs, ds_pair, stages, spec, entry) -> None:
        self.mods = tuple(block._modules.values())
        self.subtree = tuple(m for m in block.modules() if m is not block)
        self.dtype, self.device, self.shape = x.dtype, x.device, x.shape
        self.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        self.backend_env = os.environ.get("FASTRES_BACKEND")
        all_pairs = [*pairs, *([ds_pair] if ds_pair is not None else [])]
        self.convs = tuple(c for c, _ in all_pairs)
        self.bns = tuple(b for _, b in all_pairs)
        self.ds_mods = ds_pair
        self.bn_hyper = tuple((st.bn.eps, st.bn.momentum) for st in stages)
        self.slots = tuple(
            s for c, b in all_pairs
            for s in (_slot(c, "weight"), _slot(b, "weight"), _slot(b, "bias"),
                      _slot(b, "running_mean"), _slot(b, "running_var"),
                      _slot(b, "num_batches_tracked")))
        self.tensor_sig = self._sig(self._tensors())
        self.spec, self.entry, self.node = spec, entry[:3], entry[3]
        self.cs = c_spec(spec, entry[0])  # the C++ unit's spec, made once
        # the steady-state call written out (fastres.nn.fast_path)
        self.fast = make_train_fast(self, block, x, unit_call)

    @staticmethod
    def build(block, x: Tensor, pairs, ds_pair, stages, spec: _UnitSpec, backend):
        """The plan of the training call the block is making now (its checks passed, ``spec``
        and ``backend`` chosen), or None where the C++ unit does not serve it."""
        entry = backend.eager_unit()
        if entry is None or spec.group is not None or spec.shortcut not in ("identity",
                                                                            "downsample"):
            return None
        all_pairs = [*pairs, *([ds_pair] if ds_pair is not None else [])]
        for _, bn in all_pairs:
            if (type(bn) is not nn.BatchNorm2d or not bn.training or not bn.track_running_stats
                    or bn.running_mean is None or bn.running_var is None
                    or bn.num_batches_tracked is None):
                return None
        if type(x) is not Tensor or torch.is_autocast_enabled(x.device.type):
            return None
        return TrainPlan(block, x, pairs, ds_pair, stages, spec, entry)

    def _tensors(self) -> tuple:
        return tuple([_read(s) for s in self.slots])

    @staticmethod
    def _sig(ts):
        """Each tensor's dtype and device: one C call (fastres._C.tensor_sig) where the
        extension has it."""
        return _tensor_sig()(ts)

    def call(self, block: nn.Module, x) -> Tensor | None:
        """The block's training output, or None when the plan does not apply."""
        fast = self.fast
        if fast is not None:  # the same checks, stricter, then the unit
            out = fast(block, x)
            if out is not None:
                return out
        if (type(x) is not Tensor or plain_call(x) or global_hooks()
                or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or not block.training
                or x.dtype != self.dtype or x.device != self.device or x.shape != self.shape
                or x.is_contiguous(memory_format=torch.channels_last) != self.channels_last
                or torch.is_autocast_enabled(self.device.type)
                or os.environ.get("FASTRES_BACKEND") != self.backend_env
                or tuple(block._modules.values()) != self.mods):
            return None
        for m in self.subtree:  # _hooked_here, inline
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or (
                    m._backward_pre_hooks):
                return None
        if self.ds_mods is not None:
            ds = block._modules.get("downsample")
            if ds is None or tuple(ds._modules.values()) != self.ds_mods:
                return None
        for bn, (eps, momentum) in zip(self.bns, self.bn_hyper, strict=True):
            if not bn.training or bn.eps != eps or bn.momentum != momentum:
                return None
        for conv in self.convs:
            if conv._parameters.get("bias") is not None:
                return None
        ts = self._tensors()
        if self._sig(ts) != self.tensor_sig:
            return None
        return unit_call(self.entry, self.node, self.spec, x, ts, self.cs)
