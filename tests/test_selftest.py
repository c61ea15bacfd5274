"""The self-test and the records the dispatcher reads (fastres.selftest, fastres.backends.records,
fastres.backends.variants, fastres.harness.speed), on CPU tensors: the cpu and reference backends, cudasim (the
CUDA kernels on the CPU) and Triton under the interpreter (conftest sets TRITON_INTERPRET=1).

The checker is tested by planting what it exists to catch: a backend with a wrong epilogue flag
must fail and stay disabled; a record whose versions changed must be ignored; a correct backend
slower than the reference path must not be preferred."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fastres import backends, selftest
from fastres.backends import dispatch, records, variants
from fastres.backends.variants import Conv
from fastres.harness import selftest as st
from fastres.harness import speed

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _isolated_records(tmp_path, monkeypatch):
    """Records in a temporary cache only (no user cache, no project records)."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTRES_RESULTS_DIR", "")
    monkeypatch.delenv("FASTRES_BACKEND", raising=False)
    records.reset()
    yield
    records.reset()


class Wrapped(backends.Backend):
    """Another backend's ops under a new name, some replaced; like a GPU backend it is chosen
    automatically only once a self-test record of this device says it passed."""

    verified_on_gpu = False

    def __init__(self, name: str, inner: str, replace: dict | None = None):
        self.name, self.inner, self.replace = name, backends.BACKENDS[inner], replace or {}

    def requires_verification(self, device_type: str) -> bool:
        return True

    def _unavailable_reason(self):
        return None

    def not_supported_reasons(self, inputs):
        return self.inner.not_supported_reasons(inputs)

    def op(self, name):
        fn = self.inner.op(name)
        return self.replace[name](fn) if name in self.replace else fn


def register(monkeypatch, b: backends.Backend) -> None:
    """Add ``b`` to the backends, first in the dispatcher's priority, for this test only."""
    monkeypatch.setitem(backends.BACKENDS, b.name, b)
    monkeypatch.setattr(dispatch, "PRIORITY", (b.name, *backends.PRIORITY))
    monkeypatch.setitem(dispatch._probed, b.name, None)


def _wrong_relu(fn):
    # The planted bug: conv_bias_act's epilogue flag ignored (never applies the ReLU).
    return lambda *a: fn(*a[:-1], False)


def _conv_inputs(k=3, c=16):
    return backends.Inputs(CPU, torch.float32, kernel_size=(k, k), channels=c, batch=2,
                           channels_last=True)


def test_cpu_and_reference_pass_and_are_recorded():
    rec = selftest.run("cpu", ["cpu", "reference"], quick=True, precisions=["fp32"],
                       progress=False, out=lambda s: None)
    assert rec["summary"]["ok"], rec["backends"]
    assert {n: b["status"] for n, b in rec["backends"].items()} == {"cpu": "pass",
                                                                     "reference": "pass"}
    assert rec["backends"]["cpu"]["pass"] > 50  # 46 op cases and 10 block cases
    assert records.verdict("cpu", "cpu") == "pass"
    (path,) = (Path(records.cache_dir()) / "selftest").glob("*.json")
    assert json.loads(path.read_text())["key"] == records.device_key("cpu")


def test_planted_bug_fails_and_is_not_enabled(monkeypatch):
    register(monkeypatch, Wrapped("good", "cpu"))
    register(monkeypatch, Wrapped("buggy", "cpu", {"conv_bias_act": _wrong_relu}))
    # Before any record neither wrapper is eligible: the dispatcher goes on to cpu.
    assert backends.select(_conv_inputs()).name == "cpu"
    lines = []
    rec = selftest.run("cpu", ["good", "buggy"], quick=True, precisions=["fp32"],
                       progress=False, out=lines.append)
    assert not rec["summary"]["ok"]
    assert rec["backends"]["good"]["status"] == "pass"
    bad = rec["backends"]["buggy"]
    assert bad["status"] == "fail" and bad["fail"] > 0
    assert all(f["case"].endswith("bias+res+relu") or f["group"] == "blocks"
               for f in bad["failures"]), bad["failures"]
    assert any("FAIL buggy" in s for s in lines)  # the reasons are printed
    assert selftest.main(["--device", "cpu", "--backend", "buggy", "--no-blocks", "--precision",
                          "fp32", "--no-progress", "--no-record"]) == 1
    assert records.verdict("buggy", "cpu") == "fail"
    assert records.verdict("good", "cpu") == "pass"
    # good (first in priority, verified here) serves; buggy is never chosen.
    monkeypatch.setattr(dispatch, "PRIORITY", ("buggy", "good", "cpu", "reference"))
    assert backends.select(_conv_inputs()).name == "good"


def test_stale_record_is_ignored(monkeypatch):
    register(monkeypatch, Wrapped("good", "cpu"))
    rec = selftest.run("cpu", ["good"], quick=True, precisions=["fp32"], blocks=False,
                       progress=False, out=lambda s: None)
    assert records.verdict("good", "cpu") == "pass"
    assert backends.select(_conv_inputs()).name == "good"
    (path,) = (Path(records.cache_dir()) / "selftest").glob("*.json")
    for field, value in (("torch", "0.0.0"), ("kernels", {"_C": "0" * 64}), ("name", "other")):
        stale = json.loads(json.dumps(rec))
        stale["key"][field] = value
        path.write_text(json.dumps(stale))
        records.reset()
        assert records.stale_fields(stale, records.device_key("cpu")) == [field]
        assert records.verdict("good", "cpu") == ""
        assert backends.select(_conv_inputs()).name == "cpu"


_WORK = [0]


def _costs(n):
    """An op that costs n units of work on the fake clock below (and runs once)."""
    def wrap(fn):
        def counted(*a):
            _WORK[0] += n
            return fn(*a)
        return counted
    return wrap


def _fake_time_ms(fn, device, warmup, repeats, kind="eager"):
    """A clock that counts work units: timings on a shared CI machine are noise (measured here:
    the same 1x16x7x7 convolution at 0.5 ms and at 30 ms minutes apart), and what is under test
    is the ranking and the dispatcher, not the timer (fastres.harness.timer)."""
    _WORK[0] = 0
    fn()
    t = float(_WORK[0])
    return {"p20": t, "p50": t, "p80": t, "timer": "work units", "kind": kind}


def test_slower_backend_is_not_preferred(monkeypatch):
    slow_ops = dict.fromkeys(speed.OPS, _costs(12))
    fast_ops = dict.fromkeys(speed.OPS, _costs(1))
    register(monkeypatch, Wrapped("slow", "cpu", slow_ops))
    register(monkeypatch, Wrapped("fast", "cpu", fast_ops))
    cv = Conv(1, 16, 16, 3, 1, 7, 7)
    cls = records.shape_class((3, 3), (1, 1), 16, torch.float32, True, 1)
    rec = selftest.run("cpu", ["slow", "fast"], quick=True, precisions=["fp32"], blocks=False,
                       record=False, progress=False, out=lambda s: None)
    assert rec["summary"]["ok"]
    # On the fake clock the reference path costs 3, "fast" 1 and "slow" 12 per op.
    ref = backends.BACKENDS["reference"]
    monkeypatch.setitem(backends.BACKENDS, "reference", Wrapped(
        "reference", "reference", dict.fromkeys(speed.OPS, _costs(3))))
    monkeypatch.setattr(speed, "time_ms", _fake_time_ms)
    rec["bench"] = speed.bench(CPU, ["slow", "fast"], out=lambda s: None, repeats=5,
                               shape_classes=[(cls, cv, torch.float32, "channels_last")])
    backends.BACKENDS["reference"] = ref
    records.save(rec)
    entry = rec["bench"]["classes"][cls]["backends"]
    assert entry["slow"]["speedup"] < 1 < entry["fast"]["speedup"], entry
    order = records.preference("cpu", cls).split(",")
    assert order == ["fast", "reference"], order
    # Both verified, slow first in priority: the measured ranking decides.
    monkeypatch.setattr(dispatch, "PRIORITY", ("slow", "fast", "cpu", "reference"))
    assert backends.select(_conv_inputs()).name == "fast"
    # A class nobody measured keeps the priority order (wildcards: same kernel/stride/dtype).
    other = backends.Inputs(CPU, torch.float32, kernel_size=(1, 1), channels=16, batch=2)
    assert backends.select(other).name == "slow"
    assert "fast" in records.state("cpu")["wins"]


@pytest.mark.parametrize("name,precisions", [
    # The interpreter runs ~0.4 s per op case: bf16 only (its upcast path; fp32 and the rest
    # are tests/test_ops.py's). cudasim: ~0.08 s per case.
    ("triton", ["bf16"]),
    ("cudasim", ["fp32", "bf16"]),
])
def test_triton_interpreter_and_cudasim_pass(name, precisions):
    b = backends.BACKENDS[name]
    why = b.unavailable_reason() or "; ".join(b.not_supported_reasons(
        backends.Inputs(CPU, torch.float32)))
    if why:
        pytest.skip(why)
    rec = selftest.run("cpu", [name], quick=True, precisions=precisions, blocks=False,
                       progress=False, record=False, out=lambda s: None)
    assert rec["summary"]["ok"], rec["backends"][name]["failures"][:3]
    assert rec["coverage"][name]["launched"]


def test_cuda_tile_mirror_matches_the_cpp():
    """fastres._C has no capability query for its tile choice, so fastres.backends.variants mirrors it;
    this pins the mirror to the C++ source."""
    igemm = (ROOT / "csrc/cuda/conv_igemm.cuh").read_text()
    m = re.search(r"if \(p\.OC <= (\d+)\) return launch_conv_flags<T, Math::kMma16, CfgTcSmall>"
                  r"\(p, stream\);\s*return launch_conv_flags<T, Math::kMma16, CfgTcBig>", igemm)
    assert m and int(m.group(1)) == variants.CUDA_CONV_SMALL_MAX_OC
    f32 = (ROOT / "csrc/cuda/conv_fwd_f32.cu").read_text()
    assert "Math::kTf32, CfgTcSmall>" in f32 and "Math::kSimt, CfgSimt>" in f32
    wg = (ROOT / "csrc/cuda/conv_wgrad.cu").read_text()
    m = re.search(r"if \(dt == DType::kFloat32\) return 0;\s*return \(p\.K <= (\d+) \|\| "
                  r"p\.C <= (\d+)\) \? 1 : 2;", wg)
    assert m and int(m.group(1)) == int(m.group(2)) == variants.CUDA_WGRAD_SMALL_MAX
    assert re.search(r"case 0: return launch_wgrad_cfg<float, true, WgCfgSimt>", wg)
    assert variants.cuda_conv_tile("bf16", 64) == "mma16:CfgTcSmall"
    assert variants.cuda_conv_tile("fp16", 65) == "mma16:CfgTcBig"
    assert variants.cuda_wgrad_tile("bf16", 128, 64) == "mma16:WgCfgSmall"
    assert variants.cuda_wgrad_tile("tf32", 512, 512) == "simt:WgCfgSimt"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_completion_covers_every_reachable_variant(backend):
    """The GPU run's shapes launch every variant reachable at ResNet-18/50 sizes."""
    pytest.importorskip("triton") if backend == "triton" else None
    reach = variants.reachable(backend)
    assert len(reach) > (10 if backend == "cuda" else 40)
    base = set()
    for cv in st.BASE_CONVS.values():
        for p in variants.PRECISIONS:
            base |= variants.conv_variants(backend, p, cv)
    extra = variants.completion(backend, base)
    assert reach <= base | {v for v, _, _ in extra}
    assert max(cv.flops for _, _, cv in extra) < 5e9  # seconds of float64 reference, no more


def test_shape_classes_and_wildcards():
    cls = records.shape_class((3, 3), (2, 2), 128, torch.bfloat16, True, 32)
    assert cls == "k3x3 s2 c<=256 bfloat16 cl n<=64"
    bench = {"kind": "device", "classes": {cls: {"backends": {"cuda": {"speedup": 2.0},
                                                              "triton": {"speedup": 0.5}}}}}
    rk = records.ranking(bench)
    assert rk[cls] == ["cuda", "reference"]
    assert rk["k3x3 s2 c<=256 bfloat16 cl n*"] == ["cuda", "reference"]
    assert rk["k3x3 s2 c* bfloat16 cl n*"] == ["cuda", "reference"]


def _fake_gpu_record(kind, speedups: dict) -> tuple[dict, str]:
    """A record of this device (the key of "cpu") whose bench was timed in ``kind``."""
    cls = records.shape_class((3, 3), (1, 1), 16, torch.float32, True, 1)
    rec = records.new_record("cpu")
    rec["backends"] = {n: {"status": "pass"} for n in speedups}
    rec["bench"] = {"kind": kind, "timer": f"fake {kind}", "classes": {
        cls: {"backends": {n: {"speedup": s} for n, s in speedups.items()}}}}
    return rec, cls


@pytest.mark.parametrize("kind,ranked", [("device", True), ("graph", True), ("eager", False),
                                         ("host", False), (None, False)])
def test_the_dispatcher_ranks_only_on_kernel_or_graph_time(kind, ranked):
    rec, cls = _fake_gpu_record(kind, {"cpu": 3.0})
    records.save(rec)
    want = "cpu,reference" if ranked else ""
    assert records.preference("cpu", cls) == want
    assert bool(records.state("cpu")["ranking_by"]) == ranked


def test_a_record_names_gpu_driver_torch_triton_and_commit(monkeypatch):
    monkeypatch.setenv("FASTRES_COMMIT", "0123456789abcdef")
    rec = records.new_record("cpu")
    assert rec["commit"] == "0123456789abcdef"
    assert {"name", "driver", "torch", "triton", "capability", "kernels"} <= set(rec["key"])


def test_selftest_bench_names_a_kernel_kind():
    rec = speed.bench(CPU, ["cpu"], out=lambda s: None, repeats=2,
                      shape_classes=speed.classes(CPU, True)[:1])
    assert rec["kind"] == "device" and "CPU op time" in rec["timer"], rec["timer"]
    assert rec["classes"], rec


def test_selftest_bench_starts_no_class_past_its_deadline():
    todo = speed.classes(CPU, True)[:2]
    rec = speed.bench(CPU, ["cpu"], out=lambda s: None, repeats=2, shape_classes=todo,
                      deadline=0.0)
    assert rec["classes"] == {} and rec["not_timed"] == 2


def test_every_op_of_the_contract_has_cases_and_the_module_is_callable():
    import fastres

    cases = []
    for cv in st.BASE_CONVS.values():
        cases += st.conv_cases("c", cv, "fp32", "channels_last", 0)
    for c in st.BN_CHANNELS:
        cases += st.bn_cases(c, "fp32", "channels_last", 0)
    assert {c.op for c in cases} == set(backends.OP_NAMES)
    rec = fastres.selftest(device="cpu", backend=["reference"], precisions=["fp32"],
                           blocks=False, record=False, progress=False, out=lambda s: None)
    assert rec["backends"]["reference"]["status"] == "pass"
