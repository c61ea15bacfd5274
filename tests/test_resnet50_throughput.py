"""bench/resnet50_throughput.py: the GPU recognised (H100, H200) with its MLPerf figures beside
the table, kernel names sorted into classes, and the whole script run on the CPU at a tiny size
(both modes, both providers, the bare-conv table) with its stand-in kinds named."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def R():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("resnet50_throughput",
                                                  BENCH / "resnet50_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["resnet50_throughput"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("resnet50_throughput", None)
    sys.path.remove(str(BENCH))


def test_gpus_are_recognised(R):
    assert R.gpu_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert R.gpu_kind("NVIDIA H200") == "h200"
    assert R.gpu_kind("NVIDIA A100-SXM4-80GB") is None and R.gpu_kind(None) is None
    assert R.file_prefix("NVIDIA H200") == "h200"
    assert R.file_prefix("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert R.rates("h200", torch.bfloat16) == (790, 4.3)
    assert R.rates("h100", torch.float32) == (395, 3.0)


def test_kernel_classes(R):
    assert R.kernel_class("sm90_xmma_wgrad_implicit_gemm_bf16") == "conv (cuDNN/oneDNN)"
    assert R.kernel_class("void conv_igemm_kernel<...>") == "conv (fastres)"
    assert R.kernel_class("_conv_fwd_kernel") == "conv (fastres)"
    assert R.kernel_class("bn_add_relu_dense_kernel") == "BN/epilogue (fastres)"
    assert R.kernel_class("void at::native::batch_norm_collect_statistics") == "batchnorm"
    assert R.kernel_class("Memset (Device)") == "copy / fill"
    ct = R.class_table({"conv_igemm_kernel": 5.0, "wgrad_kernel": 3.0, "x": 1.0})
    assert ct == {"conv (fastres)": 8.0, "other": 1.0}


def _fake_doc(gpu: str) -> dict:
    t = {"p50": 32.0}
    row = {"provider": "fastres", "mode": "train", "dtype": "bfloat16", "batch": 256,
           "status": "ok", "times": {"device": t, "eager": t, "graph": t},
           "classes": {"conv (fastres)": 20_000.0, "BN/epilogue (fastres)": 12_000.0},
           "floors": {"conv_flops": int(3 * 4.1e9 * 256), "act_bytes": int(20e9)},
           "check": "logits: err 1e-2 vs PyTorch 1e-2, bound 3e-2 [ok]"}
    return {"env": {"gpu": gpu, "commit": "abc", "torch": "2.11", "triton": "3.6"},
            "gpu_kind": R_gpu_kind(gpu), "meta": {"image_size": 224, "repeats": 10},
            "rows": [row], "convs": []}


def R_gpu_kind(name):
    return "h200" if "H200" in name else "h100" if "H100" in name else None


def test_the_table_stands_beside_mlperf(R):
    text = R.render(_fake_doc("NVIDIA H200"))
    assert "Training v4.0 7,950 img/s/GPU" in text and "94,600" in text
    assert "| 8,000 | 8,000 | 8,000 | 1.01x |" in text  # 256 / 32 ms against 7,950
    # Conv floor: 3.15e12 FLOP at 790 TFLOP/s = 3.99 ms of the 20 ms measured.
    assert "| conv (fastres) | 20.000 | 62% | 3.986 | 0.20 |" in text
    text = R.render(_fake_doc("NVIDIA H100 80GB HBM3"))
    assert "Training v4.0 7,161 img/s/GPU (best 7,449)" in text and "88,700" in text


def test_runs_on_the_cpu_at_a_tiny_size(R, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    # fastres-cpu only: the torchvision provider differs by its build alone, and each
    # whole-model configuration costs seconds on a CPU.
    rc = R.main(["--device", "cpu", "--dtypes", "fp32", "--batch", "2", "--image-size", "32",
                 "--providers", "fastres-cpu", "--repeats", "1", "--warmup", "1", "--convs",
                 "--conv-shapes", "2", "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [(r["provider"], r["mode"], r["status"]) for r in doc["rows"]] == [
        ("fastres-cpu", "infer", "ok"), ("fastres-cpu", "train", "ok")]
    for r in doc["rows"]:
        assert set(r["times"]) == {"device", "eager", "graph"} and "[ok]" in r["check"]
        assert r["classes"] and r["floors"]["conv_flops"] > 0
    assert len(doc["convs"]) == 2 and all(set(c["ms"]) == {"torch", "cpu"} for c in doc["convs"])
    text = md.read_text()
    assert "not an H100/H200" in text and "fake graph" in text and "CPU op time" in text
