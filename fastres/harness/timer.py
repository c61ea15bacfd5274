"""The project's one timer (parity, self-test, bench and the device check use it).

A GPU timing is only meaningful with its kind named (shared/STYLE.md, Benchmarks). One call of
:func:`measure` gives, per call of ``fn``, up to four kinds:

``device``
    GPU: the sum of the GPU activity (kernels, memcpy, memset) of one call, read from the
    profiler's CUPTI events. CPU: the profiler's CPU time inside ops (the self time of every op
    under the call, Python between ops left out), the stand-in for kernel time, labelled so.
    The kind to rank kernels on: it does not grow when the host is slow.
``host``
    Wall time from the call's start until it returns, before any synchronisation: what the host
    spends launching (on a CPU, all of it).
``eager``
    Wall time of the call and a synchronisation after it. When the host is slower than the GPU
    (small batches) this is the host's time, not the kernels'.
``graph``
    GPU: wall time of one ``torch.cuda.CUDAGraph`` replay of the call captured once
    (``torch.cuda.graph``), synchronised: the launches cost one graph launch. CPU: a fake graph,
    the callable run once at "capture" and re-run at each "replay", so the same code path runs
    there; labelled so.

Between timed calls the L2 cache is flushed the same way for every provider: a write of a buffer
of twice the L2 (:func:`l2_bytes`), synchronised, outside the timed region. Before anything is
timed, ``check`` judges the call's output (and the graph's output after a replay): the callers
pass the tolerance rule against float64 (fastres.harness.rule); a failing check raises
:class:`CheckFailed` and nothing is timed.
"""


from __future__ import annotations

import bisect
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastres.backends.records import RANKABLE_KINDS

KINDS = ("device", "host", "eager", "graph")
#: The kinds a ranking of kernels may rest on.
KERNEL_KINDS = RANKABLE_KINDS

_CALL = "fastres.timer.call"
_FLUSH = "fastres.timer.flush"


def kind_label(kind: str, device: torch.device) -> str:
    """What a timing of ``kind`` measured on ``device``, in words."""
    gpu = device.type == "cuda"
    return {
        "device": ("GPU kernel time: CUPTI kernel, memcpy and memset durations summed per call"
                   if gpu else "CPU op time per call (profiler self time of the ops; the CPU "
                               "stand-in for kernel time)"),
        "host": "host time per call: from the call until it returns, no synchronisation",
        "eager": "eager wall time per call: the call and a synchronisation",
        "graph": ("CUDA-graph replay wall time per call (torch.cuda.graph, replay + synchronise)"
                  if gpu else "fake-graph replay wall time per call (CPU: no graphs; the "
                              "callable re-run)"),
    }[kind]


def column(kind: str, device: torch.device) -> str:
    """A short column header that names the kind: ``device ms [CUPTI]``."""
    gpu = device.type == "cuda"
    tag = {"device": "CUPTI kernels" if gpu else "CPU op time",
           "host": "host", "eager": "wall+sync",
           "graph": "graph replay" if gpu else "fake graph"}[kind]
    return f"{kind} ms [{tag}]"


class CheckFailed(AssertionError):
    """The output of a call failed its check; it is not timed."""


# --------------------------------------------------------------------------------------------
# L2 flush.


@functools.lru_cache(maxsize=8)
def l2_bytes(device: torch.device) -> int:
    """The L2 cache of ``device``: CUDA's device property; on a CPU core, sysfs's level-2 cache
    (1 MiB if it cannot be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == "2":
                s = (idx / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
                return int(s.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 1 << 20


class Flusher:
    """Writes a buffer of twice the L2 and synchronises: between timed calls, never inside."""

    def __init__(self, device: torch.device, nbytes: int | None = None):
        self.device = device
        self.nbytes = nbytes if nbytes is not None else 2 * l2_bytes(device)
        self._buf = torch.empty(max(1, self.nbytes // 4), dtype=torch.int32, device=device)
        self._v = 0

    def __call__(self) -> None:
        self._v = (self._v + 1) % 1000  # a new value each time: the write is never elided
        self._buf.fill_(self._v)
        _sync(self.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Quantiles.


def quantile(sorted_ts: list[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default)."""
    if len(sorted_ts) == 1:
        return sorted_ts[0]
    pos = q * (len(sorted_ts) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)


def _stats(ms: list[float], kind: str, device: torch.device) -> dict:
    ts = sorted(ms)
    return {"p20": quantile(ts, 0.2), "p50": statistics.median(ts), "p80": quantile(ts, 0.8),
            "n": len(ts), "kind": kind, "what": kind_label(kind, device)}


# --------------------------------------------------------------------------------------------
# Graphs.


class FakeGraph:
    """The CPU's stand-in for a CUDA graph: "capture" runs the callable once and keeps its
    output; each replay runs it again and keeps the new output (a real graph writes its static
    output in place)."""

    def __init__(self, fn: Callable[[], object]):
        self._fn = fn
        self.output = fn()

    def replay(self) -> None:
        self.output = self._fn()


class CudaGraph:
    """``fn`` captured into a torch.cuda.CUDAGraph after warm-up calls on a side stream."""

    def __init__(self, fn: Callable[[], object], warmup: int = 3):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self._g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._g):
            self.output = fn()
        torch.cuda.synchronize()

    def replay(self) -> None:
        self._g.replay()


def make_graph(fn: Callable[[], object], device: torch.device):
    """A CudaGraph of ``fn`` on a GPU, a FakeGraph elsewhere."""
    return CudaGraph(fn) if device.type == "cuda" else FakeGraph(fn)


# --------------------------------------------------------------------------------------------
# Device time from the profiler.


def _is_annotation(e) -> bool:
    return bool(getattr(e, "is_user_annotation", False)) or e.name in (_CALL, _FLUSH)


def device_times(events, n_calls: int, gpu: bool) -> tuple[list[float], dict[str, float]]:
    """(device milliseconds of each call, microseconds per call of each kernel name) from the
    profiler's events of calls annotated ``fastres.timer.call`` and flushes annotated
    ``fastres.timer.flush``, each ending with a synchronisation.

    An event belongs to the annotated range (host side) it starts in: every range ends with a
    synchronisation, so the GPU work launched in one range has finished before the next range
    starts. GPU: device-side events (kernels, memcpy, memset), their durations. CPU: every op
    under a call, its self time (nested ops are counted once; Python between ops is not an op)."""
    from torch.autograd import DeviceType  # noqa: PLC0415

    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.name in (_CALL, _FLUSH) and e.device_type == DeviceType.CPU)
    starts = [r[0] for r in ranges]
    call_no, k = {}, 0
    for i, r in enumerate(ranges):
        if r[2] == _CALL:
            call_no[i] = k
            k += 1
    per = [0.0] * k
    names: dict[str, float] = {}
    for e in events:
        if _is_annotation(e):
            continue
        if gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.end - e.time_range.start
        else:
            if e.device_type != DeviceType.CPU:
                continue
            us = e.self_cpu_time_total
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0 or i not in call_no or (not gpu and e.time_range.start > ranges[i][1]):
            continue
        per[call_no[i]] += us
        names[e.name] = names.get(e.name, 0.0) + us
    if k != n_calls:
        raise RuntimeError(f"the profiler saw {k} annotated calls, {n_calls} were made")
    return [u / 1e3 for u in per], {n: u / max(k, 1) for n, u in names.items()}


def _profile_calls(fn: Callable[[], object], device: torch.device, repeats: int,
                   flush: Callable[[], None]):
    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: PLC0415

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            with record_function(_FLUSH):
                flush()
            with record_function(_CALL):
                fn()
                _sync(device)
    return device_times(prof.events(), repeats, device.type == "cuda")


# --------------------------------------------------------------------------------------------
# The timer.


def _wall(replay: Callable[[], object], device: torch.device, repeats: int,
          flush: Callable[[], None]) -> tuple[list[float], list[float]]:
    """(host ms, wall ms) of each call: host until the call returns, wall after a sync."""
    host, wall = [], []
    for _ in range(repeats):
        flush()
        t0 = time.perf_counter()
        replay()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    return host, wall


def _checked(check, out, where: str) -> list[str]:
    if check is None:
        return []
    res = check(out)
    vs = res if isinstance(res, (list, tuple)) else ([] if res is None else [res])
    bad = [str(v) for v in vs if not v.ok]
    if bad:
        raise CheckFailed(f"{where}: " + "; ".join(bad))
    return [str(v) for v in vs]


def measure(fn: Callable[[], object], device: torch.device, *,
            kinds: Sequence[str] = KINDS, warmup: int = 3, repeats: int = 10,
            check: Callable[[object], object] | None = None, flush: bool = True,
            graph_fn: Callable[[], object] | None = None) -> dict:
    """Time ``fn`` on ``device`` in each of ``kinds``; returns {kind: {p20, p50, p80 (ms), n,
    kind, what}, "check": [verdicts], "kernels": {name: us per call}, "flush_bytes",
    "errors": {kind: why}}.

    ``check(output)`` returns a fastres.harness.rule.Verdict (or a list, or None) and is applied
    to the first output and to the graph's output after a replay; a failed verdict raises
    CheckFailed. ``graph_fn``: what to capture for the graph kind (default ``fn``; a training
    step that must keep its tensors static passes its own). A kind that cannot be measured here
    (a capture that fails) is left out with its reason in ``errors``."""
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown timing kind {k!r}: {', '.join(KINDS)}")
    fl = Flusher(device) if flush else (lambda: _sync(device))
    res: dict = {"check": [], "kernels": {}, "errors": {},
                 "flush_bytes": fl.nbytes if flush else 0}
    out = fn()
    _sync(device)
    res["check"] += _checked(check, out, "eager")
    del out
    eager_kinds = [k for k in kinds if k in ("host", "eager")]
    if eager_kinds or "device" in kinds:
        for _ in range(max(0, warmup - 1)):
            fn()
        _sync(device)
    if eager_kinds:
        host, wall = _wall(fn, device, repeats, fl)
        if "host" in kinds:
            res["host"] = _stats(host, "host", device)
        if "eager" in kinds:
            res["eager"] = _stats(wall, "eager", device)
    if "device" in kinds:
        try:
            dev_ms, res["kernels"] = _profile_calls(fn, device, repeats, fl)
            res["device"] = _stats(dev_ms, "device", device)
        except Exception as exc:  # noqa: BLE001 - a profiler that fails here: say so
            res["errors"]["device"] = f"{type(exc).__name__}: {exc}"[:200]
    if "graph" in kinds:
        try:
            g = make_graph(graph_fn or fn, device)
            g.replay()
            _sync(device)
            res["check"] += _checked(check, g.output, "graph")
            for _ in range(max(0, warmup - 1)):
                g.replay()
            _sync(device)
            _, wall = _wall(g.replay, device, repeats, fl)
            res["graph"] = _stats(wall, "graph", device)
        except CheckFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a capture that syncs: say so
            res["errors"]["graph"] = f"{type(exc).__name__}: {exc}"[:200]
    return res


@functools.lru_cache(maxsize=4)
def ranking_kind(device: torch.device) -> str:
    """The kind the self-test ranks backends on: ``device`` where the profiler reads this
    device's activity, else ``graph``. Never a host-bound wall time."""
    try:
        r = measure(lambda: torch.ones(8, device=device).sum(), device, kinds=("device",),
                    warmup=1, repeats=2)
        if "device" in r:
            return "device"
    except Exception:  # noqa: BLE001
        pass
    return "graph"


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
            kind: str = "eager") -> dict[str, float]:
    """p20/p50/p80 (milliseconds) of ``fn`` in one ``kind`` (default the eager wall time), with
    ``timer`` (what was measured, in words) and ``kind``: :func:`measure` for one kind."""
    r = measure(fn, device, kinds=(kind,), warmup=warmup, repeats=repeats)
    if kind not in r:
        raise RuntimeError(f"no {kind} time here: {r['errors'].get(kind)}")
    t = r[kind]
    return {"p20": t["p20"], "p50": t["p50"], "p80": t["p80"], "kind": kind,
            "timer": f"{t['what']}; median of {repeats} after {warmup} warm-up, L2 flushed "
                     f"({r['flush_bytes'] >> 20} MiB written) between calls"}
