"""Whole ResNet-50: inference and training images per second beside the MLPerf figures, where the
time goes per kernel class against its roofline floor, and every ResNet-50 convolution bare
(cuDNN against the fastres kernels).

    python -P bench/resnet50_throughput.py [--modes infer train] [--dtypes bf16 fp32]
        [--batch 256] [--largest] [--providers torchvision fastres-cuda ...] [--convs]
        [--budget-s 150]
        [--json OUT.json] [--markdown OUT.md]

Throughput: channels_last, random inputs and labels (never zeros); inference is the eval forward,
training one step: forward, cross-entropy, backward, SGD with momentum, the BatchNorm running
statistics updated (train mode). bf16 is the model and the data in bfloat16; fp32 runs with TF32
on (cuDNN and matmul), as MLPerf-class fp32 runs do. Each configuration is timed by the project's
one timer (fastres.harness.timer) in three kinds: device (CUPTI kernel time), eager wall time and
CUDA-graph replay wall time (the whole step captured once: ``torch.cuda.graph``); img/s is N over
each. ``--largest`` also runs the largest batch that fits (doubling from N until out of memory).
Before timing, each model's eval logits on 8 images are judged against the float64 torchvision
model by the tolerance rule (fastres.harness.rule).

The GPU is recognised from ``torch.cuda.get_device_name`` (H100 or H200) and its MLPerf figures
and roofline rates printed beside the table. On a CPU everything runs at tiny sizes with the
timer's CPU stand-ins (profiler op time, the fake graph), so that the script is exercised by tests.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also under python -P
import benchlib as B  # noqa: E402

from fastres.harness import rule, timer  # noqa: E402
from fastres.harness.run import forced_backend  # noqa: E402

# MLPerf ResNet-50 per GPU: Training v4.0 (MXNet, fp16, fused NormConv kernels, CUDA graphs) and
# Inference (TensorRT INT8, offline). Roofline: dense bf16 datasheet peak and what an 8192^3 bf16
# matmul measured on these machines; HBM datasheet and a device-to-device copy measured.
GPUS = {
    "h100": {"mlperf_train": 7161, "mlperf_train_best": 7449, "mlperf_infer": 88_700,
             "bf16_tflops": 989, "bf16_tflops_measured": 790,
             "hbm_tbs": 3.35, "hbm_tbs_measured": 3.0},
    "h200": {"mlperf_train": 7950, "mlperf_train_best": 7950, "mlperf_infer": 94_600,
             "bf16_tflops": 989, "bf16_tflops_measured": 790,
             "hbm_tbs": 4.8, "hbm_tbs_measured": 4.3},
}


def gpu_kind(name: str | None) -> str | None:
    """"h100", "h200" or None from a device name ('NVIDIA H100 80GB HBM3', 'NVIDIA H200')."""
    n = (name or "").upper()
    for k in ("H200", "H100"):
        if k in n:
            return k.lower()
    return None


def file_prefix(name: str | None) -> str:
    """The results-file prefix of a device: h100 / h200, else the name in lower case, dashed."""
    k = gpu_kind(name)
    if k:
        return k
    import re  # noqa: PLC0415

    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")[:24] or "cpu"


def rates(kind: str | None, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(matrix TFLOP/s, HBM TB/s) measured-class ceilings for ``dtype`` on this GPU; TF32 is half
    the bf16 rate (the datasheet's ratio). None off the H100/H200."""
    g = GPUS.get(kind or "")
    if not g:
        return None, None
    t = g["bf16_tflops_measured"] * (1.0 if dtype in (torch.bfloat16, torch.float16) else 0.5)
    return t, g["hbm_tbs_measured"]


# --------------------------------------------------------------------------------------------
# Models and steps.


def build(provider: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    import torchvision  # noqa: PLC0415

    from fastres.harness.rule import randomise_bn  # noqa: PLC0415

    torch.manual_seed(0)
    m = randomise_bn(torchvision.models.resnet50(), 1)
    if provider.startswith("fastres"):
        import fastres  # noqa: PLC0415

        m = fastres.convert(m)
    return m.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def make_step(m: torch.nn.Module, mode: str, x: torch.Tensor, labels: torch.Tensor):
    """The timed call: eval forward (no grad), or a whole SGD training step."""
    if mode == "infer":
        m.eval()

        def infer():
            with torch.no_grad():
                return m(x)
        return infer
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x).float(), labels)
        loss.backward()
        opt.step()
        return loss.detach()
    return train


class LogitsCheck:
    """The tolerance rule on the eval logits of 8 images (2 on a CPU): the float64 torchvision
    model the reference, torchvision at the run's dtype the yardstick; both computed once per
    dtype and shared by the providers."""

    def __init__(self, tv: torch.nn.Module, dtype: torch.dtype, device: torch.device, size: int):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(8 if device.type == "cuda" else 2, 3, size, size, generator=g)
        self.x = x.to(device).contiguous(memory_format=torch.channels_last)
        self.dtype = dtype
        with torch.no_grad():
            self.want = copy.deepcopy(tv).double().eval()(self.x.double())
            self.theirs = tv.eval()(self.x.to(dtype))

    def __call__(self, m: torch.nn.Module) -> rule.Verdict:
        with torch.no_grad():
            ours = m.eval()(self.x.to(self.dtype))
        return rule.verdict("logits", ours, self.theirs, self.want, self.dtype)


# --------------------------------------------------------------------------------------------
# Kernel classes.

CLASSES = (  # first match wins: cuDNN's kernel names hold "wgrad" and "dgrad" too
    ("conv (cuDNN/oneDNN)", ("cudnn", "xmma", "sm90_", "sm80_", "implicit_convolve", "convolution",
                             "mkldnn_conv", "_slow_conv2d", "nchwtonhwc", "nhwctonchw")),
    ("conv (fastres)", ("conv_igemm", "wgrad", "_conv_fwd", "_conv_dgrad", "_conv_wgrad",
                        "fastres::conv")),
    ("BN/epilogue (fastres)", ("bn_add_relu", "bn_finalize", "channel_", "colsum", "_bn_",
                               "_sum_rows", "fastres::bn")),
    ("gemm (fc)", ("gemm", "cublas", "addmm", "aten::mm", "matmul")),
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("elementwise (relu, add)", ("elementwise", "relu", "add", "threshold", "clamp")),
    ("reduce / pool / loss", ("reduce", "pool", "softmax", "nll", "cross_entropy", "log_softmax")),
    ("optimizer (SGD)", ("foreach", "multi_tensor", "sgd", "_fused")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "zero")),
)
CONV_CLASSES = {"conv (cuDNN/oneDNN)", "conv (fastres)"}
BYTE_CLASSES = {"BN/epilogue (fastres)", "batchnorm", "elementwise (relu, add)"}


def kernel_class(name: str) -> str:
    n = name.lower()
    for cls, keys in CLASSES:
        if any(k in n for k in keys):
            return cls
    return "other"


def class_table(kernels: dict[str, float]) -> dict[str, float]:
    """Microseconds per call of each kernel class."""
    out: dict[str, float] = {}
    for name, us in kernels.items():
        c = kernel_class(name)
        out[c] = out.get(c, 0.0) + us
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def floors(m: torch.nn.Module, mode: str, n: int, size: int, dtype: torch.dtype) -> dict:
    """Analytic floors of one call: convolution FLOPs (torch.utils.flop_counter on the meta
    device; x3 for a training step: forward, input grad, weight grad) and activation bytes (each
    BatchNorm, ReLU and residual-add output read and written once per pass, twice in training)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    meta = copy.deepcopy(m).to("meta")
    x = torch.empty(n, 3, size, size, device="meta", dtype=dtype)
    act = [0]

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            act[0] += out.numel() * out.element_size()

    hs = [mm.register_forward_hook(hook) for mm in meta.modules()
          if isinstance(mm, (torch.nn.BatchNorm2d, torch.nn.ReLU))]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        meta.eval()(x)
    for h in hs:
        h.remove()
    fwd = int(fc.get_total_flops())
    passes = 3 if mode == "train" else 1
    return {"conv_flops": fwd * passes, "act_bytes": 2 * act[0] * (2 if mode == "train" else 1)}


# --------------------------------------------------------------------------------------------
# Bare convolutions.


def _bare_conv(cc, n: int, dtype: torch.dtype, device: torch.device, backends_: list[str],
               repeats: int, g: torch.Generator) -> dict:
    """One ResNet-50 conv shape: device ms of F.conv2d and of each backend's kernel."""
    from fastres import backends  # noqa: PLC0415

    p = (cc.h + 2 * cc.pad - cc.k) // cc.stride + 1
    q = (cc.w + 2 * cc.pad - cc.k) // cc.stride + 1
    row = {"conv": cc.id, "k": cc.k, "flops": 2 * n * cc.cout * cc.cin * cc.k * cc.k * p * q,
           "ms": {}, "errors": {}}
    x = torch.randn(n, cc.cin, cc.h, cc.w, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cc.cout, cc.cin, cc.k, cc.k, generator=g) / (cc.cin * cc.k ** 2) ** 0.5
    w = w.to(device, dtype).contiguous(memory_format=torch.channels_last)
    cv = ([cc.stride] * 2, [cc.pad] * 2, [1, 1], 1)
    theirs = F.conv2d(x, w, None, cc.stride, cc.pad)
    want = F.conv2d(x.double(), w.double(), None, cc.stride, cc.pad)

    def check(o):
        return rule.verdict(cc.id, o, theirs, want, dtype)

    calls = {"torch": lambda: F.conv2d(x, w, None, cc.stride, cc.pad)}
    for b in backends_:
        op = backends.BACKENDS[b].op("conv_bias_act")
        calls[b] = functools.partial(op, x, w, None, None, *cv, False)
    for name, fn in calls.items():
        try:
            with forced_backend(None if name == "torch" else name):
                r = timer.measure(fn, device, kinds=("device",), repeats=repeats, warmup=2,
                                  check=check)
            row["ms"][name] = r["device"]["p50"] if "device" in r else None
            if "device" in r["errors"]:
                row["errors"][name] = r["errors"]["device"]
        except Exception as exc:  # noqa: BLE001 - one kernel's failure is its cell
            row["errors"][name] = f"{type(exc).__name__}: {exc}"[:160]
    return row


def conv_table(device: torch.device, dtype: torch.dtype, n: int, size: int, repeats: int,
               backends_: list[str], deadline: float, limit: int | None = None) -> list[dict]:
    """Every ResNet-50 conv shape, one bare convolution each (no bias, no residual, no ReLU):
    torch's F.conv2d (cuDNN on a GPU, oneDNN on a CPU) against each fastres backend's
    conv_bias_act kernel, device time per call. A shape starts only if one as long as the longest
    so far fits before ``deadline`` (time.perf_counter)."""
    rows, longest = [], 0.0
    g = torch.Generator().manual_seed(3)
    for cc in B.resnet50_conv_cases(size)[:limit]:
        tc = time.perf_counter()
        if tc + longest > deadline:
            rows.append({"conv": cc.id, "k": cc.k, "ms": {},
                         "errors": {"all": "out of the time budget"}})
            continue
        rows.append(_bare_conv(cc, n, dtype, device, backends_, repeats, g))
        longest = max(longest, time.perf_counter() - tc)
    return rows


# --------------------------------------------------------------------------------------------
# The run.


def run_config(provider: str, mode: str, dtype: torch.dtype, n: int, size: int,
               device: torch.device, repeats: int, warmup: int, check: LogitsCheck) -> dict:
    row = {"provider": provider, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
           "batch": n, "status": "ok", "reason": None, "times": {}, "classes": {}}
    m = build(provider, dtype, device)
    backend = provider.split("-", 1)[1] if provider.startswith("fastres-") else None
    with forced_backend(backend):
        return _run_config(row, m, mode, dtype, n, size, device, repeats, warmup, check)


def _run_config(row: dict, m: torch.nn.Module, mode: str, dtype: torch.dtype, n: int,
                size: int, device: torch.device, repeats: int, warmup: int,
                check: LogitsCheck) -> dict:
    v = check(m)
    row["check"] = str(v)
    if not v.ok:
        row.update(status="FAIL", reason=str(v))
        return row
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 3, size, size, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (n,), generator=g).to(device)
    step = make_step(m, mode, x, labels)
    r = timer.measure(step, device, kinds=("device", "eager", "graph"), repeats=repeats,
                      warmup=warmup)
    row["times"] = {k: r[k] for k in ("device", "eager", "graph") if k in r}
    row["errors"] = r["errors"]
    row["classes"] = class_table(r["kernels"])
    row["top_kernels"] = dict(sorted(r["kernels"].items(), key=lambda kv: -kv[1])[:12])
    row["floors"] = floors(m, mode, n, size, dtype)
    return row


def largest_batch(provider: str, mode: str, dtype: torch.dtype, start: int, size: int,
                  device: torch.device, cap: int) -> int | None:
    """The largest batch (doubling from ``start``, at most ``cap``) whose step runs here."""
    if device.type != "cuda":
        return None
    best, n = None, start
    m = build(provider, dtype, device)
    while n <= cap:
        try:
            g = torch.Generator().manual_seed(1)
            x = torch.randn(n, 3, size, size, generator=g).to(device, dtype)
            step = make_step(m, mode, x.contiguous(memory_format=torch.channels_last),
                             torch.zeros(n, dtype=torch.long, device=device))
            step()
            step()
            torch.cuda.synchronize()
            best = n
            n *= 2
        except RuntimeError as exc:  # torch.OutOfMemoryError, or cuDNN's own allocation error
            if isinstance(exc, torch.OutOfMemoryError) or "memory" in str(exc).lower():
                break
            raise
        finally:
            torch.cuda.empty_cache()
    return best


def render(doc: dict) -> str:
    env, kind = doc["env"], doc["gpu_kind"]
    dev = torch.device("cuda" if env.get("gpu") else "cpu")
    g = GPUS.get(kind or "")
    lines = [f"# Whole ResNet-50: {env.get('gpu') or env.get('cpu')} "
             f"({kind or 'not an H100/H200: no MLPerf row'})", "",
             f"commit {env.get('commit')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"image {doc['meta']['image_size']}x{doc['meta']['image_size']}, channels_last; "
             f"medians of {doc['meta']['repeats']} calls, L2 flushed between calls.", ""]
    lines += [f"* `{timer.column(k, dev)}`: {timer.kind_label(k, dev)}"
              for k in ("device", "eager", "graph")]
    if g:
        lines += ["", f"MLPerf ResNet-50 on {kind.upper()}: Training v4.0 {g['mlperf_train']:,} "
                  f"img/s/GPU (best {g['mlperf_train_best']:,}); Inference TensorRT INT8 "
                  f"{g['mlperf_infer']:,} img/s. Roofline: dense bf16 {g['bf16_tflops']} TFLOP/s "
                  f"(~{g['bf16_tflops_measured']} measured), HBM {g['hbm_tbs']} TB/s "
                  f"(~{g['hbm_tbs_measured']} measured)."]
    lines += ["", "| provider | mode | dtype | N | img/s [device] | img/s [wall+sync] | "
              "img/s [graph replay] | vs MLPerf [graph] | check |", "|---" * 9 + "|"]
    for r in doc["rows"]:
        head = f"| {r['provider']} | {r['mode']} | {r['dtype']} | {r['batch']} |"
        if r["status"] != "ok":
            lines.append(head + f" - | - | - | - | {r['status']}: {r['reason']} |")
            continue
        ips = {k: r["batch"] / (t["p50"] * 1e-3) for k, t in r["times"].items()}
        ref = (g or {}).get("mlperf_train" if r["mode"] == "train" else "mlperf_infer")
        vs = f"{ips['graph'] / ref:.2f}x" if ref and "graph" in ips else "-"
        cells = " | ".join(f"{ips[k]:,.0f}" if k in ips else "-"
                           for k in ("device", "eager", "graph"))
        chk = (r.get("check") or "").split(": ", 1)[-1]
        lines.append(f"{head} {cells} | {vs} | {chk} |")
    lines += ["", "Per kernel class (device time per call, from the profiler) against its floor: "
              "convolutions at the matrix rate (conv FLOPs; a class's floor counts all of them), "
              "the other classes at HBM bandwidth (BatchNorm and ReLU outputs read and written "
              "once per pass). floor/time is the fraction of the roofline reached.", "",
              "| provider | mode | dtype | N | class | ms | share | floor ms | floor/time |",
              "|---" * 9 + "|"]
    for r in doc["rows"]:
        if r["status"] != "ok" or not r["classes"]:
            continue
        tot = sum(r["classes"].values()) or 1.0
        tf, bw = rates(kind, getattr(torch, r["dtype"]))
        for cls, us in r["classes"].items():
            fl = None
            if tf and cls in CONV_CLASSES:
                fl = r["floors"]["conv_flops"] / (tf * 1e12) * 1e3
            elif bw and cls in BYTE_CLASSES:
                fl = r["floors"]["act_bytes"] / (bw * 1e12) * 1e3
            fl_s, frac = (f"{fl:.3f}", f"{fl / (us / 1e3):.2f}") if fl else ("-", "-")
            lines.append(f"| {r['provider']} | {r['mode']} | {r['dtype']} | {r['batch']} | {cls} "
                         f"| {us / 1e3:.3f} | {us / tot:.0%} | {fl_s} | {frac} |")
    if doc.get("convs"):
        names = sorted({k for r in doc["convs"] for k in r["ms"]}, key=lambda s: s != "torch")
        lines += ["", f"Bare convolutions, N={doc['meta']['conv_batch']}, "
                  f"{doc['meta']['conv_dtype']}: device ms per call "
                  f"(`{timer.column('device', dev)}`); torch = "
                  f"{'cuDNN' if dev.type == 'cuda' else 'oneDNN'}; ratio torch/backend above 1 "
                  "is a faster fastres kernel.", "",
                  "| conv | " + " | ".join(names) + " | " + " | ".join(
                      f"torch/{n}" for n in names if n != "torch") + " |",
                  "|---" * (2 * len(names)) + "|"]
        for r in doc["convs"]:
            t = r["ms"].get("torch")
            cells = [f"{r['ms'][n]:.3f}" if r["ms"].get(n) else r["errors"].get(
                n, r["errors"].get("all", "-"))[:40] for n in names]
            rat = [f"{t / r['ms'][n]:.2f}x" if t and r["ms"].get(n) else "-"
                   for n in names if n != "torch"]
            lines.append(f"| {r['conv']} | " + " | ".join(cells + rat) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=256 if gpu else 2)
    ap.add_argument("--largest", action="store_true",
                    help="also the largest batch that fits (GPU; doubling up to --max-batch)")
    ap.add_argument("--max-batch", type=int, default=2048)
    ap.add_argument("--image-size", type=int, default=224 if gpu else 64)
    ap.add_argument("--providers", nargs="+", choices=["torchvision", "fastres",
                                                       "fastres-cuda", "fastres-triton",
                                                       "fastres-cpu"],
                    default=["torchvision", *(("fastres-cuda", "fastres-triton") if gpu
                                             else ("fastres-cpu",))],
                    help="fastres: the dispatcher's choice (a GPU backend only once the "
                         "self-test passed here); fastres-<backend>: that backend forced")
    ap.add_argument("--convs", action="store_true", help="also the bare-conv table")
    ap.add_argument("--conv-batch", type=int, default=None)
    ap.add_argument("--conv-shapes", type=int, default=None,
                    help="only the first K conv shapes (tests)")
    ap.add_argument("--repeats", type=int, default=10 if gpu else 2)
    ap.add_argument("--warmup", type=int, default=3 if gpu else 1)
    ap.add_argument("--budget-s", type=float, default=None)
    B.add_output_args(ap)
    a = ap.parse_args(argv)
    if a.from_json:
        B.emit_table(a, render)
        return 0
    device = torch.device(a.device)
    t0 = time.perf_counter()
    deadline = t0 + a.budget_s if a.budget_s is not None else float("inf")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    from fastres.harness.environment import environment  # noqa: PLC0415

    env = environment(device)
    doc = {"format": "fastres-resnet50-throughput/1", "env": env,
           "gpu_kind": gpu_kind(env.get("gpu")), "meta": {
               "image_size": a.image_size, "repeats": a.repeats, "argv": sys.argv[1:]},
           "rows": [], "convs": []}

    def flush():
        B.write_json(a.json_out, doc)

    dts = {"bf16": torch.bfloat16, "fp32": torch.float32}
    failed, longest = 0, {}
    for dname in a.dtypes:
        check = LogitsCheck(build("torchvision", dts[dname], device), dts[dname], device,
                            a.image_size)
        for mode in a.modes:
            for prov in a.providers:
                batches = [a.batch]
                if a.largest and time.perf_counter() < deadline:
                    with forced_backend(prov.split("-", 1)[1] if "-" in prov else None):
                        big = largest_batch(prov, mode, dts[dname], a.batch, a.image_size,
                                            device, a.max_batch)
                    if big and big != a.batch:
                        batches.append(big)
                for n in batches:
                    # A configuration starts only if one as long as the longest of its mode
                    # so far fits (a mode not seen yet: 3x, a training step being about three
                    # forwards).
                    est = longest.get(mode) or 3 * max(longest.values(), default=0.0)
                    if time.perf_counter() + est > deadline:
                        row = {"provider": prov, "mode": mode, "dtype": dname, "batch": n,
                               "status": "skipped", "reason": "out of the time budget",
                               "times": {}, "classes": {}}
                    else:
                        tc = time.perf_counter()
                        try:
                            row = run_config(prov, mode, dts[dname], n, a.image_size, device,
                                             a.repeats, a.warmup, check)
                        except Exception as exc:  # noqa: BLE001 - the row says what failed
                            row = {"provider": prov, "mode": mode, "dtype": dname, "batch": n,
                                   "status": "error", "times": {}, "classes": {},
                                   "reason": f"{type(exc).__name__}: {exc}"[:300]}
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        longest[mode] = max(longest.get(mode, 0.0), time.perf_counter() - tc)
                    failed += row["status"] in ("FAIL", "error")
                    doc["rows"].append(row)
                    ips = {k: f"{n / (t['p50'] * 1e-3):,.0f}" for k, t in row["times"].items()}
                    print(f"ResNet-50 {prov} {mode} {dname} N={n}: {row['status']} img/s {ips} "
                          f"{row.get('reason') or ''}", flush=True)
                    flush()
    if a.convs:
        from fastres import backends  # noqa: PLC0415

        names = [b for b in (("cuda", "triton") if device.type == "cuda" else ("cpu",))
                 if backends.available().get(b) is None]
        cdt = dts[a.dtypes[0]]
        cn = a.conv_batch or (a.batch if device.type == "cuda" else 1)
        doc["meta"].update(conv_batch=cn, conv_dtype=a.dtypes[0])
        doc["convs"] = conv_table(device, cdt, cn, a.image_size, a.repeats, names, deadline,
                                   a.conv_shapes)
        flush()
    B.emit_table(a, render, doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
