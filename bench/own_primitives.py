"""fastres' own oneDNN primitives (csrc/cpu/dnnl_conv.cpp) against ATen's path, eager and
torch.compile, in one process, providers alternating round by round (A B A B ...), so both see
the machine alike; each figure is the median over rounds with the min and max.

    python bench/own_primitives.py [--cases peak threads tiny residual block block_train
                                    train_convs resnet50 compile resnet50_ab]

peak: this CPU's torch.mm fp32/bf16 GFLOP/s and copy GB/s (bench/cpu_profile.py), the floors'
rates. threads: OpenMP runtimes mapped and threads alive, own path on and off. tiny: per-call us
of a 1x1 conv + bias + ReLU on 1x64x4x4 channels_last (the work is nothing: the per-call
overhead). residual: the ways of adding a residual. block: converted torchvision
Bottleneck(256, 64) eval on 8x256x56x56 channels_last (no_grad), fp32 and bf16, with its compute
floor at torch.mm's rate. block_train: the same block's training step (forward, sum, backward)
against eager and torch.compile. train_convs: every ResNet-50 training convolution at N=8,
forward, backward data and backward weights, own against ATen's. resnet50: converted ResNet-50 eval, N=1 and 8, 224x224. compile: a
converted ResNet-50 (N=1) and Bottleneck eager against torch.compile of them (default, and with
Inductor's freezing), and the weight reorders per call. resnet50_ab: ResNet-50 eval, N=1 and 8:
fastres, fastres + torch.compile, torchvision compiled with Inductor's freezing, eager. The own path
is switched with fastres_cpu::set_own_primitives; "aten" is the same fastres with it off.
"""

# ruff: noqa: B023  (every closure here is timed inside the loop iteration that made it)
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torchvision

import fastres
from fastres.backends import extension

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CL = torch.channels_last
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _timed_ms(f, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls * 1e3


def _alternate(providers: dict, calls: int, rounds: int, warm: int = 3) -> dict:
    """{name: [ms per call of each round]}: every provider warmed, then rounds of A B C ..."""
    ops = torch.ops.fastres_cpu
    for own, f in providers.values():
        ops.set_own_primitives(own)
        for _ in range(warm):
            f()
    out = {name: [] for name in providers}
    for _ in range(rounds):
        for name, (own, f) in providers.items():
            ops.set_own_primitives(own)
            out[name].append(_timed_ms(f, calls))
    ops.set_own_primitives(True)
    return out


def _report(title: str, res: dict, unit: str = "ms", scale: float = 1.0, floor=None) -> None:
    base = statistics.median(res.get("fastres own", res.get("own", next(iter(res.values())))))
    print(title + (f"  (floor {floor:.2f} {unit})" if floor else ""))
    for name, v in res.items():
        v = sorted(x * scale for x in v)
        med = statistics.median(v)
        print(f"  {name:18s} median {med:9.2f} {unit}  (min {v[0]:.2f}, max {v[-1]:.2f}, "
              f"{len(v)} rounds)  first row {med / (base * scale):.2f}x faster")


def case_peak(args) -> dict:
    from cpu_profile import peak_rates  # noqa: PLC0415

    r = peak_rates(args.threads)
    print(f"peak ({args.threads} threads): {r}")
    return r


def case_tiny(args, peak) -> None:
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        for dn, dt in DTYPES.items():
            x = torch.randn(1, 64, 4, 4, dtype=dt).contiguous(memory_format=CL)
            w = torch.randn(64, 64, 1, 1, dtype=dt) / 8
            b = torch.randn(64, dtype=dt)
            torch.ops.fastres_cpu.weight_cache_allow(w)  # as the eval plans' folded weights

            def fused():
                return torch.ops.fastres_cpu.conv_bias_act_finite(x, w, b, None, [1, 1], [0, 0],
                                                                  [1, 1], 1, True)

            def eager():
                return torch.conv2d(x, w, b).relu_()

            res = _alternate({"own": (True, fused), "aten": (False, fused),
                              "eager conv+relu_": (True, eager)}, 500, args.rounds)
            _report(f"tiny 1x1 conv+bias+ReLU 1x64x4x4 {dn}, {threads} thread(s), us per call",
                    res, "us", 1e3)
    torch.set_num_threads(args.threads)


def case_block(args, peak) -> None:
    flops = 0
    for cin, cout, k in ((256, 64, 1), (64, 64, 3), (64, 256, 1)):
        flops += 2 * 8 * 56 * 56 * cin * cout * k * k
    for dn, dt in DTYPES.items():
        tv = torchvision.models.resnet.Bottleneck(256, 64).eval().to(dtype=dt, memory_format=CL)
        fr = fastres.convert(tv)
        x = torch.randn(8, 256, 56, 56, dtype=dt).contiguous(memory_format=CL)
        with torch.no_grad():
            comp = torch.compile(tv)
            comp(x)
            res = _alternate({"fastres own": (True, lambda: fr(x)),
                              "fastres aten": (False, lambda: fr(x)),
                              "torch.compile": (True, lambda: comp(x)),
                              "eager": (True, lambda: tv(x))}, 5, args.rounds)
        floor = flops / (peak[f"mm_{dn}_gflops"] * 1e9) * 1e3 if peak else None
        _report(f"Bottleneck(256, 64) eval 8x256x56x56 {dn} ({flops / 1e9:.2f} GFLOP)", res,
                floor=floor)


def case_residual(args, peak) -> None:
    """Bottleneck(256, 64)'s conv3 with its residual (8x64x56x56 -> 256, 1x1), own primitives:
    out of place (fp32: a binary add post-op; bf16: the residual copied into the output, then
    the sum post-op), a copy then the sum into it, and the sum into the residual itself."""
    ops = torch.ops.fastres_cpu
    for dn, dt in DTYPES.items():
        x = torch.randn(8, 64, 56, 56, dtype=dt).contiguous(memory_format=CL)
        w = torch.randn(256, 64, 1, 1, dtype=dt) / 8
        b = torch.randn(256, dtype=dt)
        r = torch.randn(8, 256, 56, 56, dtype=dt).contiguous(memory_format=CL)
        ops.weight_cache_allow(w)
        conv = ([1, 1], [0, 0], [1, 1], 1, True)
        res = _alternate({
            "out of place": (True, lambda: ops.conv_bias_act_finite(x, w, b, r, *conv)),
            "copy + sum": (True, lambda: ops.conv_bias_act_finite_into(r.clone(), x, w, b,
                                                                       *conv)),
            "sum into": (True, lambda: ops.conv_bias_act_finite_into(r, x, w, b, *conv)),
        }, 5, args.rounds)
        _report(f"conv3 + residual {dn}", res)


def case_resnet50(args, peak) -> None:
    for n in (1, 8):
        for dn, dt in DTYPES.items():
            m = fastres.convert(torchvision.models.resnet50()).eval().to(dtype=dt,
                                                                       memory_format=CL)
            x = torch.randn(n, 3, 224, 224, dtype=dt).contiguous(memory_format=CL)
            with torch.no_grad():
                res = _alternate({"fastres own": (True, lambda: m(x)),
                                  "fastres aten": (False, lambda: m(x))},
                                 3 if n == 1 else 1, args.rounds)
            floor = (8.18e9 * n / (peak[f"mm_{dn}_gflops"] * 1e9) * 1e3) if peak else None
            _report(f"ResNet-50 eval N={n} {dn}", res, floor=floor)


def _reorders_per_call(f, calls: int = 3) -> float:
    """Weight reorders of the own path per call of ``f``, once warm."""
    f()
    f()
    before = torch.ops.fastres_cpu.own_primitives_stats()[2]
    for _ in range(calls):
        f()
    return (torch.ops.fastres_cpu.own_primitives_stats()[2] - before) / calls


def case_compile(args, peak) -> None:
    """A converted model eager against torch.compile of it (default, and with Inductor's
    freezing), inference: ResNet-50 N=1 and Bottleneck(256, 64) on 8x256x56x56, fp32 and bf16,
    with the weight reorders per call under torch.no_grad() and torch.inference_mode()."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    cases = (("ResNet-50 N=1", lambda: torchvision.models.resnet50(), (1, 3, 224, 224), 3),
             ("Bottleneck(256, 64) 8x256x56x56",
              lambda: torchvision.models.resnet.Bottleneck(256, 64), (8, 256, 56, 56), 3))
    for title, make, shape, calls in cases:
        for dn, dt in DTYPES.items():
            fr = fastres.convert(make()).eval().to(dtype=dt, memory_format=CL)
            x = torch.randn(*shape, dtype=dt).contiguous(memory_format=CL)
            torch._dynamo.reset()
            comp = torch.compile(fr)
            with torch.no_grad():
                comp(x)
                with inductor_config.patch(freezing=True):
                    frozen = torch.compile(fr)
                    frozen(x)
                providers = {"fastres": (True, lambda: fr(x)),
                             "fastres + compile": (True, lambda: comp(x)),
                             "+ compile, freezing": (True, lambda: frozen(x))}
                res = _alternate(providers, calls, args.rounds)
            _report(f"{title} eval {dn}, fastres eager against compiled", res)
            for ctx in (torch.no_grad, torch.inference_mode):
                with ctx():
                    counts = {n: _reorders_per_call(f) for n, (_, f) in providers.items()}
                print(f"  weight reorders per call under {ctx.__name__}: {counts}")
    torch._dynamo.reset()


def case_resnet50_ab(args, peak) -> None:
    """ResNet-50 eval (randomised BatchNorms), N=1 and 8, fp32 and bf16, 224x224: fastres,
    fastres with frozen weights (fastres.freeze), fastres + torch.compile, torchvision under
    torch.compile with Inductor's freezing, and eager torchvision, alternating. Each output judged
    against float64 by the suite's rule first (max-abs in fp32, RMS in bf16, as
    bench/bench_peers.py), with the floor at torch.mm's rate."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    from fastres.harness.rule import randomise_bn, verdict, verdict_rms  # noqa: PLC0415

    tv32 = randomise_bn(torchvision.models.resnet50()).eval()
    for n in (1, 8):
        x32 = torch.randn(n, 3, 224, 224)
        with torch.no_grad():
            ref = copy.deepcopy(tv32).double()(x32.double())
        for dn, dt in DTYPES.items():
            tv = copy.deepcopy(tv32).to(dtype=dt, memory_format=CL)
            fr = fastres.convert(copy.deepcopy(tv))
            frf = fastres.convert(copy.deepcopy(tv), freeze=True)
            x = x32.to(dt).contiguous(memory_format=CL)
            torch._dynamo.reset()
            with torch.no_grad():
                comp = torch.compile(fr)
                comp(x)
                with inductor_config.patch(freezing=True):
                    frozen = torch.compile(tv)
                    frozen(x)
                providers = {"fastres": (True, lambda: fr(x)),
                             "fastres frozen": (True, lambda: frf(x)),
                             "fastres + compile": (True, lambda: comp(x)),
                             "tv compile freezing": (True, lambda: frozen(x)),
                             "tv eager": (True, lambda: tv(x))}
                want = tv(x).double()
                rule = verdict_rms if dt == torch.bfloat16 else verdict
                for name, (_, f) in providers.items():
                    print(f"  {rule(name, f().double(), want, ref, dt)}")
                res = _alternate(providers, 3 if n == 1 else 1, args.rounds)
            floor = (8.18e9 * n / (peak[f"mm_{dn}_gflops"] * 1e9) * 1e3) if peak else None
            _report(f"ResNet-50 eval N={n} {dn}", res, floor=floor)
    torch._dynamo.reset()


def case_threads(args, peak) -> None:
    """OpenMP runtimes mapped and threads alive (/proc/self/task) after ResNet-50 eval calls,
    own path on and off: one pool means the same count either way."""
    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if "gomp" in ln or "iomp" in ln})
    print(f"OpenMP runtimes mapped: {libs}")
    m = fastres.convert(torchvision.models.resnet50()).eval().to(memory_format=CL)
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=CL)
    for own in (True, False, True):
        torch.ops.fastres_cpu.set_own_primitives(own)
        with torch.no_grad():
            for _ in range(3):
                m(x)
        n = len(os.listdir("/proc/self/task"))
        print(f"  own path {'on ' if own else 'off'}: {n} threads in /proc/self/task after 3 "
              f"ResNet-50 calls (torch.get_num_threads() = {torch.get_num_threads()})")
    torch.ops.fastres_cpu.set_own_primitives(True)


def case_block_train(args, peak) -> None:
    """A converted Bottleneck(256, 64)'s training step (forward, sum, backward; gradients reset
    untimed by set_to_none) on 8x256x56x56, against eager torchvision and its torch.compile:
    the issue's single-block training bar (1.15x eager)."""
    for dn, dt in DTYPES.items():
        torch.manual_seed(0)
        tv = torchvision.models.resnet.Bottleneck(256, 64).train().to(dtype=dt,
                                                                      memory_format=CL)
        fr = fastres.convert(copy.deepcopy(tv))
        comp = torch.compile(copy.deepcopy(tv))
        x = torch.randn(8, 256, 56, 56, dtype=dt).contiguous(memory_format=CL)

        def step(m):
            def f():
                m(x).float().sum().backward()
                for p in m.parameters():
                    p.grad = None
            return f

        res = _alternate({"fastres own": (True, step(fr)), "fastres aten": (False, step(fr)),
                          "torch.compile": (True, step(comp)), "eager": (True, step(tv))},
                         3, args.rounds)
        _report(f"Bottleneck(256, 64) training step 8x256x56x56 {dn}", res)


#: Every ResNet-50 convolution of a training step but the stem's: (in channels, out channels,
#: kernel, input size, stride, how many per step).
RESNET50_CONVS = (
    (64, 64, 1, 56, 1, 1), (64, 64, 3, 56, 1, 3), (256, 64, 1, 56, 1, 2), (64, 256, 1, 56, 1, 4),
    (256, 128, 1, 56, 1, 1), (128, 128, 3, 56, 2, 1), (256, 512, 1, 56, 2, 1),
    (512, 128, 1, 28, 1, 3), (128, 128, 3, 28, 1, 3), (128, 512, 1, 28, 1, 4),
    (512, 256, 1, 28, 1, 1), (256, 256, 3, 28, 2, 1), (512, 1024, 1, 28, 2, 1),
    (1024, 256, 1, 14, 1, 5), (256, 256, 3, 14, 1, 5), (256, 1024, 1, 14, 1, 6),
    (1024, 512, 1, 14, 1, 1), (512, 512, 3, 14, 2, 1), (1024, 2048, 1, 14, 2, 1),
    (2048, 512, 1, 7, 1, 2), (512, 512, 3, 7, 1, 2), (512, 2048, 1, 7, 1, 3),
)


def case_train_convs(args, peak) -> None:
    """Each ResNet-50 training convolution at N=8 (conv_stats without prologue, conv_bwd's
    backward data alone and backward weights alone), own primitives against ATen's path, and for
    backward data the own primitive with and without the rule that sends float32 3x3 backward
    data to ATen (set_aten_spatial_bwd_data); medians over rounds, then summed per step (times
    each shape's count)."""
    ops, cpu = torch.ops.fastres, torch.ops.fastres_cpu
    n = 8

    def with_rule(on, f):
        def g():
            prev = cpu.set_aten_spatial_bwd_data(on)
            try:
                return f()
            finally:
                cpu.set_aten_spatial_bwd_data(prev)
        return g

    for dn, dt in DTYPES.items():
        print(f"ResNet-50 training convolutions, N={n}, {dn}: median ms per call (min-max)")
        tot: dict = {}
        for ci, co, k, hw, s, count in RESNET50_CONVS:
            p = k // 2
            ho = (hw + 2 * p - k) // s + 1
            x = torch.randn(n, ci, hw, hw, dtype=dt).contiguous(memory_format=CL)
            w = (torch.randn(co, ci, k, k, dtype=dt) / (ci * k * k) ** 0.5).contiguous(
                memory_format=CL)
            g = torch.randn(n, co, ho, ho, dtype=dt).contiguous(memory_format=CL)
            conv = ([s, s], [p, p], [1, 1], 1)

            def fwd():
                return ops.conv_stats(x, w, None, None, False, *conv)

            def bwd_d():
                return ops.conv_bwd(g, x, w, None, None, False, *conv, [True, False])

            def bwd_w():
                return ops.conv_bwd(g, x, w, None, None, False, *conv, [False, True])

            res = _alternate({"fwd own": (True, fwd), "fwd aten": (False, fwd),
                              "bwd_d own": (True, bwd_d),
                              "bwd_d own, no rule": (True, with_rule(False, bwd_d)),
                              "bwd_d aten": (False, bwd_d),
                              "bwd_w own": (True, bwd_w), "bwd_w aten": (False, bwd_w)},
                             1, args.rounds, warm=2)
            cells = []
            for name, v in res.items():
                med = statistics.median(v)
                tot[name] = tot.get(name, 0.0) + med * count
                cells.append(f"{name} {med:.2f} ({min(v):.2f}-{max(v):.2f})")
            print(f"  {ci}->{co} {k}x{k} s{s} {hw}x{hw} (x{count}): " + ", ".join(cells))
        print(f"  summed per step ({dn}): "
              + ", ".join(f"{name} {v:.1f}" for name, v in tot.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+",
                    default=["peak", "threads", "tiny", "residual", "block", "resnet50"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    extension.load()
    built = torch.ops.fastres_cpu.own_primitives_built()
    if not built:
        sys.exit("fastres was built without oneDNN's headers: no own-primitive path to time")
    from fastres.backends.records import cpu_model  # noqa: PLC0415

    print(f"{cpu_model()}; fastres {fastres.__version__} ({os.path.dirname(fastres.__file__)}), "
          f"torch {torch.__version__}, {built}, {args.threads} threads, load average at start "
          f"{os.getloadavg()}")
    peak = case_peak(args) if "peak" in args.cases else None
    for name in ("threads", "tiny", "residual", "block", "block_train", "train_convs",
                 "resnet50", "compile", "resnet50_ab"):
        if name in args.cases:
            globals()[f"case_{name}"](args, peak)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
