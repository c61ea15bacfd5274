"""A plan's steady-state call as one generated function: every check of the plan's own ``call``
(:class:`fastres.nn.eval_plan.EvalPlan`, :class:`fastres.nn.train_plan.TrainPlan`), the tensor
reads and the direct call into the backend's whole-block entry, written out for this plan's
modules.

Why generated: the checks are ~30 attribute tests and ~20 dict reads per call. Through the
plans' general code (loops over the BatchNorms, the convolutions, the slots and the subtree,
``os.environ.get``, ``torch.is_autocast_enabled(device)``, the input's dtype, device, shape and
layout read one by one) they cost ~11 µs per Bottleneck call on the 2-CPU AMD EPYC (cudasim and
the fake Triton driver, bench/host_overhead.py), of a 25 µs budget for eval with autograd.
Written out, with the plan's modules, dicts and values as constants of the function, and the
input's signature read by one C call (``fastres._C.tensor_key``, csrc/host_path.h), about 4 µs.

The function answers None wherever the plan's own code might answer something else: the block's
forward then takes its full path (the plan's ``call``, which repeats every check precisely). It
is stricter, never looser: any autocast on (``torch._C._is_any_autocast_enabled``, not only the
input device's), a dispatch mode on, the input's exact strides and alignment, ``FASTRES_*``
variables spelled as when the plan was made. The environment is read from ``os.environ``'s own
dict (what ``os.environ.get`` reads after encoding the key); the function never runs under
``torch.compile`` (it answers None there), which guards ``os.environ.get`` calls instead.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.modules.module as _nn_module
from torch import Tensor

from fastres._autograd_block import backward as _block_backward
from fastres.backends import extension

__all__ = ["make_cpu_eval_fast", "make_eval_fast", "make_train_fast"]

_ENV = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)


class _Writer:
    """The generated function's source lines and its constants."""

    def __init__(self) -> None:
        from fastres.nn._fused import _onnx_exporting  # noqa: PLC0415  (_fused imports plans)

        self.ns = {"_Tensor": Tensor, "_is_compiling": torch.compiler.is_compiling,
                   "_is_tracing": torch._C._is_tracing,
                   "_autocast": torch._C._is_any_autocast_enabled,
                   "_modes": torch._C._len_torch_dispatch_stack, "_grad": torch.is_grad_enabled,
                   "_nnm": _nn_module, "_sys_modules": sys.modules, "_onnx": _onnx_exporting,
                   "_env": _ENV, "_getattr": getattr, "_cl": torch.channels_last}
        self.lines: list[str] = []

    def const(self, name: str, value) -> str:
        self.ns[name] = value
        return name

    def env_test(self, var: str) -> str:
        """``var`` spelled as it is now."""
        tag = var.lower()
        return (f"_env.get({self.const(f'K_{tag}', _ENCODE(var))}) != "
                f"{self.const(f'V_{tag}', _ENV.get(_ENCODE(var)))}")

    def common_tests(self, plan, x: Tensor, training: bool) -> list[str]:
        """The tests every plan makes: a plain eager call (no trace, export, compile, dispatch
        mode, autocast, module hook anywhere in the block or global), the block's mode, its
        submodules, the input's signature, FASTRES_BACKEND."""
        key = getattr(extension.load()[0], "tensor_key", None)
        if key is not None:  # dtype, device, shape, exact strides and alignment: one C call
            self.ns.update(_key=key, XKEY=key(x))
            x_tests = ["_key(x) != XKEY"]
        else:
            self.ns.update(DT=plan.dtype, DEV=plan.device, SHAPE=plan.shape,
                           CL=plan.channels_last)
            x_tests = ["x.dtype is not DT", "x.shape != SHAPE", "x.device != DEV",
                       "x.is_contiguous(memory_format=_cl) is not CL"]
        # _is_compiling first: under torch.compile nothing after it is traced (Dynamo cannot
        # trace the C checks; the function answers None there).
        tests = ["_is_compiling()", "type(x) is not _Tensor",
                 "not block.training" if training else "block.training",
                 *x_tests, "_autocast()", "_modes()", "_is_tracing()",
                 "('torch.onnx' in _sys_modules and _onnx())",
                 "_nnm._global_forward_hooks", "_nnm._global_forward_pre_hooks",
                 "_nnm._global_backward_hooks", "_nnm._global_backward_pre_hooks",
                 self.env_test("FASTRES_BACKEND"),
                 f"tuple(block._modules.values()) != {self.const('MODS', plan.mods)}"]
        for i, m in enumerate(plan.subtree):
            name = self.const(f"m{i}", m)
            tests += [f"{name}._forward_hooks", f"{name}._forward_pre_hooks",
                      f"{name}._backward_hooks", f"{name}._backward_pre_hooks"]
        for i, conv in enumerate(plan.convs):
            tests.append(f"{self.const(f'c{i}', conv._parameters)}.get('bias') is not None")
        return tests

    def check(self, tests: list[str]) -> None:
        self.lines += ["    if (" + "\n            or ".join(tests) + "):", "        return None"]

    def downsample(self, pair) -> None:
        """The block's downsample still holds ``pair`` (conv, bn)."""
        self.const("DSMODS", tuple(pair))
        self.lines += ["    ds = block._modules.get('downsample')",
                       "    if ds is None or tuple(ds._modules.values()) != DSMODS:",
                       "        return None"]

    def reads(self, slots) -> list[str]:
        """Each slot's tensor as ``fastres.nn.eval_plan._read`` reads it, into t0, t1, ..."""
        names = []
        for i, (d, key, mod) in enumerate(slots):
            t = f"t{i}"
            self.lines += [f"    {t} = {self.const(f'd{i}', d)}.get({key!r})",
                           f"    if {t} is None:",
                           f"        {t} = _getattr({self.const(f'mod{i}', mod)}, {key!r}, None)"]
            names.append(t)
        return names

    def finish(self):
        src = "\n".join(["def fast(block, x, donate=False, bound=None):", *self.lines]) + "\n"
        exec(src, self.ns)  # noqa: S102
        return self.ns["fast"]


def _usable() -> bool:
    # Windows: os.environ's dict holds str keys, upper-cased; not written for it.
    return _ENV is not None and _ENCODE is not None and sys.platform != "win32"


def _eval_checks(plan, block, x: Tensor, slots, extra=()):
    """The writer of an eval plan's steady-state function up to its call: every check, then the
    tensors of ``slots`` read into t0, t1, ...; (writer, their names), or None where the plan
    cannot have one (no os.environ dict, the environment changed since the plan was made)."""
    if not _usable():
        return None
    from fastres.nn.eval_plan import enabled  # noqa: PLC0415

    if os.environ.get("FASTRES_BACKEND") != plan.backend_env or not enabled():
        return None
    w = _Writer()
    tests = w.common_tests(plan, x, training=False)
    tests.append(w.env_test("FASTRES_EVAL_PLAN"))
    tests += list(extra)
    if plan.grad:
        tests.append("not _grad()")
    for i, (bn, eps) in enumerate(zip(plan.bns, plan.eps, strict=True)):
        b = w.const(f"b{i}", bn)
        tests += [f"{b}.training", f"{b}.eps != {eps!r}"]
    w.check(tests)
    if plan.shortcut is not None and plan.shortcut[0] == "pair":
        w.downsample(plan.shortcut[1:3])
    names = w.reads(slots)
    needs = " or ".join(["x.requires_grad",
                         *(f"({t} is not None and {t}.requires_grad)" for t in names)])
    if plan.grad:
        w.lines += [f"    if not ({needs}):", "        return None"]
    else:
        w.lines += [f"    if _grad() and ({needs}):", "        return None"]
    return w, names


def make_cpu_eval_fast(plan, block, x: Tensor, run, spec, slots):
    """``fast(block, x, donate=False, bound=None)`` of a CPU plan with folds: the checks of
    :func:`make_eval_fast` and the block's frozen mode, then one call, ``run(spec, x, sources,
    donate)`` (``fastres._C.cpu_block_eval``, csrc/cpu/block_cpu_py.h), which checks the folds
    against the sources read from ``slots`` and runs the block; None where it answers None.
    With ``bound`` (a float: an upper bound of max |x| the caller has proven, NaN: none) it
    answers (output, the output's bound) instead."""
    made = _eval_checks(plan, block, x, slots, ("block.__dict__.get('_fr_frozen') is not FROZEN",))
    if made is None:
        return None
    w, names = made
    w.ns.update(FROZEN=plan.frozen, RUN=run, SPEC=spec)
    ts = ", ".join(names)
    w.lines += ["    if bound is None:",
                f"        return RUN(SPEC, x, ({ts},), donate)",
                f"    return RUN(SPEC, x, ({ts},), donate, bound)"]
    fast = w.finish()
    fast.bounded = True  # takes ``bound`` (fastres.nn.resnet's body)
    return fast


def make_eval_fast(plan, block, x: Tensor):
    """``fast(block, x, donate=False)``: the output of the eval ``plan`` for this call, or None
    (see the module docstring). None where the plan has no direct entry. ``donate`` is the CPU
    plans' (:func:`make_cpu_eval_fast`); the direct entries here ignore it."""
    if plan.direct is None:
        return None
    run, spec, slots = plan.direct
    made = _eval_checks(plan, block, x, slots)
    if made is None:
        return None
    w, names = made
    ts = ", ".join(names)
    if spec is None:  # with autograd: plan.direct's call written out (_autograd_block.block_call)
        block_run, node, block_spec, meta = run.parts
        w.ns.update(BRUN=block_run, BSPEC=block_spec, NODE=node, META=meta,
                    BACKWARD=_block_backward)
        w.lines += [f"    outs = BRUN(BSPEC, x, ({ts},), True)",
                    "    out = outs[-1]",
                    f"    NODE(BACKWARD, META, 'BlockEvalBackward', (out,), (x, {ts}), "
                    f"(x, *outs, {ts}))",
                    "    return out"]
    else:
        w.ns.update(RUN=run, SPEC=spec)
        w.lines.append(f"    return RUN(SPEC, x, ({ts},))")
    return w.finish()


def make_train_fast(plan, block, x: Tensor, unit_call):
    """``fast(block, x)``: the output of the training ``plan`` for this call (``unit_call``:
    fastres._autograd_unit.unit_call), or None (see the module docstring)."""
    if not _usable() or os.environ.get("FASTRES_BACKEND") != plan.backend_env:
        return None
    w = _Writer()
    tests = w.common_tests(plan, x, training=True)
    for i, (bn, (eps, momentum)) in enumerate(zip(plan.bns, plan.bn_hyper, strict=True)):
        b = w.const(f"b{i}", bn)
        tests += [f"not {b}.training", f"{b}.eps != {eps!r}",
                  f"{b}.momentum != {w.const(f'mom{i}', momentum)}"]
    w.check(tests)
    if plan.ds_mods is not None:
        w.downsample(plan.ds_mods)
    ts = ", ".join(w.reads(plan.slots))
    w.ns.update(_sig=plan._sig, TSIG=plan.tensor_sig, UNIT=unit_call, ENTRY=plan.entry,
                NODE=plan.node, USPEC=plan.spec, CS=plan.cs)
    w.lines += [f"    ts = ({ts},)",
                "    if _sig(ts) != TSIG:",
                "        return None",
                "    return UNIT(ENTRY, NODE, USPEC, x, ts, CS)"]
    return w.finish()
