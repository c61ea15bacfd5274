"""What the eval path's values check costs: a converted ResNet-50's eval call with the check
against the same call with it switched off, alternating in one process.

Every eval call proves its cached folds (and the weights oneDNN prepacked from them) current by
one fingerprint of the block's conv weights and BatchNorm tensors (fastres_cpu::fingerprint:
one read of them, so writes through ``.data`` are seen). Switched off here (the fingerprint
replaced by a constant, so the cached folds are always taken), the call is what it would cost
without the check. The floor of the check is reading the weights once: ResNet-50's conv weights
are 102 MB in float32, 51 MB in bfloat16.

    python bench/live_check_cost.py [--batch 1 8] [--dtype fp32 bf16] [--rounds 5] [--calls 10]

Prints, per case, the median ms per call of each variant over the rounds with min-max, the
fingerprint of all the model's weights alone, and the difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import fastres
from fastres import functional as FF
from fastres.harness.environment import environment, hardware_line
from fastres.nn import eval_plan as EP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _per_call_ms(model, x, calls: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(calls):
            model(x)
        return (time.perf_counter() - t0) * 1e3 / calls


def _check(on: bool, real_ep, real_ff) -> None:
    EP.fingerprint = real_ep if on else (lambda ts: 0)
    FF.fingerprint = real_ff if on else (lambda ts: 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=tuple(DTYPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(hardware_line(environment(torch.device("cpu"))))
    real_ep, real_ff = EP.fingerprint, FF.fingerprint
    for dname in args.dtype:
        dt = DTYPES[dname]
        model = fastres.convert(torchvision.models.resnet50()).eval()
        model = model.to(dtype=dt, memory_format=torch.channels_last)
        weights = [t for t in list(model.parameters()) + list(model.buffers())
                   if t.is_floating_point()]
        mb = sum(t.numel() * t.element_size() for t in weights) / 1e6
        fp = []
        for _ in range(10):
            t0 = time.perf_counter()
            real_ff(weights)
            fp.append((time.perf_counter() - t0) * 1e3)
        for n in args.batch:
            x = torch.randn(n, 3, 224, 224).to(dtype=dt, memory_format=torch.channels_last)
            times = {True: [], False: []}
            for on in (True, False):  # warm-up: plans, folds, packings
                _check(on, real_ep, real_ff)
                _per_call_ms(model, x, 2)
            for _ in range(args.rounds):
                for on in (True, False):
                    _check(on, real_ep, real_ff)
                    _per_call_ms(model, x, 1)  # a switch re-plans once: not timed
                    times[on].append(_per_call_ms(model, x, args.calls))
            _check(True, real_ep, real_ff)
            on, off = statistics.median(times[True]), statistics.median(times[False])
            print(f"ResNet-50 eval {dname} N={n} channels_last: check on {on:.2f} ms "
                  f"({min(times[True]):.2f}-{max(times[True]):.2f}), off {off:.2f} ms "
                  f"({min(times[False]):.2f}-{max(times[False]):.2f}): "
                  f"{on - off:+.2f} ms ({(on / off - 1) * 100:+.1f}%); fingerprint of all "
                  f"{mb:.0f} MB of weights alone {statistics.median(fp):.2f} ms "
                  f"({min(fp):.2f}-{max(fp):.2f})")


if __name__ == "__main__":
    main()
