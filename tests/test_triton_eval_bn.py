"""The Triton forward convolution computing its eval BatchNorm's scale and shift itself
(``_conv_fwd_kernel``'s ``BN_VECTORS``: each program writes its column tile's vectors into the
call's buffer before its main loop and its epilogue reads them back). Against the same
convolution given the vectors from ``bn_eval_vectors``' launch: bit for bit, with several
programs per column tile (each writes the same bits), a masked channel tail, a 16-bit model's
BatchNorm tensors, a residual, and the BatchNorm's tensors changed between calls (read live,
never written). Runs under the Triton interpreter without a GPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

tk = pytest.importorskip("fastres.triton_kernels")
_WHY = tk.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton kernels unavailable: {_WHY}")

if _WHY is None:
    from fastres.triton_kernels import _common, bn_eval, conv

    OPS = tk.ops()

CL = torch.channels_last
GEO = ([1, 1], [1, 1], [1, 1], 1)


def _given_vectors(x, w, g, b, m, v, eps, res, relu):
    """The same convolution with the scale and shift computed by their own launch."""
    scale, shift = bn_eval.bn_eval_vectors(g, b, m, v, eps)
    return OPS.conv_bias_act(x, w, shift, res, *GEO, relu, scale)


@pytest.mark.parametrize("bn_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_vectors_in_the_convolution_are_the_launched_ones(dtype, bn_dtype, monkeypatch):
    # 16-wide tiles: K = 40 is three column tiles, the last masked; 2*6*6 = 72 rows are five
    # row tiles, so five programs write each column tile's vectors.
    monkeypatch.setattr(conv, "gemm_config",
                        lambda *a, **kw: _common.GemmConfig(16, 16, 16, 4, 1, GROUP_M=2))
    k = 40
    x = torch.randn(2, 24, 6, 6).to(dtype).contiguous(memory_format=CL)
    w = (torch.randn(k, 24, 3, 3) * 0.2).to(dtype).contiguous(memory_format=CL)
    res = torch.randn(2, k, 6, 6).to(dtype).contiguous(memory_format=CL)
    g, b, m = (torch.randn(k).to(bn_dtype) for _ in range(3))
    v = (torch.rand(k) + 0.1).to(bn_dtype)
    kept = [t.clone() for t in (g, b, m, v)]
    for residual, relu in ((None, True), (res, True), (None, False)):
        got = OPS.conv_bias_act(x, w, b, residual, *GEO, relu, g, m, v, 1e-5)
        want = _given_vectors(x, w, g, b, m, v, 1e-5, residual, relu)
        assert torch.equal(got, want), (residual is None, relu)
    assert all(torch.equal(t, u) for t, u in zip((g, b, m, v), kept, strict=True))
    # The BatchNorm changed between calls (an optimizer step, a .data write): read as it is now.
    v.mul_(4.0)
    b.add_(1.0)
    got = OPS.conv_bias_act(x, w, b, res, *GEO, True, g, m, v, 1e-5)
    assert torch.equal(got, _given_vectors(x, w, g, b, m, v, 1e-5, res, True))
    # Against the formula in float64 (bf16 output: its rounding).
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    scale = g.double() / (v.double() + 1e-5).sqrt()
    ref = ref * scale[:, None, None] + (b.double() - m.double() * scale)[:, None, None]
    ref = torch.relu(ref + res.double())
    tol = 0.05 if dtype == torch.bfloat16 else 2e-3  # bf16 operands; float32 through TF32 or not
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()


def test_bn_without_affine_part_takes_the_vectors_launch(monkeypatch):
    """A BatchNorm without weight and bias is not BN_VECTORS' (affine only): its scale and shift
    come from bn_eval_vectors' launch, with the same numbers as the formula."""
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    w = torch.randn(16, 8, 3, 3).contiguous(memory_format=CL)
    m, v = torch.randn(16), torch.rand(16) + 0.5
    seen = []
    for mod in (bn_eval, conv):
        launch = mod.launch
        monkeypatch.setattr(mod, "launch", lambda k, *a, _l=launch, **kw: seen.append(
            (k.__name__, kw.get("BN_VECTORS"))) or _l(k, *a, **kw))
    got = OPS.conv_bias_act(x, w, None, None, *GEO, False, None, m, v, 1e-5)
    assert seen == [("_bn_eval_vectors_kernel", None), ("_conv_fwd_kernel", False)], seen
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    ref = (ref - m.double()[:, None, None]) / (v.double()[:, None, None] + 1e-5).sqrt()
    assert (got.double() - ref).abs().max() <= 2e-3 * ref.abs().max()
