"""Every backend's ops at ResNet-50's real training shapes, one line per op output.

    python -P bench/op_diag.py [--device cuda] [--backends cuda triton] [--batch 32] [--profile]

The unit tests (tests/test_ops.py) run the ops at tiny shapes, where every kernel uses one
split, one chunk and one tile. The first H200 run failed only at real sizes (bf16 training of
every Bottleneck on the cuda backend, while the tiny-shape tests passed), so this runs each op
at the sizes of a ResNet-50 block at batch 32 and prints, per output, the largest error relative
to the largest reference value, against the float32 reference computed from the same inputs.
A line is BAD when that exceeds the dtype's bound below (bf16 rounding is 2^-8 = 4e-3 relative;
the bound leaves room for accumulation order, and a broken kernel is off by orders of magnitude).

--profile also runs one eval and one training step of a fused layer3.0 block per backend under
torch.profiler and prints the top entries by device time and by host time (why a backend is slow).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fastres import backends, reference

BOUND = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}

# (name, C, K, R, stride, H): the convolutions of ResNet-50 blocks whose kernels differ.
CONVS = [
    ("l1-3x3", 64, 64, 3, 1, 56),
    ("l1-1x1-expand", 64, 256, 1, 1, 56),
    ("l2-3x3s2", 128, 128, 3, 2, 56),
    ("l3-1x1-reduce", 1024, 256, 1, 1, 14),
    ("l4-3x3", 512, 512, 3, 1, 7),
]


def _rel(o: torch.Tensor, r: torch.Tensor) -> float:
    if o.shape != r.shape:
        return float("inf")
    o, r = o.double(), r.double()
    if not torch.isfinite(o).all():
        return float("nan")
    den = r.abs().max().item() or 1.0
    return (o - r).abs().max().item() / den


def _cases(n: int, dtype: torch.dtype, device: str):
    """(label, op name, args) at real sizes; activations channels_last."""
    cl = torch.channels_last
    f32 = dict(device=device, dtype=torch.float32)

    def act(c, h):
        return torch.randn(n, c, h, h, device=device).to(dtype).contiguous(memory_format=cl)

    for name, c, k, r, s, h in CONVS:
        p = (h + 2 * (r // 2) - r) // s + 1
        x = act(c, h)
        w = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
        w = w.contiguous(memory_format=cl)
        sc, sh = torch.rand(c, **f32) + 0.5, torch.randn(c, **f32) * 0.5
        cv = ([s, s], [r // 2, r // 2], [1, 1], 1)
        g = act(k, p)
        yield f"{name} conv_bias_act", "conv_bias_act", (x, w, torch.randn(k, **f32), None, *cv, True)
        yield f"{name} conv_stats+prologue", "conv_stats", (x, w, sc, sh, True, *cv)
        yield f"{name} conv_bwd+prologue", "conv_bwd", (g, x, w, sc, sh, True, *cv, [True, True])
        yield f"{name} conv_bwd", "conv_bwd", (g, x, w, None, None, False, *cv, [True, True])
    for c, h in ((64, 56), (256, 14), (512, 7)):
        x, go = act(c, h), act(c, h)
        xs = x.float()
        mean = xs.mean((0, 2, 3))
        invstd = torch.rsqrt(xs.var((0, 2, 3), unbiased=False) + 1e-5)
        wt, sc, sh = torch.rand(c, **f32) + 0.5, torch.rand(c, **f32) + 0.5, torch.randn(c, **f32)
        yield f"C{c}@{h} bn_relu_bwd", "bn_relu_bwd", (go, x, mean, invstd, wt, sc, sh, True)
        out = torch.relu(act(c, h))
        yield (f"C{c}@{h} bn_add_relu_bwd", "bn_add_relu_bwd",
               (go, out, x, mean, invstd, wt, None, None, None, None))
        yield (f"C{c}@{h} bn_add_relu_bwd+bn_res", "bn_add_relu_bwd",
               (go, out, x, mean, invstd, wt, act(c, h), mean, invstd, wt))
        s, q = xs.sum((0, 2, 3)), (xs * xs).sum((0, 2, 3))
        yield f"C{c}@{h} bn_add_relu", "bn_add_relu", (x, sc, sh, act(c, h), None, None, 0, True)
        yield (f"C{c}@{h} bn_finalize", "bn_finalize",
               (s, q, wt, sh, None, None, None, n * h * h, 0.1, 1e-5))


def _conv_case(op: str, n: int, c: int, k: int, r: int, s: int, h: int, dtype, device,
               prologue: bool):
    cl = torch.channels_last
    f32 = dict(device=device, dtype=torch.float32)
    p = (h + 2 * (r // 2) - r) // s + 1
    x = torch.randn(n, c, h, h, device=device).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(k, c, r, r, device=device) / (c * r * r) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=cl)
    sc, sh = (torch.rand(c, **f32) + 0.5, torch.randn(c, **f32) * 0.5) if prologue else (None, None)
    cv = ([s, s], [r // 2, r // 2], [1, 1], 1)
    if op == "conv_bwd":
        g = torch.randn(n, k, p, p, device=device).to(dtype).contiguous(memory_format=cl)
        return (g, x, w, sc, sh, prologue, *cv, [True, True])
    return (x, w, sc, sh, prologue, *cv)


def sweep(device: str, names: list[str], dtype: torch.dtype) -> None:
    """Where does each conv op start failing? Batch, image side, channels and kernel varied one
    at a time around the smallest shapes, so a size-dependent bug (splits, chunks, tiles) shows
    its threshold."""
    print("--- sweep: conv_bwd and conv_stats (prologue), per backend; errors per output")
    grid = [(n, c, k, r, s, h) for r, s in ((3, 1), (1, 1), (3, 2)) for c, k in ((16, 16), (64, 64))
            for n, h in ((1, 8), (2, 14), (1, 56), (4, 28), (8, 56), (32, 56))]
    for op in ("conv_bwd", "conv_stats"):
        for pro in (False, True):
            for n, c, k, r, s, h in grid:
                args = _conv_case(op, n, c, k, r, s, h, dtype, device, pro)
                ref = getattr(reference, op)(*[_up(a) for a in args])
                for b in names:
                    try:
                        out = backends.op(b, op)(*args)
                    except Exception as exc:  # noqa: BLE001
                        print(f"{b} {op} pro={pro:d} N{n} C{c} K{k} r{r} s{s} H{h}: ERROR {exc}")
                        continue
                    errs = [_rel(o, rr) for o, rr in zip(out, ref, strict=True)
                            if isinstance(rr, torch.Tensor) and rr.numel()]
                    flag = "BAD" if any(not e <= BOUND[dtype] for e in errs) else "ok"
                    print(f"{b:7s} {op:10s} pro={pro:d} N{n:<3d} C{c:<3d} K{k:<3d} r{r} s{s} H{h:<3d}"
                          f" {' '.join(f'{e:.1e}' for e in errs)} {flag}")
        sys.stdout.flush()


def _up(a):
    return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def diag(device: str, names: list[str], n: int, dtype: torch.dtype) -> int:
    bad = 0
    torch.backends.cudnn.allow_tf32 = False
    for label, op, args in _cases(n, dtype, device):
        ref = getattr(reference, op)(*[_up(a) for a in args])
        ref = ref if isinstance(ref, tuple) else (ref,)
        for b in names:
            t0 = time.perf_counter()
            try:
                out = backends.op(b, op)(*args)
            except Exception as exc:  # noqa: BLE001 - a diagnostic reports every failure
                print(f"{b:9s} {label:32s} ERROR {type(exc).__name__}: {str(exc)[:150]}")
                bad += 1
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3
            out = out if isinstance(out, tuple) else (out,)
            errs = []
            for i, (o, r) in enumerate(zip(out, ref, strict=True)):
                if isinstance(r, torch.Tensor) and r.numel() and r.is_floating_point():
                    e = _rel(o, r)
                    ok = e <= BOUND[dtype]
                    bad += not ok
                    errs.append(f"[{i}] {e:.2e}{'' if ok else ' BAD'}")
            print(f"{b:9s} {label:32s} {' '.join(errs)}  ({dt:.1f} ms incl. first-call)")
            sys.stdout.flush()
    return bad


def profile(device: str, names: list[str], n: int, dtype: torch.dtype) -> None:
    import os  # noqa: PLC0415

    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as tprofile

    import fastres  # noqa: PLC0415

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for b in names:
        os.environ["FASTRES_BACKEND"] = b
        block = fastres.BottleneckBlock(512, 256, stride=2, downsample=torch.nn.Sequential(
            torch.nn.Conv2d(512, 1024, 1, 2, bias=False), torch.nn.BatchNorm2d(1024)))
        block = block.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(n, 512, 28, 28, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        for mode in ("eval", "train"):
            block.train(mode == "train")

            def step():
                if mode == "eval":
                    with torch.no_grad():
                        block(x)
                else:
                    block(x).sum().backward()

            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            with tprofile(activities=acts) as prof:
                for _ in range(5):
                    step()
                if device == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            print(f"--- profile {b} {mode} layer3.0 N={n} {dtype} (5 steps), by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
            if device == "cuda":
                print(f"--- profile {b} {mode}, by host time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8,
                                                max_name_column_width=60))
        os.environ.pop("FASTRES_BACKEND", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-diag", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="conv ops over a ladder of sizes")
    a = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    avail = backends.available()  # loads fastres._C (registers torch.ops.fastres) and triton ops
    for n in a.backends or ():
        if avail.get(n, "unknown backend") is not None:
            print(f"op_diag: backend {n} unavailable: {avail.get(n, 'unknown backend')}")
            return 2
    names = a.backends or [n for n, why in avail.items()
                           if why is None and n != "reference"
                           and (a.device == "cuda" or n not in ("cuda", "triton"))]
    torch.manual_seed(0)
    print(f"op_diag: {a.device} "
          f"{torch.cuda.get_device_name() if a.device == 'cuda' else ''} backends {names} "
          f"N={a.batch} {dtype}; error = max|out - ref| / max|ref| vs float32 reference")
    bad = 0 if a.no_diag else diag(a.device, names, a.batch, dtype)
    if a.sweep:
        sweep(a.device, names, dtype)
    if a.profile:
        profile(a.device, names, a.batch, dtype)
    print(f"op_diag: {bad} BAD")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
