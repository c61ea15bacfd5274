"""Shared machinery of the fastres benchmarks: cases, providers, timing, FLOPs, bytes, memory.

Imported by bench/conftest.py and the bench_*.py modules (pytest puts bench/ on sys.path).
Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fastres.harness import timer as T  # the project's one timer
from fastres.harness.timer import quantile


def stamp_commit() -> str:
    """The commit a benchmark measures, for its results' headers and file names: FASTRES_COMMIT
    when the caller set it, else scripts/commit.sh's answer for this checkout (the benchmarks
    live in the repository; the package reads no repository itself), exported so that child
    processes name the same commit."""
    sha = os.environ.get("FASTRES_COMMIT", "").strip()
    if not sha:
        import subprocess  # noqa: PLC0415

        script = Path(__file__).resolve().parent.parent / "scripts" / "commit.sh"
        try:
            sha = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
        sha = sha or "unknown"
        os.environ["FASTRES_COMMIT"] = sha
    return sha


stamp_commit()

HAS_CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Batch sizes. The CPU ones keep the default `pytest bench/` run at a few minutes on a 2-core
# machine; the GPU ones are realistic training/inference batches.
CPU_BATCH = 2
GPU_BATCH = 64
REF_CASE_BATCH = 8  # the reference case: BottleneckBlock(256, 64), N=8, 56x56
MODEL_CPU_BATCH = 1  # a whole-model training step at N=1 still has 49 values per channel in layer4
MODEL_GPU_INFER_BATCH = 256
MODEL_GPU_TRAIN_BATCH = 128

# Timing budgets: per measured case, after warm-up.
# On the CPU (a 2-core machine runs the default suite in minutes) three rounds is the floor; the
# p20/p50/p80 of three runs are their min/median/max.
CPU_BUDGET_S, CPU_MIN_ROUNDS, CPU_MAX_ROUNDS = 0.3, 3, 30
GPU_BUDGET_S, GPU_MIN_ROUNDS, GPU_MAX_ROUNDS = 0.15, 10, 200


# --------------------------------------------------------------------------------------------
# Cases.


@dataclass(frozen=True)
class ConvCase:
    """One distinct convolution of ResNet-50 (224x224 input) and the epilogue it has there."""

    name: str  # where it first occurs, e.g. "layer2.0.conv2"
    cin: int
    cout: int
    k: int
    stride: int
    pad: int
    h: int
    w: int
    epilogue: str  # "relu" | "residual+relu" | "none" (downsample: folded BN only)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.cin}x{self.cout}k{self.k}s{self.stride}@{self.h}"


def resnet50_conv_cases(image_size: int = 224) -> list[ConvCase]:
    """ResNet-50's distinct conv shapes (23 at 224x224), from torchvision's model on the meta
    device; a shape that occurs twice keeps the epilogue of its first occurrence."""
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.resnet50().eval()  # eval: a 1x1 layer4 at small sizes
    seen: dict[tuple, ConvCase] = {}

    def hook(name: str):
        def pre(mod: nn.Conv2d, args):
            x = args[0]
            key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
                   mod.padding[0], int(x.shape[2]), int(x.shape[3]))
            if name.endswith("conv3"):
                epi = "residual+relu"
            elif "downsample" in name:
                epi = "none"
            else:
                epi = "relu"
            seen.setdefault(key, ConvCase(name, *key, epi))
        return pre

    for name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        net(torch.empty(1, 3, image_size, image_size, device="meta"))
    return list(seen.values())


def block_cases() -> list:
    """The 8 Bottleneck types of ResNet-50 and the 7 BasicBlock types of ResNet-18/34 (the same
    7 for both), as fastres.parity.BlockCase."""
    from fastres.harness.cases import distinct_blocks

    out = distinct_blocks("resnet50")
    basic = distinct_blocks("resnet18")
    assert [(c.inplanes, c.planes, c.stride, c.downsample, c.height) for c in basic] == \
        [(c.inplanes, c.planes, c.stride, c.downsample, c.height)
         for c in distinct_blocks("resnet34")]
    return out + basic


# --------------------------------------------------------------------------------------------
# Modules.


class ConvBNAct(nn.Module):
    """Eager conv + BatchNorm (eval) [+ residual] [+ ReLU]: what one fused conv replaces."""

    def __init__(self, case: ConvCase):
        super().__init__()
        self.conv = nn.Conv2d(case.cin, case.cout, case.k, case.stride, case.pad, bias=False)
        self.bn = nn.BatchNorm2d(case.cout)
        self.relu = case.epilogue != "none"

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y


def place(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool
          ) -> nn.Module:
    module = module.to(device=device, dtype=dtype)
    return module.to(memory_format=torch.channels_last) if channels_last else module


def fmt(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def randn(shape, device, dtype, channels_last: bool, seed: int) -> Tensor:
    """Normal random data (never zeros), made on the CPU for reproducibility."""
    g = torch.Generator().manual_seed(seed)
    return fmt(torch.randn(*shape, generator=g).to(dtype).to(device), channels_last)


# --------------------------------------------------------------------------------------------
# Providers.

FASTRES_BACKENDS = ("cuda", "triton", "cpu", "reference")


def providers() -> list[str]:
    return ["eager", "compile"] + [f"fastres-{b}" for b in FASTRES_BACKENDS]


def provider_skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run on ``device`` here, or None."""
    if not provider.startswith("fastres-"):
        return None
    from fastres import backends

    name = provider.split("-", 1)[1]
    why = backends.available()[name]
    if why is not None:
        return f"{provider}: {why}"
    if name == "triton" and device.type != "cuda":
        return "fastres-triton: on a CPU Triton runs only in the interpreter (not a benchmark)"
    reasons = backends.BACKENDS[name].not_supported_reasons(backends.Inputs(device,
                                                                            torch.float32))
    dev = [r for r in reasons if r.startswith(f"{name} runs on")]
    return f"{provider}: {'; '.join(dev)}" if dev else None


def compile_mode(device: torch.device) -> str:
    return "max-autotune" if device.type == "cuda" else "default"


@contextmanager
def forced_backend(provider: str) -> Iterator[None]:
    """FASTRES_BACKEND set for fastres providers (forward and backward run inside it)."""
    if not provider.startswith("fastres-"):
        yield
        return
    from fastres.harness.run import forced_backend as _fb

    with _fb(provider.split("-", 1)[1]):
        yield


def make_module(provider: str, eager: nn.Module, device: torch.device) -> nn.Module:
    """The module a provider runs: eager itself, torch.compile of it, or fastres.convert of it."""
    if provider == "eager":
        return eager
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache: same forward code, new module, no cache limit hit
        return torch.compile(copy.deepcopy(eager), mode=compile_mode(device))
    import fastres

    return fastres.convert(copy.deepcopy(eager))


class MissingKernel(Exception):
    """A fastres op has no kernel for this device yet (it is being written)."""


def is_missing_kernel(exc: BaseException) -> bool:
    msg = str(exc)
    return isinstance(exc, NotImplementedError) and "Could not run 'fastres" in msg


# --------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotation_count(input_bytes: int, device: torch.device) -> int:
    """How many copies of the inputs to cycle through so that the GPU's L2 cannot hold them all
    (three times L2, at most 8 copies and 2 GiB); 1 on the CPU."""
    if device.type != "cuda" or input_bytes <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    k = math.ceil(3 * l2 / input_bytes)
    return int(max(1, min(k, 8, (2 << 30) // input_bytes)))


def warmup_calls(provider: str, device: torch.device) -> int:
    """Untimed calls before the one that sizes the rounds: compile needs one to compile and one
    more to settle; on the CPU one call warms the caches and oneDNN's primitive cache."""
    if provider == "compile":
        return 2
    return 1 if device.type == "cpu" else 2


def measure(benchmark, call: Callable[[int], object], device: torch.device, warmup: int = 2,
            group: str | None = None) -> dict:
    """Time ``call(i)`` (i: which rotated input to use) through pytest-benchmark's pedantic mode,
    with the project's one timer's kinds and L2 flush (fastres.harness.timer).

    Warm-up calls run first and are excluded. Before every timed call the L2 is flushed
    (pedantic's untimed setup: a write of twice the L2, synchronised). Each timed call gives its
    host time (until it returns) and its eager wall time (after a synchronisation, so
    pytest-benchmark's own wall-clock stats are honest too); p20/p50/p80 are the eager wall
    times (``kind``: "eager"). On CUDA the same call is also timed in the device kind (the
    profiler's kernel time per call: ``device_p50_ms``), the kind to rank kernels on."""
    if group is not None:
        benchmark.group = group  # pytest-benchmark reads it when pedantic() starts
    counter = itertools.count()
    t0 = time.perf_counter()
    for _ in range(warmup):
        call(next(counter))
    _sync(device)
    t_one = time.perf_counter()
    call(next(counter))
    _sync(device)
    t_one = time.perf_counter() - t_one
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        budget, lo, hi = GPU_BUDGET_S, GPU_MIN_ROUNDS, GPU_MAX_ROUNDS
    else:
        budget, lo, hi = CPU_BUDGET_S, CPU_MIN_ROUNDS, CPU_MAX_ROUNDS
    rounds = int(max(lo, min(hi, budget / max(t_one, 1e-6))))
    flush = T.Flusher(device)
    host: list = []
    wall: list = []

    def target():
        i = next(counter)
        s = time.perf_counter()
        call(i)
        h = time.perf_counter()
        _sync(device)
        host.append((h - s) * 1e3)
        wall.append((time.perf_counter() - s) * 1e3)

    benchmark.pedantic(target, setup=flush, rounds=rounds, iterations=1, warmup_rounds=0)
    timer = T.kind_label("eager", device)
    if not wall:  # --benchmark-disable runs the target once at most
        return {"timer": timer, "kind": "eager", "rounds": 0}
    ms, hs = sorted(wall), sorted(host)
    info = {"p20_ms": quantile(ms, 0.2), "p50_ms": statistics.median(ms),
            "p80_ms": quantile(ms, 0.8), "min_ms": ms[0], "rounds": len(ms), "timer": timer,
            "kind": "eager", "host_p50_ms": statistics.median(hs),
            "flush_bytes": flush.nbytes, "warmup_calls": warmup + 1, "warmup_s": warm_s}
    if device.type == "cuda":
        r = T.measure(lambda: call(next(counter)), device, kinds=("device",), warmup=1,
                      repeats=min(rounds, 10))
        if "device" in r:
            info.update(device_p50_ms=r["device"]["p50"], device_timer=r["device"]["what"])
        else:
            info["device_error"] = r["errors"].get("device")
    return info


# --------------------------------------------------------------------------------------------
# FLOPs, bytes, memory.


def flops_of(fn: Callable[[], object]) -> int:
    """FLOPs counted by torch.utils.flop_counter (convolutions and matmuls, forward and, when
    ``fn`` runs it, backward). Run ``fn`` on meta tensors: nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def nbytes(*ts) -> int:
    total = 0
    for t in ts:
        if isinstance(t, Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (list, tuple)):
            total += nbytes(*t)
    return total


def param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters()) + \
        sum(b.numel() * b.element_size() for b in m.buffers())


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """On CUDA: the peak bytes allocated during the block above what was allocated at its start
    (torch.cuda.max_memory_allocated). Elsewhere: nothing (None) -- there is no honest CPU
    equivalent for torch's allocator; see saved_tensor_bytes."""
    res: dict = {"peak_mem_bytes": None}
    if device.type != "cuda":
        yield res
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield res
    torch.cuda.synchronize(device)
    res["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base


def saved_tensor_bytes(forward: Callable[[], Tensor], exclude: list[Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``forward()`` (counted
    with torch.autograd.graph.saved_tensors_hooks), leaving out the storages of ``exclude``
    (the parameters: they are resident anyway). Meaningful on any device: it is the activation
    memory a training step holds between forward and backward."""
    skip = set()
    for t in exclude:
        try:
            skip.add(t.untyped_storage().data_ptr())
        except RuntimeError:
            pass
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip:
                seen[ptr] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# Recording.


@dataclass
class Record:
    """What one benchmark case stores (also put into pytest-benchmark's extra_info)."""

    group: str
    case: str
    provider: str
    info: dict = field(default_factory=dict)


def finish(info: dict, flops: int, bytes_floor: int) -> dict:
    info["flops"] = flops
    info["bytes_floor"] = bytes_floor
    p50 = info.get("p50_ms")
    if p50:
        info["tflops"] = flops / (p50 * 1e-3) / 1e12
        info["gbps"] = bytes_floor / (p50 * 1e-3) / 1e9
    return info


def no_grad_if(flag: bool):
    return torch.no_grad() if flag else nullcontext()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def check_and_measure(bm, provider: str, m: nn.Module, ref_m: nn.Module, x0: Tensor,
                      call: Callable[[int], object], device: torch.device, group: str,
                      train: bool) -> tuple[Tensor, float, dict, int | None, dict]:
    """The shared body of a module benchmark, under ``provider``'s backend: the first output
    (skipping a provider whose kernel is missing here), its max difference from eager (``ref_m``,
    a copy whose statistics the check may step), the timing of ``call``, the bytes saved for
    backward (train), and the peak memory of one call from zeroed gradients (CUDA). Returns
    (eager's output, diff, info, saved bytes or None, peak-memory dict)."""
    import pytest  # noqa: PLC0415  (benchlib is imported by non-test tools too)

    with forced_backend(provider):
        try:
            with torch.no_grad():
                got = m(x0)
        except NotImplementedError as exc:
            if is_missing_kernel(exc):
                pytest.skip(f"{provider}: {str(exc).splitlines()[0][:120]}")
            raise
        with torch.no_grad():
            want = got if provider == "eager" and not train else ref_m(x0)
        diff = (got.double() - want.double()).abs().max().item()
        info = measure(bm, call, device, warmup=warmup_calls(provider, device), group=group)
        saved = None
        if train:
            try:
                saved = saved_tensor_bytes(lambda: m(x0), list(m.parameters()))
            except Exception as exc:  # e.g. hooks a compiled graph refuses: say so, no number
                info["saved_bytes_error"] = str(exc).splitlines()[0][:200]
        for p in m.parameters():
            p.grad = None
        with peak_memory(device) as pm:
            if device.type == "cuda":
                call(0)
    return want, diff, info, saved, pm


# --------------------------------------------------------------------------------------------
# Table scripts (gpu_timing.py, resnet50_throughput.py): their output options.


def add_output_args(ap) -> None:
    """--json, --markdown and --from-json on an argparse parser."""
    ap.add_argument("--json", dest="json_out", help="write every row here (rewritten after each)")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--from-json", metavar="PATH",
                    help="run nothing: print (and --markdown) the table of an earlier --json")


def write_json(path: str | None, doc: dict) -> None:
    """``doc`` to ``path`` through a temporary file: a reader never sees half of it."""
    if not path:
        return
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def emit_table(args, render: Callable[[dict], str], doc: dict | None = None) -> str:
    """The table of ``doc`` (or of ``args.from_json``): printed, and written to --markdown."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    text = render(doc if doc is not None else json.loads(Path(args.from_json).read_text()))
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)
    return text
