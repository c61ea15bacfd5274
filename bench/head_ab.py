"""ResNet-50 eval with its head (average pool and fc) through ATen's modules against the one call
``fastres_cpu::avg_pool_linear``, switched round by round in one process (both see the machine
alike), frozen fastres (``fastres.convert(freeze=True)``), channels_last, 2 threads.

    python bench/head_ab.py [--rounds 5] [--calls 15]

Each round: the median ms of ``--calls`` calls after 3 warm-up calls, per side; printed: the
median of the rounds' medians, then their min and max.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision

import fastres
from fastres.nn import resnet as fr_resnet

from cpu_ab import median_ms  # bench/ is the script's directory: cpu_ab's timer

CASES = ((torch.bfloat16, 1), (torch.float32, 1), (torch.bfloat16, 8), (torch.float32, 8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    op = fr_resnet._head_op()
    if op is None:
        raise SystemExit("head_ab: the CPU extension has no avg_pool_linear")
    print(f"fastres {fastres.__version__} from {fastres.__file__}; rounds {args.rounds}, "
          f"calls {args.calls}")
    try:
        for dt, n in CASES:
            x = torch.randn(n, 3, 224, 224).to(dt).contiguous(memory_format=torch.channels_last)
            m = fastres.convert(torchvision.models.resnet50(), freeze=True).eval()
            m = m.to(dt, memory_format=torch.channels_last)
            res: dict[str, list[float]] = {"aten head": [], "one-call head": []}
            with torch.no_grad():
                for _ in range(args.rounds):
                    for side in res:
                        fr_resnet._HEAD[:] = [None if side == "aten head" else op]
                        res[side].append(median_ms(lambda: m(x), args.calls))
            cells = ", ".join(f"{k} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
                              for k, v in res.items())
            print(f"resnet50 frozen {str(dt).split('.')[1]} N={n}: {cells} ms")
    finally:
        fr_resnet._HEAD[:] = [op]


if __name__ == "__main__":
    main()
