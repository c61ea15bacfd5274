"""The host path's cost per block call, with the kernels made free: what a GPU would wait on the
CPU for, measured without a GPU.

    python bench/host_overhead.py [--dtype bf16 fp32] [--calls 200] [--json out.json]

Providers, per ResNet-50 block (Bottleneck 256->64 identity and 256->128 stride-2 downsample, N=32,
channels_last) and mode (eval without autograd, eval with autograd, a training step: forward and
backward), and per whole ResNet-50 call at 224x224 (eval modes: its launches, allocations and
syncs; its host time includes the CPU computing the model's pooling and fc, see UNITS):

* ``torchvision``: its block on ``meta`` tensors: every op dispatched as on a GPU, no kernel runs
  (its host time is an upper bound: meta shape functions run in Python, slower than a CUDA
  launch; its launches are exact);
* ``fastres-cuda``: the fused block on the ``cudasim`` backend in dry-run mode: the CUDA backend's
  real Python path, dispatcher and C++ launchers (their checks, copies, allocations), every kernel
  launch checked and counted but not run.

Per call: host µs (median of ``--calls``, with min-max), kernel launches (the ops that launch a
kernel on a GPU, views excluded, plus cudasim's count of the launches inside fastres' ops),
allocations (the profiler's ``aten::empty``/``empty_strided`` events of one byte or more; for
torchvision on meta tensors the dispatched ops' new outputs) and host-device syncs (ops reading a
tensor back).
The CPU time of fills and copies (``DATA_OPS``: a launcher zeroing a buffer, a layout copy; on a
GPU asynchronous kernels, counted among the launches) is subtracted from the host time, as the
profiler measures it (the least of 5 calls, the ``data us`` column: the profiler's clock is
wall time, which grows when the thread is descheduled; the host time is thread time): the rest
estimates the host path, it is not an exact figure. The budgets, per block call:
host <= 25 µs eval and <= 120 µs for a training step, no sync, launches no more than the
convolutions plus one per BatchNorm reduction (``launch_budget``), allocations at most half of
torchvision's in the same run; the exit status is the number of fastres rows that miss one.
The Triton backend's rows come from ``bench/host_overhead_triton.py``
(Triton's real eager launch path over a fake sm_90 driver, run as a process of its own).

Training rows run at N=1 (``--train-batch``): a training step's host path does not depend on
the batch (no value-dependent host work, memory from the kept heap), but in dry-run mode the
launchers' fills and copies still run on the CPU (zeroed statistics buffers, each weight's
transpose for the data gradient: tens of ms per step at N=32), and subtracting so much data work
leaves noise, not a host time.

Host time is the calling thread's CPU time (``time.thread_time_ns``), not wall time: the host
path is that thread's work, and time spent descheduled while other processes run is not. It
still grows when another process shares the core's caches and execution units, and this 2-CPU
machine has a slow mode that doubles every time for a while (seen idle too): every cell is
measured in ``--passes`` passes over the whole table, one after the other, and keeps the pass
with the lowest median.

One intra-op thread (``torch.set_num_threads(1)``): a launch path uses none, and the proxy's
real CPU fills and copies, parallelised over two threads, wait milliseconds for a descheduled
thread whenever anything else runs on the machine (measured: a 36K-element weight transpose
took 36 µs or 30 ms).

Allocations: a GPU's caching allocator hands a freed block back in ~1 µs; the CPU proxy's glibc
maps and unmaps every block over 32 MiB (a 56x56 activation at N=32), ~20-40 µs per block call
that a GPU never pays. The script runs with glibc's heap for every size and no trimming
(``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_``; it re-executes itself with them), so
memory is reused as the caching allocator reuses it; ``--system-malloc`` measures without.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import stamp_commit  # noqa: E402

import fastres  # noqa: E402
from fastres.backends import extension  # noqa: E402
from fastres.harness.environment import environment, hardware_line  # noqa: E402
from fastres.harness.rule import randomise_bn  # noqa: E402
from fastres.nn import resnet as fr_resnet  # noqa: E402
from fastres.nn._fused import _FusedMixin  # noqa: E402

BUDGET_US = {"eval": 25.0, "eval-grad": 25.0, "train": 120.0}


def launch_budget(n_conv: int, n_bn: int, mode: str) -> int:
    """The issue's launch budget per block call: the convolutions (a training step: forward,
    data gradient and weight gradient of each) plus one launch per BatchNorm reduction that
    cannot live in an epilogue (a training step: the forward's statistics and the backward's
    sums of each BatchNorm). Eval has no reduction: the BatchNorm lives in the epilogue."""
    return n_conv if mode != "train" else 3 * n_conv + 2 * n_bn


def verdict(r: dict, mode: str, n_conv: int, n_bn: int, tv_allocs: int | None) -> tuple:
    """(every budget met, the budget column's text): host µs, syncs, launches, and allocations
    at most half of torchvision's in the same run."""
    limit = BUDGET_US[mode]
    n_launch = launch_budget(n_conv, n_bn, mode)
    checks = [(r["host_us"] <= limit, f"host <= {limit:.0f} us"),
              (r["syncs"] == 0, "no sync"),
              (r["launches"] <= n_launch, f"launches <= {n_launch}")]
    if tv_allocs is not None:
        checks.append((2 * r["allocations"] <= tv_allocs, f"allocs <= {tv_allocs // 2}"))
    missed = [what for ok, what in checks if not ok]
    return not missed, "met" if not missed else "MISSED " + ", ".join(missed)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "allclose",
            "masked_select", "unique", "_unique2", "tolist"}
#: Ops that launch no kernel on a GPU (metadata only).
VIEW_OPS = {"view", "_unsafe_view", "as_strided", "expand", "permute", "t", "transpose",
            "reshape", "alias", "detach", "slice", "select", "unsqueeze", "squeeze",
            "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_",
            "_to_copy_meta", "lift_fresh", "size", "stride", "is_contiguous"}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops, self.syncs, self.allocs = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.syncs += name in SYNC_OPS
        # fastres' own ops: their launches are cudasim's count
        launches = name not in VIEW_OPS and not func.namespace.startswith("fastres")
        self.ops += launches
        out = func(*args, **(kwargs or {}))
        if launches:  # the op's new outputs: what it allocates on a GPU
            ins = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.allocs += sum(1 for t in outs if isinstance(t, torch.Tensor) and t.numel() > 0
                               and not t._is_view() and not any(t is a for a in ins))
        return out


def _blocks():
    down = torchvision.models.resnet.Bottleneck(
        256, 128, stride=2, downsample=torch.nn.Sequential(
            torch.nn.Conv2d(256, 512, 1, stride=2, bias=False), torch.nn.BatchNorm2d(512)))
    return {"identity 256->64 56x56": (torchvision.models.resnet.Bottleneck(256, 64), 56),
            "downsample 256->128 s2 56x56": (down, 56),
            "resnet50 224x224": (torchvision.models.resnet50(), 224)}


#: Fused units per model row (16 blocks and the stem). Its host time is not the host path: the
#: model's own max-pool, average-pool and fc run for real on the CPU tensors cudasim uses (tens
#: of ms at N=32); its launches and allocations are, and its syncs.
UNITS = {"resnet50 224x224": 17}
#: The whole model is timed in eval only: a training step over cudasim fills every buffer its
#: launchers zero on the CPU (hundreds of ms at N=32, 224x224), which is not host path.
MODEL_MODES = ("eval", "eval-grad")


#: Ops whose CPU time is data movement a GPU runs as asynchronous kernels (fills, copies):
#: subtracted from the host time (the profiler's self time per call), not the host path.
DATA_OPS = {"aten::fill_", "aten::zero_", "aten::copy_"}
_GRADS: dict = {}


#: The ops every tensor allocation reaches (``empty_like``, ``zeros``, ``clone``, ``_to_copy``
#: call one of them), from Python and from C++ alike; on meta tensors they count what a GPU
#: would allocate.
ALLOC_OPS = ("aten::empty", "aten::empty_strided")


def count_allocations(events) -> int:
    """Allocations of one or more bytes among profiler ``events`` (recorded with shapes: an
    allocation's size is its first concrete input). Not the profiler's memory events: with
    torch 2.14 on the CPU they showed the frees of a call's tensors but not their allocations."""
    n = 0
    for e in events:
        if e.name in ALLOC_OPS:
            size = (getattr(e, "concrete_inputs", None) or [None])[0]
            n += not isinstance(size, list) or math.prod(size) > 0
    return n


#: The autograd engine, entered as torch.autograd.backward enters it (see _call).
_ENGINE = torch.autograd.variable.Variable._execution_engine


def _call(block, x, mode, reset=True):
    """One block call (``reset``: then the gradients reset; the timed calls reset untimed). A
    training step is the forward and the autograd engine's backward from the block's output: the
    Python around them that a training loop pays once per step for the whole model, not per
    block (``torch.autograd.backward``'s argument handling, ~12 µs, and resetting the gradients,
    ~11 µs for a block's parameters; measured on this CPU, loaded) is not timed."""
    if mode == "eval":
        with torch.no_grad():
            return block(x)
    out = block(x)
    if mode == "train":
        key = (out.shape, out.dtype, out.device, out.is_contiguous())
        if key not in _GRADS:  # the loss gradient, made once (not the block's host path)
            _GRADS[key] = torch.ones_like(out)
        # torch.autograd.backward((out,), (g,)) after its checks: keep_graph, create_graph,
        # inputs, allow_unreachable, accumulate_grad
        _ENGINE.run_backward((out,), (_GRADS[key],), False, False, (), True, True)
        if reset:
            _reset(block, mode)
    return out


def _reset(block, mode) -> None:
    """Between training calls: the gradients set to None (an optimizer's zero_grad)."""
    if mode == "train":
        for p in block.parameters():
            p.grad = None


#: Ops that copy through an aten op under them (counted there) and are no-ops as leaves.
NOOP_LEAVES = {"to", "contiguous", "type_as", "view_as", "reshape_as", "expand_as"}


def profiled_counts(block, x, mode, launches) -> dict:
    """Launches, allocations and syncs of one call, seen by the profiler, which (unlike a
    TorchDispatchMode) leaves the call's path as it is: the C++ block and unit calls and the
    eager Triton paths step aside under a dispatch mode (they bypass the dispatcher), so a mode
    would count the ops of the path that replaces them.

    Launches: ``launches()``'s count (cudasim's, the fake Triton driver's), plus every leaf aten
    op (no aten op under it) that is not a view, an allocation or a sync (on a GPU a kernel:
    fill_, copy_, add, ...). Allocations: :func:`count_allocations`. Syncs: the ops that read a
    tensor back."""
    n0 = launches()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        _call(block, x, mode)
    launched = launches() - n0
    ops = syncs = 0
    events = prof.events()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        name = e.name[len("aten::"):]
        syncs += name in SYNC_OPS
        leaf = not any(c.name.startswith("aten::") for c in e.cpu_children)
        ops += (leaf and name not in VIEW_OPS and name not in SYNC_OPS
                and name not in NOOP_LEAVES)
    return {"launches": launched + ops, "allocations": count_allocations(events),
            "syncs": syncs}


def _measure(block, x, mode, calls, launches=None) -> dict:
    block.train(mode == "train")
    for _ in range(3):
        _call(block, x, mode)
    ts = []
    for _ in range(calls):
        t0 = time.thread_time_ns()
        _call(block, x, mode, reset=False)
        ts.append((time.thread_time_ns() - t0) / 1e3)
        _reset(block, mode)
    n0 = launches() if launches else 0
    with OpCounter() as c:
        _call(block, x, mode)
    # On a GPU every dispatched op that is not a view launches a kernel; a fastres op launches
    # what cudasim counted for it.
    n_launch = c.ops + (launches() - n0 if launches else 0)
    # On meta tensors the profiler's allocation events would count the meta kernels' Python
    # decompositions (a BatchNorm's ~10 intermediates, one buffer on a GPU): there the
    # dispatched ops' outputs. fastres' rows: profiled_counts, below.
    allocs = c.allocs
    data = []
    for _ in range(5):  # the data ops' CPU time per call: the least of 5 profiled calls
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _call(block, x, mode)
        data.append(sum(e.self_cpu_time_total for e in prof.key_averages()
                        if e.key in DATA_OPS))
    data_us = min(data)
    r = {"host_us": max(0.0, statistics.median(ts) - data_us),
         "min_us": max(0.0, min(ts) - data_us), "max_us": max(0.0, max(ts) - data_us),
         "data_us": data_us, "launches": n_launch, "allocations": allocs, "syncs": c.syncs}
    if launches is not None:  # fastres: the path the call takes, seen by the profiler
        seen = profiled_counts(block, x, mode, launches)
        r.update(seen, syncs=max(seen["syncs"], c.syncs))
    return r


def _triton_rows(args) -> tuple[list[dict], str | None]:
    """The Triton backend's rows, from bench/host_overhead_triton.py (its fake sm_90 driver, in
    a process of its own: the driver and the Triton backend's patches stay there)."""
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "triton.json"
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve().parent / "host_overhead_triton.py"),
             "--calls", str(args.calls), "--batch", str(args.batch), "--dtype", *args.dtype,
             "--json", str(out)], capture_output=True, text=True)
        if not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()
            return [], tail[-1] if tail else f"exit status {proc.returncode}"
        return json.loads(out.read_text())["rows"], None


#: glibc settings that keep freed memory in the heap (see the docstring: allocations).
HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    stamp_commit()  # before the re-execution: its header names the commit measured
    if "--system-malloc" not in argv and any(os.environ.get(k) != v for k, v in HEAP_ENV.items()):
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv],
                  {**os.environ, **HEAP_ENV})
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--system-malloc", action="store_true",
                    help="allocate as glibc does by default (see the docstring)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=tuple(DTYPES))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--passes", type=int, default=3,
                    help="measure every cell this many times, keep each cell's lowest median")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=1,
                    help="the training rows' batch (see the docstring: training)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-triton", action="store_true",
                    help="skip the Triton rows (bench/host_overhead_triton.py, a fake driver)")
    args = ap.parse_args(argv)
    why = extension.load_cudasim()
    if why:
        print(f"cudasim is not built: {why}")
        return 2
    from fastres import _C_cudasim as sim

    print(hardware_line(environment(torch.device("cpu"))))
    print(f"per block call, N={args.batch} (training rows N={args.train_batch}), channels_last, "
          "kernels made free (see the docstring); "
          f"host: thread CPU time, median (min-max) of {args.calls} calls, the lowest of "
          f"{args.passes} passes; allocator: "
          f"{'glibc default' if args.system_malloc else 'heap kept (MALLOC_MMAP_MAX_=0)'}")
    head = (f"{'block':30s} {'dtype':5s} {'mode':9s} {'provider':13s} {'host us':>22s} "
            f"{'data us':>8s} {'launches':>8s} {'allocs':>6s} {'syncs':>5s}  budget")
    print(head)
    rows, missed = [], 0
    torch.set_num_threads(1)  # see the docstring
    os.environ["FASTRES_BACKEND"] = "cudasim"
    # The CUDA path off the CPU cache: BatchNorm in the epilogues, as on a GPU.
    _FusedMixin._fold_cacheable = staticmethod(lambda conv, bn: False)
    # The model's max-pool, average pool and fc as the modules run them on a GPU: fastres' CPU
    # ops for them (fastres.ResNet takes them on CPU tensors, which cudasim's are) are not
    # counted as launches and would hide the GPU's.
    fr_resnet._MAX_POOL[:] = [None]
    fr_resnet._HEAD[:] = [None]
    # Every cell measured in each pass, the passes one after the other; a cell keeps its pass
    # with the lowest median (this CPU's slow mode doubles a pass's times: see the docstring).
    cells: dict = {}
    blocks = _blocks()
    for tv, _ in blocks.values():
        randomise_bn(tv)
    for _ in range(args.passes):
        for name, (tv, h) in blocks.items():
            for dname in args.dtype:
                dt = DTYPES[dname]
                for mode in ("eval", "eval-grad", "train"):
                    if name in UNITS and mode not in MODEL_MODES:
                        continue
                    calls = args.calls if name not in UNITS else max(5, args.calls // 10)
                    n = args.train_batch if mode == "train" else args.batch
                    xm = torch.empty(n, tv.conv1.in_channels, h, h, device="meta",
                                     dtype=dt).contiguous(memory_format=torch.channels_last)
                    meta = copy.deepcopy(tv).to(device="meta", dtype=dt,
                                                memory_format=torch.channels_last)
                    results = {"torchvision": _measure(meta, xm, mode, calls)}
                    ours = fastres.convert(copy.deepcopy(tv)).to(
                        dtype=dt, memory_format=torch.channels_last)
                    x = torch.randn(n, tv.conv1.in_channels, h, h, dtype=dt).contiguous(
                        memory_format=torch.channels_last)
                    prev = sim.set_dry_run(True)
                    try:
                        results["fastres-cuda"] = _measure(ours, x, mode, calls,
                                                           sim.launch_count)
                    finally:
                        sim.set_dry_run(prev)
                    for prov, r in results.items():
                        key = (name, dname, mode, prov)
                        if key not in cells or r["host_us"] < cells[key]["host_us"]:
                            cells[key] = r
    counts = {name: (sum(isinstance(m, torch.nn.Conv2d) for m in tv.modules()),
                     sum(isinstance(m, torch.nn.BatchNorm2d) for m in tv.modules()))
              for name, (tv, _) in blocks.items()}
    for (name, dname, mode, prov), r in cells.items():
        budget = ""
        r["missed"] = False
        if prov != "torchvision":
            if name in UNITS:
                ok = r["syncs"] == 0
                budget = f"syncs {'met' if ok else 'MISSED'}; host: CPU pooling, fc"
            else:
                tv_r = cells.get((name, dname, mode, "torchvision"))
                ok, budget = verdict(r, mode, *counts[name],
                                     tv_r["allocations"] if tv_r else None)
            missed += not ok
            r["missed"] = not ok
        host = f"{r['host_us']:.0f} ({r['min_us']:.0f}-{r['max_us']:.0f})"
        print(f"{name:30s} {dname:5s} {mode:9s} {prov:13s} {host:>22s} "
              f"{r['data_us']:8.0f} {r['launches']:8d} {r['allocations']:6d} "
              f"{r['syncs']:5d}  {budget}")
        rows.append({"block": name, "dtype": dname, "mode": mode, "provider": prov, **r})
    if not args.no_triton:
        trows, why, best = [], None, {}
        for _ in range(args.passes):  # as the CUDA rows: each cell's lowest median
            got, why = _triton_rows(args)
            for r in got:
                key = (r["block"], r["dtype"], r["mode"])
                if key not in best or r["host_us"] < best[key]["host_us"]:
                    best[key] = r
        trows = list(best.values())
        if why:
            print(f"fastres-triton: not measured ({why})")
        for r in trows:
            tv_r = cells.get((r["block"], r["dtype"], r["mode"], "torchvision"))
            ok, budget = verdict(r, r["mode"], *counts[r["block"]],
                                 tv_r["allocations"] if tv_r else None)
            r["missed"] = not ok
            missed += r["missed"]
            host = f"{r['host_us']:.0f} ({r['min_us']:.0f}-{r['max_us']:.0f})"
            print(f"{r['block']:30s} {r['dtype']:5s} {r['mode']:9s} {r['provider']:13s} "
                  f"{host:>22s} {r['data_us']:8.0f} {r['launches']:8d} {r['allocations']:6d} "
                  f"{r['syncs']:5d}  {budget}")
        rows += trows
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": environment(torch.device("cpu")), "budget_us": BUDGET_US, "rows": rows},
            indent=1, default=str))
    print(f"{missed} fastres row(s) miss a budget")
    return missed


if __name__ == "__main__":
    sys.exit(main())
