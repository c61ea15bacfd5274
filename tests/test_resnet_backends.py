"""Converted torchvision ResNet-18 and ResNet-50 against torchvision, whole, on each compiled
backend (FASTRES_BACKEND forced): the C++ CPU kernels (``cpu``), the CUDA kernels on a GPU
(``cuda``, marked ``gpu``: the device check runs it) and the same CUDA kernels on the CPU
execution harness (``cudasim``). Each op on its own: tests/test_ops.py."""

from __future__ import annotations

import pytest
import torch
from op_check import backend_params, device_of

DEVICES = backend_params(("cpu", "cuda", "cudasim"))


# (dtype, train, compare gradients): eval at every precision; a training step at fp32 with every
# gradient by the max-abs rule, at bf16 every gradient by the rule on the RMS error
# (tests/test_blocks.py and fastres.harness.rule.verdict_rms explain why a whole deep network's
# low-precision gradients are a ReLU-flip lottery for the max-abs rule).
MODEL_CASES = [
    pytest.param((torch.float32, False, False), id="fp32-eval"),
    pytest.param((torch.bfloat16, False, False), id="bf16-eval"),
    pytest.param((torch.float16, False, False), id="fp16-eval"),
    pytest.param((torch.float32, True, True), id="fp32-train"),
    pytest.param((torch.bfloat16, True, "rms"), id="bf16-train"),
]


def _model_parity(arch: str, device: str, case, monkeypatch, n: int, size: int) -> None:
    import torchvision
    from test_blocks import check_model_parity

    from fastres.harness.rule import randomise_bn

    dtype, train, grads = case
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32, as on the CPU
    model = randomise_bn(getattr(torchvision.models, arch)(num_classes=10))
    x = torch.randn(n, 3, size, size)
    dev = device_of(device)
    check_model_parity(model.to(dev), x.to(dev), dtype, True, train, device, monkeypatch, grads)


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_resnet18(device, case, monkeypatch):
    """A converted torchvision ResNet-18 against torchvision, whole: eval and a training step.
    N=4 at 40x40 leaves layer4's BatchNorms 16 values per channel (at 2x32x32, 2 values: even the
    cpu backend then misses the rule on the output, a conditioning problem, not a kernel's)."""
    _model_parity("resnet18", device, case, monkeypatch, 4, 40)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        pytest.param((torch.float32, False, False), id="fp32-eval"),
        pytest.param((torch.bfloat16, False, False), id="bf16-eval"),
        pytest.param((torch.float32, True, False), id="fp32-train"),
        pytest.param((torch.bfloat16, True, "rms"), id="bf16-train"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_resnet50(device, case, monkeypatch):
    """A converted ResNet-50: eval, and a training step (fp16 runs the same kernels as bf16 with
    the other MMA type: ResNet-18 covers it). bf16 gradients by the rule on the RMS error; fp32
    gradients are not compared: at 4x40x40, layer3's maps are 3x3, so one ReLU flip moves a
    thirty-sixth of a weight gradient and even the cpu backend misses the rule, max-abs
    (layer3.5.conv2.weight.grad 6.0e-3 against torchvision's 1.7e-4) and RMS (4.7e-4 against
    1.6e-5) alike; see tests/test_blocks.py."""
    _model_parity("resnet50", device, case, monkeypatch, 4, 40)
