"""The project's one timer (parity, self-test and bench use it)."""


from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

# --------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
            ) -> dict[str, float]:
    """p20/p50/p80 (milliseconds) of ``fn``.

    CPU: time.perf_counter around each call after ``warmup`` calls. CUDA: triton.testing.do_bench
    (which flushes L2 between calls and synchronises) when triton imports, else CUDA events around
    each call after warm-up."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            rep = max(50, 10 * repeats)
            q = do_bench(fn, warmup=25, rep=rep, quantiles=[0.2, 0.5, 0.8])
            return {"p20": float(q[0]), "p50": float(q[1]), "p80": float(q[2]),
                    "timer": f"triton.testing.do_bench (25 ms warm-up, {rep} ms of runs, L2 "
                             "flushed between runs)"}
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(repeats)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        ts = sorted(a.elapsed_time(b) for a, b in evs)
        timer = f"CUDA events around each of {repeats} runs after {warmup} warm-up"
    else:
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        timer = f"time.perf_counter around each of {repeats} runs after {warmup} warm-up"
    return {"p20": quantile(ts, 0.2), "p50": statistics.median(ts), "p80": quantile(ts, 0.8),
            "timer": timer}


def quantile(sorted_ts: list[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default)."""
    if len(sorted_ts) == 1:
        return sorted_ts[0]
    pos = q * (len(sorted_ts) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)
