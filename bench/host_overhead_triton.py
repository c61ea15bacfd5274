"""The Triton backend's host path per block call, with the kernels made free: Triton's real launch
path over a fake driver, measured on the CPU.

    python bench/host_overhead_triton.py [--dtype bf16 fp32] [--calls 200] [--json out.json]

``install()`` makes Triton believe it drives an sm_90 GPU: ``triton.runtime.driver.set_active``
with a driver whose target is ``GPUTarget("cuda", 90, 32)``, whose device and stream queries
answer 0, whose ``load_binary`` loads nothing and whose launcher counts the launch and returns.
Everything above the launcher is the real eager path: the block module, the dispatcher
(``FASTRES_BACKEND=triton``), the ``torch.ops.fastres_triton`` ops and their bodies, the launch
code, and each kernel compiled for sm_90 by ptxas (Triton's on-disk cache keeps the cubins, so
only the first run compiles). The tensors are CPU tensors; no kernel runs, so the outputs hold
whatever ``torch.empty`` gave. What it does not include: a real launcher's argument packing and
``cuLaunchKernel`` (a few µs per launch on a GPU host), and ``torch.cuda.current_device`` (the
fake answers from Python).

Two patches make a CPU tensor acceptable to the Triton backend (it refuses them without the
interpreter): ``unavailable_reason`` answers None and ``not_supported_reasons`` drops the device
reasons. Nothing else is patched.

Rows as ``bench/host_overhead.py``'s (same keys, its ``_measure``): host µs per block call
(median of ``calls`` with min-max, the CPU time of fills and copies subtracted), and from one
profiled call (``host_overhead.profiled_counts``: no dispatch mode, so the eager paths run as
they do unobserved) launches (the fake launcher's count plus every leaf aten op that launches a
kernel on a GPU), allocations (aten::empty and aten::empty_strided) and host-device syncs.
``main`` runs with glibc's large allocations kept on the heap (``MALLOC_MMAP_MAX_=0``, see
there); a caller of ``measure_rows`` sets that in its own environment.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _FakeUtils:
    """The driver utilities Triton's runtime calls: loading a cubin (each load gets its own
    function handle, so a launch names the compiled kernel it went to), device properties."""

    def __init__(self):
        self.loaded = 0

    def load_binary(self, name, kernel, shared, device):
        self.loaded += 1
        # (module, function, n_regs, n_spills, n_max_threads)
        return self.loaded, self.loaded, 0, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        # H200: 228 KiB of shared memory per SM, 227 KiB per block; 132 SMs
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "sm_clock_rate": 1980000,
                "mem_clock_rate": 3201000, "mem_bus_width": 6144, "max_num_regs": 65536,
                "warpSize": 32}

    def get_device_capability(self, device):
        return (9, 0)


class FakeDriver:
    """An sm_90 'GPU' that launches nothing: ``launches`` counts the launcher calls; with
    ``record`` set, each call's (kernel name, grid, stream, function, packed metadata, args) is
    appended to ``calls``."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = _FakeUtils()
        self.launches = 0
        self.record = False
        self.calls: list[tuple] = []
        driver = self

        class FakeLauncher:
            def __init__(self, src, metadata):
                self.name = metadata.name

            def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata,
                         enter_hook, exit_hook, *args):
                driver.launches += 1
                if driver.record:
                    driver.calls.append((self.name, (gx, gy, gz), stream, function,
                                         packed_metadata, args))

        self.launcher_cls = FakeLauncher

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cpu

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def assemble_tensormap_to_arg(self, tensormaps_info, args):
        return args

    def get_benchmarker(self):
        raise RuntimeError("the fake driver runs no kernel: nothing to time")


_DRIVER: FakeDriver | None = None


def cannot_install() -> str | None:
    """Why the fake driver cannot be installed in this process, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the kernels are interpreted, nothing is compiled"
    try:
        import triton  # noqa: F401, PLC0415
        from triton.backends.compiler import GPUTarget  # noqa: F401, PLC0415
        from triton.runtime import driver  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"triton does not import: {exc}"
    if torch.cuda.is_available():
        return "a CUDA device is visible: measure the real driver instead"
    return None


def install() -> FakeDriver:
    """Make the fake driver Triton's active driver and let the Triton backend take CPU tensors
    (see the module docstring). Idempotent; returns the driver."""
    global _DRIVER
    if _DRIVER is not None:
        return _DRIVER
    why = cannot_install()
    if why:
        raise RuntimeError(f"the fake Triton driver cannot be installed: {why}")
    from triton.runtime import driver as triton_driver  # noqa: PLC0415

    drv = FakeDriver()
    triton_driver.set_active(drv)
    from fastres import triton_kernels  # noqa: PLC0415
    from fastres.backends import dispatch  # noqa: PLC0415

    probe = triton_kernels.not_supported_reasons

    def not_supported_reasons(inputs):
        return [r for r in probe(inputs) if "cpu tensors" not in r and "CUDA device" not in r]

    triton_kernels.unavailable_reason = lambda: None
    triton_kernels.not_supported_reasons = not_supported_reasons
    dispatch._probed["triton"] = None
    _DRIVER = drv
    return drv


MODES = ("eval", "eval-grad", "train")

#: Elementwise ops whose CPU time is data work a GPU runs as kernels (counted among the
#: launches): subtracted like host_overhead.DATA_OPS. Before the TF32 rounding became one Triton
#: launch it ran as these four torch ops, on the CPU here over whole activations (hundreds of ms
#: per fp32 training step at N=32).
ELEMENTWISE_OPS = {"aten::add", "aten::bitwise_and", "aten::__and__", "aten::isnan",
                   "aten::where"}


def measure_rows(dtypes=("bf16", "fp32"), calls: int = 200, batch: int = 32) -> list[dict]:
    """Rows with ``bench/host_overhead.py``'s keys for the two ResNet-50 blocks (identity and
    stride-2 downsample), ``dtypes`` (names of host_overhead.DTYPES), eval, eval-grad and train,
    provider ``fastres-triton``. Installs the fake driver and sets FASTRES_BACKEND=triton."""
    import host_overhead as ho  # noqa: PLC0415

    import fastres  # noqa: PLC0415
    from fastres.harness.rule import randomise_bn  # noqa: PLC0415
    from fastres.nn._fused import _FusedMixin  # noqa: PLC0415

    drv = install()
    os.environ["FASTRES_BACKEND"] = "triton"
    # BatchNorm in the epilogues, as on a GPU (the fold cache is the CPU's)
    _FusedMixin._fold_cacheable = staticmethod(lambda conv, bn: False)
    rows = []
    for name, (tv, h) in ho._blocks().items():
        if name in ho.UNITS:
            continue
        randomise_bn(tv)
        for dname in dtypes:
            dt = ho.DTYPES[dname]
            ours = fastres.convert(copy.deepcopy(tv)).to(dtype=dt,
                                                         memory_format=torch.channels_last)
            x = torch.randn(batch, tv.conv1.in_channels, h, h, dtype=dt).contiguous(
                memory_format=torch.channels_last)
            for mode in MODES:
                data_ops, ho.DATA_OPS = ho.DATA_OPS, ho.DATA_OPS | ELEMENTWISE_OPS
                try:
                    # launches, allocations and syncs as the profiler sees the call
                    r = ho._measure(ours, x, mode, calls, lambda: drv.launches)
                finally:
                    ho.DATA_OPS = data_ops
                rows.append({"block": name, "dtype": dname, "mode": mode,
                             "provider": "fastres-triton", **r})
    return rows


def format_rows(rows: list[dict]) -> list[str]:
    import host_overhead as ho  # noqa: PLC0415

    lines = [f"{'block':30s} {'dtype':5s} {'mode':9s} {'provider':14s} {'host us':>22s} "
             f"{'data us':>8s} {'launches':>8s} {'allocs':>6s} {'syncs':>5s}  budget"]
    for r in rows:
        limit = ho.BUDGET_US[r["mode"]]
        ok = r["host_us"] <= limit and r["syncs"] == 0
        host = f"{r['host_us']:.0f} ({r['min_us']:.0f}-{r['max_us']:.0f})"
        lines.append(f"{r['block']:30s} {r['dtype']:5s} {r['mode']:9s} {r['provider']:14s} "
                     f"{host:>22s} {r['data_us']:8.0f} {r['launches']:8d} "
                     f"{r['allocations']:6d} {r['syncs']:5d}  "
                     f"host and syncs {'met' if ok else 'MISSED'} (<= {limit:.0f} us; launches "
                     f"and allocations: bench/host_overhead.py)")
    return lines


def main(argv=None) -> int:
    import host_overhead as ho  # noqa: PLC0415

    from fastres.harness.environment import environment, hardware_line  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=tuple(ho.DTYPES))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if argv is None and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        # glibc maps each large allocation (an activation: tens of MB) anew and unmaps it on
        # free: 90 µs per torch.empty in a training step here, where a GPU's caching allocator
        # reuses its blocks in ~1-2 µs. From the heap, kept (no trim), they are reused too.
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**40))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    why = cannot_install()
    if why:
        print(f"the fake Triton driver cannot be installed: {why}")
        return 2
    import triton  # noqa: PLC0415

    print(hardware_line(environment(torch.device("cpu"))))
    print(f"triton {triton.__version__}; per block call, N={args.batch}, channels_last, "
          f"FASTRES_BACKEND=triton over a fake sm_90 driver; host: median (min-max) of "
          f"{args.calls} calls")
    rows = measure_rows(args.dtype, args.calls, args.batch)
    for line in format_rows(rows):
        print(line)
    missed = sum(1 for r in rows
                 if r["host_us"] > ho.BUDGET_US[r["mode"]] or r["syncs"] != 0)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": environment(torch.device("cpu")), "budget_us": ho.BUDGET_US, "rows": rows},
            indent=1, default=str))
    print(f"{missed} fastres-triton row(s) miss a budget")
    return missed


if __name__ == "__main__":
    sys.exit(main())
