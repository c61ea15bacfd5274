"""pytest configuration of the fastres benchmarks (`pytest bench/`).

Providers run side by side in one session: eager torchvision, torch.compile (default mode on the
CPU, max-autotune on CUDA) and every fastres backend; a provider that cannot run here is skipped
with its reason. Each case stores its p20/p50/p80, achieved TFLOP/s and GB/s (against a bytes
floor), peak memory (CUDA) and saved-for-backward bytes (train), the hardware, versions and commit
in pytest-benchmark's ``extra_info``, and in the file named by ``--bench-out`` (rewritten after
every case, so a run cut short by a timeout keeps what it measured). ``python -m bench.table
FILE`` turns either file into a markdown table.

Without pytest-benchmark installed the suite still runs: a stand-in ``benchmark`` fixture times
with the same timer and results go to ``--bench-out`` only.

Plain ``pytest`` (testpaths = tests) never collects this directory; if bench/ is collected by a
wider invocation (``pytest .``) its cases are deselected unless bench/ was named explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import benchlib  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False


def pytest_addoption(parser):
    g = parser.getgroup("fastres-bench")
    g.addoption("--bench-dtype", choices=sorted(benchlib.DTYPES),
                help="dtype of the conv/block/model cases (default fp32 on CPU, bf16 on CUDA; "
                     "the reference case is always fp32)")
    g.addoption("--bench-contiguous", action="store_true",
                help="NCHW-contiguous instead of channels_last (the default)")
    g.addoption("--bench-batch", type=int,
                help=f"batch of the conv and block cases (default {benchlib.CPU_BATCH} on CPU, "
                     f"{benchlib.GPU_BATCH} on CUDA)")
    g.addoption("--bench-compile", choices=("none", "ref", "all"),
                help="which cases run the torch.compile provider: none, only the reference "
                     "case (default on CPU: compiling every case takes many minutes there) or "
                     "all (default on CUDA)")
    g.addoption("--bench-providers",
                help="comma-separated providers to run (eager, compile, fastres-cuda, "
                     "fastres-triton, fastres-cpu, fastres-reference); default all")
    g.addoption("--bench-quick", action="store_true",
                help="a representative subset of cases (device checks)")
    g.addoption("--bench-out", metavar="PATH",
                help="write every measured case to this JSON file (rewritten after each case)")
    g.addoption("--bench-append", action="store_true",
                help="append to an existing --bench-out file instead of replacing it")


class _StandInBenchmark:
    """The part of pytest-benchmark's fixture the suite uses, when it is not installed."""

    def __init__(self):
        self.extra_info: dict = {}
        self.group: str | None = None

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0,
                 iterations=1):
        kwargs = kwargs or {}
        result = None
        for _ in range(warmup_rounds + rounds):
            if setup is not None:
                setup()
            for _ in range(iterations):
                result = target(*args, **kwargs)
        return result

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _plugin_active(config) -> bool:
    """pytest-benchmark installed and not disabled (``-p no:benchmark``)."""
    return HAVE_PYTEST_BENCHMARK and config.pluginmanager.hasplugin("benchmark")


class _LazyBenchmark:
    """pytest-benchmark's fixture, requested on first use only: a case that skips before
    measuring does not trip its "fixture was not used" warning."""

    def __init__(self, request):
        object.__setattr__(self, "_request", request)
        object.__setattr__(self, "_fixture", None)

    def _get(self):
        if self._fixture is None:
            object.__setattr__(self, "_fixture", self._request.getfixturevalue("benchmark"))
        return self._fixture

    def __getattr__(self, name):
        return getattr(self._get(), name)

    def __setattr__(self, name, value):
        setattr(self._get(), name, value)


@pytest.fixture
def bm(request):
    """pytest-benchmark's ``benchmark`` fixture, or the stand-in when it is absent/disabled."""
    if _plugin_active(request.config):
        return _LazyBenchmark(request)
    return _StandInBenchmark()


class BenchContext:
    """Session-wide settings and the results store."""

    def __init__(self, config):
        self.config = config
        self.device = torch.device("cuda" if benchlib.HAS_CUDA else "cpu")
        name = config.getoption("--bench-dtype") or ("bf16" if benchlib.HAS_CUDA else "fp32")
        self.dtype_name = name
        self.dtype = benchlib.DTYPES[name]
        self.channels_last = not config.getoption("--bench-contiguous")
        self.batch = config.getoption("--bench-batch") or (
            benchlib.GPU_BATCH if benchlib.HAS_CUDA else benchlib.CPU_BATCH)
        self.compile_scope = config.getoption("--bench-compile") or (
            "all" if benchlib.HAS_CUDA else "ref")
        prov = config.getoption("--bench-providers")
        self.providers = [p.strip() for p in prov.split(",")] if prov else None
        self.quick = config.getoption("--bench-quick")
        self.out = config.getoption("--bench-out")
        self.records: list[dict] = []
        self._env = None
        if self.out and config.getoption("--bench-append") and Path(self.out).exists():
            try:
                self.records = json.loads(Path(self.out).read_text()).get("records", [])
            except (OSError, ValueError):
                self.records = []
        self.t0 = time.perf_counter()

    @property
    def env(self) -> dict:
        if self._env is None:
            from fastres.harness.environment import environment

            self._env = environment(self.device)
            self._env["pytest_benchmark"] = _plugin_active(self.config)
            self._env["compile_mode"] = benchlib.compile_mode(self.device)
        return self._env

    def meta(self) -> dict:
        return {"device": str(self.device), "dtype": self.dtype_name,
                "layout": "channels_last" if self.channels_last else "contiguous",
                "batch": self.batch, "compile_scope": self.compile_scope, "quick": self.quick,
                "argv": sys.argv[1:]}

    def skip_provider(self, provider: str, compile_ok: bool) -> None:
        """pytest.skip with the reason when ``provider`` does not run for this case."""
        if self.providers is not None and provider not in self.providers:
            pytest.skip(f"{provider}: not in --bench-providers")
        if provider == "compile" and not compile_ok:
            pytest.skip(f"compile: --bench-compile={self.compile_scope} runs torch.compile "
                        "only for the reference case here (--bench-compile=all for every case)")
        why = benchlib.provider_skip_reason(provider, self.device)
        if why:
            pytest.skip(why)

    def record(self, benchmark, group: str, case: str, provider: str, info: dict) -> None:
        env = self.env
        info = dict(info)
        info.update(group=group, case=case, provider=provider,
                    hardware=env["gpu"] or env["cpu"], torch=env["torch"],
                    torchvision=env["torchvision"], triton=env["triton"],
                    fastres=env["fastres"], commit=env["commit"])
        benchmark.extra_info.update(info)
        self.records.append({"group": group, "case": case, "provider": provider,
                             "extra_info": info})
        self.flush()

    def flush(self) -> None:
        if not self.out:
            return
        doc = {"format": "fastres-bench/1", "env": self.env, "meta": self.meta(),
               "duration_s": time.perf_counter() - self.t0, "records": self.records}
        tmp = Path(self.out + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.out)


_CTX: BenchContext | None = None


def pytest_configure(config):
    global _CTX
    _CTX = BenchContext(config)
    if benchlib.HAS_CUDA:
        torch.backends.cudnn.benchmark = True  # eager at its best: cuDNN picks per shape


@pytest.fixture(scope="session")
def bctx() -> BenchContext:
    assert _CTX is not None
    return _CTX


def pytest_generate_tests(metafunc):
    """Every provider for a test that takes ``provider`` and does not parametrize it itself."""
    if "provider" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "provider" in names:
            return
    metafunc.parametrize("provider", benchlib.providers())


def _named_bench(config) -> bool:
    """Was bench/ (or something inside it) named on the command line?"""
    for arg in config.args:
        p = Path(arg.split("::", 1)[0]).resolve()
        if p == BENCH_DIR or BENCH_DIR in p.parents:
            return True
    return False


def _case_key(item) -> tuple:
    """The case of a parametrized bench item, without its provider."""
    cs = getattr(item, "callspec", None)
    if cs is None or "provider" not in cs.params:
        return (str(item.fspath), item.name)
    rest = tuple((k, repr(v)) for k, v in cs.params.items() if k != "provider")
    return (str(item.fspath), item.originalname, rest)


def pytest_collection_modifyitems(config, items):
    bench_items = [it for it in items if BENCH_DIR in Path(str(it.fspath)).resolve().parents]
    if bench_items and not _named_bench(config):
        config.hook.pytest_deselected(items=bench_items)
        items[:] = [it for it in items if it not in bench_items]
        return
    # The providers of one case run back to back, not one provider through all cases: what else
    # runs on the machine then changes little between the numbers that are compared.
    first: dict[tuple, int] = {}
    for i, it in enumerate(items):
        first.setdefault(_case_key(it), i)
    order = {id(it): (first[_case_key(it)], i) for i, it in enumerate(items)}
    items.sort(key=lambda it: order[id(it)])


def pytest_report_header(config):
    if _CTX is None:
        return None
    env = _CTX.env
    lines = [
        f"fastres bench: {env['gpu'] or env['cpu']} | torch {env['torch']} | triton "
        f"{env['triton']} | fastres {env['fastres']} @ {env['commit'][:12]}",
        f"fastres bench: {_CTX.device}, {_CTX.dtype_name}, "
        f"{'channels_last' if _CTX.channels_last else 'contiguous'}, batch {_CTX.batch}, "
        f"torch.compile on {_CTX.compile_scope} ({benchlib.compile_mode(_CTX.device)})",
    ]
    if not _plugin_active(config):
        lines.append("fastres bench: pytest-benchmark is not installed or disabled: timing with "
                     "the suite's own timer; results go to --bench-out only")
    return lines


def _table_module():
    spec = importlib.util.spec_from_file_location("_fastres_bench_table", BENCH_DIR / "table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _CTX is None or not _CTX.records:
        return
    _CTX.flush()
    try:
        text = _table_module().render({"env": _CTX.env, "meta": _CTX.meta(),
                                       "records": _CTX.records}, compact=True)
    except Exception as exc:  # the summary must never hide the results file
        text = f"(summary table failed: {exc})"
    terminalreporter.write_sep("=", "fastres bench: p50 ms and speedup vs eager")
    terminalreporter.write_line(text)
    if _CTX.out:
        terminalreporter.write_line(f"results: {_CTX.out}")
