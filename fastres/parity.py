"""``python -m fastres.parity``: the fused blocks against torchvision, block by block.

For each distinct residual block of a ResNet (ResNet-50 by default: its 8 Bottleneck types, at
their real channel counts and spatial sizes for a 224x224 image), each dtype, eval and train, and
each available backend, the fused fastres block runs next to the torchvision block it replaces:

* correctness: everything a user keeps (eval: the output and the buffers; train: the output, the
  input grad, every parameter grad, running_mean, running_var and num_batches_tracked) is compared
  with the torchvision block run in float64 on the same weights, and judged by the tolerance rule
  ``err(fastres) <= 2 * err(PyTorch at that dtype) + atol[dtype]`` (``fastres.testing``);
* speed: the median time of the fused block and of the torchvision block (eval: forward under
  no_grad; train: forward + backward), and their ratio.

BatchNorm affine parameters and running statistics are randomised so that folding is exercised.
Every backend is forced in turn (``FASTRES_BACKEND`` set around the calls), including those the
dispatcher would not choose by itself on this device. The exit status is non-zero when any case
fails parity or raises.

    python -m fastres.parity                          # ResNet-50 blocks, default device
    python -m fastres.parity --quick                  # about a minute on a small CPU
    python -m fastres.parity --model resnet18 --dtype fp16 bf16 --json r.json --markdown r.md \\
        --plot r.png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TINY = "tiny"  # a few small blocks (odd sizes): smoke tests of the harness itself


# --------------------------------------------------------------------------------------------
# The blocks.


@dataclass(frozen=True)
class BlockCase:
    """One distinct residual block of a model: its type, widths, stride and input size."""

    name: str  # where it first occurs, e.g. "layer2.0"
    kind: str  # "Bottleneck" | "BasicBlock"
    inplanes: int
    planes: int
    stride: int
    downsample: bool
    height: int
    width: int

    @property
    def label(self) -> str:
        ds = ",ds" if self.downsample else ""
        return (f"{self.name} {self.kind}({self.inplanes},{self.planes},s{self.stride}{ds}) "
                f"{self.height}x{self.width}")


def distinct_blocks(model: str, image_size: int = 224) -> list[BlockCase]:
    """The distinct residual blocks of a torchvision ResNet, in order of first occurrence.

    The model is built on the meta device and run once with pre-hooks on its blocks, so the widths
    and input sizes are torchvision's own (no weights are allocated)."""
    if model == TINY:
        return [
            BlockCase("tiny.0", "Bottleneck", 8, 4, 2, True, 9, 9),
            BlockCase("tiny.1", "BasicBlock", 6, 6, 1, False, 5, 7),
        ]
    import torchvision
    from torchvision.models import resnet as tv_resnet

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    with torch.device("meta"):
        net = getattr(torchvision.models, model)()
    seen: dict[tuple, BlockCase] = {}

    def hook(name):
        def pre(mod, args):
            x = args[0]
            kind = "Bottleneck" if isinstance(mod, tv_resnet.Bottleneck) else "BasicBlock"
            case = BlockCase(name, kind, mod.conv1.in_channels, _planes(mod), mod.stride,
                             mod.downsample is not None, int(x.shape[2]), int(x.shape[3]))
            key = asdict(case)
            key.pop("name")
            seen.setdefault(tuple(key.items()), case)
        return pre

    for name, mod in net.named_modules():
        if isinstance(mod, (tv_resnet.Bottleneck, tv_resnet.BasicBlock)):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        net(torch.empty(1, 3, image_size, image_size, device="meta"))
    return list(seen.values())


def _planes(block: nn.Module) -> int:
    """The ``planes`` constructor argument of a torchvision block (output channels / expansion)."""
    return block.conv2.out_channels if hasattr(block, "conv3") else block.conv1.out_channels


def quick_subset(cases: list[BlockCase]) -> list[BlockCase]:
    """A few blocks that still cover every code path: the first block (stride-1 downsample in
    ResNet-50), the first stride-2 block, the first identity block and the last block."""
    picks = [cases[0]]
    picks += [c for c in cases if c.stride == 2][:1]
    picks += [c for c in cases if not c.downsample][:1]
    picks.append(cases[-1])
    out: list[BlockCase] = []
    for c in picks:
        if c not in out:
            out.append(c)
    return out


def build_torchvision_block(case: BlockCase, seed: int) -> nn.Module:
    """The torchvision block of ``case`` in float32 on the CPU, with randomised BatchNorms."""
    from torchvision.models import resnet as tv_resnet

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the conv weights: torchvision's own (kaiming) init
    cls = tv_resnet.Bottleneck if case.kind == "Bottleneck" else tv_resnet.BasicBlock
    ds = None
    if case.downsample:
        out_ch = case.planes * cls.expansion
        ds = nn.Sequential(tv_resnet.conv1x1(case.inplanes, out_ch, case.stride),
                           nn.BatchNorm2d(out_ch))
    block = cls(case.inplanes, case.planes, case.stride, ds)
    randomise_batchnorms(block, gen)
    return block


def randomise_batchnorms(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics, so that folding them matters."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)  # [0.5, 1.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)  # [0.5, 2)
                m.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=gen)))


# --------------------------------------------------------------------------------------------
# Running one block: what a user keeps.


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """FASTRES_BACKEND=name for the duration (None: leave the dispatcher alone). cudasim runs the
    CUDA launchers, which follow cuDNN's TF32 switch as on a GPU; its fp32 cases are judged
    against PyTorch on the CPU, which never uses TF32, so TF32 is off for them (as in
    tests/test_ops_device.py)."""
    old = os.environ.get("FASTRES_BACKEND")
    old_tf32 = torch.backends.cudnn.allow_tf32
    if name is not None:
        os.environ["FASTRES_BACKEND"] = name
    if name == "cudasim":
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
        if name is not None:
            if old is None:
                os.environ.pop("FASTRES_BACKEND", None)
            else:
                os.environ["FASTRES_BACKEND"] = old


def _buffers(m: nn.Module) -> dict[str, Tensor]:
    return {f"buffer.{n}": b.detach().clone() for n, b in m.named_buffers()}


def run_eval(m: nn.Module, x: Tensor) -> dict[str, Tensor]:
    m.eval()
    with torch.no_grad():
        out = m(x)
    return {"out": out, **_buffers(m)}


def run_train(m: nn.Module, x: Tensor, grad_out: Tensor) -> dict[str, Tensor]:
    m.train()
    for p in m.parameters():
        p.grad = None
    xx = x.detach().clone().requires_grad_(True)  # clone keeps the memory format
    with relu_calls(m) as calls:
        out = m(xx)
    decisions = relu_decisions_of(calls, out)
    out.backward(grad_out)
    res = Kept({"out": out.detach(), "grad.input": xx.grad})
    res.update({f"grad.{n}": p.grad for n, p in m.named_parameters()})
    res.update(_buffers(m))
    res.decisions = decisions
    return res


class Kept(dict):
    """What a user keeps from a run (every key is judged), and, for a train run, the run's ReLU
    decisions (``decisions``: inner ReLUs first, the output's last), which are not kept."""

    decisions: list[Tensor] | None = None


@contextlib.contextmanager
def relu_calls(block: nn.Module) -> Iterator[list[Tensor]]:
    """Inside, the decisions (``out > 0``) of every call of ``block.relu`` in call order."""
    calls: list[Tensor] = []
    relu = getattr(block, "relu", None)
    if relu is None:
        yield calls
        return
    handle = relu.register_forward_hook(lambda mod, args, out: calls.append(out.detach() > 0))
    try:
        yield calls
    finally:
        handle.remove()


def relu_decisions_of(calls: list[Tensor], out: Tensor) -> list[Tensor]:
    """A train run's ReLU decisions, inner ones first and the output's last: the relu module's
    calls (torchvision, or a fastres block on an unfused path), or, for a fused block whose
    ReLUs never run as modules, recomputed from what its backward saved."""
    inner = fastres_inner_decisions(out)
    if inner is None:
        inner = calls[:-1]
    return [*inner, out.detach() > 0]


def fastres_inner_decisions(out: Tensor) -> list[Tensor] | None:
    from fastres.functional import inner_relu_decisions

    return inner_relu_decisions(out)


class _DecidedReLU(torch.autograd.Function):
    """A ReLU whose decisions are given: forward z * mask, backward grad * mask."""

    @staticmethod
    def forward(ctx, z: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return z * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


@contextlib.contextmanager
def relu_decisions(block: nn.Module, masks: list[Tensor | None]) -> Iterator[None]:
    """Inside, call k of a torchvision block's ``relu`` (k = 0, 1, ... within each forward) lets
    through exactly the elements of ``masks[k]`` (None: an ordinary ReLU).

    Why: a ReLU decision on an element within rounding of zero goes either way; the float64
    reference and a low-precision run then disagree on it, and the whole gradient value of that
    element lands in the max-abs error (PyTorch's own run flips a few such decisions too, at other
    elements). A flip at an inner ReLU (between the convolutions) spreads further: the BatchNorm
    backward's means carry it to the whole channel. Judging each run against a float64 reference
    that takes that run's own decisions removes this coin flip from the verdict and keeps
    everything else (values, statistics, the gradients' arithmetic)."""
    calls = len(masks)
    count = [0]
    inplace = block.relu.inplace
    block.relu.inplace = False  # so that the hook sees the pre-activation

    def hook(mod, args, out):
        mask = masks[count[0] % calls]
        count[0] += 1
        if mask is None:
            return None
        return _DecidedReLU.apply(args[0], mask.to(device=args[0].device, dtype=args[0].dtype))

    handle = block.relu.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        block.relu.inplace = inplace


def output_relu_decisions(block: nn.Module, mask: Tensor) -> contextlib.AbstractContextManager:
    """:func:`relu_decisions` for the output ReLU only (the last of the block's ``relu`` calls)."""
    calls = 3 if hasattr(block, "conv3") else 2
    return relu_decisions(block, [None] * (calls - 1) + [mask])


def kept_reference(ref: nn.Module, mode: str, x: Tensor, grad_out: Tensor,
                   decided_by: list[Tensor] | None = None) -> dict[str, Tensor]:
    """What a user keeps from the float64 reference block; in train mode, with the ReLU decisions
    ``decided_by`` (a run's, from :func:`relu_decisions_of`) when given."""
    m = copy.deepcopy(ref)
    if decided_by is None or mode == "eval":
        return kept(m, mode, x, grad_out)
    with relu_decisions(m, decided_by):
        return kept(m, mode, x, grad_out)


class References:
    """The float64 references of one (block, dtype, mode): the plain one, and in train mode one
    per set of ReLU decisions (runs that decide alike share one)."""

    def __init__(self, ref: nn.Module, mode: str, x64: Tensor, g64: Tensor):
        self.ref, self.mode, self.x64, self.g64 = ref, mode, x64, g64
        self.plain = kept_reference(ref, mode, x64, g64)
        self.plain_decisions = decisions(self.plain)
        self._by_masks: list[tuple[list[Tensor] | None, dict[str, Tensor]]] = [
            (self.plain_decisions, self.plain)]

    def for_run(self, run: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.mode == "eval":
            return self.plain
        masks = decisions(run)
        for m, r in self._by_masks:
            if m is not None and len(m) == len(masks) and all(
                    torch.equal(a, b) for a, b in zip(m, masks, strict=True)):
                return r
        r = kept_reference(self.ref, self.mode, self.x64, self.g64, decided_by=masks)
        self._by_masks.append((masks, r))
        return r


def decisions(run: dict[str, Tensor]) -> list[Tensor] | None:
    """The ReLU decisions of a train run's kept dict (None for an eval run)."""
    return getattr(run, "decisions", None)


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
    return {"p20": _quantile(ts, 0.2), "p50": statistics.median(ts), "p80": _quantile(ts, 0.8),
            "timer": timer}


def _quantile(sorted_ts: list[float], q: float) -> float:
    if len(sorted_ts) == 1:
        return sorted_ts[0]
    pos = q * (len(sorted_ts) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------
# The environment: hardware, versions, commit.


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty) of the fastres checkout, read at run time; FASTRES_COMMIT when there is no
    git checkout (e.g. a copied working tree); ("unknown", None) otherwise."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            st = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10)
            return head.stdout.strip(), bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    env = os.environ.get("FASTRES_COMMIT", "").strip()
    return (env, None) if env else ("unknown", None)


def environment(device: torch.device) -> dict:
    import fastres

    commit, dirty = git_commit()
    env = {
        "fastres": fastres.__version__,
        "commit": commit,
        "commit_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "hostname": platform.node(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine skews CPU timings: the 1-minute load average at the start.
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for mod in ("torchvision", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.type == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return env


def hardware_line(env: dict) -> str:
    hw = env["gpu"] or f"{env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} threads)"
    commit = env["commit"][:12] + ("+dirty" if env.get("commit_dirty") else "")
    return (f"{hw} | torch {env['torch']} | torchvision {env['torchvision']} | "
            f"triton {env['triton']} | fastres {env['fastres']} @ {commit}")


# --------------------------------------------------------------------------------------------
# The harness.


def _fmt_memory(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def _block_inputs(block: nn.Module) -> list:
    """(kernel_size, stride) of each conv of a torchvision block, for backend capability checks."""
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)]


def backend_plan(device: torch.device, only: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The backends to run on ``device`` and, for each one left out, why."""
    from fastres import backends

    names = list(backends.BACKENDS)
    if only:
        unknown = [n for n in only if n not in backends.BACKENDS]
        if unknown:
            raise SystemExit(f"unknown backend(s) {', '.join(unknown)}: choose from "
                             f"{', '.join(names)}")
        names = [n for n in names if n in only]
    avail = backends.available()
    run, skipped = [], {}
    for n in names:
        if avail[n] is not None:
            skipped[n] = avail[n]
        elif n == "cudasim" and not only:
            skipped[n] = ("cudasim runs the CUDA kernels fiber by fiber on the CPU (minutes per "
                          "block); ask for it with --backend cudasim")
        elif n == "triton" and device.type != "cuda" and not only:
            skipped[n] = ("on a CPU Triton runs only in the interpreter (thousands of times "
                          "slower); ask for it with --backend triton")
        else:
            reasons = backends.BACKENDS[n].not_supported_reasons(
                backends.Inputs(device, torch.float32))
            dev_reasons = [r for r in reasons if r.startswith(f"{n} runs on")]
            if dev_reasons:
                skipped[n] = "; ".join(dev_reasons)
            else:
                run.append(n)
    return run, skipped


def auto_choice(device: torch.device, dtype: torch.dtype, channels_last: bool) -> str:
    """The backend the dispatcher picks by itself for a 3x3 conv on ``device`` at ``dtype``."""
    from fastres import backends

    old = os.environ.pop("FASTRES_BACKEND", None)
    try:
        return backends.select(backends.Inputs(device, dtype, kernel_size=(3, 3),
                                               channels_last=channels_last)).name
    except RuntimeError as exc:
        return f"none ({exc})"
    finally:
        if old is not None:
            os.environ["FASTRES_BACKEND"] = old


def _first_line(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _worst(checks: list[dict]) -> dict | None:
    """The check closest to (or furthest past) its bound."""
    def score(c):
        if not c["ok"]:
            return math.inf if not math.isfinite(c["err"]) else 1e300 + c["err"]
        return c["err"] / c["bound"] if c["bound"] > 0 else 0.0
    return max(checks, key=score) if checks else None


def run_cases(cases: list[BlockCase], dtypes: list[torch.dtype], modes: list[str],
              backend_names: list[str], device: torch.device, batch: int, channels_last: bool,
              warmup: int, repeats: int, timing: bool = True, progress: bool = True,
              emit: Callable[[str], None] = print, seed: int = 0,
              checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run every (block, dtype, mode, backend) case; one result dict per case.
    ``checkpoint(results so far)`` is called after each (block, dtype, mode)."""
    import fastres
    from fastres import backends
    from fastres.testing import compare_all

    units = [(c, dt, mode) for c in cases for dt in dtypes for mode in modes]
    bar = _progress(len(units) * (len(backend_names) + 2), progress)
    results = []
    for i, (case, dtype, mode) in enumerate(units):
        dname = DTYPE_NAMES[dtype]
        bar.set_description(f"{case.name} {dname} {mode}")
        base = build_torchvision_block(case, seed + 1000 * cases.index(case))
        tv = base.to(dtype)
        tv = tv.to(device=device, memory_format=torch.channels_last) if channels_last else \
            tv.to(device=device)
        ref = copy.deepcopy(tv).double()  # the same (rounded) weights and statistics, in float64
        gen = torch.Generator().manual_seed(seed + 7 + i)
        x = torch.randn(batch, case.inplanes, case.height, case.width, generator=gen)
        x = _fmt_memory(x.to(dtype).to(device), channels_last)
        with torch.no_grad():
            out_shape = ref.eval()(x.double()).shape
        g = _fmt_memory(torch.randn(out_shape, generator=gen).to(dtype).to(device), channels_last)
        x64, g64 = x.double(), g.double()
        refs = References(ref, mode, x64, g64)
        want_ref = refs.plain
        bar.update(1)
        theirs = kept(copy.deepcopy(tv), mode, x, g)
        ref_theirs = refs.for_run(theirs)
        t_tv = None
        if timing:
            t_tv = time_ms(_timed(copy.deepcopy(tv), mode, x, g), device, warmup, repeats)
        bar.update(1)
        convs = _block_inputs(tv)
        for bname in backend_names:
            bar.set_postfix_str(bname)
            row = {
                "block": case.label, "name": case.name, "kind": case.kind,
                "inplanes": case.inplanes, "planes": case.planes, "stride": case.stride,
                "downsample": case.downsample,
                "input_shape": [batch, case.inplanes, case.height, case.width],
                "dtype": dname, "layout": "channels_last" if channels_last else "contiguous",
                "mode": mode, "backend": bname, "device": str(device),
                "status": "pass", "error": None, "checks": [], "worst": None,
                "diagnostics": None,
                "time_fused_ms": None, "time_torchvision_ms": None, "speedup": None,
                "time_fused": None, "time_torchvision": t_tv,
            }
            reasons = []
            for conv in convs:
                reasons += backends.BACKENDS[bname].not_supported_reasons(
                    backends.Inputs.of(x, conv))
            if reasons:
                row.update(status="skipped", error="; ".join(dict.fromkeys(reasons)))
                results.append(row)
                emit(_row_line(row))
                bar.update(1)
                continue
            try:
                ours_m = fastres.convert(copy.deepcopy(tv))
                with forced_backend(bname):
                    ours = kept(ours_m, mode, x, g)
                # The verdict: each run against the float64 reference with its own ReLU
                # decisions (identical to the plain reference in eval mode).
                ref_ours = refs.for_run(ours)
                verdicts = judge(ours, ref_ours, theirs, ref_theirs, dtype)
                row["checks"] = [
                    {"name": v.name, "err": v.err, "torch_err": v.torch_err, "bound": v.bound,
                     "ok": v.ok} for v in verdicts]
                row["diagnostics"] = diagnostics(ours, theirs, want_ref)
                if mode == "train":  # the rule against the plain reference, for the record
                    row["diagnostics"]["plain_reference_checks"] = [
                        {"name": v.name, "err": v.err, "torch_err": v.torch_err,
                         "bound": v.bound, "ok": v.ok}
                        for v in compare_all(ours, theirs, want_ref, dtype)]
                row["worst"] = _worst(row["checks"])
                row["status"] = "pass" if all(v.ok for v in verdicts) else "fail"
                if timing:
                    with forced_backend(bname):
                        t_f = time_ms(_timed(fastres.convert(copy.deepcopy(tv)), mode, x, g),
                                      device, warmup, repeats)
                    row["time_fused"] = t_f
                    row["time_fused_ms"] = t_f["p50"]
                    row["time_torchvision_ms"] = t_tv["p50"]
                    row["speedup"] = t_tv["p50"] / t_f["p50"] if t_f["p50"] > 0 else None
            except Exception as exc:  # a backend that raises fails its case; the run goes on
                row.update(status="error", error=_first_line(exc))
            results.append(row)
            emit(_row_line(row))
            bar.update(1)
        if checkpoint is not None:
            checkpoint(results)
    bar.close()
    return results


def judge(ours: dict[str, Tensor], ref_ours: dict[str, Tensor], theirs: dict[str, Tensor],
          ref_theirs: dict[str, Tensor], dtype: torch.dtype) -> list:
    """The tolerance rule per kept tensor, each run against its own reference; integer tensors
    (num_batches_tracked) exactly."""
    from fastres.testing import Verdict, max_abs_err, verdict_own_refs

    out = []
    for name, r in ref_ours.items():
        for who, d in (("fastres", ours), ("PyTorch", theirs)):
            if d.get(name) is None:
                raise AssertionError(f"{name}: missing or None in the {who} run")
        if r.is_floating_point():
            out.append(verdict_own_refs(name, ours[name], r, theirs[name], ref_theirs[name],
                                        dtype))
        else:
            out.append(Verdict(name, max_abs_err(ours[name], r),
                               max_abs_err(theirs[name], ref_theirs[name]), 0.0))
    return out


def _rms(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def diagnostics(ours: dict[str, Tensor], theirs: dict[str, Tensor], ref: dict[str, Tensor]
                ) -> dict:
    """Not part of the verdict: what helps triage a failure.

    * ``relu_flips``: output elements whose final ReLU decision (out > 0) differs from the float64
      reference, for fastres and for PyTorch. In low precision both flip a few decisions near zero;
      a flip puts one whole gradient value into the max-abs error of the grads, so in bf16/fp16
      training a max-abs failure with similar flip counts and similar RMS errors is rounding luck,
      not a kernel bug.
    * ``inner_relu_flips`` (train): the same for the ReLUs between the convolutions, which the
      verdict's references also take from each run (see :func:`relu_decisions`).
    * ``rms``: root-mean-square error against the reference per check, fastres and PyTorch."""
    out = {"relu_flips": {
        "fastres": int(((ours["out"] > 0) != (ref["out"] > 0)).sum()),
        "torch": int(((theirs["out"] > 0) != (ref["out"] > 0)).sum()),
        "elements": ref["out"].numel()}}
    masks = {who: decisions(d) for who, d in (("fastres", ours), ("torch", theirs), ("ref", ref))}
    if all(m is not None and len(m) == len(masks["ref"]) for m in masks.values()):
        inner = list(zip(*(masks[w][:-1] for w in ("fastres", "torch", "ref")), strict=True))
        out["inner_relu_flips"] = {
            "fastres": sum(int((f != r).sum()) for f, _, r in inner),
            "torch": sum(int((t != r).sum()) for _, t, r in inner),
            "elements": sum(r.numel() for _, _, r in inner)}
    out["rms"] = {k: {"fastres": _rms(ours[k], r), "torch": _rms(theirs[k], r)}
                  for k, r in ref.items() if r.is_floating_point()}
    return out


def kept(m: nn.Module, mode: str, x: Tensor, grad_out: Tensor) -> dict[str, Tensor]:
    """What a user keeps after one eval forward or one train forward + backward."""
    return run_eval(m, x) if mode == "eval" else run_train(m, x, grad_out)


def _timed(m: nn.Module, mode: str, x: Tensor, grad_out: Tensor) -> Callable[[], None]:
    """One timed call: eval forward under no_grad, or train forward + backward."""
    if mode == "eval":
        m.eval()

        def call():
            with torch.no_grad():
                m(x)
    else:
        m.train()
        xr = x.detach().clone().requires_grad_(True)

        def call():
            m(xr).backward(grad_out)
    return call


class _NoBar:
    def __init__(self, total):
        self.total = total

    def update(self, n=1):
        pass

    def set_description(self, s):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass

    @staticmethod
    def write(s):
        print(s)


_BAR = None


def _progress(total: int, enabled: bool):
    global _BAR
    if enabled:
        try:
            from tqdm.auto import tqdm

            _BAR = tqdm(total=total, unit="step", leave=False, file=sys.stderr,
                        dynamic_ncols=True)
            return _BAR
        except ImportError:
            pass
    _BAR = _NoBar(total)
    return _BAR


def _emit(line: str) -> None:
    """Print a line without breaking the progress bar."""
    if _BAR is not None and not isinstance(_BAR, _NoBar):
        _BAR.write(line)
    else:
        print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Reporting.

_HEAD = (f"{'block':44s} {'dtype':5s} {'mode':5s} {'backend':9s} {'worst check':28s} "
         f"{'err':>9s} {'torch':>9s} {'bound':>9s} {'':4s} {'fused ms':>9s} {'tv ms':>9s} "
         f"{'tv/fused':>8s}")


def _g(v: float | None, fmt: str = ".2e") -> str:
    return "-" if v is None else format(v, fmt)


def _row_line(r: dict) -> str:
    if r["status"] in ("error", "skipped"):
        mark = "ERR" if r["status"] == "error" else "skip"
        msg = r["error"] or ""
        msg = msg if len(msg) <= 110 else msg[:107] + "..."
        return (f"{r['block']:44s} {r['dtype']:5s} {r['mode']:5s} {r['backend']:9s} "
                f"{mark}: {msg}")
    w = r["worst"] or {}
    mark = "ok" if r["status"] == "pass" else "FAIL"
    sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    line = (f"{r['block']:44s} {r['dtype']:5s} {r['mode']:5s} {r['backend']:9s} "
            f"{w.get('name', '-'):28.28s} {_g(w.get('err')):>9s} {_g(w.get('torch_err')):>9s} "
            f"{_g(w.get('bound')):>9s} {mark:4s} {_g(r['time_fused_ms'], '.3f'):>9s} "
            f"{_g(r['time_torchvision_ms'], '.3f'):>9s} {sp:>8s}")
    if r["status"] == "fail":
        bad = [c for c in r["checks"] if not c["ok"]]
        rms = (r.get("diagnostics") or {}).get("rms", {})
        for c in bad:
            line += (f"\n    FAIL {c['name']}: err {c['err']:.3g} > bound {c['bound']:.3g} "
                     f"(PyTorch {c['torch_err']:.3g})")
            if c["name"] in rms:
                line += (f"; rms {rms[c['name']]['fastres']:.3g} vs PyTorch "
                         f"{rms[c['name']]['torch']:.3g}")
        fl = (r.get("diagnostics") or {}).get("relu_flips")
        if fl:
            line += (f"\n    output ReLU decisions differing from float64: fastres "
                     f"{fl['fastres']}, PyTorch {fl['torch']} (of {fl['elements']})")
        fi = (r.get("diagnostics") or {}).get("inner_relu_flips")
        if fi:
            line += (f"\n    inner ReLU decisions differing from float64: fastres "
                     f"{fi['fastres']}, PyTorch {fi['torch']} (of {fi['elements']})")
    return line


def summarise(results: list[dict]) -> dict:
    s = {k: sum(r["status"] == k for r in results) for k in ("pass", "fail", "error", "skipped")}
    s["cases"] = len(results)
    s["ok"] = s["fail"] == 0 and s["error"] == 0 and s["pass"] > 0
    return s


def to_markdown(report: dict) -> str:
    meta, env = report["meta"], report["env"]
    lines = [
        f"# fastres parity: {meta['model']} blocks on {env['gpu'] or env['cpu']}",
        "",
        f"- hardware: {hardware_line(env)}",
        f"- device {meta['device']}, batch {meta['batch']}, {meta['layout']}, dtypes "
        f"{', '.join(meta['dtypes'])}, modes {', '.join(meta['modes'])}; "
        + (f"timing: median, {meta['timer']}" if meta.get("timing", True) else "no timing"),
        f"- backends run: {', '.join(meta['backends']) or 'none'}"
        + "".join(f"; {n} skipped: {why}" for n, why in meta["skipped_backends"].items()),
        f"- rule: err(fastres) <= 2 * err(PyTorch at the dtype) + atol[dtype], errors are max "
        f"|x - float64 reference| of the worst check (of {meta['checks_per_case']})",
        f"- result: {report['summary']['pass']} pass, {report['summary']['fail']} fail, "
        f"{report['summary']['error']} error, {report['summary']['skipped']} skipped "
        f"({report['summary']['duration_s']:.0f} s)"
        + (" -- PARTIAL: the run was cut short" if report["summary"].get("partial") else ""),
        "",
        "| block | dtype | mode | backend | worst check | err | PyTorch err | bound | ok | "
        "fused ms | torchvision ms | tv/fused |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in report["cases"]:
        if r["status"] in ("error", "skipped"):
            err = (r["error"] or "").replace("|", "\\|")
            lines.append(f"| {r['block']} | {r['dtype']} | {r['mode']} | {r['backend']} | "
                         f"{r['status'].upper()}: {err} | | | | "
                         f"{'ERR' if r['status'] == 'error' else 'skip'} | | | |")
            continue
        w = r["worst"] or {}
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['block']} | {r['dtype']} | {r['mode']} | {r['backend']} | {w.get('name', '')} "
            f"| {_g(w.get('err'))} | {_g(w.get('torch_err'))} | {_g(w.get('bound'))} | "
            f"{'ok' if r['status'] == 'pass' else '**FAIL**'} | {_g(r['time_fused_ms'], '.3f')} "
            f"| {_g(r['time_torchvision_ms'], '.3f')} | {sp} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> str | None:
    """Speedup per block and backend, and error against PyTorch's own error. Returns why it was
    not drawn (matplotlib missing), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    rows = [r for r in report["cases"] if r["status"] in ("pass", "fail")]
    series = sorted({(r["backend"], r["dtype"], r["mode"]) for r in rows})
    blocks = list(dict.fromkeys(r["name"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(1, len(series))
    for k, key in enumerate(series):
        ys = []
        for b in blocks:
            hit = [r for r in rows if (r["backend"], r["dtype"], r["mode"]) == key
                   and r["name"] == b and r["speedup"]]
            ys.append(hit[0]["speedup"] if hit else 0.0)
        ax1.bar([i + k * width for i in range(len(blocks))], ys, width, label=" ".join(key))
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(blocks))])
    ax1.set_xticklabels(blocks, rotation=30, ha="right")
    ax1.set_ylabel("speedup (torchvision time / fused time)")
    ax1.set_title("speed: > 1 means fastres is faster")
    ax1.legend(fontsize=7)
    markers = {"eval": "o", "train": "^"}
    for key in series:
        pts = [(c["torch_err"], c["err"]) for r in rows
               if (r["backend"], r["dtype"], r["mode"]) == key
               for c in r["checks"] if c["bound"] > 0]
        if pts:
            ax2.scatter([max(p[0], 1e-12) for p in pts], [max(p[1], 1e-12) for p in pts], s=10,
                        marker=markers.get(key[2], "o"), label=" ".join(key))
    allv = [max(v, 1e-12) for r in rows for c in r["checks"] if c["bound"] > 0
            for v in (c["err"], c["torch_err"]) if math.isfinite(v)] or [1e-12, 1.0]
    lo, hi = math.floor(math.log10(min(allv))), math.ceil(math.log10(max(allv)))
    xs = [10 ** e for e in range(lo, hi + 1)]
    ax2.plot(xs, [2 * v for v in xs], "k--", lw=0.8, label="err = 2 x PyTorch err")
    ax2.plot(xs, xs, "k:", lw=0.8, label="err = PyTorch err")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("PyTorch error vs float64 (max abs)")
    ax2.set_ylabel("fastres error vs float64 (max abs)")
    ax2.set_title("accuracy: every check (output, grads, running stats)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"fastres parity, {report['meta']['model']}: {hardware_line(report['env'])}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# Command line.


def _parse_dtypes(vals: list[str] | None, device: torch.device) -> list[torch.dtype]:
    if not vals:
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    out = []
    for v in vals:
        for name in v.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in DTYPES:
                raise SystemExit(f"--dtype {name!r}: choose from {', '.join(DTYPES)}")
            if DTYPES[name] not in out:
                out.append(DTYPES[name])
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fastres.parity",
        description="Fused fastres blocks against torchvision: float64-referenced errors under "
                    "the tolerance rule, and median times. Exit status 1 when a case fails.")
    ap.add_argument("--model", default="resnet50", choices=MODELS + (TINY,),
                    help="whose distinct blocks to run (default resnet50; 'tiny' = two small "
                         "blocks for smoke tests)")
    ap.add_argument("--dtype", nargs="+", metavar="DTYPE",
                    help="fp32, fp16, bf16 (several allowed; default fp32 on CPU, bf16 on CUDA)")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                     help="channels_last activations and weights (default)")
    fmt.add_argument("--contiguous", dest="channels_last", action="store_false",
                     help="NCHW-contiguous activations and weights")
    ap.add_argument("--batch", type=int, help="batch size (default 2 on CPU, 32 on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    help="default: cuda when available, else cpu")
    ap.add_argument("--backend", action="append", metavar="NAME",
                    help="only this backend (repeatable; default: every available backend)")
    ap.add_argument("--mode", action="append", choices=("eval", "train"),
                    help="only this mode (repeatable; default eval and train)")
    ap.add_argument("--quick", action="store_true",
                    help="a quick run: 4 representative blocks, fewer repeats")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, help="warm-up calls before timing (CPU timer)")
    ap.add_argument("--repeats", type=int, help="timed calls per measurement")
    ap.add_argument("--no-timing", dest="timing", action="store_false",
                    help="check parity only")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bar")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    ap.add_argument("--plot", metavar="PNG", help="plot speedups and errors (needs matplotlib)")
    ap.add_argument("--from-json", metavar="PATH",
                    help="run nothing: write --markdown/--plot from an earlier --json report "
                         "(also a partial one, from a run that was cut short)")
    return ap


def _write_outputs(report: dict, args) -> None:
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(report))
        print(f"wrote {args.markdown}")
    if args.plot:
        why = plot(report, args.plot)
        print(f"plot skipped: {why}" if why else f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        _write_outputs(report, args)
        return 0 if report["summary"]["ok"] and not report["summary"].get("partial") else 1
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastres.parity: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.backend and "triton" in args.backend:
        # The Triton interpreter must be chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtypes = _parse_dtypes(args.dtype, device)
    modes = args.mode or ["eval", "train"]
    batch = args.batch or (32 if device.type == "cuda" else 2)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    cases = distinct_blocks(args.model, args.image_size)
    if args.quick:
        cases = quick_subset(cases)
    names, skipped = backend_plan(device, args.backend)
    env = environment(device)
    print(f"fastres parity: {args.model} ({len(cases)} distinct blocks) on {device}")
    print(f"hardware: {hardware_line(env)}")
    print(f"batch {batch}, {'channels_last' if args.channels_last else 'contiguous'}, dtypes "
          f"{', '.join(DTYPE_NAMES[d] for d in dtypes)}, modes {', '.join(modes)}"
          + ((f", timing: median of {repeats} after {warmup} warm-up" if device.type == "cpu"
              else ", timing: median by triton.testing.do_bench (CUDA events without triton)")
             if args.timing else ", no timing"))
    for d in dtypes:
        print(f"dispatcher's own choice at {DTYPE_NAMES[d]}: "
              f"{auto_choice(device, d, args.channels_last)}")
    print(f"backends: {', '.join(names) or 'none'}"
          + "".join(f"\n  skipped {n}: {why}" for n, why in skipped.items()))
    if not names:
        print("fastres.parity: no backend to run", file=sys.stderr)
        return 2
    print(_HEAD)

    def make_report(results: list[dict], partial: bool) -> dict:
        summary = summarise(results)
        summary["duration_s"] = time.perf_counter() - t_start
        summary["partial"] = partial
        timer = next((r["time_torchvision"]["timer"] for r in results
                      if r.get("time_torchvision")), None)
        checks = max((len(r["checks"]) for r in results), default=0)
        return {
            "meta": {
                "tool": "fastres.parity", "argv": sys.argv[1:] if argv is None else list(argv),
                "model": args.model, "device": str(device), "batch": batch,
                "layout": "channels_last" if args.channels_last else "contiguous",
                "dtypes": [DTYPE_NAMES[d] for d in dtypes], "modes": modes,
                "image_size": args.image_size, "quick": args.quick, "warmup": warmup,
                "repeats": repeats, "timing": args.timing, "timer": timer,
                "backends": names, "skipped_backends": skipped,
                "auto_backend": {DTYPE_NAMES[d]: auto_choice(device, d, args.channels_last)
                                 for d in dtypes},
                "checks_per_case": checks,
                "blocks": [asdict(c) for c in cases],
            },
            "env": env,
            "summary": summary,
            "cases": results,
        }

    def checkpoint(results: list[dict]) -> None:
        # A run cut short (a time-boxed device check) keeps what it measured.
        if args.json:
            Path(args.json).write_text(json.dumps(make_report(results, True), indent=1,
                                                  default=str) + "\n")

    results = run_cases(cases, dtypes, modes, names, device, batch, args.channels_last, warmup,
                        repeats, timing=args.timing, progress=args.progress, emit=_emit,
                        seed=args.seed, checkpoint=checkpoint)
    report = make_report(results, False)
    summary = report["summary"]
    print(f"\n{summary['pass']} pass, {summary['fail']} fail, {summary['error']} error, "
          f"{summary['skipped']} skipped in {summary['duration_s']:.1f} s -- "
          f"{'PARITY OK' if summary['ok'] else 'PARITY FAILED'}")
    train_fails = [r for r in results if r["status"] == "fail" and r["mode"] == "train"]
    if train_fails:
        print(f"note: {len(train_fails)} failing case(s) are training. The verdict already gives "
              "each run a float64 reference with its own ReLU decisions (inner and output), so "
              "rounding that flips a decision near zero is not what failed. Compare the RMS "
              "errors printed with each failure, and diagnostics.plain_reference_checks in the "
              "JSON.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    _write_outputs(report, args)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
