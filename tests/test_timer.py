"""The project's one timer (fastres.harness.timer): every kind present and named, the kinds
measuring what they say (a slow host path shows in host time, not device time), the check before
timing, the L2 flush, and the GPU attribution of kernels to calls on fake profiler events."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from fastres.harness import rule, timer

CPU = torch.device("cpu")


def _op():
    x = torch.randn(128, 128)
    return lambda: x @ x


def test_every_kind_is_measured_and_named_on_the_cpu():
    r = timer.measure(_op(), CPU, repeats=3, warmup=1)
    for k in timer.KINDS:
        assert r[k]["kind"] == k and r[k]["n"] == 3, r[k]
        assert 0 < r[k]["p20"] <= r[k]["p50"] <= r[k]["p80"], r[k]
        assert timer.column(k, CPU).startswith(f"{k} ms [")
    assert "stand-in" in r["device"]["what"] and "fake-graph" in r["graph"]["what"]
    assert "aten::mm" in r["kernels"]
    assert r["flush_bytes"] >= 2 * timer.l2_bytes(CPU)
    assert not r["errors"]


def test_a_slow_host_path_shows_in_host_time_not_device_time():
    mm = _op()

    def slow_host():
        time.sleep(0.02)  # Python work between the ops: host time, no op runs
        return mm()

    r = timer.measure(slow_host, CPU, kinds=("device", "host", "eager"), repeats=3, warmup=1)
    assert r["host"]["p50"] >= 20.0 and r["eager"]["p50"] >= 20.0, r
    # The op itself takes well under a millisecond; 15 ms of slack for a shared machine.
    assert r["host"]["p50"] - r["device"]["p50"] >= 5.0, r


def test_a_failing_check_raises_before_anything_is_timed():
    calls = [0]
    x = torch.randn(64)

    def fn():
        calls[0] += 1
        return x + 1.0  # the "bug": the reference is x + 2

    ref = (x.double() + 2.0)

    def check(out):
        return rule.verdict("out", out, x + 2.0, ref, torch.float32)

    with pytest.raises(timer.CheckFailed, match="out: err"):
        timer.measure(fn, CPU, repeats=5, check=check)
    assert calls[0] == 1

    def good():
        return x + 2.0

    r = timer.measure(good, CPU, kinds=("eager", "graph"), repeats=2, check=check)
    assert len(r["check"]) == 2 and all("[ok]" in c for c in r["check"])  # eager and graph


def test_the_graph_output_is_checked_after_a_replay():
    state = {"n": 0}
    x = torch.randn(16)

    def fn():  # right at the first call, wrong from the second: a stale or broken replay
        state["n"] += 1
        return x * (1.0 if state["n"] == 1 else 3.0)

    def check(out):
        return rule.verdict("out", out, x.clone(), x.double(), torch.float32)

    with pytest.raises(timer.CheckFailed, match="graph"):
        timer.measure(fn, CPU, kinds=("graph",), repeats=2, check=check)


def test_flusher_writes_twice_the_l2():
    f = timer.Flusher(CPU)
    assert f.nbytes == 2 * timer.l2_bytes(CPU) and f._buf.numel() * 4 >= f.nbytes
    f()
    a = int(f._buf[0])
    f()
    assert int(f._buf[0]) != a  # a new value each time


def _ev(name, start, end, dev=DeviceType.CPU, self_us=None, ann=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=dev, is_user_annotation=ann,
                           self_cpu_time_total=(end - start) if self_us is None else self_us)


def test_gpu_kernels_are_attributed_to_their_call_and_the_flush_is_not():
    g = DeviceType.CUDA
    events = [
        _ev(timer._FLUSH, 0, 100, ann=True), _ev("fill_flush_kernel", 10, 90, g),
        _ev(timer._CALL, 100, 400, ann=True), _ev("cudaLaunchKernel", 105, 110),
        _ev("conv_kernel", 120, 220, g), _ev("relu_kernel", 230, 260, g),
        _ev(timer._CALL, 100, 400, g, ann=True),  # the GPU-side annotation: not a kernel
        _ev(timer._FLUSH, 400, 500, ann=True), _ev("fill_flush_kernel", 410, 490, g),
        _ev(timer._CALL, 500, 900, ann=True), _ev("conv_kernel", 600, 700, g),
    ]
    per, kernels = timer.device_times(events, 2, gpu=True)
    assert per == [pytest.approx(0.130), pytest.approx(0.100)]
    assert kernels == {"conv_kernel": 100.0, "relu_kernel": 15.0}
    with pytest.raises(RuntimeError, match="annotated calls"):
        timer.device_times(events, 3, gpu=True)


def test_cpu_op_time_counts_self_time_once_and_only_inside_calls():
    events = [
        _ev(timer._CALL, 0, 1000, ann=True, self_us=700),  # 700 us of Python: not an op
        _ev("aten::matmul", 10, 300, self_us=10), _ev("aten::mm", 20, 290, self_us=270),
        _ev(timer._FLUSH, 1000, 1100, ann=True), _ev("aten::fill_", 1010, 1090),
    ]
    per, _ = timer.device_times(events, 1, gpu=False)
    assert per == [pytest.approx(0.280)]


def test_time_ms_names_its_kind():
    t = timer.time_ms(_op(), CPU, 1, 3)
    assert t["kind"] == "eager" and "eager wall time" in t["timer"] and "L2 flushed" in t["timer"]
    t = timer.time_ms(_op(), CPU, 1, 3, kind="device")
    assert t["kind"] == "device" and t["p50"] > 0
    with pytest.raises(ValueError, match="unknown timing kind"):
        timer.measure(_op(), CPU, kinds=("wall",))
