"""The project's GPU record (fastres/gpu_record.py): generated from a recorded run, never stale,
and the dispatcher passes over a backend measured slower than torchvision on that GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from fastres import gpu_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_record_matches_its_run():
    """The data block is what bench/record_gpu_run.py makes of the run it names."""
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "record_gpu_run.py"),
         os.path.join(ROOT, gpu_record.RUN), "--check",
         "--steps", os.path.join(ROOT, gpu_record.RUN.replace("_parity.json",
                                                              "_device-check-steps.log"))],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_slower_backend_passed_over_on_the_recorded_gpu_only(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(gpu_record, "SPEED", {("cuda", "bf16", "train"): 0.65,
                                              ("cuda", "bf16", "eval"): 1.3})
    monkeypatch.setattr(gpu_record, "device_name", lambda d: gpu_record.GPU)
    why = gpu_record.slower_reason("cuda", cuda, torch.bfloat16, training=True)
    assert why and "0.65x" in why and gpu_record.RUN in why
    assert gpu_record.slower_reason("cuda", cuda, torch.bfloat16, training=False) is None
    assert gpu_record.slower_reason("cuda", cuda, torch.float16, training=True)  # as bf16
    assert gpu_record.slower_reason("triton", cuda, torch.bfloat16, training=True) is None
    monkeypatch.setattr(gpu_record, "device_name", lambda d: "NVIDIA A100-SXM4-80GB")
    assert gpu_record.slower_reason("cuda", cuda, torch.bfloat16, training=True) is None
    assert gpu_record.slower_reason("cuda", torch.device("cpu"), torch.bfloat16, True) is None
