"""A ResNet-50 training step on the CPU, providers alternating in one process (issue 15, item 4).

    python bench/train_step.py --dtype bf16 --batch 8 --providers eager,fastres,compile
    python bench/train_step.py --dtype fp32 --batch 8 --peak     # peak RSS, one process each

One step is forward, cross-entropy, backward and an SGD (momentum) step, on the same randomised
ResNet-50 (bench.benchlib.randomised), channels_last, the model in ``--dtype``. After two warm-up
steps per provider, ``--rounds`` rounds run each provider once in turn (alternating, so a busy
spell of the machine hits all of them); the median, min and max are printed with the machine's
load average. ``--peak`` instead runs each provider in its own process for two steps and prints
the process's peak resident memory (``ru_maxrss``: model, optimizer state, activations and the
libraries, which are the same for every provider). Provider ``fastres-aten`` is fastres with its
own oneDNN primitives switched off (ATen's convolutions): the A/B of those primitives;
``fastres-direct`` is fastres with its float32 3x3 backward data on the own primitive (oneDNN
2.6's direct kernel) instead of ATen's (``fastres_cpu::set_aten_spatial_bwd_data``);
``fastres-perop`` is fastres without the CPU's C++ training unit (csrc/cpu/unit_cpu.h): each
block's ops one torch.ops call each, under a ``torch.autograd.Function``.
``--conv-share`` adds, after the timed rounds, one profiled step per provider: the self time of
its convolution ops (forward and backward: ATen's oneDNN calls, or fastres' ``conv_stats`` and
``conv_bwd`` on its own primitives, which include their statistics and prologue passes) against
the rest, and the ceiling that puts on any speed-up that leaves the convolutions as they are
(eager's step over the convolutions alone).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _models(providers: list[str], dtype: torch.dtype, batch: int):
    import benchlib as B
    import torchvision

    import fastres
    from fastres.harness.rule import randomise_bn

    torch.manual_seed(0)
    base = B.place(randomise_bn(torchvision.models.resnet50(), 1), torch.device("cpu"),
                   dtype, True).train()
    x = B.randn((batch, 3, 224, 224), torch.device("cpu"), dtype, True, seed=10)
    y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(3))
    models = {}
    for p in providers:
        m = copy.deepcopy(base)
        if p in ("fastres", "fastres-aten", "fastres-direct", "fastres-perop"):
            m = fastres.convert(m)
        elif p == "compile":
            m = torch.compile(m)
        elif p != "eager":
            raise SystemExit(f"unknown provider {p!r}: eager, fastres, fastres-aten, "
                             "fastres-direct, fastres-perop or compile")
        models[p] = (m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9))
    return models, x, y


def _switch(name: str, on: bool) -> bool:
    """Set one of fastres' CPU switches (fastres_cpu::set_own_primitives: the own oneDNN
    primitives, csrc/cpu/dnnl_conv*.cpp; set_aten_spatial_bwd_data: float32 3x3 backward data on
    ATen's path); returns the previous setting (True where the build has none)."""
    from fastres.backends import extension

    if extension.load()[0] is None or not hasattr(torch.ops.fastres_cpu, name):
        return True
    return bool(getattr(torch.ops.fastres_cpu, name)(on))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--providers", default="eager,fastres")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak", action="store_true")
    ap.add_argument("--conv-share", action="store_true")
    a = ap.parse_args(argv)
    providers = a.providers.split(",")
    if a.peak:
        for p in providers:
            cmd = [sys.executable, __file__, "--dtype", a.dtype, "--batch", str(a.batch),
                   "--providers", p, "--rounds", "1", "--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            print(out.strip().splitlines()[-1])
        return 0
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    models, x, y = _models(providers, dtype, a.batch)

    from fastres.backends.dispatch import CPUBackend

    unit = CPUBackend.eager_unit

    def step(p):
        m, opt = models[p]
        own = _switch("set_own_primitives", p != "fastres-aten")
        rule = _switch("set_aten_spatial_bwd_data", p != "fastres-direct")
        if p == "fastres-perop":  # no C++ unit: no training plan, the per-op autograd Function
            CPUBackend.eager_unit = lambda self: None
        try:
            F.cross_entropy(m(x).float(), y).backward()
        finally:
            CPUBackend.eager_unit = unit
            _switch("set_own_primitives", own)
            _switch("set_aten_spatial_bwd_data", rule)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for p in providers:
        for _ in range(2):
            step(p)
    load = os.getloadavg()[0]
    ts = {p: [] for p in providers}
    for _ in range(a.rounds):
        for p in providers:
            t = time.perf_counter()
            step(p)
            ts[p].append((time.perf_counter() - t) * 1e3)
    from fastres.backends.records import cpu_model

    print(f"# ResNet-50 training step, {a.dtype}, N={a.batch}, channels_last, {a.threads} threads,"
          f" load average {load:.2f} at the start, {a.rounds} alternating rounds; {cpu_model()}")
    for p in providers:
        v = sorted(ts[p])
        print(f"{p:8s} median {statistics.median(v):8.1f} ms  min {v[0]:8.1f}  max {v[-1]:8.1f}")
    if a.conv_share:
        _conv_share(providers, step, {p: statistics.median(v) for p, v in ts.items()})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'+'.join(providers)}: peak RSS {rss:.0f} MiB ({a.dtype}, N={a.batch})")
    return 0


def _is_conv(key: str) -> bool:
    """A profiler key of a convolution op: ATen's, or fastres' training ops that run one."""
    return "convolution" in key or key in ("fastres::conv_stats", "fastres::conv_bwd")


def _conv_share(providers, step, median_ms, rounds: int = 3) -> None:
    """Profiled steps, providers alternating: median convolution self time against the rest."""
    from torch.profiler import ProfilerActivity, profile

    tot, conv = {p: [] for p in providers}, {p: [] for p in providers}
    for _ in range(rounds):
        for p in providers:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(p)
            ev = prof.key_averages()
            tot[p].append(sum(e.self_cpu_time_total for e in ev) / 1e3)
            conv[p].append(sum(e.self_cpu_time_total for e in ev if _is_conv(e.key)) / 1e3)
    med = {p: statistics.median(conv[p]) for p in providers}
    for p in providers:
        t, c = statistics.median(tot[p]), med[p]
        print(f"{p:8s} profiled step {t:8.1f} ms: convolutions {c:7.1f} ms ({100 * c / t:.0f}%),"
              f" the rest {t - c:6.1f} ms (medians of {rounds} alternating profiled steps)")
    if "eager" in median_ms:
        best = min(med.values())
        print(f"ceiling with these convolutions: eager's median {median_ms['eager']:.1f} ms over "
              f"the fastest convolution time {best:.1f} ms = {median_ms['eager'] / best:.2f}x "
              "(everything but the convolutions free)")


if __name__ == "__main__":
    raise SystemExit(main())
