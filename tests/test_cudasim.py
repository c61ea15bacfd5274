"""cudasim itself (csrc/cuda/cudasim): what the CUDA launchers do on it beyond the op results
(tests/test_ops.py runs those), and the planted bugs it must catch."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastres import backends

_WHY = backends.BACKENDS["cudasim"].unavailable_reason()
needs_module = pytest.mark.skipif(_WHY is not None, reason=f"cudasim not available: {_WHY}")


def _conv(dtype, k):
    x = torch.randn(2, 16, 9, 11).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, 16, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    return torch.ops.fastres_cudasim.conv_bias_act(x, w, None, None, [1, 1], [1, 1], [1, 1], 1,
                                                   False)


@needs_module
def test_smem_attribute_set_once_per_kernel():
    """cudaFuncSetAttribute(MaxDynamicSharedMemorySize) runs at the first launch of a kernel on a
    device, not at every launch (a driver call each time)."""
    from fastres import _C_cudasim

    _conv(torch.bfloat16, 128)  # CfgTcBig: 69,632 B, needs the attribute
    before = _C_cudasim.func_set_attribute_calls()
    for _ in range(3):
        _conv(torch.bfloat16, 128)
    assert _C_cudasim.func_set_attribute_calls() == before


# ---- planted bugs: csrc/cuda/cudasim/harness.cpp built with -DFR_PLANT=n (csrc/cuda/conv_igemm.cuh)
_ROOT = Path(__file__).resolve().parent.parent
_SIM = _ROOT / "csrc" / "cuda" / "cudasim"
_FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-Wno-unknown-pragmas", f"-I{_SIM / 'include'}"]
# (plant, the exit status cudasim must give: 1 wrong results, 2 a reported error, and its text)
PLANTS = [
    pytest.param(1, 2, "not landed yet", id="wait_group-off-by-one"),
    pytest.param(2, 2, "shared-memory race", id="barrier-removed"),
    pytest.param(3, 1, "", id="ldmatrix-lane-map"),
    pytest.param(4, 2, "outside every allocation", id="out-of-bounds-global-read"),
]


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def _harness(plant: int) -> Path:
    """The harness binary for ``plant``, built once per source state into a cache directory
    (FASTRES_CUDASIM_CACHE, default ~/.cache/fastres/cudasim)."""
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ or clang++) to build the cudasim harness")
    srcs = sorted(_SIM.rglob("*.h")) + sorted(_SIM.glob("*.cpp")) + sorted(
        (_ROOT / "csrc" / "cuda").glob("*.cuh")) + [_ROOT / "csrc" / "cuda" / "kernels.h"]
    key = hashlib.sha256(" ".join([cxx, *_FLAGS]).encode())
    for f in srcs:
        key.update(f.read_bytes())
    cache = Path(os.environ.get("FASTRES_CUDASIM_CACHE", Path.home() / ".cache/fastres/cudasim"))
    out = cache / key.hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    exe = out / f"harness_plant{plant}"
    if not exe.exists():
        rts = []
        for src in sorted(_SIM.glob("runtime_*.cpp")):
            rt = out / f"{src.stem}.o"
            if not rt.exists():
                subprocess.run([cxx, *_FLAGS, "-c", str(src), "-o", f"{rt}.tmp"], check=True)
                os.replace(f"{rt}.tmp", rt)
            rts.append(str(rt))
        subprocess.run([cxx, *_FLAGS, f"-DFR_PLANT={plant}", str(_SIM / "harness.cpp"), *rts,
                        "-o", f"{exe}.tmp"], check=True)
        os.replace(f"{exe}.tmp", exe)
    return exe


def _run_harness(plant: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(_harness(plant))], capture_output=True, text=True, timeout=120)


def test_harness_clean_kernel_passes():
    """The unplanted kernel agrees with a float64 direct convolution (else the planted tests
    below would prove nothing)."""
    r = _run_harness(0)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("plant,expect,message", PLANTS)
def test_planted_bug_is_caught(plant, expect, message):
    """Each planted bug fails: a reported error naming the kernel line (the shared-memory race
    check, the global bounds check), or wrong results (the lane map: the data is there, in the
    wrong registers)."""
    r = _run_harness(plant)
    assert r.returncode == expect, f"plant {plant}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    if expect == 2:
        assert message in r.stdout and "conv_igemm.cuh:" in r.stdout, r.stdout


@pytest.mark.parametrize(
    "check,message",
    [
        ("early-exit", "a barrier not reached by all threads of the block"),
        ("divergent-barrier", "divergent barriers"),
        ("divergent-warp", "divergent warp"),
        ("smem-48k", "over 48 KB needs cudaFuncSetAttribute"),
        ("block-1025", "at most 1024 threads"),
    ],
)
def test_simulator_reports(check, message):
    """The harness's toy kernels: each error reported with the offending source line."""
    r = subprocess.run([str(_harness(0)), check], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stdout and "harness.cpp:" in r.stdout, r.stdout
