"""One block run and its float64 reference: what a user keeps (output, grads, buffers) from
the fused block and from torchvision's, judged by the tolerance rule, for every case, dtype, mode
and backend (:func:`run_cases`)."""


from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from fastres.harness.cases import (
    DTYPE_NAMES,
    BlockCase,
    block_inputs,
    build_torchvision_block,
    in_format,
)
from fastres.harness.progress import progress_bar
from fastres.harness.report import row_line
from fastres.harness.timer import time_ms
from fastres.nn import convert

# --------------------------------------------------------------------------------------------
# Running one block: what a user keeps.


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """FASTRES_BACKEND=name for the duration (None: leave the dispatcher alone). cudasim runs the
    CUDA launchers, which follow cuDNN's TF32 switch as on a GPU; its fp32 cases are judged
    against PyTorch on the CPU, which never uses TF32, so TF32 is off for them (as in
    tests/op_check.py)."""
    old = os.environ.get("FASTRES_BACKEND")
    old_tf32 = torch.backends.cudnn.allow_tf32
    if name is not None:
        os.environ["FASTRES_BACKEND"] = name
    if name == "cudasim":
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
        if name is not None:
            if old is None:
                os.environ.pop("FASTRES_BACKEND", None)
            else:
                os.environ["FASTRES_BACKEND"] = old


def _buffers(m: nn.Module) -> dict[str, Tensor]:
    return {f"buffer.{n}": b.detach().clone() for n, b in m.named_buffers()}


def run_eval(m: nn.Module, x: Tensor) -> dict[str, Tensor]:
    m.eval()
    with torch.no_grad():
        out = m(x)
    return {"out": out, **_buffers(m)}


def run_train(m: nn.Module, x: Tensor, grad_out: Tensor) -> dict[str, Tensor]:
    m.train()
    for p in m.parameters():
        p.grad = None
    xx = x.detach().clone().requires_grad_(True)  # clone keeps the memory format
    with relu_calls(m) as calls:
        out = m(xx)
    decisions = relu_decisions_of(calls, out)
    out.backward(grad_out)
    res = Kept({"out": out.detach(), "grad.input": xx.grad})
    res.update({f"grad.{n}": p.grad for n, p in m.named_parameters()})
    res.update(_buffers(m))
    res.decisions = decisions
    return res


class Kept(dict):
    """What a user keeps from a run (every key is judged), and, for a train run, the run's ReLU
    decisions (``decisions``: inner ReLUs first, the output's last), which are not kept."""

    decisions: list[Tensor] | None = None


@contextlib.contextmanager
def relu_calls(block: nn.Module) -> Iterator[list[Tensor]]:
    """Inside, the decisions (``out > 0``) of every call of ``block.relu`` in call order. Not
    for a fused block: a hook inside it would make it run its plain forward (its decisions come
    from what its backward saved, :func:`fastres_inner_decisions`)."""
    from fastres.nn._fused import _FusedMixin

    calls: list[Tensor] = []
    relu = getattr(block, "relu", None)
    if relu is None or isinstance(block, _FusedMixin):
        yield calls
        return
    handle = relu.register_forward_hook(lambda mod, args, out: calls.append(out.detach() > 0))
    try:
        yield calls
    finally:
        handle.remove()


def relu_decisions_of(calls: list[Tensor], out: Tensor) -> list[Tensor]:
    """A train run's ReLU decisions, inner ones first and the output's last: the relu module's
    calls (torchvision, or a fastres block on an unfused path), or, for a fused block whose
    ReLUs never run as modules, recomputed from what its backward saved."""
    inner = fastres_inner_decisions(out)
    if inner is None:
        inner = calls[:-1]
    return [*inner, out.detach() > 0]


def fastres_inner_decisions(out: Tensor) -> list[Tensor] | None:
    from fastres.functional import inner_relu_decisions

    return inner_relu_decisions(out)


class _DecidedReLU(torch.autograd.Function):
    """A ReLU whose decisions are given: forward z * mask, backward grad * mask."""

    @staticmethod
    def forward(ctx, z: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return z * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


@contextlib.contextmanager
def relu_decisions(block: nn.Module, masks: list[Tensor | None]) -> Iterator[None]:
    """Inside, call k of a torchvision block's ``relu`` (k = 0, 1, ... within each forward) lets
    through exactly the elements of ``masks[k]`` (None: an ordinary ReLU).

    Why: a ReLU decision on an element within rounding of zero goes either way; the float64
    reference and a low-precision run then disagree on it, and the whole gradient value of that
    element lands in the max-abs error (PyTorch's own run flips a few such decisions too, at other
    elements). A flip at an inner ReLU (between the convolutions) spreads further: the BatchNorm
    backward's means carry it to the whole channel. Judging each run against a float64 reference
    that takes that run's own decisions removes this coin flip from the verdict and keeps
    everything else (values, statistics, the gradients' arithmetic)."""
    calls = len(masks)
    count = [0]
    inplace = block.relu.inplace
    block.relu.inplace = False  # so that the hook sees the pre-activation

    def hook(mod, args, out):
        mask = masks[count[0] % calls]
        count[0] += 1
        if mask is None:
            return None
        return _DecidedReLU.apply(args[0], mask.to(device=args[0].device, dtype=args[0].dtype))

    handle = block.relu.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        block.relu.inplace = inplace


def output_relu_decisions(block: nn.Module, mask: Tensor) -> contextlib.AbstractContextManager:
    """:func:`relu_decisions` for the output ReLU only (the last of the block's ``relu`` calls)."""
    calls = 3 if hasattr(block, "conv3") else 2
    return relu_decisions(block, [None] * (calls - 1) + [mask])


def kept_reference(ref: nn.Module, mode: str, x: Tensor, grad_out: Tensor,
                   decided_by: list[Tensor] | None = None) -> dict[str, Tensor]:
    """What a user keeps from the float64 reference block; in train mode, with the ReLU decisions
    ``decided_by`` (a run's, from :func:`relu_decisions_of`) when given."""
    m = copy.deepcopy(ref)
    if decided_by is None or mode == "eval":
        return kept(m, mode, x, grad_out)
    with relu_decisions(m, decided_by):
        return kept(m, mode, x, grad_out)


class References:
    """The float64 references of one (block, dtype, mode): the plain one, and in train mode one
    per set of ReLU decisions (runs that decide alike share one)."""

    def __init__(self, ref: nn.Module, mode: str, x64: Tensor, g64: Tensor):
        self.ref, self.mode, self.x64, self.g64 = ref, mode, x64, g64
        self.plain = kept_reference(ref, mode, x64, g64)
        self.plain_decisions = decisions(self.plain)
        self._by_masks: list[tuple[list[Tensor] | None, dict[str, Tensor]]] = [
            (self.plain_decisions, self.plain)]

    def for_run(self, run: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.mode == "eval":
            return self.plain
        masks = decisions(run)
        for m, r in self._by_masks:
            if m is not None and len(m) == len(masks) and all(
                    torch.equal(a, b) for a, b in zip(m, masks, strict=True)):
                return r
        r = kept_reference(self.ref, self.mode, self.x64, self.g64, decided_by=masks)
        self._by_masks.append((masks, r))
        return r


def decisions(run: dict[str, Tensor]) -> list[Tensor] | None:
    """The ReLU decisions of a train run's kept dict (None for an eval run)."""
    return getattr(run, "decisions", None)


def backend_plan(device: torch.device, only: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The backends to run on ``device`` and, for each one left out, why."""
    from fastres import backends

    names = list(backends.BACKENDS)
    if only:
        unknown = [n for n in only if n not in backends.BACKENDS]
        if unknown:
            raise SystemExit(f"unknown backend(s) {', '.join(unknown)}: choose from "
                             f"{', '.join(names)}")
        names = [n for n in names if n in only]
    avail = backends.available()
    run, skipped = [], {}
    for n in names:
        if avail[n] is not None:
            skipped[n] = avail[n]
        elif n == "cudasim" and not only:
            skipped[n] = ("cudasim runs the CUDA kernels fiber by fiber on the CPU (minutes per "
                          "block); ask for it with --backend cudasim")
        elif n == "triton" and device.type != "cuda" and not only:
            skipped[n] = ("on a CPU Triton runs only in the interpreter (thousands of times "
                          "slower); ask for it with --backend triton")
        else:
            reasons = backends.BACKENDS[n].not_supported_reasons(
                backends.Inputs(device, torch.float32))
            dev_reasons = [r for r in reasons if r.startswith(f"{n} runs on")]
            if dev_reasons:
                skipped[n] = "; ".join(dev_reasons)
            else:
                run.append(n)
    return run, skipped


def auto_choice(device: torch.device, dtype: torch.dtype, channels_last: bool) -> str:
    """The backend the dispatcher picks by itself for a 3x3 conv on ``device`` at ``dtype``."""
    from fastres import backends

    old = os.environ.pop("FASTRES_BACKEND", None)
    try:
        return backends.select(backends.Inputs(device, dtype, kernel_size=(3, 3),
                                               channels_last=channels_last)).name
    except RuntimeError as exc:
        return f"none ({exc})"
    finally:
        if old is not None:
            os.environ["FASTRES_BACKEND"] = old


def _first_line(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _worst(checks: list[dict]) -> dict | None:
    """The check closest to (or furthest past) its bound."""
    def score(c):
        if not c["ok"]:
            return math.inf if not math.isfinite(c["err"]) else 1e300 + c["err"]
        return c["err"] / c["bound"] if c["bound"] > 0 else 0.0
    return max(checks, key=score) if checks else None


def run_cases(cases: list[BlockCase], dtypes: list[torch.dtype], modes: list[str],
              backend_names: list[str], device: torch.device, batch: int, channels_last: bool,
              warmup: int, repeats: int, timing: bool = True, progress: bool = True,
              emit: Callable[[str], None] = print, seed: int = 0,
              checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every (block, dtype, mode, backend) case; one result dict per case.
    ``checkpoint(results so far)`` is called after each (block, dtype, mode)."""
    from fastres import backends
    from fastres.harness.rule import compare_all

    units = [(c, dt, mode) for c in cases for dt in dtypes for mode in modes]
    bar = progress_bar(len(units) * (len(backend_names) + 2), progress)
    results = []
    for i, (case, dtype, mode) in enumerate(units):
        dname = DTYPE_NAMES[dtype]
        bar.set_description(f"{case.name} {dname} {mode}")
        base = build_torchvision_block(case, seed + 1000 * cases.index(case))
        tv = base.to(dtype)
        tv = tv.to(device=device, memory_format=torch.channels_last) if channels_last else \
            tv.to(device=device)
        ref = copy.deepcopy(tv).double()  # the same (rounded) weights and statistics, in float64
        gen = torch.Generator().manual_seed(seed + 7 + i)
        x = torch.randn(batch, case.inplanes, case.height, case.width, generator=gen)
        x = in_format(x.to(dtype).to(device), channels_last)
        with torch.no_grad():
            out_shape = ref.eval()(x.double()).shape
        g = in_format(torch.randn(out_shape, generator=gen).to(dtype).to(device), channels_last)
        x64, g64 = x.double(), g.double()
        refs = References(ref, mode, x64, g64)
        want_ref = refs.plain
        bar.update(1)
        theirs = kept(copy.deepcopy(tv), mode, x, g)
        ref_theirs = refs.for_run(theirs)
        t_tv = None
        if timing:
            t_tv = time_ms(_timed(copy.deepcopy(tv), mode, x, g), device, warmup, repeats)
        bar.update(1)
        convs = block_inputs(tv)
        for bname in backend_names:
            bar.set_postfix_str(bname)
            row = {
                "block": case.label, "name": case.name, "kind": case.kind,
                "inplanes": case.inplanes, "planes": case.planes, "stride": case.stride,
                "downsample": case.downsample,
                "input_shape": [batch, case.inplanes, case.height, case.width],
                "dtype": dname, "layout": "channels_last" if channels_last else "contiguous",
                "mode": mode, "backend": bname, "device": str(device),
                "status": "pass", "error": None, "checks": [], "worst": None,
                "diagnostics": None,
                "time_fused_ms": None, "time_torchvision_ms": None, "speedup": None,
                "time_fused": None, "time_torchvision": t_tv,
            }
            reasons = []
            for conv in convs:
                reasons += backends.BACKENDS[bname].not_supported_reasons(
                    backends.Inputs.of(x, conv))
            if reasons:
                row.update(status="skipped", error="; ".join(dict.fromkeys(reasons)))
                results.append(row)
                emit(row_line(row))
                bar.update(1)
                continue
            try:
                ours_m = convert(copy.deepcopy(tv))
                with forced_backend(bname):
                    ours = kept(ours_m, mode, x, g)
                # The verdict: each run against the float64 reference with its own ReLU
                # decisions (identical to the plain reference in eval mode).
                ref_ours = refs.for_run(ours)
                verdicts = judge(ours, ref_ours, theirs, ref_theirs, dtype)
                row["checks"] = [
                    {"name": v.name, "err": v.err, "torch_err": v.torch_err, "bound": v.bound,
                     "ok": v.ok} for v in verdicts]
                row["diagnostics"] = diagnostics(ours, theirs, want_ref)
                if mode == "train":  # the rule against the plain reference, for the record
                    row["diagnostics"]["plain_reference_checks"] = [
                        {"name": v.name, "err": v.err, "torch_err": v.torch_err,
                         "bound": v.bound, "ok": v.ok}
                        for v in compare_all(ours, theirs, want_ref, dtype)]
                row["worst"] = _worst(row["checks"])
                row["status"] = "pass" if all(v.ok for v in verdicts) else "fail"
                if timing:
                    with forced_backend(bname):
                        t_f = time_ms(_timed(convert(copy.deepcopy(tv)), mode, x, g),
                                      device, warmup, repeats)
                    row["time_fused"] = t_f
                    row["time_fused_ms"] = t_f["p50"]
                    row["time_torchvision_ms"] = t_tv["p50"]
                    row["speedup"] = t_tv["p50"] / t_f["p50"] if t_f["p50"] > 0 else None
            except Exception as exc:  # a backend that raises fails its case; the run goes on
                row.update(status="error", error=_first_line(exc))
            results.append(row)
            emit(row_line(row))
            bar.update(1)
        if checkpoint is not None:
            checkpoint(results)
    bar.close()
    return results


def judge(ours: dict[str, Tensor], ref_ours: dict[str, Tensor], theirs: dict[str, Tensor],
          ref_theirs: dict[str, Tensor], dtype: torch.dtype) -> list:
    """The tolerance rule per kept tensor, each run against its own reference; integer tensors
    (num_batches_tracked) exactly."""
    from fastres.harness.rule import Verdict, max_abs_err, verdict_own_refs

    out = []
    for name, r in ref_ours.items():
        for who, d in (("fastres", ours), ("PyTorch", theirs)):
            if d.get(name) is None:
                raise AssertionError(f"{name}: missing or None in the {who} run")
        if r.is_floating_point():
            out.append(verdict_own_refs(name, ours[name], r, theirs[name], ref_theirs[name],
                                        dtype))
        else:
            out.append(Verdict(name, max_abs_err(ours[name], r),
                               max_abs_err(theirs[name], ref_theirs[name]), 0.0))
    return out


def _rms(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def diagnostics(ours: dict[str, Tensor], theirs: dict[str, Tensor], ref: dict[str, Tensor]
                ) -> dict:
    """Not part of the verdict: what helps triage a failure.

    * ``relu_flips``: output elements whose final ReLU decision (out > 0) differs from the float64
      reference, for fastres and for PyTorch. In low precision both flip a few decisions near zero;
      a flip puts one whole gradient value into the max-abs error of the grads, so in bf16/fp16
      training a max-abs failure with similar flip counts and similar RMS errors is rounding luck,
      not a kernel bug.
    * ``inner_relu_flips`` (train): the same for the ReLUs between the convolutions, which the
      verdict's references also take from each run (see :func:`relu_decisions`).
    * ``rms``: root-mean-square error against the reference per check, fastres and PyTorch."""
    out = {"relu_flips": {
        "fastres": int(((ours["out"] > 0) != (ref["out"] > 0)).sum()),
        "torch": int(((theirs["out"] > 0) != (ref["out"] > 0)).sum()),
        "elements": ref["out"].numel()}}
    masks = {who: decisions(d) for who, d in (("fastres", ours), ("torch", theirs), ("ref", ref))}
    if all(m is not None and len(m) == len(masks["ref"]) for m in masks.values()):
        inner = list(zip(*(masks[w][:-1] for w in ("fastres", "torch", "ref")), strict=True))
        out["inner_relu_flips"] = {
            "fastres": sum(int((f != r).sum()) for f, _, r in inner),
            "torch": sum(int((t != r).sum()) for _, t, r in inner),
            "elements": sum(r.numel() for _, _, r in inner)}
    out["rms"] = {k: {"fastres": _rms(ours[k], r), "torch": _rms(theirs[k], r)}
                  for k, r in ref.items() if r.is_floating_point()}
    return out


def kept(m: nn.Module, mode: str, x: Tensor, grad_out: Tensor) -> dict[str, Tensor]:
    """What a user keeps after one eval forward or one train forward + backward."""
    return run_eval(m, x) if mode == "eval" else run_train(m, x, grad_out)


def _timed(m: nn.Module, mode: str, x: Tensor, grad_out: Tensor) -> Callable[[], None]:
    """One timed call: eval forward under no_grad, or train forward + backward."""
    if mode == "eval":
        m.eval()

        def call():
            with torch.no_grad():
                m(x)
    else:
        m.train()
        xr = x.detach().clone().requires_grad_(True)

        def call():
            m(xr).backward(grad_out)
    return call
