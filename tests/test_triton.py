"""The Triton backend (fastres.triton_kernels): what only it has. Its numerics against float64 on
every case of the op table are tests/test_ops.py's (``triton`` backend); the TF32 path is
tests/test_triton_tf32.py's, the GPU-only checks tests/test_triton_gpu.py's.

Here: every op again with small tiles (several programs per reduction, split-K weight gradients,
masked tile edges, grouped ordering on tiny shapes), the stem's channel padding, the empty batch,
bitwise claims (bn_finalize_count against bn_finalize, the SyncBatchNorm split against the one-op
backwards), error messages, the registration against the contract, dispatch reasons, a machine
without triton, opcheck, torch.compile, the sm_90 compile, a block through the dispatcher, and
the Hopper tile configs. Without a GPU the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported): shapes are tiny.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from op_cases import CASES
from op_cases_bn import RUNNING, finalize_args
from op_check import Maker, check, device_of

from fastres import backends, reference
from fastres.harness.rule import assert_close_rule

tk = pytest.importorskip("fastres.triton_kernels")
_WHY = tk.unavailable_reason()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"triton kernels unavailable: {_WHY}")

if _WHY is None:
    from fastres.triton_kernels import _common, bn, conv, reduce

    OPS = tk.ops()
else:  # pragma: no cover
    OPS = None
DEVICE = device_of("triton").type
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CL = torch.channels_last


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



# The op table's odd geometries (tests/op_cases.py, family "geom") with small tiles; the default
# tiles run them in tests/test_ops.py. The stem's 49 taps under 16-wide tiles cost ~150
# interpreted programs for nothing the other geometries do not cover: its weight gradient is
# left out.
SMALL_TILE_CASES = [
    pytest.param(c, id=c.id) for c in CASES
    if c.family == "geom" and (c.op != "conv_bwd" or (c.dtype == torch.bfloat16
                                                      and "7x7" not in c.geometry.id))
]


@pytest.mark.parametrize("case", SMALL_TILE_CASES)
@pytest.mark.parametrize("tiles", ["small"], indirect=True)
def test_geometry_small_tiles(case, tiles):
    for args, mutated in case.calls(Maker("triton", case.dtype, case.layout)):
        check("triton", case.op, args, case.dtype, mutated)


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


def test_bn_finalize_errors():
    s = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="more than 1 value"):
        OPS.bn_finalize(s, s, None, None, None, None, None, 1, 0.1, 1e-5)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        OPS.bn_finalize(s, s, None, None, s.clone(), s.clone(), None, 4, None, 1e-5)


def test_bn_add_relu_tiles(tiles):
    dtype = torch.bfloat16
    x = act(2, 37, 5, 7, dtype, channels_last=False)
    res = act(2, 37, 5, 7, dtype)
    check("triton", "bn_add_relu", (x, vec(37, 0.5, 1.5), vec(37), res, vec(37), vec(37), 0, True),
          dtype)


def _stats(x):
    xf = x.double()
    mean = xf.mean(dim=(0, 2, 3))
    var = xf.var(dim=(0, 2, 3), unbiased=False)
    return mean.float(), torch.rsqrt(var + 1e-5).float()


def test_bn_bwd_tiles(tiles):
    """Several programs per reduction and partial rows summed in blocks (small tiles)."""
    dtype = torch.float32
    n, c, h, w = 2, 37, 5, 7
    x = act(n, c, h, w, dtype)
    mean, invstd = _stats(x)
    rx = act(n, c, h, w, dtype)
    rmean, rinvstd = _stats(rx)
    go, out = act(n, c, h, w, dtype), act(n, c, h, w, dtype)
    check("triton", "bn_add_relu_bwd",
          (go, out, x, mean, invstd, vec(c), rx, rmean, rinvstd, vec(c)), dtype)
    scale, shift = invstd, -mean * invstd
    check("triton", "bn_relu_bwd", (go, x, mean, invstd, None, scale, shift, True), dtype)
    check("triton", "relu_bias_bwd", (go, out), dtype)


# ------------------------------------------------------------------------------------------
# SyncBatchNorm's split: bn_finalize_count, bn_*_bwd_reduce and bn_*_bwd_elemt
# ------------------------------------------------------------------------------------------



@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("running", RUNNING)
def test_bn_finalize_count_equals_bn_finalize(affine, running):
    """bn_finalize with the count read from a one-element tensor is bitwise bn_finalize given the
    same count as an int (the kernel rounds 1/count and count/(count-1) to float32 as the host
    does), running stats included. (Against the reference: tests/test_ops.py.)"""
    m = Maker("triton", torch.float32)
    s, ss, weight, bias, rm, rv, nbt, count, momentum = finalize_args(m, affine, running)
    n = torch.tensor([float(count)], device=DEVICE)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
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
        ["-m", "fastres.triton_kernels.lint.aot_check", "--quick", "--dtypes", "bfloat16",
         "--trace"], timeout=600)
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


