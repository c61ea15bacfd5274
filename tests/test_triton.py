"""The Triton backend (fastres.triton_kernels) against fastres.reference under the tolerance rule.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported), thousands of times slower than eager: shapes are tiny and odd (odd channel counts
and spatial sizes, stride 2, batch 1) and every fusion flag is covered. Tests marked ``gpu`` run
the real ResNet-50 shapes, determinism and int64-offset checks on a CUDA device.

The rule (fastres.harness.rule): err(ours) <= 2 * err(reference at the same dtype) + atol[dtype], err
measured against fastres.reference on float64 copies of the same inputs.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (tests/conftest.py does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402

import pytest  # noqa: E402

from fastres import backends, reference  # noqa: E402
from fastres.harness.rule import assert_close_rule  # noqa: E402

tk = pytest.importorskip("fastres.triton_kernels")
_WHY = tk.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton kernels unavailable: {_WHY}")

if _WHY is None:
    from fastres.triton_kernels import _common, bn, conv, reduce  # noqa: E402

    OPS = tk.ops()
    DEVICE = "cpu" if _common.INTERPRETED else "cuda"
else:  # pragma: no cover
    OPS = None
    DEVICE = "cpu"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CL = torch.channels_last
# tests/conftest.py skips "gpu" tests without CUDA too; this keeps the file right on its own.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def act(n, c, h, w, dtype, channels_last=True, scale=1.0, offset=0.0):
    x = torch.randn(n, c, h, w, device=DEVICE) * scale + offset
    x = x.to(dtype)
    return x.contiguous(memory_format=CL) if channels_last else x


def vec(c, lo=None, hi=None):
    if lo is None:
        return torch.randn(c, device=DEVICE)
    return torch.rand(c, device=DEVICE) * (hi - lo) + lo


def _fmt(t):
    if t.dim() == 4 and t.is_contiguous(memory_format=CL) and not t.is_contiguous():
        return "channels_last"
    return "contiguous"


def _to64(a):
    if isinstance(a, torch.Tensor):
        return a.detach().clone().to(torch.float64) if a.is_floating_point() else a.clone()
    return a


def _clone(a):
    return a.detach().clone() if isinstance(a, torch.Tensor) else a


def _expected_formats(name, args, fallback):
    """Memory formats of the outputs as the fastres fakes (fastres/_meta.py) give them, the
    contract for every backend; the reference's own formats when fastres._C does not load."""
    from fastres.backends import extension

    mod, _ = extension.load()
    if mod is None:
        return [_fmt(t) for t in fallback]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = getattr(torch.ops.fastres, name)(*[_clone(a) for a in args])
    fake = (fake,) if isinstance(fake, torch.Tensor) else fake
    return [_fmt(t) for t in fake]


def check(name, args, dtype, mutated=()):
    """Run op ``name`` on our kernels, on the reference at ``dtype`` and at float64; judge every
    output and every mutated argument with the tolerance rule. Returns our outputs."""
    ours_args = [_clone(a) for a in args]
    lo_args = [_clone(a) for a in args]
    hi_args = [_to64(a) for a in args]
    ours = getattr(OPS, name)(*ours_args)
    lo = getattr(reference, name)(*lo_args)
    hi = getattr(reference, name)(*hi_args)
    if isinstance(ours, torch.Tensor):
        ours, lo, hi = (ours,), (lo,), (hi,)
    assert len(ours) == len(lo)
    formats = _expected_formats(name, args, lo)
    for i, (o, lo_i, hi_i) in enumerate(zip(ours, lo, hi, strict=True)):
        assert o.shape == lo_i.shape, f"{name}[{i}] shape {tuple(o.shape)} != {tuple(lo_i.shape)}"
        assert o.dtype == lo_i.dtype, f"{name}[{i}] dtype {o.dtype} != {lo_i.dtype}"
        assert o.device == lo_i.device
        assert _fmt(o) == formats[i], f"{name}[{i}] memory format {_fmt(o)} != {formats[i]}"
        assert torch.isfinite(o.float()).all(), f"{name}[{i}] has non-finite values"
        assert_close_rule(f"{name}[{i}]", o, lo_i, hi_i, dtype)
    for j in mutated:
        if args[j] is None:
            continue
        if args[j].is_floating_point():
            assert_close_rule(f"{name} arg {j}", ours_args[j], lo_args[j], hi_args[j], dtype)
        else:
            assert torch.equal(ours_args[j], lo_args[j]), f"{name} arg {j}: {ours_args[j]}"
    return ours


@pytest.fixture(params=["big", "small"])
def tiles(request, monkeypatch):
    """'small' forces 16-wide tiles, split-K weight gradients and several programs per reduction,
    so the multi-program paths (partials, masked tile edges, grouped ordering) run on tiny shapes
    that the interpreter's big default tiles cover in one program."""
    if request.param == "small":
        monkeypatch.setattr(conv, "gemm_config",
                            lambda *a, **kw: _common.GemmConfig(16, 16, 16, 4, 1, GROUP_M=2))
        monkeypatch.setattr(conv, "wgrad_config",
                            lambda *a, **kw: _common.WgradConfig(16, 16, 16, 3, 4, 1))
        monkeypatch.setattr(bn, "rows_config", lambda *a: _common.RowsConfig(16, 16, 3, 4))
        monkeypatch.setattr(reduce, "sum_rows_blocks", lambda p, n: (2, 16))
    return request.param


# ------------------------------------------------------------------------------------------
# Convolutions
# ------------------------------------------------------------------------------------------

# (N, C, H, W, K, kernel (R, S), stride, padding, dilation): odd channels and sizes, batch 1,
# stride 2, the 7x7 stem, a non-square kernel and a dilated one.
GEOMETRIES = [
    pytest.param((1, 5, 7, 7, 6, (3, 3), 1, 1, 1), id="3x3s1-n1"),
    pytest.param((2, 7, 7, 9, 5, (3, 3), 2, 1, 1), id="3x3s2-odd"),
    pytest.param((2, 6, 6, 6, 9, (1, 1), 2, 0, 1), id="1x1s2-down"),
    pytest.param((1, 3, 11, 11, 8, (7, 7), 2, 3, 1), id="7x7s2-stem"),
    pytest.param((1, 5, 6, 5, 3, (1, 3), 1, (0, 1), 1), id="1x3"),
    pytest.param((1, 4, 9, 9, 5, (3, 3), 1, 2, 2), id="3x3-dil2"),
]


def _geom(g):
    n, c, h, w, k, (r, s), stride, pad, dil = g
    pad = list(pad) if isinstance(pad, tuple) else [pad, pad]
    return n, c, h, w, k, r, s, [stride, stride], pad, [dil, dil]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("has_res", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bias_act_flags(dtype, has_bias, has_res, relu):
    """Every HAS_BIAS x HAS_RESIDUAL x APPLY_RELU combination at every dtype."""
    x = act(2, 5, 5, 7, dtype)
    w = (torch.randn(6, 5, 3, 3, device=DEVICE) / 5).to(dtype)
    bias = torch.randn(6, device=DEVICE).to(dtype) if has_bias else None
    res = act(2, 6, 3, 4, dtype) if has_res else None
    check("conv_bias_act", (x, w, bias, res, [2, 2], [1, 1], [1, 1], 1, relu), dtype)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_conv_bias_act_geometry(geom, tiles):
    # Indexing and masking do not depend on the dtype (the flag tests cover all three); one
    # dtype per geometry test keeps the interpreter's bill down.
    dtype = torch.float16
    n, c, h, w, k, r, s, stride, pad, dil = _geom(geom)
    x = act(n, c, h, w, dtype)
    wt = (torch.randn(k, c, r, s, device=DEVICE) / (c * r * s) ** 0.5).to(dtype)
    p, q = conv.out_hw(h, w, r, s, stride, pad, dil)
    res = act(n, k, p, q, dtype, channels_last=False)  # residual in another layout
    check("conv_bias_act", (x, wt, torch.randn(k, device=DEVICE).to(dtype), res, stride, pad, dil,
                            1, True), dtype)


def test_conv_bias_act_contiguous_in_contiguous_out():
    """A contiguous (NCHW) input gives a contiguous output (the fakes' rule)."""
    x = act(1, 3, 5, 5, torch.float32, channels_last=False)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    (out,) = check("conv_bias_act", (x, w, None, None, [1, 1], [1, 1], [1, 1], 1, False),
                   torch.float32)
    assert out.is_contiguous()


def test_stem_channel_padding_keeps_values_and_nonfinite_patterns():
    """A pixel row under 16 bytes (the stem, C = 3) runs zero-padded to 16 channels
    (conv._padded_channels): the forward output and the weight gradient must equal the unpadded
    reference's, with NaN and Inf exactly where PyTorch puts them; the padded channels' gradient
    (Inf * 0 = NaN there) is sliced off and never reaches the real ones."""
    assert conv._padded_channels(3, torch.bfloat16) == 16
    assert conv._padded_channels(3, torch.float32) == 16
    assert conv._padded_channels(4, torch.float32) == 4  # a 16-byte row: no copy
    assert conv._padded_channels(8, torch.float16) == 8
    dtype = torch.float32
    geo = ([2, 2], [3, 3], [1, 1], 1)
    x = act(1, 3, 11, 11, dtype)
    x[0, 0, 4, 4], x[0, 2, 8, 1] = float("nan"), float("inf")
    w = (torch.randn(8, 3, 7, 7, device=DEVICE) / 12).to(dtype)
    ours = OPS.conv_bias_act(x, w, None, None, *geo, False)
    ref = reference.conv_bias_act(x, w, None, None, *geo, False)
    assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
    assert ours.isnan().any()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(ours[fin], ref[fin], atol=1e-4, rtol=1e-4)
    go = act(1, 8, 6, 6, dtype)
    go[0, 1, 2, 3] = float("inf")  # meets the padded zeros: NaN in the sliced-off channels only
    xf = act(1, 3, 11, 11, dtype)
    gi, gw = OPS.conv_bwd(go, xf, w, None, None, False, *geo, [False, True])
    rgi, rgw = reference.conv_bwd(go, xf, w, None, None, False, *geo, [False, True])
    assert gw.shape == w.shape and _fmt(gw) == _fmt(rgw)
    assert torch.equal(gw.isnan(), rgw.isnan()) and torch.equal(gw.isinf(), rgw.isinf())
    fin = torch.isfinite(rgw)
    torch.testing.assert_close(gw[fin], rgw[fin], atol=1e-4, rtol=1e-4)


# Prologue variants: (pre_scale, pre_shift, pre_relu). The shift is biased positive so that a
# padded zero transformed (relu(shift) > 0) instead of kept zero would show.
PROLOGUES = [
    pytest.param((False, False, False), id="plain"),
    pytest.param((True, True, False), id="bn"),
    pytest.param((True, True, True), id="bn-relu"),
    pytest.param((False, False, True), id="relu-only"),
    pytest.param((False, True, True), id="shift-relu"),
]


def _prologue_args(c, prologue):
    has_scale, has_shift, pre_relu = prologue
    return (vec(c, 0.5, 1.5) if has_scale else None,
            vec(c, 0.2, 1.0) if has_shift else None, pre_relu)


@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_stats_prologue(prologue, dtype):
    x = act(2, 5, 7, 5, dtype)
    w = (torch.randn(7, 5, 3, 3, device=DEVICE) / 6).to(dtype)
    sc, sh, pre_relu = _prologue_args(5, prologue)
    check("conv_stats", (x, w, sc, sh, pre_relu, [1, 1], [1, 1], [1, 1], 1), dtype)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_conv_stats_geometry(geom, tiles):
    dtype = torch.bfloat16
    n, c, h, w, k, r, s, stride, pad, dil = _geom(geom)
    x = act(n, c, h, w, dtype, offset=0.3)  # nonzero mean: the statistics must not cancel it
    wt = (torch.randn(k, c, r, s, device=DEVICE) / (c * r * s) ** 0.5).to(dtype)
    check("conv_stats", (x, wt, vec(c, 0.5, 1.5), vec(c), True, stride, pad, dil, 1), dtype)


@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_bwd_prologue(prologue, dtype):
    x = act(2, 5, 7, 7, dtype)
    w = (torch.randn(6, 5, 3, 3, device=DEVICE) / 6).to(dtype)
    go = act(2, 6, 4, 4, dtype)
    sc, sh, pre_relu = _prologue_args(5, prologue)
    check("conv_bwd", (go, x, w, sc, sh, pre_relu, [2, 2], [1, 1], [1, 1], 1, [True, True]),
          dtype)


# The stem's 49 taps under 16-wide tiles cost ~150 interpreted programs for nothing the other
# geometries do not cover already: big tiles only there.
BWD_GEOMETRY_TILES = [
    pytest.param(g.values[0], t, id=f"{t}-{g.id}")
    for g in GEOMETRIES for t in ("big", "small") if not (t == "small" and "7x7" in g.id)
]


@pytest.mark.parametrize(("geom", "tiles"), BWD_GEOMETRY_TILES, indirect=["tiles"])
def test_conv_bwd_geometry(geom, tiles):
    dtype = torch.float32 if tiles == "big" else torch.bfloat16
    n, c, h, w, k, r, s, stride, pad, dil = _geom(geom)
    x = act(n, c, h, w, dtype)
    wt = (torch.randn(k, c, r, s, device=DEVICE) / (c * r * s) ** 0.5).to(dtype)
    p, q = conv.out_hw(h, w, r, s, stride, pad, dil)
    go = act(n, k, p, q, dtype)
    check("conv_bwd", (go, x, wt, vec(c, 0.5, 1.5), vec(c), True, stride, pad, dil, 1,
                       [True, True]), dtype)


@pytest.mark.parametrize("mask", [[True, False], [False, True]], ids=["dgrad", "wgrad"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_bwd_output_mask_and_layout(mask, channels_last):
    dtype = torch.float32
    x = act(1, 3, 6, 6, dtype, channels_last=channels_last)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    if channels_last:
        w = w.contiguous(memory_format=CL)  # the weight gradient keeps the weight's layout
    go = act(1, 4, 3, 3, dtype, channels_last=channels_last)
    gi, gw = check("conv_bwd", (go, x, w, None, None, False, [2, 2], [1, 1], [1, 1], 1, mask),
                   dtype)
    assert (gi.numel() == 0) != mask[0] and (gw.numel() == 0) != mask[1]
    if mask[1]:
        assert gw.stride() == w.stride()


def test_conv_bwd_stride2_phases_without_taps():
    """1x1 stride 2: three of the four output phases receive no tap and must be written as zeros
    (the output buffer is uninitialised memory)."""
    x = act(1, 4, 5, 5, torch.float32)
    w = torch.randn(3, 4, 1, 1, device=DEVICE)
    go = act(1, 3, 3, 3, torch.float32)
    gi, _ = check("conv_bwd", (go, x, w, None, None, False, [2, 2], [0, 0], [1, 1], 1,
                               [True, False]), torch.float32)
    assert torch.count_nonzero(gi[:, :, 1::2, :]) == 0
    assert torch.count_nonzero(gi[:, :, :, 1::2]) == 0


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


def _tf32_yardstick(a):
    from fastres.harness.selftest_cases import tf32_round

    return tf32_round(_clone(a))


def check_tf32(name, args):
    """check() for a float32 op run through the TF32 path (EMULATE_TF32): PyTorch's yardstick is
    the reference on TF32-rounded operands, as for the CUDA kernels' TF32 (test_ops_device)."""
    ours = getattr(OPS, name)(*[_clone(a) for a in args])
    lo = getattr(reference, name)(*[_tf32_yardstick(a) for a in args])
    hi = getattr(reference, name)(*[_to64(a) for a in args])
    if isinstance(ours, torch.Tensor):
        ours, lo, hi = (ours,), (lo,), (hi,)
    for i, (o, lo_i, hi_i) in enumerate(zip(ours, lo, hi, strict=True)):
        assert o.dtype == lo_i.dtype and o.shape == lo_i.shape
        assert_close_rule(f"{name}[{i}] tf32", o, lo_i, hi_i, torch.float32)
    return ours


@pytest.fixture
def tf32(monkeypatch):
    """The TF32 path under the interpreter: operands rounded as on the GPU, multiplied exactly."""
    if not _common.INTERPRETED:
        pytest.skip("TF32 emulation is for the interpreter; on a GPU TF32 is the real thing")
    monkeypatch.setattr(_common, "EMULATE_TF32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)


@pytest.mark.parametrize("geom", [GEOMETRIES[1], GEOMETRIES[2]])
def test_conv_tf32_rule(geom, tf32, monkeypatch):
    """fp32 with TF32: one TF32 MMA on operands rounded to nearest meets the tolerance rule
    against the TF32 yardstick in the forward (bias, residual, ReLU; statistics with the BN
    prologue) and both gradients; and it is really TF32: exact fp32 gives other values. C = 72
    channels: a reduction long enough (9 x 72 terms) that a rounding bias would show."""
    dtype = torch.float32
    n, _, h, w, k, r, s, stride, pad, dil = _geom(geom)
    c = 72
    x = act(n, c, h, w, dtype, offset=0.5)  # nonzero mean: a biased rounding would accumulate
    wt = (torch.randn(k, c, r, s, device=DEVICE) / (c * r * s) ** 0.5 + 0.02).to(dtype)
    p, q = conv.out_hw(h, w, r, s, stride, pad, dil)
    res = act(n, k, p, q, dtype)
    geo = (stride, pad, dil, 1)
    (out,) = check_tf32("conv_bias_act", (x, wt, vec(k), res, *geo, True))
    check_tf32("conv_stats", (x, wt, vec(c, 0.5, 1.5), vec(c), True, *geo))
    go = act(n, k, p, q, dtype, offset=0.3)
    gi, gw = check_tf32("conv_bwd", (go, x, wt, vec(c, 0.5, 1.5), vec(c), True, *geo,
                                     [True, True]))
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
    n, _, h, w, k, r, s, stride, pad, dil = _geom(GEOMETRIES[1].values[0])
    x = act(n, 72, h, w, torch.float32, offset=0.5)
    wt = torch.randn(k, 72, r, s, device=DEVICE) / (72 * r * s) ** 0.5 + 0.02
    args = (x, wt, None, None, stride, pad, dil, 1, False)
    with pytest.raises(AssertionError, match="FAIL"):
        check_tf32("conv_bias_act", args)


def test_conv_tf32_nonfinite(tf32):
    """NaN and Inf in the activation and grad_out propagate through the TF32 path as through the
    reference on the same (rounded) operands: rounding keeps NaN and Inf. (Not in the weight:
    there an Inf times a masked-off zero of a padded tap is NaN in the dgrad on every precision,
    where PyTorch's CPU dgrad skips the tap; test_nonfinite does not cover weights either.)"""
    dtype = torch.float32
    x = act(1, 5, 6, 6, dtype)
    w = torch.randn(4, 5, 3, 3, device=DEVICE)
    go = act(1, 4, 6, 6, dtype)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 4, 1] = float("inf")
    x[0, 3, 0, 5] = -float("inf")
    go[0, 2, 1, 1] = float("nan")
    go[0, 1, 3, 4] = -float("inf")
    geo = ([1, 1], [1, 1], [1, 1], 1)
    pairs = [(OPS.conv_bias_act(x, w, None, None, *geo, True),
              reference.conv_bias_act(_tf32_yardstick(x), _tf32_yardstick(w), None, None, *geo,
                                      True))]
    pairs += list(zip(OPS.conv_bwd(go, x, w, None, None, False, *geo, [True, True]),
                      reference.conv_bwd(_tf32_yardstick(go), _tf32_yardstick(x),
                                         _tf32_yardstick(w), None, None, False, *geo,
                                         [True, True]), strict=True))
    for ours, ref in pairs:
        assert torch.equal(torch.isnan(ours), torch.isnan(ref))
        assert torch.equal(torch.isposinf(ours), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(ours), torch.isneginf(ref))
        assert torch.isnan(ours).any()


def test_empty_batch():
    """N = 0: no program to launch; the statistics and weight gradient are zeros, not garbage."""
    x = act(0, 5, 7, 7, torch.float32)
    w = torch.randn(6, 5, 3, 3, device=DEVICE)
    out, s, ss = OPS.conv_stats(x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1)
    assert out.shape == (0, 6, 7, 7) and not s.any() and not ss.any()
    go = act(0, 6, 7, 7, torch.float32)
    gi, gw = OPS.conv_bwd(go, x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1, [True, True])
    assert gi.shape == x.shape and not gw.any()
    assert not OPS.relu_bias_bwd(go, None)[1].any()


# ------------------------------------------------------------------------------------------
# BatchNorm ops
# ------------------------------------------------------------------------------------------


def _finalize_args(affine, running):
    """(sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked, count,
    momentum) of a 37-channel BatchNorm over 50 values per channel."""
    c, count = 37, 50
    x = torch.randn(count, c, device=DEVICE, dtype=torch.float64) * 2 + 1
    s, ss = x.sum(0).float(), (x * x).sum(0).float()
    weight = vec(c, 0.5, 1.5) if affine else None
    bias = vec(c) if affine else None
    rm = rv = nbt = None
    momentum = 0.1
    if running in ("momentum", "cumulative"):
        rm, rv = vec(c), vec(c, 0.5, 2.0)
        nbt = torch.tensor(3, device=DEVICE, dtype=torch.long)
    if running == "cumulative":
        momentum = None
    if running == "nbt-only":
        nbt = torch.tensor(0, device=DEVICE, dtype=torch.long)
    return s, ss, weight, bias, rm, rv, nbt, count, momentum


RUNNING = ["none", "momentum", "cumulative", "nbt-only"]


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("running", RUNNING)
def test_bn_finalize(affine, running):
    s, ss, weight, bias, rm, rv, nbt, count, momentum = _finalize_args(affine, running)
    check("bn_finalize", (s, ss, weight, bias, rm, rv, nbt, count, momentum, 1e-5),
          torch.float32, mutated=(4, 5, 6))


def test_bn_finalize_errors():
    s = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value"):
        OPS.bn_finalize(s, s, None, None, None, None, None, 1, 0.1, 1e-5)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        OPS.bn_finalize(s, s, None, None, s.clone(), s.clone(), None, 4, None, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", ["none", "identity", "bn", "option-a", "strided", "shift"])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_add_relu(dtype, residual, relu):
    n, c, h, w = 2, 9, 5, 3
    x = act(n, c, h, w, dtype)
    res = res_scale = res_shift = None
    offset = 0
    if residual in ("identity", "bn", "shift"):
        res = act(n, c, h, w, dtype, channels_last=False)
    if residual == "bn":
        res_scale, res_shift = vec(c, 0.5, 1.5), vec(c)
    if residual == "shift":
        res_shift = vec(c)
    if residual == "option-a":  # fewer channels, landing on channels [2, 7)
        res, offset = act(n, 5, h, w, dtype), 2
    if residual == "strided":  # the option-A shortcut's x[:, :, ::2, ::2] of a larger x
        big = act(n, 5, 2 * h, 2 * w, dtype)
        res, offset = big[:, :, ::2, ::2], 3
        assert not res.is_contiguous() and not res.is_contiguous(memory_format=CL)
    check("bn_add_relu", (x, vec(c, 0.5, 1.5), vec(c), res, res_scale, res_shift, offset, relu),
          dtype)


def test_bn_add_relu_tiles(tiles):
    dtype = torch.bfloat16
    x = act(2, 37, 5, 7, dtype, channels_last=False)
    res = act(2, 37, 5, 7, dtype)
    check("bn_add_relu", (x, vec(37, 0.5, 1.5), vec(37), res, vec(37), vec(37), 0, True), dtype)


def _stats(x):
    xf = x.double()
    mean = xf.mean(dim=(0, 2, 3))
    var = xf.var(dim=(0, 2, 3), unbiased=False)
    return mean.float(), torch.rsqrt(var + 1e-5).float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_out", [False, True])
@pytest.mark.parametrize("res_mode", ["identity", "bn", "bn-noaffine"])
@pytest.mark.parametrize("affine", [False, True])
def test_bn_add_relu_bwd(dtype, has_out, res_mode, affine):
    n, c, h, w = 2, 7, 5, 3
    x = act(n, c, h, w, dtype, scale=2.0, offset=0.5)
    mean, invstd = _stats(x)
    weight = vec(c, 0.5, 1.5) if affine else None
    go = act(n, c, h, w, dtype, channels_last=False)
    out = act(n, c, h, w, dtype) if has_out else None
    rx = rmean = rinvstd = rweight = None
    if res_mode != "identity":
        rx = act(n, c, h, w, dtype, offset=-0.3)
        rmean, rinvstd = _stats(rx)
        rweight = vec(c, 0.5, 1.5) if res_mode == "bn" else None
    check("bn_add_relu_bwd", (go, out, x, mean, invstd, weight, rx, rmean, rinvstd, rweight),
          dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_bn_relu_bwd(dtype, relu, affine):
    n, c, h, w = 1, 11, 7, 5
    x = act(n, c, h, w, dtype, scale=1.5, offset=0.2)
    mean, invstd = _stats(x)
    weight = vec(c, 0.5, 1.5) if affine else None
    bias = vec(c)
    scale = invstd * (weight if affine else 1.0)
    shift = bias - mean * scale
    go = act(n, c, h, w, dtype)
    check("bn_relu_bwd", (go, x, mean, invstd, weight, scale, shift, relu), dtype)


def test_bn_bwd_tiles(tiles):
    """Several programs per reduction and partial rows summed in blocks (small tiles)."""
    dtype = torch.float32
    n, c, h, w = 2, 37, 5, 7
    x = act(n, c, h, w, dtype)
    mean, invstd = _stats(x)
    rx = act(n, c, h, w, dtype)
    rmean, rinvstd = _stats(rx)
    go, out = act(n, c, h, w, dtype), act(n, c, h, w, dtype)
    check("bn_add_relu_bwd", (go, out, x, mean, invstd, vec(c), rx, rmean, rinvstd, vec(c)), dtype)
    scale, shift = invstd, -mean * invstd
    check("bn_relu_bwd", (go, x, mean, invstd, None, scale, shift, True), dtype)
    check("relu_bias_bwd", (go, out), dtype)


# ------------------------------------------------------------------------------------------
# SyncBatchNorm's split: bn_finalize_count, bn_*_bwd_reduce and bn_*_bwd_elemt
# ------------------------------------------------------------------------------------------

# Indexing, masking and layouts are shared with the single-process ops tested above with all three
# dtypes; the split ops run fp32 and bf16 only, to keep the interpreter's bill down.
SPLIT_DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("running", RUNNING)
def test_bn_finalize_count(affine, running):
    """bn_finalize with the count read from a one-element tensor: by the rule against the
    reference, and bitwise equal to bn_finalize given the same count as an int (the kernel rounds
    1/count and count/(count-1) to float32 as the host does), running stats included."""
    s, ss, weight, bias, rm, rv, nbt, count, momentum = _finalize_args(affine, running)
    n = torch.tensor([float(count)], device=DEVICE)
    check("bn_finalize_count", (s, ss, n, weight, bias, rm, rv, nbt, momentum, 1e-5),
          torch.float32, mutated=(5, 6, 7))
    state, single_state = ([_clone(t) for t in (rm, rv, nbt)] for _ in range(2))
    ours = OPS.bn_finalize_count(s, ss, n, weight, bias, *state, momentum, 1e-5)
    single = OPS.bn_finalize(s, ss, weight, bias, *single_state, count, momentum, 1e-5)
    for i, (a, b) in enumerate(zip(ours, single, strict=True)):
        assert torch.equal(a, b), i
    for a, b in zip(state, single_state, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_bn_finalize_count_errors():
    s = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="one element"):
        OPS.bn_finalize_count(s, s, torch.tensor([4.0, 4.0], device=DEVICE), None, None, None,
                              None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        OPS.bn_finalize_count(s, s, torch.tensor([4.0], device=DEVICE), None, None, s.clone(),
                              s.clone(), None, None, 1e-5)


def _means(sums, count):
    """Pass 1's sums made the means pass 2 takes (a single process: global count = count)."""
    return [t if t is None or t.numel() == 0 else t / count for t in sums]


def _bn_add_relu_bwd_case(dtype, has_out, res_mode, channels_last, n=2, c=7, h=5, w=3):
    """(grad_out, out, input, mean, invstd, weight, res_input, res_mean, res_invstd, res_weight)
    as in test_bn_add_relu_bwd; res_mode "identity", "bn" or "bn-noaffine" (no weights)."""
    x = act(n, c, h, w, dtype, channels_last, scale=2.0, offset=0.5)
    mean, invstd = _stats(x)
    weight = None if res_mode == "bn-noaffine" else vec(c, 0.5, 1.5)
    go = act(n, c, h, w, dtype, channels_last)
    out = act(n, c, h, w, dtype, channels_last) if has_out else None
    rx = rmean = rinvstd = rweight = None
    if res_mode != "identity":
        rx = act(n, c, h, w, dtype, not channels_last, offset=-0.3)  # the other layout
        rmean, rinvstd = _stats(rx)
        rweight = None if res_mode == "bn-noaffine" else vec(c, 0.5, 1.5)
    return go, out, x, mean, invstd, weight, rx, rmean, rinvstd, rweight


@pytest.mark.parametrize("dtype", SPLIT_DTYPES, ids=str)
@pytest.mark.parametrize("has_out", [False, True])
@pytest.mark.parametrize("res_mode", ["identity", "bn", "bn-noaffine"])
@LAYOUTS
def test_bn_add_relu_bwd_split(dtype, has_out, res_mode, channels_last):
    go, out, x, mean, invstd, weight, rx, rmean, rinvstd, rweight = _bn_add_relu_bwd_case(
        dtype, has_out, res_mode, channels_last)
    sums = check("bn_add_relu_bwd_reduce", (go, out, x, mean, invstd, rx, rmean, rinvstd), dtype)
    # Pass 2 on the reference's float64 sums: each pass is judged on its own.
    exact = reference.bn_add_relu_bwd_reduce(*[_to64(a) for a in (go, out, x, mean, invstd, rx,
                                                                   rmean, rinvstd)])
    mg, mgx, rmgx = [t.float() for t in _means(exact, x.numel() // x.shape[1])]
    if rx is None:
        assert sums[2].numel() == 0
        rmgx = None
    gi, gr = check("bn_add_relu_bwd_elemt", (go, out, x, mean, invstd, weight, mg, mgx, rx, rmean,
                                             rinvstd, rweight, rmgx), dtype)
    if rx is None:  # identity residual: grad_res is g itself, exactly
        assert torch.equal(gr, reference.bn_add_relu_bwd_elemt(
            go, out, x, mean, invstd, weight, mg, mgx, None, None, None, None, None)[1])


@pytest.mark.parametrize("dtype", SPLIT_DTYPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
@LAYOUTS
def test_bn_relu_bwd_split(dtype, relu, channels_last):
    n, c, h, w = 1, 11, 7, 5
    x = act(n, c, h, w, dtype, channels_last, scale=1.5, offset=0.2)
    mean, invstd = _stats(x)
    weight = vec(c, 0.5, 1.5) if channels_last else None
    scale = invstd * (weight if weight is not None else 1.0)
    shift = vec(c) - mean * scale
    go = act(n, c, h, w, dtype, channels_last)
    check("bn_relu_bwd_reduce", (go, x, mean, invstd, scale, shift, relu), dtype)
    exact = reference.bn_relu_bwd_reduce(*[_to64(a) for a in (go, x, mean, invstd, scale, shift,
                                                               relu)])
    mg, mgx = [t.float() for t in _means(exact, n * h * w)]
    check("bn_relu_bwd_elemt", (go, x, mean, invstd, weight, scale, shift, relu, mg, mgx), dtype)


@pytest.mark.parametrize("dtype", SPLIT_DTYPES, ids=str)
def test_bn_bwd_split_chain(dtype, tiles):
    """reduce -> (divide by the count) -> elemt on one process is the single-process op: the sums
    bitwise (the same reduction kernel and config), the gradients by the rule with the
    single-process op as yardstick. Under the interpreter also bitwise when the means are taken
    as the single-process kernel takes them (times 1/count rounded to float32); not on a GPU,
    where the compiler may fuse the single-process kernel's sum * (1/count) into the subtraction
    that follows (one FMA, one rounding) but not a mean computed outside. 'small' tiles: several
    programs per reduction."""
    n, c, h, w = 2, 37, 5, 7
    count = n * h * w
    inv = 1.0 / count
    ways = [False, True] if _common.INTERPRETED else [False]  # bitwise?
    for res_mode in ("identity", "bn"):
        args = _bn_add_relu_bwd_case(dtype, True, res_mode, True, n, c, h, w)
        go, out, x, mean, invstd, weight, rx, rmean, rinvstd, rweight = args
        gi1, gw1, gb1, gr1, grw1, grb1 = OPS.bn_add_relu_bwd(*args)
        sums = OPS.bn_add_relu_bwd_reduce(go, out, x, mean, invstd, rx, rmean, rinvstd)
        assert torch.equal(sums[0], gb1) and torch.equal(sums[1], gw1)
        assert torch.equal(sums[2], grw1) if rx is not None else sums[2].numel() == 0
        hi = reference.bn_add_relu_bwd(*[_to64(a) for a in args])
        for bitwise in ways:
            mg, mgx, rmgx = ([t * inv for t in sums] if bitwise else _means(sums, count))
            gi, gr = OPS.bn_add_relu_bwd_elemt(go, out, x, mean, invstd, weight, mg, mgx, rx,
                                               rmean, rinvstd, rweight,
                                               rmgx if rx is not None else None)
            for name, ours, single, ref in (("grad_input", gi, gi1, hi[0]),
                                            ("grad_res", gr, gr1, hi[3])):
                assert _fmt(ours) == _fmt(single), name
                if bitwise:
                    assert torch.equal(ours, single), f"{res_mode} {name}"
                else:
                    assert_close_rule(f"{res_mode} {name}", ours, single, ref, dtype)
    x = act(n, c, h, w, dtype, False, offset=0.2)
    mean, invstd = _stats(x)
    weight, go = vec(c, 0.5, 1.5), act(n, c, h, w, dtype, False)
    scale, shift = invstd * weight, vec(c)
    gi1, gw1, gb1 = OPS.bn_relu_bwd(go, x, mean, invstd, weight, scale, shift, True)
    gsum, gxsum = OPS.bn_relu_bwd_reduce(go, x, mean, invstd, scale, shift, True)
    assert torch.equal(gsum, gb1) and torch.equal(gxsum, gw1)
    hi = reference.bn_relu_bwd(*[_to64(a) for a in (go, x, mean, invstd, weight, scale, shift,
                                                     True)])
    gi = OPS.bn_relu_bwd_elemt(go, x, mean, invstd, weight, scale, shift, True, gsum / count,
                               gxsum / count)
    assert_close_rule("bn_relu_bwd grad_input", gi, gi1, hi[0], dtype)
    if True in ways:
        gi = OPS.bn_relu_bwd_elemt(go, x, mean, invstd, weight, scale, shift, True, gsum * inv,
                                   gxsum * inv)
        assert torch.equal(gi, gi1)


def test_bn_bwd_split_errors():
    x = act(1, 3, 2, 2, torch.float32)
    v = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="res_mean and res_invstd"):
        OPS.bn_add_relu_bwd_reduce(x, None, x, v, v, x, None, v)
    with pytest.raises(ValueError, match="res_mean_g_xhat"):
        OPS.bn_add_relu_bwd_elemt(x, None, x, v, v, None, v, v, x, v, v, None, None)


@pytest.mark.gpu
@needs_cuda
def test_gpu_split_ops_do_not_sync():
    """No host sync in the SyncBatchNorm ops (the count stays on the device), momentum=None
    included: num_batches_tracked is read by the finalize kernel too."""
    x = act(4, 64, 14, 14, torch.bfloat16)
    mean, invstd = _stats(x)
    s, ss, n = vec(64), vec(64, 1.0, 2.0), torch.tensor([784.0], device=DEVICE)
    state = [torch.zeros(64, device=DEVICE), torch.ones(64, device=DEVICE),
             torch.tensor(0, device=DEVICE)]
    for _ in range(2):  # the first round compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            OPS.bn_finalize_count(s, ss, n, None, None, *state, None, 1e-5)
            sums = OPS.bn_add_relu_bwd_reduce(x, x, x, mean, invstd, None, None, None)
            OPS.bn_add_relu_bwd_elemt(x, x, x, mean, invstd, None, sums[0], sums[1], None, None,
                                      None, None, None)
            sums = OPS.bn_relu_bwd_reduce(x, x, mean, invstd, mean, invstd, True)
            OPS.bn_relu_bwd_elemt(x, x, mean, invstd, None, mean, invstd, True, *sums)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(state[2]) == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_out", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_relu_bias_bwd(dtype, has_out, channels_last):
    go = act(1, 13, 5, 7, dtype, channels_last=channels_last)
    out = act(1, 13, 5, 7, dtype) if has_out else None
    check("relu_bias_bwd", (go, out), dtype)


# ------------------------------------------------------------------------------------------
# Op registration, dispatch, compile
# ------------------------------------------------------------------------------------------


def test_ops_match_contract():
    """Every op of the contract (fastres._opset), registered under fastres_triton with its
    schema, under fastres (the compiled kernels) with the same one when fastres._C loads, and
    with reference.py's argument names."""
    from fastres import _opset

    ns = OPS.__dict__
    assert sorted(ns) == sorted(backends.OP_NAMES) == sorted(_opset.OP_NAMES)
    for name in _opset.OP_NAMES:
        ours = getattr(torch.ops.fastres_triton, name).default._schema
        theirs = torch._C.parse_schema(f"fastres::{name}{_opset.SCHEMAS[name]}")
        assert str(ours).replace("fastres_triton::", "") == \
            str(theirs).replace("fastres::", ""), name
    from fastres.backends import extension

    mod, _ = extension.load()
    for name in backends.OP_NAMES:
        schema = getattr(torch.ops.fastres_triton, name).default._schema
        ref_args = list(inspect.signature(getattr(reference, name)).parameters)
        assert [a.name for a in schema.arguments] == ref_args, name
        if mod is not None:
            theirs = getattr(torch.ops.fastres, name).default._schema
            assert str(schema).replace("fastres_triton::", "") == \
                str(theirs).replace("fastres::", ""), name


def test_dispatch_reasons():
    from fastres.backends import Inputs

    dev = torch.device(DEVICE)
    assert tk.unavailable_reason() is None
    assert tk.not_supported_reasons(Inputs(dev, torch.bfloat16, (3, 3), (2, 2))) == []
    assert any("float64" in r for r in tk.not_supported_reasons(Inputs(dev, torch.float64)))
    assert any("groups" in r for r in tk.not_supported_reasons(Inputs(dev, torch.float32,
                                                                       groups=2)))
    assert any("7x7" in r for r in tk.not_supported_reasons(Inputs(dev, torch.float32, (9, 9))))
    other = torch.device("cuda") if DEVICE == "cpu" else torch.device("cpu")
    assert tk.not_supported_reasons(Inputs(other, torch.float32)) != []
    with pytest.raises(NotImplementedError, match="groups"):
        OPS.conv_bias_act(act(1, 4, 3, 3, torch.float32), torch.randn(4, 2, 1, 1, device=DEVICE),
                          None, None, [1, 1], [0, 0], [1, 1], 2, False)


_NO_TRITON = """
import importlib.machinery
import sys
class Block:  # a triton that cannot be imported: every import of it raises ImportError
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError("no triton here")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
import torch
import fastres.triton_kernels as t
why = t.unavailable_reason()
assert why and "triton" in why, why
from fastres import backends
assert backends.BACKENDS["triton"].not_supported_reasons(
    backends.Inputs(torch.device("cpu"), torch.float32)) == [why]
assert not torch.cuda.is_initialized()
"""


def test_missing_triton_is_a_reason_not_a_crash():
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _NO_TRITON], check=True)


def test_opcheck():
    x = act(1, 5, 5, 5, torch.float32)
    w = torch.randn(6, 5, 3, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.fastres_triton.conv_stats,
                          (x, w, vec(5, 0.5, 1.5), vec(5), True, [1, 1], [1, 1], [1, 1], 1))
    s, ss = torch.zeros(6, device=DEVICE), torch.full((6,), 10.0, device=DEVICE)
    nbt = torch.tensor(0, device=DEVICE)
    torch.library.opcheck(torch.ops.fastres_triton.bn_finalize,
                          (s, ss, None, None, vec(6), vec(6, 1, 2), nbt, 20, None, 1e-5))
    go = act(1, 6, 5, 5, torch.float32)
    torch.library.opcheck(torch.ops.fastres_triton.bn_add_relu_bwd,
                          (go, go.relu(), go, torch.zeros(6, device=DEVICE),
                           torch.ones(6, device=DEVICE), None, None, None, None, None))
    ops = torch.ops.fastres_triton
    z, o = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    torch.library.opcheck(ops.bn_finalize_count,
                          (s, ss, torch.tensor([20.0], device=DEVICE), None, None, vec(6),
                           vec(6, 1, 2), nbt, None, 1e-5))
    torch.library.opcheck(ops.bn_add_relu_bwd_reduce, (go, go.relu(), go, z, o, go, z, o))
    torch.library.opcheck(ops.bn_add_relu_bwd_elemt,
                          (go, go.relu(), go, z, o, None, z, o, None, None, None, None, None))
    torch.library.opcheck(ops.bn_relu_bwd_reduce, (go, go, z, o, o, z, True))
    torch.library.opcheck(ops.bn_relu_bwd_elemt, (go, go, z, o, None, o, z, True, z, o))


def _train_step(x, w1, w2, rm, rv, nbt):
    ops = torch.ops.fastres_triton
    y1, s1, ss1 = ops.conv_stats(x, w1, None, None, False, [1, 1], [1, 1], [1, 1], 1)
    count = y1.shape[0] * y1.shape[2] * y1.shape[3]
    _, _, sc1, sh1 = ops.bn_finalize(s1, ss1, None, None, rm, rv, nbt, count, 0.1, 1e-5)
    y2, _, _ = ops.conv_stats(y1, w2, sc1, sh1, True, [1, 1], [0, 0], [1, 1], 1)
    return ops.bn_add_relu(y2, sc1, sh1, x, None, None, 0, True)


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) sees through the ops (interpreter: opaque custom ops through
    aot_eager; GPU: triton_op kernels through inductor), mutations of the running stats included."""
    backend = "aot_eager" if _common.INTERPRETED else "inductor"
    x = act(1, 4, 5, 5, torch.float32)
    w1 = torch.randn(4, 4, 3, 3, device=DEVICE) / 6
    w2 = torch.randn(4, 4, 1, 1, device=DEVICE) / 2
    state = [torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE),
             torch.tensor(0, device=DEVICE)]
    state_c = [t.clone() for t in state]
    eager = _train_step(x, w1, w2, *state)
    compiled = torch.compile(_train_step, fullgraph=True, backend=backend)(x, w1, w2, *state_c)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(state_c, state, strict=True):
        torch.testing.assert_close(a, b)
    assert int(state_c[2]) == 1


def _sync_bn_step(y, count, rm, rv, nbt, go):
    """SyncBatchNorm's forward finalize and backward on one process (no all-reduce between the
    passes): the count stays a tensor from end to end."""
    ops = torch.ops.fastres_triton
    s, ss = y.sum(dim=(0, 2, 3)), (y * y).sum(dim=(0, 2, 3))
    mean, invstd, scale, shift = ops.bn_finalize_count(s, ss, count, None, None, rm, rv, nbt,
                                                       0.1, 1e-5)
    sum_g, sum_g_xhat = ops.bn_relu_bwd_reduce(go, y, mean, invstd, scale, shift, True)
    gi = ops.bn_relu_bwd_elemt(go, y, mean, invstd, None, scale, shift, True, sum_g / count,
                               sum_g_xhat / count)
    out = ops.bn_add_relu(y, scale, shift, None, None, None, 0, True)
    sums = ops.bn_add_relu_bwd_reduce(go, out, y, mean, invstd, None, None, None)
    gi2, gr = ops.bn_add_relu_bwd_elemt(go, out, y, mean, invstd, None, sums[0] / count,
                                        sums[1] / count, None, None, None, None, None)
    return gi, gi2, gr


def test_torch_compile_fullgraph_sync_bn():
    backend = "aot_eager" if _common.INTERPRETED else "inductor"
    y, go = act(2, 4, 3, 3, torch.float32), act(2, 4, 3, 3, torch.float32)
    count = torch.tensor([18.0], device=DEVICE)
    state = [torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE),
             torch.tensor(0, device=DEVICE)]
    state_c = [t.clone() for t in state]
    eager = _sync_bn_step(y, count, *state, go)
    compiled = torch.compile(_sync_bn_step, fullgraph=True, backend=backend)(y, count, *state_c,
                                                                              go)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(state_c, state, strict=True):
        torch.testing.assert_close(a, b)
    assert int(state_c[2]) == 1


def test_kernels_compile_and_trace_for_hopper_without_gpu():
    """The interpreter accepts code the compiler rejects: compile the bf16 variants of every
    kernel for sm_90 (ptxas bundled with triton; no GPU needed) with the GPU configs, and trace
    every triton_op as torch.compile does, checking that torch's mutation analysis marks only the
    kernels' outputs as written (else torch.compile would clone every input of every call)."""
    from fastres.harness.rule import run_sm90_compiler

    run = run_sm90_compiler(
        ["-m", "fastres.triton_kernels.lint.aot_check", "--quick", "--dtypes", "bfloat16", "--trace"],
        timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert " 0 failures" in run.stdout and "trace: 0 problems" in run.stdout


def _train_kept(model, x):
    """Output, input grad, parameter grads and buffers after one forward/backward."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * proj).sum().backward()
    kept = {"out": out.detach(), "input.grad": x.grad}
    kept.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
    kept.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return kept


@pytest.mark.parametrize("case", ["bottleneck-ds-fp32-nchw", "basic-bf16-nhwc"])
def test_block_through_dispatcher(case, monkeypatch):
    """A torchvision block converted by fastres.convert and trained one step on FASTRES_BACKEND=
    triton: every output, gradient and buffer by the rule against torchvision (float64 reference,
    same-dtype yardstick). This is the path the functional API takes (dispatcher -> ops)."""
    import copy

    import torchvision
    from torch import nn

    import fastres

    monkeypatch.setenv("FASTRES_BACKEND", "triton")
    if case.startswith("bottleneck"):
        ds = nn.Sequential(nn.Conv2d(13, 28, 1, stride=2, bias=False), nn.BatchNorm2d(28))
        tv = torchvision.models.resnet.Bottleneck(13, 7, stride=2, downsample=ds)
        x, dtype, fmt = torch.randn(3, 13, 9, 11), torch.float32, torch.contiguous_format
    else:
        tv = torchvision.models.resnet.BasicBlock(8, 8)
        x, dtype, fmt = torch.randn(2, 8, 6, 6), torch.bfloat16, CL
    for m in tv.modules():  # non-trivial BN state, so that the statistics matter
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    tv = tv.to(DEVICE).train()
    x = x.to(DEVICE)
    ref = _train_kept(copy.deepcopy(tv).double().to(memory_format=fmt),
                      x.double().contiguous(memory_format=fmt))
    theirs = _train_kept(copy.deepcopy(tv).to(dtype).to(memory_format=fmt),
                         x.to(dtype).contiguous(memory_format=fmt))
    ours = _train_kept(fastres.convert(copy.deepcopy(tv)).to(dtype).to(memory_format=fmt),
                       x.to(dtype).contiguous(memory_format=fmt))
    assert ours.keys() == ref.keys()
    for name in ref:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ours[name], ref[name]), name
        else:
            assert_close_rule(name, ours[name], theirs[name], ref[name], dtype)


# ------------------------------------------------------------------------------------------
# Configs (pure Python: the Hopper table is checked here even without a GPU)
# ------------------------------------------------------------------------------------------

RESNET50_CONVS = [  # (M = N*P*Q at N=256, K, C) of ResNet-50's distinct conv shapes
    (256 * 112 * 112, 64, 3), (256 * 56 * 56, 64, 64), (256 * 56 * 56, 256, 64),
    (256 * 28 * 28, 128, 128), (256 * 14 * 14, 256, 256), (256 * 7 * 7, 512, 512),
    (256 * 7 * 7, 2048, 512),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hopper_configs_compile_rules(dtype):
    """Tiles the compiler accepts: powers of two, tl.dot tiles >= 16, fit in 228 KiB of SMEM."""
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    for m, k, c in RESNET50_CONVS:
        for cfg in (_common._gemm_config(m, k, c, dtype, False),
                    _common._gemm_config(m, c, k, dtype, False)):
            assert all(pow2(b) and b >= 16 for b in (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K)), cfg
            smem = cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * dtype.itemsize
            assert smem <= 228 * 1024, cfg
        wc = _common._wgrad_config(k, c, 9, m, dtype, False)
        assert all(pow2(b) and b >= 16 for b in (wc.BLOCK_K, wc.BLOCK_C, wc.BLOCK_M)), wc
        assert wc.SPLIT >= 1
        for live_tiles in (3, 4):
            rc = _common._rows_config(m, k, False, live_tiles)
            assert pow2(rc.BLOCK_M) and pow2(rc.BLOCK_C) and rc.GRID_M >= 1
            assert rc.BLOCK_M * rc.BLOCK_C <= (4096 if live_tiles == 3 else 1024)


# ------------------------------------------------------------------------------------------
# GPU: ResNet-50 shapes, determinism, int64 offsets
# ------------------------------------------------------------------------------------------

# (N, C, H, W, K, kernel, stride, padding) of ResNet-50's convs at batch 32.
R50_GPU = [
    pytest.param((32, 3, 224, 224, 64, 7, 2, 3), id="stem"),
    pytest.param((32, 256, 56, 56, 64, 1, 1, 0), id="l1-reduce"),
    pytest.param((32, 64, 56, 56, 64, 3, 1, 1), id="l1-3x3"),
    pytest.param((32, 128, 56, 56, 128, 3, 2, 1), id="l2-3x3s2"),
    pytest.param((32, 256, 56, 56, 512, 1, 2, 0), id="l2-down"),
    pytest.param((32, 512, 7, 7, 2048, 1, 1, 0), id="l4-expand"),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("geom", R50_GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_resnet50_shapes(geom, dtype):
    n, c, h, w, k, ks, stride, pad = geom
    x = act(n, c, h, w, dtype)
    wt = (torch.randn(k, c, ks, ks, device=DEVICE) / (c * ks * ks) ** 0.5).to(dtype)
    wt = wt.contiguous(memory_format=CL)
    st, pd, dl = [stride, stride], [pad, pad], [1, 1]
    out, s, _ = check("conv_stats", (x, wt, vec(c, 0.5, 1.5), vec(c), True, st, pd, dl, 1), dtype)
    res = act(*out.shape, dtype)
    check("conv_bias_act", (x, wt, vec(k).to(dtype), res, st, pd, dl, 1, True), dtype)
    go = act(*out.shape, dtype)
    check("conv_bwd", (go, x, wt, vec(c, 0.5, 1.5), vec(c), True, st, pd, dl, 1, [True, True]),
          dtype)
    mean, invstd = _stats(out)
    check("bn_add_relu_bwd", (go, out, out, mean, invstd, vec(k), None, None, None, None), dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_statistics_bitwise_reproducible():
    dtype = torch.bfloat16
    x = act(64, 64, 56, 56, dtype)
    w = (torch.randn(64, 64, 3, 3, device=DEVICE) / 24).to(dtype).contiguous(memory_format=CL)
    sc, sh = vec(64, 0.5, 1.5), vec(64)
    first = OPS.conv_stats(x, w, sc, sh, True, [1, 1], [1, 1], [1, 1], 1)
    go = act(64, 64, 56, 56, dtype)
    mean, invstd = _stats(first[0])
    bwd1 = OPS.bn_add_relu_bwd(go, first[0], first[0], mean, invstd, None, None, None, None, None)
    gw1 = OPS.conv_bwd(go, x, w, sc, sh, True, [1, 1], [1, 1], [1, 1], 1, [False, True])[1]
    for _ in range(3):
        again = OPS.conv_stats(x, w, sc, sh, True, [1, 1], [1, 1], [1, 1], 1)
        assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
        bwd = OPS.bn_add_relu_bwd(go, first[0], first[0], mean, invstd, None, None, None, None,
                                  None)
        assert torch.equal(bwd[1], bwd1[1]) and torch.equal(bwd[2], bwd1[2])
        assert torch.equal(OPS.conv_bwd(go, x, w, sc, sh, True, [1, 1], [1, 1], [1, 1], 1,
                                        [False, True])[1], gw1)


@pytest.mark.gpu
@needs_cuda
def test_gpu_int64_offsets():
    """More than 2^31 elements: a 1x1 conv and bn_add_relu over (33, 64, 1024, 1024) bf16 (4.4 GB
    per tensor); the last image, past element 2^31, is checked against the reference."""
    dtype = torch.bfloat16
    n, c, h, w = 33, 64, 1024, 1024
    assert n * c * h * w > 2**31
    x = act(n, c, h, w, dtype)
    wt = (torch.randn(c, c, 1, 1, device=DEVICE) / 8).to(dtype)
    out = OPS.conv_bias_act(x, wt, None, None, [1, 1], [0, 0], [1, 1], 1, True)
    ref = reference.conv_bias_act(x[-1:], wt, None, None, [1, 1], [0, 0], [1, 1], 1, True)
    hi = reference.conv_bias_act(x[-1:].double(), wt.double(), None, None, [1, 1], [0, 0],
                                 [1, 1], 1, True)
    assert_close_rule("conv_bias_act[last]", out[-1:], ref, hi, dtype)
    del out
    sc, sh = vec(c, 0.5, 1.5), vec(c)
    y = OPS.bn_add_relu(x, sc, sh, None, None, None, 0, True)
    ref = reference.bn_add_relu(x[-1:], sc, sh, None, None, None, 0, True)
    hi = reference.bn_add_relu(x[-1:].double(), sc.double(), sh.double(), None, None, None, 0,
                               True)
    assert_close_rule("bn_add_relu[last]", y[-1:], ref, hi, dtype)
