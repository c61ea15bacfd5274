"""The CPU workloads of an A/B between two checkouts: run it from each checkout's root in turn
(alternating processes, so both see the machine alike) and compare the printed medians.

    PYTHONPATH=. python bench/cpu_ab.py [--cases NAME ...] [--calls N] [--batch N] [--size S]

Converted torchvision Bottleneck(256, 64), N=8, 56x56, channels_last: eval (no_grad) and a training
step (forward, sum, backward); converted ResNet-50, N=1 (``--batch``), 224x224 (``--size``), eval,
live and frozen (``fastres.convert(freeze=True)``); float32 and bfloat16; 2 threads. Each
figure: the median ms of one process's calls (eval 15, train 8, ResNet-50 10 by default) after 3
warm-up calls, with the fastres it imported (``PYTHONPATH=.``: the current checkout's, where an
editable install would otherwise import another's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import fastres

CL = torch.channels_last
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_ms(f, n: int) -> float:
    """The median ms of ``n`` calls of ``f`` after 3 warm-up calls (bench/head_ab.py's too)."""
    for _ in range(3):
        f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _block(dt):
    blk = fastres.convert(torchvision.models.resnet.Bottleneck(256, 64)).to(dtype=dt,
                                                                           memory_format=CL)
    return blk, torch.randn(8, 256, 56, 56, dtype=dt).contiguous(memory_format=CL)


def block_eval(dt, calls):
    blk, x = _block(dt)
    blk.eval()
    with torch.no_grad():
        return median_ms(lambda: blk(x), calls or 15)


def block_train(dt, calls):
    blk, x = _block(dt)
    blk.train()

    def step():
        blk(x).float().sum().backward()
        for p in blk.parameters():
            p.grad = None

    return median_ms(step, calls or 8)


SHAPE = {"batch": 1, "size": 224}


def resnet50_eval(dt, calls, freeze=False):
    m = torchvision.models.resnet50().to(dtype=dt, memory_format=CL).eval()
    m = fastres.convert(m, freeze=freeze)
    x = torch.randn(SHAPE["batch"], 3, SHAPE["size"], SHAPE["size"],
                    dtype=dt).contiguous(memory_format=CL)
    with torch.no_grad():
        return median_ms(lambda: m(x), calls or 10)


def resnet50_frozen(dt, calls):
    return resnet50_eval(dt, calls, freeze=True)


CASES = {f"{name} {d}": (fn, dt) for d, dt in DTYPES.items()
         for name, fn in (("block eval", block_eval), ("block train", block_train),
                          ("resnet50 eval", resnet50_eval),
                          ("resnet50 frozen", resnet50_frozen))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    ap.add_argument("--calls", type=int, default=0, help="timed calls per case (default: per case)")
    ap.add_argument("--batch", type=int, default=1, help="ResNet-50's batch")
    ap.add_argument("--size", type=int, default=224, help="ResNet-50's input side")
    args = ap.parse_args(argv)
    SHAPE.update(batch=args.batch, size=args.size)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"# fastres from {fastres.__file__}", flush=True)
    for name in args.cases:
        fn, dt = CASES[name]
        print(f"{name:20s} {fn(dt, args.calls):9.2f} ms", flush=True)


if __name__ == "__main__":
    main()
