"""The paper's deepest network: one ResNet-1202 (CIFAR, option A) training step, fused vs eager.

    pytest bench/bench_cifar.py --benchmark-columns=min,median,max

Per provider (fastres: the dispatcher's backend or FASTRES_BACKEND; eager: the plain-PyTorch twin
``fastres.models.cifar_resnet(1202, fused=False)``, same weights) and device:

* time of one SGD step (forward, backward, optimizer) on a CIFAR-sized batch;
* ``extra_info["saved_activation_bytes"]``: bytes autograd keeps for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once: a tensor saved by two nodes,
  or a view of a saved tensor, is not counted twice), parameters excluded (``saved_bytes``
  includes them). The activation memory a step needs;
* ``extra_info["peak_rss_step_mib"]`` (CPU): growth of the process's peak resident set over one
  step, measured in a fresh subprocess so that the earlier cases do not mask it.

The CUDA cases skip on a machine without a GPU; they end each timed call with
``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastres import backends, models

DEPTH = int(os.environ.get("FASTRES_BENCH_CIFAR_DEPTH", "1202"))  # 6n + 2
BATCH = int(os.environ.get("FASTRES_BENCH_CIFAR_BATCH", "4"))
HW = 32  # CIFAR-10 images

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def _model(fused: bool, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.cifar_resnet(DEPTH, "A", fused=fused).to(device).train()


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, HW, HW, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return x.to(device), y.to(device)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """What one forward saves for backward: bytes (each storage once), the part that is not
    parameters (the activations: what the fusion can save), and the number of tensors saved."""
    storages: dict[tuple, int] = {}
    count = 0

    def pack(t: torch.Tensor):
        nonlocal count
        count += 1
        if t.device.type != "meta":
            s = t.untyped_storage()
            storages[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    # Conv weights are saved too: the same for both providers, and kept anyway.
    params = {(p.device, p.untyped_storage().data_ptr()) for p in model.parameters()}
    activations = sum(n for k, n in storages.items() if k not in params)
    return {"saved_bytes": sum(storages.values()), "saved_activation_bytes": activations,
            "saved_activation_mib": round(activations / 2**20, 1), "saved_tensors": count}


_RSS_SCRIPT = r"""
import json, resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[3])
from bench_cifar import _model, _batch
fused = sys.argv[1] == "fastres"
model = _model(fused, "cpu"); x, y = _batch("cpu")
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
before = rss_kib()
opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print(json.dumps({"peak_rss_step_mib": (peak - before) / 1024}))
"""


def _peak_rss_step_mib(provider: str) -> float | None:
    if not sys.platform.startswith("linux"):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, provider, "cpu", here],
                         capture_output=True, text=True, timeout=600, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_step_mib"]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ["fastres", "eager"])
def test_resnet1202_train_step(benchmark, provider, device):
    model = _model(provider == "fastres", device)
    x, y = _batch(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync()
        return loss

    saved = saved_bytes(model, x, y)
    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
    info = benchmark.extra_info
    info.update(
        depth=DEPTH,
        batch=BATCH,
        input=f"3x{HW}x{HW}",
        provider=provider,
        device=device,
        params=sum(p.numel() for p in model.parameters()),
        **saved,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    if provider == "fastres":
        stem = model.stem[0]
        info["backend"] = backends.select(backends.Inputs.of(x, stem)).name
    if device == "cpu":
        info["peak_rss_step_mib"] = _peak_rss_step_mib(provider)
