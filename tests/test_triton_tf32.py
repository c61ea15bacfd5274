"""The Triton kernels' TF32 path (fp32 convolutions with cudnn.allow_tf32 on): the switch, the
rounding rule (host and kernel bit for bit, ties away from zero as cvt.rna.tf32.f32), the
tolerance rule against the TF32 yardstick (tests/op_check.check with tf32=True: the reference on
TF32-rounded operands), the planted truncation that the rule must catch, and NaN/Inf. Under the
interpreter the TF32 path is emulated (EMULATE_TF32: operands rounded as on the GPU, multiplied
exactly)."""

from __future__ import annotations

import pytest
import torch
from op_cases import GEOM_GEOMS
from op_check import Maker, check

from fastres import reference
from fastres.harness.selftest_cases import tf32_round

tk = pytest.importorskip("fastres.triton_kernels")
_WHY = tk.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton kernels unavailable: {_WHY}")

if _WHY is None:
    from fastres.triton_kernels import _common, conv

    OPS = tk.ops()
F32 = torch.float32


def test_conv_fp32_tf32_switch(monkeypatch):
    """On a GPU fp32 runs TF32 when cudnn.allow_tf32 is on, exact IEEE otherwise (as F.conv2d);
    upcast operands (the interpreter) are multiplied exactly unless EMULATE_TF32."""
    for allow in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        assert _common.dot_precision(torch.float32, upcast=False) == ("tf32" if allow else "ieee")
        assert _common.dot_precision(torch.float32, upcast=True) == "ieee"
        assert _common.dot_precision(torch.bfloat16, upcast=False) == "tf32"
        assert _common.dot_precision(torch.bfloat16, upcast=True) == "ieee"
        monkeypatch.setattr(_common, "EMULATE_TF32", True)
        assert _common.dot_precision(torch.float32, upcast=True) == ("tf32" if allow else "ieee")
        assert _common.dot_precision(torch.bfloat16, upcast=True) == "ieee"
        monkeypatch.setattr(_common, "EMULATE_TF32", False)


def _tf32_inputs():
    """float32 values that exercise the rounding: random magnitudes, exact ties (bit 12 set,
    bits 11..0 clear), a full mantissa that carries into the exponent, the largest finite float
    (rounds to Inf), subnormals, signed zeros, Inf and NaN (quiet, canonical 0x7FFFFFFF, and
    negative)."""
    x = torch.randn(4096) * torch.exp2(torch.randint(-30, 30, (4096,)).float())
    bits = [0x3F801000, 0xBF803000, 0x3FFFF000, 0x3FFFFFFF, 0x7F7FFFFF, 0x00000FFF, 0x00001000,
            0x80003000, 0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF,
            0xFFFFFFFF, 0x7F801234]
    special = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits],
                           dtype=torch.int32).view(torch.float32)
    return torch.cat([x, special])


def _rna_tf32_f64(x):
    """Round to 10 explicit mantissa bits, ties away from zero, computed in float64 (frexp):
    the meaning of cvt.rna.tf32.f32, independent of the bit tricks under test."""
    m, e = torch.frexp(x.double())  # x = m * 2^e, 0.5 <= |m| < 1
    e = torch.clamp(e, min=-125)  # subnormals: fixed quantum 2^-136 (2^-149 * 2^13)
    q = torch.ldexp(torch.ones_like(m), e - 11)  # TF32 ulp at this exponent
    r = torch.sign(x.double()) * torch.floor(x.double().abs() / q + 0.5) * q
    r = torch.where(torch.isfinite(x), r, x.double()).float()  # float32: overflow -> Inf
    return r


def test_tf32_rounding_host_and_kernel():
    """round_tf32 (the weights and grad_out, on the host) and tf32_operand (the activation tile,
    in the kernel; run here by the interpreter) agree bit for bit, round to nearest with ties
    away from zero as cvt.rna.tf32.f32, carry into the exponent, send the largest finite floats
    to Inf, and keep Inf, signed zeros and every NaN (the canonical NaN 0x7FFFFFFF would carry
    into the sign bit and become -0 without the NaN test)."""
    import triton
    import triton.language as tl

    x = _tf32_inputs()
    host = _common.round_tf32(x)

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, _common.tf32_operand(v, "tf32"), mask=offs < n)

    dev = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, dev, x.numel(), BLOCK=1024)
    assert torch.equal(host.view(torch.int32), dev.view(torch.int32))
    nan = torch.isnan(x)
    assert torch.isnan(host[nan]).all()
    fin = ~nan
    assert torch.equal(host[fin], _rna_tf32_f64(x[fin]))
    assert torch.equal(torch.signbit(host[fin]), torch.signbit(x[fin]))  # -0 stays -0
    assert not (host[fin].view(torch.int32) & 0x1FFF).any()
    assert torch.isinf(host[x.abs() == torch.finfo(torch.float32).max]).all()


@pytest.fixture
def tf32(monkeypatch):
    """The TF32 path under the interpreter: operands rounded as on the GPU, multiplied exactly."""
    if not _common.INTERPRETED:
        pytest.skip("TF32 emulation is for the interpreter; on a GPU TF32 is the real thing")
    monkeypatch.setattr(_common, "EMULATE_TF32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)


def _tf32_operands(m: Maker, g, c=72):
    """x, weight (contiguous), residual and grad_out at geometry g with C = 72 channels: a
    reduction long enough (9 x 72 terms) that a rounding bias would show; nonzero means, so that
    a biased rounding would accumulate."""
    x = m.act(g.n, c, g.h, g.w, offset=0.5)
    wt = m.weight(g.k, c, g.r, g.s, layout="contiguous", shift=0.02)
    return x, wt, m.act(g.n, g.k, *g.out_hw), m.act(g.n, g.k, *g.out_hw, offset=0.3)


@pytest.mark.parametrize("geom", [GEOM_GEOMS[1], GEOM_GEOMS[2]], ids=lambda g: g.id)
def test_conv_tf32_rule(geom, tf32, monkeypatch):
    """fp32 with TF32: one TF32 MMA on operands rounded to nearest meets the tolerance rule
    against the TF32 yardstick in the forward (bias, residual, ReLU; statistics with the BN
    prologue) and both gradients; and it is really TF32: exact fp32 gives other values."""
    m = Maker("triton", F32)
    x, wt, res, go = _tf32_operands(m, geom)
    c, geo = x.shape[1], geom.conv
    check("triton", "conv_bias_act", (x, wt, m.vec(geom.k), res, *geo, True), F32, tf32=True)
    check("triton", "conv_stats", (x, wt, m.pos(c), m.vec(c), True, *geo), F32, tf32=True)
    check("triton", "conv_bwd", (go, x, wt, m.pos(c), m.vec(c), True, *geo, [True, True]), F32,
          tf32=True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    exact = OPS.conv_bias_act(x, wt, None, None, *geo, False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert not torch.equal(OPS.conv_bias_act(x, wt, None, None, *geo, False), exact)


def test_conv_tf32_truncation_fails_the_rule(tf32, monkeypatch):
    """The planted bug: operands truncated to TF32 (what wgmma does to unrounded fp32, the H200's
    2.4-3.8x) fail the rule that rounded operands pass (same shape as test_conv_tf32_rule;
    bench/tf32_emulated.py measured 2.4-20x PyTorch's error truncated, 0.8-1.6x rounded)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _truncate(x, DOT_PRECISION: tl.constexpr):
        if DOT_PRECISION == "tf32":
            x = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return x

    monkeypatch.setattr(conv, "tf32_operand", _truncate)
    monkeypatch.setattr(conv, "round_tf32",
                        lambda t: (t.view(torch.int32) & -0x2000).view(torch.float32))
    g = GEOM_GEOMS[1]
    x, wt, _, _ = _tf32_operands(Maker("triton", F32), g)
    with pytest.raises(AssertionError, match="FAIL"):
        check("triton", "conv_bias_act", (x, wt, None, None, *g.conv, False), F32, tf32=True)


def test_conv_tf32_nonfinite(tf32):
    """NaN and Inf in the activation and grad_out propagate through the TF32 path as through the
    reference on the same (rounded) operands: rounding keeps NaN and Inf. (Not in the weight:
    there an Inf times a masked-off zero of a padded tap is NaN in the dgrad on every precision,
    where PyTorch's CPU dgrad skips the tap; test_nonfinite does not cover weights either.)"""
    dtype = torch.float32
    m = Maker("triton", dtype)
    x, w, go = m.act(1, 5, 6, 6), m.weight(4, 5, 3, layout="contiguous"), m.act(1, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 4, 1] = float("inf")
    x[0, 3, 0, 5] = -float("inf")
    go[0, 2, 1, 1] = float("nan")
    go[0, 1, 3, 4] = -float("inf")
    geo = ([1, 1], [1, 1], [1, 1], 1)
    pairs = [(OPS.conv_bias_act(x, w, None, None, *geo, True),
              reference.conv_bias_act(tf32_round(x), tf32_round(w), None, None, *geo,
                                      True))]
    pairs += list(zip(OPS.conv_bwd(go, x, w, None, None, False, *geo, [True, True]),
                      reference.conv_bwd(tf32_round(go), tf32_round(x),
                                         tf32_round(w), None, None, False, *geo,
                                         [True, True]), strict=True))
    for ours, ref in pairs:
        assert torch.equal(torch.isnan(ours), torch.isnan(ref))
        assert torch.equal(torch.isposinf(ours), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
        assert torch.isnan(ours).any()
