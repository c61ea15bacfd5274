"""``python -m fastres.selftest --bench``: each verified backend against the reference path
(cuDNN + PyTorch: fastres.reference), per op and shape class, on this device.

A shape class (fastres.backends.records.shape_class) is kernel size, stride, input-channel
range, dtype, layout and batch range; each is timed at one representative ResNet-18/50
convolution: the three convolution ops of a fused block (conv_bias_act with bias + residual +
ReLU, conv_stats with the BN-ReLU prologue, conv_bwd with both gradients). A class's time is the
sum of its three ops' medians; the ranking the dispatcher reads (records.ranking) puts the
backends faster than the reference path first, fastest first, and never one slower than it.

Timing: the project's one timer (fastres.harness.timer) in a kernel kind, never a host-bound wall
time: ``device`` (the profiler's kernel time per call on a GPU, its CPU op time on a CPU) where the
profiler reads the device, else ``graph`` (CUDA-graph replay). The record names the kind
(``bench["kind"]``) and the dispatcher ranks only on these kinds
(fastres.backends.records.RANKABLE_KINDS). ``cudnn.benchmark`` is on for the reference path as a
user would run it. Inputs are random, never zeros.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from fastres.backends import records
from fastres.backends.variants import Conv, resnet_convs
from fastres.harness.timer import ranking_kind, time_ms

OPS = ("conv_bias_act", "conv_stats", "conv_bwd")


def classes(device: torch.device, quick: bool) -> list[tuple[str, Conv, torch.dtype, str]]:
    """(class key, representative conv, dtype, layout) to time on ``device``: one ResNet
    convolution per (kernel, stride, channel range), the largest of its class, at batch 32 on a
    GPU (and 128 off --quick) or batch 2 of a 64x64 image on a CPU."""
    if device.type == "cuda":
        batches = (32,) if quick else (32, 128)
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        layouts = ("channels_last",) if quick else ("channels_last", "contiguous")
        convs = resnet_convs(224)
    else:
        batches, dtypes, layouts = (2,), (torch.float32,), ("channels_last",)
        convs = resnet_convs(64)
    rep: dict[tuple, Conv] = {}
    for cv in convs:
        k = (cv.r, cv.stride, records._bucket(cv.c, records._CH_EDGES, "c"))
        if k not in rep or cv.flops > rep[k].flops:
            rep[k] = cv
    if quick and device.type != "cuda":
        rep = dict(list(rep.items())[:3])
    out = []
    for n in batches:
        for dt in dtypes:
            for layout in layouts:
                for cv in rep.values():
                    cvn = Conv(n, cv.c, cv.k, cv.r, cv.stride, cv.h, cv.w)
                    key = records.shape_class((cv.r, cv.r), (cv.stride, cv.stride), cv.c, dt,
                                             layout == "channels_last", n)
                    out.append((key, cvn, dt, layout))
    return out


def _operands(cv: Conv, dtype: torch.dtype, layout: str, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        x = torch.randn(shape, generator=gen).to(dtype).to(device)
        return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

    p, q = cv.out_hw
    acc = torch.float32
    return {
        "x": t(cv.n, cv.c, cv.h, cv.w), "w": t(cv.k, cv.c, cv.r, cv.r) / (cv.c * cv.r**2) ** 0.5,
        "res": t(cv.n, cv.k, p, q), "g": t(cv.n, cv.k, p, q),
        "bias": torch.randn(cv.k, generator=gen).to(acc).to(device),
        "scale": (torch.rand(cv.c, generator=gen) + 0.5).to(acc).to(device),
        "shift": torch.randn(cv.c, generator=gen).to(acc).to(device),
        "conv": ([cv.stride] * 2, [cv.pad] * 2, [1, 1], 1),
    }


def _calls(ops, a: dict) -> dict[str, Callable[[], object]]:
    cv = a["conv"]
    return {
        "conv_bias_act": lambda: ops.op("conv_bias_act")(a["x"], a["w"], a["bias"], a["res"],
                                                         *cv, True),
        "conv_stats": lambda: ops.op("conv_stats")(a["x"], a["w"], a["scale"], a["shift"], True,
                                                   *cv),
        "conv_bwd": lambda: ops.op("conv_bwd")(a["g"], a["x"], a["w"], a["scale"], a["shift"],
                                               True, *cv, [True, True]),
    }


def bench(device: torch.device, names: list[str], out: Callable[[str], None] = print,
          quick: bool = True, repeats: int | None = None,
          shape_classes: list | None = None, deadline: float = math.inf) -> dict:
    """Time ``names`` (backends that passed) and the reference path; the record's "bench".
    No shape class starts after ``deadline`` (time.monotonic); those left are counted in
    ``"not_timed"``."""
    from fastres import backends  # noqa: PLC0415

    repeats = repeats or (20 if device.type == "cuda" else 5)
    todo = shape_classes if shape_classes is not None else classes(device, quick)
    kind = ranking_kind(device)
    result: dict = {"timer": None, "kind": kind, "classes": {}}
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for key, cv, dt, layout in todo:
            if time.monotonic() > deadline:
                result["not_timed"] = result.get("not_timed", 0) + 1
                continue
            a = _operands(cv, dt, layout, device)
            entry = {"shape": cv.label(), "ops": {}, "backends": {}}
            totals = {}
            for name in ["reference", *names]:
                b = backends.BACKENDS[name]
                reasons = b.not_supported_reasons(backends.Inputs(
                    device, dt, kernel_size=(cv.r, cv.r), stride=(cv.stride, cv.stride),
                    channels_last=layout == "channels_last"))
                if reasons:
                    continue
                try:
                    timed = {op: time_ms(fn, device, 3, repeats, kind=kind)
                             for op, fn in _calls(b, a).items()}
                    ts = {op: t["p50"] for op, t in timed.items()}
                    result["timer"] = next(iter(timed.values()))["timer"]
                except Exception as exc:  # noqa: BLE001 - a backend that raises is not ranked
                    entry["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                    continue
                for op, t in ts.items():
                    entry["ops"].setdefault(op, {})[name] = t
                totals[name] = sum(ts.values())
            ref = totals.get("reference")
            for name, t in totals.items():
                if name != "reference" and ref:
                    entry["backends"][name] = {"ms": t, "speedup": ref / t if t > 0 else None}
            entry["reference_ms"] = ref
            result["classes"][key] = entry
    finally:
        torch.backends.cudnn.benchmark = prev
    out("")
    out(table(result, names))
    return result


def table(result: dict, names: list[str]) -> str:
    """The speedup report: per shape class and op, milliseconds and speedup over the reference
    path; the last column is what the dispatcher will prefer for the class."""
    rk = records.ranking(result)
    head = f"{'shape class':38s} {'op':14s} {'reference':>10s}" + "".join(
        f" {n:>16s}" for n in names) + "  preferred"
    lines = [f"speed against the reference path ({result['timer']}), ms (speedup)", head]
    for key, e in result["classes"].items():
        for op in OPS:
            row = e["ops"].get(op, {})
            cells = ""
            for n in names:
                t, r = row.get(n), row.get("reference")
                cells += (f" {t:9.3f} ({r / t:4.2f}x)" if t and r else f" {'-':>16s}")
            ref = row.get("reference")
            ref_s = f"{ref:10.3f}" if ref else f"{'-':>10s}"
            pref = rk.get(key, ["reference"])[0] if op == OPS[-1] else ""
            lines.append(f"{key if op == OPS[0] else '':38s} {op:14s} {ref_s}{cells}  {pref}")
    return "\n".join(lines)
