"""The C++ CPU ops (csrc/cpu) against fastres.reference, with the suite's tolerance rule.

Every case compares torch.ops.fastres.<op> on CPU tensors with reference.<op> run twice: on
float64 copies (the truth) and at the case's dtype (PyTorch's own error, the yardstick of
fastres.harness.rule.assert_close_rule). Dtypes and conv geometries come from the CPU backend's
capabilities (fastres.backends). Also: opcheck on every op, BatchNorm's running statistics,
bad-input messages, bitwise determinism, OpenMP parallelism, and the kernels of every
instruction set this CPU can run.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from fastres import backends, reference
from fastres.backends import extension
from fastres.harness.rule import assert_close_rule

_mod, _why = extension.load()
if _mod is None:  # a test module for compiled ops has nothing to say without them: fail loudly
    raise ImportError(_why)

ops = torch.ops.fastres
CPU = backends.BACKENDS["cpu"]
DTYPES = [
    d for d in CPU.dtypes if not CPU.not_supported_reasons(backends.Inputs(torch.device("cpu"), d))
]
LOW_DTYPES = [d for d in DTYPES if d != torch.float64]
LAYOUTS = ["contiguous", "channels_last"]

# (kernel, stride, padding, dilation, groups): 1x1, 3x3 and the 7x7/2 stem, stride 1 and 2 in every
# dtype and layout; dilated and grouped convolutions (which only the CPU and reference backends
# serve) in float32 and float64.
_CORE_GEOMETRIES = [
    (1, 1, 0, 1, 1),
    (1, 2, 0, 1, 1),
    (3, 1, 1, 1, 1),
    (3, 2, 1, 1, 1),
    (7, 2, 3, 1, 1),
]
_EXTRA_GEOMETRIES = [(3, 1, 2, 2, 1), (3, 1, 1, 1, 3)]


def _gid(g):
    k, s, p, d, grp = g
    return f"{k}x{k}s{s}p{p}" + (f"d{d}" if d > 1 else "") + (f"g{grp}" if grp > 1 else "")


def _conv_cases():
    """(geometry, dtype, layout) for every combination the CPU backend says it serves."""
    cases = []
    for geom, dtype, layout in itertools.product(
        _CORE_GEOMETRIES + _EXTRA_GEOMETRIES, DTYPES, LAYOUTS
    ):
        k, s, p, d, g = geom
        if geom in _EXTRA_GEOMETRIES and dtype not in (torch.float32, torch.float64):
            continue
        inputs = backends.Inputs(
            torch.device("cpu"),
            dtype,
            kernel_size=(k, k),
            stride=(s, s),
            dilation=(d, d),
            groups=g,
            channels_last=layout == "channels_last",
        )
        if not CPU.not_supported_reasons(inputs):
            cases.append(pytest.param(geom, dtype, layout, id=f"{_gid(geom)}-{dtype}-{layout}"))
    return cases


CONV_CASES = _conv_cases()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The reference comparisons run on one thread: their shapes are small (fastres' kernels run
    them serially anyway), and OpenMP fork/join on a busy 2-core machine costs milliseconds per
    oneDNN call. The multi-threaded paths are checked below on larger shapes, bitwise against
    one thread (test_deterministic_across_runs_and_thread_counts)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_THREADS)


@pytest.fixture
def all_threads():
    torch.set_num_threads(_THREADS)
    yield _THREADS
    torch.set_num_threads(1)


def _acc(dtype):
    return reference.acc_dtype(dtype)


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _act(shape, dtype, layout, lo=None):
    t = torch.randn(shape, dtype=torch.float64)
    if lo is not None:
        t = t.clamp_min(lo)
    return _layout(t.to(dtype), layout)


def _vec(c, dtype, positive=False):
    v = (
        torch.rand(c, dtype=torch.float64) + 0.5
        if positive
        else torch.randn(c, dtype=torch.float64)
    )
    return v.to(_acc(dtype))


def _f64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


def _check(name, ours, fn, args, dtype, strides_of=None):
    """ours vs fn(*args) (PyTorch at dtype) vs fn(*float64 args) (the truth), output by output.

    The strides of 4-D outputs (those listed in strides_of, default all) must match the
    reference's: both follow the input's memory format, as the fakes do."""
    theirs = fn(*args)
    truth = fn(*[_f64(a) for a in args])
    if isinstance(ours, torch.Tensor):
        ours, theirs, truth = (ours,), (theirs,), (truth,)
    assert len(ours) == len(theirs)
    for i, (o, t, r) in enumerate(zip(ours, theirs, truth, strict=True)):
        assert o.dtype == t.dtype, f"{name}[{i}]: dtype {o.dtype} != reference {t.dtype}"
        assert o.shape == t.shape, f"{name}[{i}]: shape {tuple(o.shape)} != {tuple(t.shape)}"
        if o.dim() == 4 and (strides_of is None or i in strides_of):
            assert o.stride() == t.stride(), f"{name}[{i}]: strides {o.stride()} != {t.stride()}"
        assert_close_rule(f"{name}[{i}]", o, t, r, dtype)


def _conv_shapes(geom, n=2, c=6, k=7, h=9, w=11):
    ks, s, p, d, g = geom
    c, k = (c + g - 1) // g * g, (k + g - 1) // g * g  # divisible by groups
    return (n, c, h, w), (k, c // g, ks, ks), [s, s], [p, p], [d, d], g


# ----------------------------------------------------------------------------------------------
# conv_bias_act


@pytest.mark.parametrize("geom,dtype,layout", CONV_CASES)
def test_conv_bias_act(geom, dtype, layout):
    xs, ws, stride, pad, dil, groups = _conv_shapes(geom)
    x = _act(xs, dtype, layout)
    w = (torch.randn(ws, dtype=torch.float64) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(dtype)
    k = ws[0]
    y_shape = reference.conv_bias_act(x, w, None, None, stride, pad, dil, groups, False).shape
    # every option with and without: the oneDNN unary (bias+ReLU) and binary (bias+add+ReLU)
    # paths, the epilogue pass after the convolution, a strided residual view
    for has_bias, res_kind, relu in [
        (False, None, False),
        (True, None, True),
        (False, "dense", False),
        (True, "dense", True),
        (True, "strided", True),
    ]:
        bias = torch.randn(k, dtype=torch.float64).to(dtype) if has_bias else None
        res = None
        if res_kind == "dense":
            res = _act(y_shape, dtype, layout)
        elif res_kind == "strided":  # a view: every other column of a wider tensor
            n_, k_, h_, w_ = y_shape
            res = _act((n_, k_, h_, 2 * w_), dtype, layout)[:, :, :, ::2]
        args = (x, w, bias, res, stride, pad, dil, groups, relu)
        _check(
            f"conv_bias_act bias={has_bias} res={res_kind} relu={relu}",
            ops.conv_bias_act(*args),
            reference.conv_bias_act,
            args,
            dtype,
        )


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_conv_bias_act_acc_dtype_bias(dtype):
    """A folded-BN bias may come in the accumulation dtype (float32) with low-precision weights."""
    x = _act((2, 16, 8, 8), dtype, "channels_last")
    w = (torch.randn(16, 16, 3, 3) / 12).to(dtype)
    bias = torch.randn(16)
    res = _act((2, 16, 8, 8), dtype, "channels_last")
    args = (x, w, bias, res, [1, 1], [1, 1], [1, 1], 1, True)
    _check(
        "conv_bias_act fp32 bias", ops.conv_bias_act(*args), reference.conv_bias_act, args, dtype
    )


def test_conv_bias_act_mixed_formats():
    """Input contiguous, residual channels_last (and vice versa): out follows the input."""
    for in_layout, res_layout in [("contiguous", "channels_last"), ("channels_last", "contiguous")]:
        x = _act((2, 8, 7, 7), torch.float32, in_layout)
        w = torch.randn(12, 8, 1, 1)
        res = _act((2, 12, 7, 7), torch.float32, res_layout)
        args = (x, w, torch.randn(12), res, [1, 1], [0, 0], [1, 1], 1, True)
        _check(
            f"conv_bias_act {in_layout}/{res_layout}",
            ops.conv_bias_act(*args),
            reference.conv_bias_act,
            args,
            torch.float32,
        )


def test_conv_bias_act_weight_cache_follows_the_weight():
    """The prepacked-weight cache (channels_last inference) sees in-place updates, new weights
    and dead weights; inference tensors are not cached; a tensor not allowed is not cached, a
    parameter included (a torch.compile buffer may be rewritten without a version bump, a
    parameter through .data)."""
    cache_size, cache_clear = (
        torch.ops.fastres_cpu.weight_cache_size,
        torch.ops.fastres_cpu.weight_cache_clear,
    )
    cache_clear()
    x = _act((2, 16, 7, 7), torch.float32, "channels_last")
    conv = ([1, 1], [1, 1], [1, 1], 1)

    def run(w):
        b = torch.linspace(-1, 1, w.shape[0])
        args = (x, w, b, None, *conv, True)
        _check(
            "conv_bias_act cached",
            ops.conv_bias_act(*args),
            reference.conv_bias_act,
            args,
            torch.float32,
        )

    plain = torch.randn(8, 16, 3, 3) / 12
    run(plain)
    run(plain)
    assert cache_size() == 0
    # Inductor's buffer reuse as a cache sees it: new values, same impl, pointer and version.
    plain.numpy()[:] *= -1
    run(plain)
    w = torch.randn(8, 16, 3, 3) / 12
    torch.ops.fastres_cpu.weight_cache_allow(w)
    run(w)
    run(w)
    packed = cache_size()
    if packed == 0:
        pytest.skip("no oneDNN weight prepacking in this build (FASTRES_CPU_WEIGHT_CACHE=0?)")
    assert packed == 1
    with torch.no_grad():
        w.mul_(-2)  # an optimizer step / load_state_dict: the version counter moves
    run(w)
    w.data = torch.randn(8, 16, 3, 3) / 12  # new storage
    run(w)
    for _ in range(3):  # weights that die right away are evicted, not accumulated
        run(torch.randn(8, 16, 3, 3) / 12)
    assert cache_size() <= 3
    with torch.inference_mode():
        wi = torch.randn(8, 16, 3, 3) / 12
    before = cache_size()
    run(wi)
    assert cache_size() <= before
    # A parameter is not cached unasked: a write through .data leaves its version alone.
    p = torch.nn.Parameter(torch.randn(8, 16, 3, 3) / 12)
    with torch.no_grad():
        before = cache_size()
        run(p)
        assert cache_size() == before
        p.data.mul_(-1)
        run(p)
    cache_clear()
    assert cache_size() == 0


# ----------------------------------------------------------------------------------------------
# relu_bias_bwd


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_bias_bwd(dtype, layout):
    shape = (3, 37, 7, 9)  # 37 channels: two full AVX-512 vectors and a tail
    go = _act(shape, dtype, layout)
    for out in [None, _act(shape, dtype, layout), _act(shape, dtype, "channels_last")]:
        args = (go, out)
        _check(
            f"relu_bias_bwd out={'none' if out is None else 'given'}",
            ops.relu_bias_bwd(*args),
            reference.relu_bias_bwd,
            args,
            dtype,
        )


# ----------------------------------------------------------------------------------------------
# conv_stats

PROLOGUES = {
    "none": (False, False, False),
    "scale": (True, False, False),
    "shift": (False, True, False),
    "relu": (False, False, True),
    "bn_relu": (True, True, True),
}


@pytest.mark.parametrize("geom,dtype,layout", CONV_CASES)
def test_conv_stats(geom, dtype, layout):
    xs, ws, stride, pad, dil, groups = _conv_shapes(geom, c=10, k=19)
    x = _act(xs, dtype, layout)
    w = (torch.randn(ws, dtype=torch.float64) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(dtype)
    c = xs[1]
    for name, (has_scale, has_shift, relu) in PROLOGUES.items():
        scale = _vec(c, dtype, positive=True) if has_scale else None
        shift = _vec(c, dtype) if has_shift else None
        args = (x, w, scale, shift, relu, stride, pad, dil, groups)
        _check(
            f"conv_stats prologue={name}", ops.conv_stats(*args), reference.conv_stats, args, dtype
        )


# ----------------------------------------------------------------------------------------------
# bn_finalize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("affine", [False, True])
def test_bn_finalize_outputs(dtype, affine):
    c, count = 13, 50
    x = torch.randn(count, c, dtype=torch.float64) * 3 + 1
    s, ss = x.sum(0).to(dtype), (x * x).sum(0).to(dtype)
    weight, bias = (_vec(c, dtype), _vec(c, dtype)) if affine else (None, None)
    args = (s, ss, weight, bias, None, None, None, count, 0.1, 1e-5)
    _check("bn_finalize", ops.bn_finalize(*args), reference.bn_finalize, args, dtype)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bn_finalize_running_stats_match_batchnorm(momentum, dtype):
    """Three training steps of nn.BatchNorm2d and of bn_finalize on the same batches."""
    c = 11
    bn = torch.nn.BatchNorm2d(c, momentum=momentum, eps=1e-3).to(dtype).train()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(4, c, 5, 3, dtype=dtype) * (step + 1) + step
            y = bn(x)
            xd = x.double()
            s = xd.sum(dim=(0, 2, 3)).to(dtype)
            ss = (xd * xd).sum(dim=(0, 2, 3)).to(dtype)
            mean, invstd, scale, shift = ops.bn_finalize(
                s, ss, bn.weight, bn.bias, rm, rv, nbt, x.numel() // c, momentum, bn.eps
            )
            ours = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(ours, y, atol=tol, rtol=tol)
            torch.testing.assert_close(rm, bn.running_mean, atol=tol, rtol=tol)
            torch.testing.assert_close(rv, bn.running_var, atol=tol, rtol=tol)
            assert nbt.dtype == torch.long and int(nbt) == int(bn.num_batches_tracked) == step + 1


def test_bn_finalize_partial_updates():
    """Only num_batches_tracked; only running_var; momentum=0 leaves the stats alone."""
    s, ss = torch.tensor([2.0, 4.0]), torch.tensor([6.0, 20.0])
    nbt = torch.tensor(5)
    ops.bn_finalize(s, ss, None, None, None, None, nbt, 4, 0.1, 1e-5)
    assert int(nbt) == 6
    rv = torch.ones(2)
    ops.bn_finalize(s, ss, None, None, None, rv, None, 4, 1.0, 1e-5)
    var = ss / 4 - (s / 4) ** 2
    torch.testing.assert_close(rv, var * 4 / 3)
    rm = torch.full((2,), 7.0)
    ops.bn_finalize(s, ss, None, None, rm, None, None, 4, 0.0, 1e-5)
    assert torch.equal(rm, torch.full((2,), 7.0))


# ----------------------------------------------------------------------------------------------
# bn_add_relu


def _residuals(shape, dtype, layout):
    n, c, h, w = shape
    wide = _act((n, c, 2 * h, 2 * w), dtype, layout)
    return {
        "none": (None, 0),
        "dense": (_act(shape, dtype, layout), 0),
        "other_format": (
            _act(shape, dtype, "contiguous" if layout != "contiguous" else "channels_last"),
            0,
        ),
        "strided": (wide[:, :, ::2, ::2], 0),  # the option-A subsample x[:, :, ::2, ::2]
        "fewer_channels": (_act((n, c - 6, h, w), dtype, layout), 3),
        "fewer_strided": (wide[:, 1 : c - 4, ::2, ::2], 4),
        "channel_strided": (wide[:, ::2, :h, :w][:, : (c + 1) // 2], 1),
        "expanded": (torch.randn(1, c, 1, 1).to(dtype).expand(n, c, h, w), 0),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_add_relu(dtype, layout):
    shape = (2, 37, 5, 7)
    x = _act(shape, dtype, layout)
    scale, shift = _vec(37, dtype, positive=True), _vec(37, dtype)
    for (res_name, (res, off)), affine, relu in itertools.product(
        _residuals(shape, dtype, layout).items(), ["none", "scale", "shift", "both"], [False, True]
    ):
        if res is None and affine != "none":
            continue
        cr = 0 if res is None else res.shape[1]
        rs = _vec(cr, dtype, positive=True) if affine in ("scale", "both") else None
        rb = _vec(cr, dtype) if affine in ("shift", "both") else None
        args = (x, scale, shift, res, rs, rb, off, relu)
        _check(
            f"bn_add_relu res={res_name} affine={affine} relu={relu}",
            ops.bn_add_relu(*args),
            reference.bn_add_relu,
            args,
            dtype,
        )


def test_bn_add_relu_option_a_shortcut():
    """The CIFAR option-A shortcut of reference.option_a_shortcut through res_channel_offset."""
    for layout in LAYOUTS:
        x = _act((2, 16, 8, 8), torch.float32, layout)
        y = _act((2, 32, 4, 4), torch.float32, layout)
        scale, shift = _vec(32, torch.float32, positive=True), _vec(32, torch.float32)
        ours = ops.bn_add_relu(y, scale, shift, x[:, :, ::2, ::2], None, None, 8, True)
        expect = torch.relu(
            y * scale.view(1, -1, 1, 1)
            + shift.view(1, -1, 1, 1)
            + reference.option_a_shortcut(x, 32, 2)
        )
        torch.testing.assert_close(ours, expect, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# bn_add_relu_bwd and bn_relu_bwd


def test_bn_add_relu_bwd_mixed_formats():
    """grad_out contiguous, input channels_last: each output follows its own reference tensor."""
    shape = (2, 24, 6, 6)
    go = _act(shape, torch.float32, "contiguous")
    out, x = (
        _act(shape, torch.float32, "channels_last"),
        _act(shape, torch.float32, "channels_last"),
    )
    args = (
        go,
        out,
        x,
        _vec(24, torch.float32),
        _vec(24, torch.float32, positive=True),
        None,
        None,
        None,
        None,
        None,
    )
    _check(
        "bn_add_relu_bwd mixed",
        ops.bn_add_relu_bwd(*args),
        reference.bn_add_relu_bwd,
        args,
        torch.float32,
    )


def test_bn_relu_bwd_mask_rounds_like_reference():
    """The ReLU mask is taken after rounding x*scale+shift to the activations' dtype: float16
    rounds values up to 2^-25 to zero (masked out), larger ones to 2^-24 (kept)."""
    c = 5
    x = torch.zeros(1, c, 2, 2, dtype=torch.float16)
    shift = torch.tensor([2.0**-26, 2.0**-25, 1.5 * 2.0**-25, 2.0**-24, -(2.0**-30)])
    go = torch.ones(1, c, 2, 2, dtype=torch.float16)
    args = (go, x, torch.zeros(c), torch.ones(c), None, torch.ones(c), shift, True)
    ours, theirs = ops.bn_relu_bwd(*args), reference.bn_relu_bwd(*args)
    assert ours[2].tolist() == [0.0, 0.0, 4.0, 4.0, 0.0]  # grad_bias: the mask per channel
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# conv_bwd


@pytest.mark.parametrize("geom,dtype,layout", CONV_CASES)
def test_conv_bwd(geom, dtype, layout):
    xs, ws, stride, pad, dil, groups = _conv_shapes(geom, c=10, k=9)
    x = _act(xs, dtype, layout)
    w = (torch.randn(ws, dtype=torch.float64) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(dtype)
    y_shape = reference.conv_bias_act(x, w, None, None, stride, pad, dil, groups, False).shape
    go = _act(y_shape, dtype, layout)
    c = xs[1]
    for (name, (has_scale, has_shift, relu)), mask in itertools.product(
        PROLOGUES.items(), [[True, True], [True, False], [False, True]]
    ):
        if mask != [True, True] and name != "bn_relu":
            continue
        scale = _vec(c, dtype, positive=True) if has_scale else None
        shift = _vec(c, dtype) if has_shift else None
        args = (go, x, w, scale, shift, relu, stride, pad, dil, groups, mask)
        # grad_weight's strides: the weight's (fake: empty_like(weight)); the reference returns
        # whatever convolution_backward picked, so only grad_input's strides are compared.
        _check(
            f"conv_bwd prologue={name} mask={mask}",
            ops.conv_bwd(*args),
            reference.conv_bwd,
            args,
            dtype,
            strides_of=(0,),
        )


def test_conv_bwd_channels_last_weight():
    """grad_weight takes the weight's own strides (torch.empty_like in the fake)."""
    x = _act((2, 8, 6, 6), torch.float32, "contiguous")
    w = torch.randn(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    go = torch.randn(2, 4, 6, 6)
    gi, gw = ops.conv_bwd(go, x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1, [True, True])
    assert gw.stride() == w.stride()
    _, gw_ref = reference.conv_bwd(
        go, x, w, None, None, False, [1, 1], [1, 1], [1, 1], 1, [True, True]
    )
    torch.testing.assert_close(gw, gw_ref)


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm's split ops: each against the reference, and reduce -> mean -> elemt against the
# single-process op it splits.


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_add_relu_bwd(dtype, layout):
    """The one-op backward and its SyncBatchNorm split (reduce, elemt) against the reference,
    and reduce -> mean -> elemt against the one-op backward."""
    shape = (3, 21, 7, 5)
    c, count = shape[1], shape[0] * shape[2] * shape[3]
    go, out = _act(shape, dtype, layout), _act(shape, dtype, layout)
    x, x2 = _act(shape, dtype, layout), _act(shape, dtype, layout)
    for has_out, res, has_w in itertools.product(
        [False, True], ["identity", "bn", "bn_noweight"], [False, True]
    ):
        mean, invstd = _vec(c, dtype), _vec(c, dtype, positive=True)
        weight = _vec(c, dtype) if has_w else None
        o = out if has_out else None
        name = f"out={has_out} res={res} weight={has_w}"
        if res == "identity":
            r = (None, None, None)
            rw = None
        else:
            r = (x2, _vec(c, dtype), _vec(c, dtype, positive=True))
            rw = _vec(c, dtype) if res == "bn" else None
        args = (go, o, x, mean, invstd, *r)
        sums = ops.bn_add_relu_bwd_reduce(*args)
        _check(f"reduce {name}", sums, reference.bn_add_relu_bwd_reduce, args, dtype)
        # elemt with arbitrary means: every term of the formula is exercised on its own
        mg, mgx, rmgx = _vec(c, dtype), _vec(c, dtype), _vec(c, dtype)
        args = (go, o, x, mean, invstd, weight, mg, mgx, *r, rw, rmgx if r[0] is not None else None)
        _check(
            f"elemt {name}",
            ops.bn_add_relu_bwd_elemt(*args),
            reference.bn_add_relu_bwd_elemt,
            args,
            dtype,
        )
        # the chain equals the one-op backward: the sums bitwise (same kernel), the gradients
        # up to the rounding of the means to the accumulation dtype
        args = (go, o, x, mean, invstd, weight, *r, rw)
        full = ops.bn_add_relu_bwd(*args)
        _check(name, full, reference.bn_add_relu_bwd, args, dtype)
        means = [v / count if v.numel() else None for v in sums]
        gi, gr = ops.bn_add_relu_bwd_elemt(
            go, o, x, mean, invstd, weight, means[0], means[1], *r, rw, means[2]
        )
        torch.testing.assert_close(gi, full[0])
        torch.testing.assert_close(gr, full[3])
        torch.testing.assert_close(sums[1], full[1], rtol=0, atol=0)
        torch.testing.assert_close(sums[0], full[2], rtol=0, atol=0)
        if r[0] is not None:
            torch.testing.assert_close(sums[2], full[4], rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_relu_bwd(dtype, layout):
    """As test_bn_add_relu_bwd, for the prologue BatchNorm + ReLU."""
    shape = (2, 37, 6, 5)
    c, count = shape[1], shape[0] * shape[2] * shape[3]
    go, x = _act(shape, dtype, layout), _act(shape, dtype, layout)
    for relu, has_w in itertools.product([False, True], [False, True]):
        mean, invstd = _vec(c, dtype), _vec(c, dtype, positive=True)
        weight = _vec(c, dtype) if has_w else None
        scale, shift = _vec(c, dtype), _vec(c, dtype)
        name = f"relu={relu} weight={has_w}"
        args = (go, x, mean, invstd, scale, shift, relu)
        sums = ops.bn_relu_bwd_reduce(*args)
        _check(f"reduce {name}", sums, reference.bn_relu_bwd_reduce, args, dtype)
        mg, mgx = _vec(c, dtype), _vec(c, dtype)
        args = (go, x, mean, invstd, weight, scale, shift, relu, mg, mgx)
        _check(
            f"elemt {name}", ops.bn_relu_bwd_elemt(*args), reference.bn_relu_bwd_elemt, args, dtype
        )
        args = (go, x, mean, invstd, weight, scale, shift, relu)
        full = ops.bn_relu_bwd(*args)
        _check(name, full, reference.bn_relu_bwd, args, dtype)
        gi = ops.bn_relu_bwd_elemt(
            go, x, mean, invstd, weight, scale, shift, relu, sums[0] / count, sums[1] / count
        )
        torch.testing.assert_close(gi, full[0])
        torch.testing.assert_close(sums[1], full[1], rtol=0, atol=0)
        torch.testing.assert_close(sums[0], full[2], rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bn_finalize_count_matches_bn_finalize(momentum, dtype):
    c, count = 9, 40
    x = torch.randn(count, c, dtype=torch.float64) * 2 - 1
    s, ss = x.sum(0).to(dtype), (x * x).sum(0).to(dtype)
    w, b = _vec(c, dtype), _vec(c, dtype)
    state = [torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), torch.tensor(3)]
    twin = [t.clone() for t in state]
    ours = ops.bn_finalize_count(
        s, ss, torch.tensor([float(count)], dtype=dtype), w, b, *state, momentum, 1e-5
    )
    theirs = ops.bn_finalize(s, ss, w, b, *twin, count, momentum, 1e-5)
    for o, t in zip([*ours, *state], [*theirs, *twin], strict=True):
        torch.testing.assert_close(o, t, rtol=0, atol=0)
    args = (s, ss, torch.tensor(float(count), dtype=dtype), w, b, None, None, None, 0.1, 1e-5)
    _check(
        "bn_finalize_count", ops.bn_finalize_count(*args), reference.bn_finalize_count, args, dtype
    )


def test_split_ops_bad_input():
    s = torch.ones(3)
    with pytest.raises(RuntimeError, match="count must be one floating-point value"):
        ops.bn_finalize_count(s, s, torch.tensor([4, 4]), None, None, None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel when training, got 1"):
        ops.bn_finalize_count(s, s, torch.tensor(1.0), None, None, None, None, None, 0.1, 1e-5)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="res_input needs res_mean_g_xhat"):
        ops.bn_add_relu_bwd_elemt(x, None, x, s, s, None, s, s, x, s, s, None, None)
    with pytest.raises(RuntimeError, match="mean_g must be 1-D with 3 elements"):
        ops.bn_relu_bwd_elemt(x, x, s, s, None, s, s, True, torch.ones(4), s)


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels (shapes, dtypes, strides), autograd registration, AOT dispatch.


def _opcheck_cases(dtype, layout):
    acc = _acc(dtype)

    def act(*shape):
        return _act(shape, dtype, layout)

    def vec(c, positive=False):
        return _vec(c, dtype, positive)

    x, w = act(2, 5, 6, 7), torch.randn(4, 5, 3, 3, dtype=dtype)
    y = act(2, 4, 3, 4)
    conv = ([2, 2], [1, 1], [1, 1], 1)
    count = 2 * 6 * 7
    return {
        "conv_bias_act": (x, w, torch.randn(4, dtype=dtype), y, *conv, True),
        "relu_bias_bwd": (act(2, 5, 6, 7), act(2, 5, 6, 7)),
        "conv_stats": (x, w, vec(5, True), vec(5), True, *conv),
        "bn_finalize": (
            vec(5, True) * count,
            vec(5, True) * count * 2,
            vec(5),
            vec(5),
            torch.zeros(5, dtype=acc),
            torch.ones(5, dtype=acc),
            torch.tensor(0),
            count,
            None,
            1e-5,
        ),
        "bn_add_relu": (
            x,
            vec(5),
            vec(5),
            act(2, 8, 12, 14)[:, :3, ::2, ::2],
            vec(3),
            vec(3),
            1,
            True,
        ),
        "bn_add_relu_bwd": (
            x,
            act(2, 5, 6, 7),
            act(2, 5, 6, 7),
            vec(5),
            vec(5, True),
            vec(5),
            act(2, 5, 6, 7),
            vec(5),
            vec(5, True),
            None,
        ),
        "bn_relu_bwd": (x, act(2, 5, 6, 7), vec(5), vec(5, True), vec(5), vec(5), vec(5), True),
        "conv_bwd": (y, x, w, vec(5, True), vec(5), True, *conv, [True, True]),
        "bn_finalize_count": (
            vec(5, True) * count,
            vec(5, True) * count * 2,
            torch.tensor([float(count)], dtype=acc),
            vec(5),
            vec(5),
            torch.zeros(5, dtype=acc),
            torch.ones(5, dtype=acc),
            torch.tensor(0),
            0.1,
            1e-5,
        ),
        "bn_add_relu_bwd_reduce": (
            x,
            act(2, 5, 6, 7),
            act(2, 5, 6, 7),
            vec(5),
            vec(5, True),
            act(2, 5, 6, 7),
            vec(5),
            vec(5, True),
        ),
        "bn_add_relu_bwd_elemt": (
            x,
            act(2, 5, 6, 7),
            act(2, 5, 6, 7),
            vec(5),
            vec(5, True),
            vec(5),
            vec(5),
            vec(5),
            act(2, 5, 6, 7),
            vec(5),
            vec(5, True),
            None,
            vec(5),
        ),
        "bn_relu_bwd_reduce": (x, act(2, 5, 6, 7), vec(5), vec(5, True), vec(5), vec(5), True),
        "bn_relu_bwd_elemt": (
            x,
            act(2, 5, 6, 7),
            vec(5),
            vec(5, True),
            vec(5),
            vec(5),
            vec(5),
            True,
            vec(5),
            vec(5),
        ),
    }


@pytest.mark.parametrize(
    "dtype,layout", [(torch.float32, "channels_last"), (torch.float64, "contiguous")], ids=str
)
@pytest.mark.parametrize("op_name", backends.OP_NAMES)
def test_opcheck(op_name, dtype, layout):
    args = _opcheck_cases(dtype, layout)[op_name]
    torch.library.opcheck(getattr(ops, op_name).default, args)


def test_opcheck_optional_arguments_absent():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 1, 1)
    cases = {
        "conv_bias_act": (x, w, None, None, [1, 1], [0, 0], [1, 1], 1, False),
        "relu_bias_bwd": (x, None),
        "conv_stats": (x, w, None, None, False, [1, 1], [0, 0], [1, 1], 1),
        "bn_finalize": (
            torch.rand(3) * 9,
            torch.rand(3) * 9 + 9,
            None,
            None,
            None,
            None,
            None,
            9,
            0.1,
            1e-5,
        ),
        "bn_add_relu": (x, torch.rand(3), torch.rand(3), None, None, None, 0, False),
        "bn_add_relu_bwd": (x, None, x, torch.rand(3), torch.rand(3), None, None, None, None, None),
        "bn_relu_bwd": (
            x,
            x,
            torch.rand(3),
            torch.rand(3),
            None,
            torch.rand(3),
            torch.rand(3),
            False,
        ),
        "conv_bwd": (
            torch.randn(2, 4, 5, 5),
            x,
            w,
            None,
            None,
            False,
            [1, 1],
            [0, 0],
            [1, 1],
            1,
            [False, True],
        ),
    }
    for name, args in cases.items():
        torch.library.opcheck(
            getattr(ops, name).default, args, test_utils=("test_schema", "test_faketensor")
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch(layout):
    """N = 0: every op returns empty activations and zero sums, as the reference does."""
    x = _act((0, 4, 5, 5), torch.float32, layout)
    w, v = torch.randn(3, 4, 3, 3), torch.rand(4) + 0.5
    conv = ([1, 1], [1, 1], [1, 1], 1)
    y = _act((0, 3, 5, 5), torch.float32, layout)
    cases = {
        "conv_bias_act": (x, w, torch.randn(3), y, *conv, True),
        "relu_bias_bwd": (x, x),
        "conv_stats": (x, w, v, v, True, *conv),
        "bn_add_relu": (x, v, v, x, v, v, 0, True),
        "bn_add_relu_bwd": (x, x, x, v, v, v, x, v, v, v),
        "bn_relu_bwd": (x, x, v, v, v, v, v, True),
        "conv_bwd": (y, x, w, v, v, True, *conv, [True, True]),
    }
    for name, args in cases.items():
        ours, theirs = getattr(ops, name)(*args), getattr(reference, name)(*args)
        ours, theirs = (ours, theirs) if isinstance(ours, tuple) else ((ours,), (theirs,))
        for o, t in zip(ours, theirs, strict=True):
            assert o.shape == t.shape and o.dtype == t.dtype, name
            if o.dim() == 1:  # per-channel sums of nothing
                assert torch.equal(o, torch.zeros_like(o)), name


# ----------------------------------------------------------------------------------------------
# Bad input: a clear message naming the offending sizes, never a crash.


def _bad_cases():
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    v8, v3 = torch.ones(8), torch.ones(3)
    return [
        (
            "conv rank",
            lambda: ops.conv_bias_act(x[0], w, None, None, *conv, True),
            r"input must be 4-D .*got 3-D tensor of size \[8, 6, 6\]",
        ),
        (
            "conv channels",
            lambda: ops.conv_bias_act(x, torch.randn(4, 5, 3, 3), None, None, *conv, True),
            r"input of size \[2, 8, 6, 6\] has 8 channels but weight of size \[4, 5, 3, 3\]",
        ),
        (
            "conv dtype",
            lambda: ops.conv_bias_act(x, w.double(), None, None, *conv, True),
            r"weight has dtype Double but input has dtype Float",
        ),
        (
            "conv bias length",
            lambda: ops.conv_bias_act(x, w, torch.ones(5), None, *conv, True),
            r"bias must be 1-D with 4 elements .*got size \[5\]",
        ),
        (
            "conv residual size",
            lambda: ops.conv_bias_act(x, w, None, torch.randn(2, 4, 5, 6), *conv, True),
            r"residual must have the output's size \[2, 4, 6, 6\], got \[2, 4, 5, 6\]",
        ),
        (
            "conv residual dtype",
            lambda: ops.conv_bias_act(x, w, None, torch.randn(2, 4, 6, 6).half(), *conv, True),
            r"residual has dtype Half but input has dtype Float",
        ),
        (
            "conv kernel too big",
            lambda: ops.conv_bias_act(x, torch.randn(4, 8, 9, 9), None, None, *conv, True),
            r"smaller than the dilated kernel",
        ),
        (
            "conv groups",
            lambda: ops.conv_stats(
                x, torch.randn(6, 2, 1, 1), None, None, False, [1, 1], [0, 0], [1, 1], 4
            ),
            r"6 output channels, not divisible by groups=4",
        ),
        (
            "int dtype",
            lambda: ops.bn_add_relu(x.int(), v8, v8, None, None, None, 0, True),
            r"input must be float32, float16, bfloat16 or float64, got Int",
        ),
        (
            "prologue length",
            lambda: ops.conv_stats(x, w, v3, None, True, *conv),
            r"pre_scale must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "scale length",
            lambda: ops.bn_add_relu(x, v3, v8, None, None, None, 0, True),
            r"scale must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "residual offset",
            lambda: ops.bn_add_relu(x, v8, v8, torch.randn(2, 4, 6, 6), None, None, 5, True),
            r"residual's 4 channels at res_channel_offset=5 do not fit in input's 8 channels",
        ),
        (
            "residual hw",
            lambda: ops.bn_add_relu(x, v8, v8, torch.randn(2, 8, 3, 3), None, None, 0, True),
            r"residual of size \[2, 8, 3, 3\] must match input of size \[2, 8, 6, 6\] in N, H",
        ),
        (
            "res_scale length",
            lambda: ops.bn_add_relu(x, v8, v8, torch.randn(2, 4, 6, 6), v8, None, 0, True),
            r"res_scale must be 1-D with 4 elements",
        ),
        (
            "grad_out size",
            lambda: ops.bn_add_relu_bwd(x, None, x[:, :4], v8, v8, None, None, None, None, None),
            r"input has size \[2, 4, 6, 6\] but grad_out has size \[2, 8, 6, 6\]",
        ),
        (
            "res_input stats",
            lambda: ops.bn_add_relu_bwd(x, None, x, v8, v8, None, x, None, None, None),
            r"res_input needs res_mean and res_invstd",
            ValueError,
        ),
        (
            "mean length",
            lambda: ops.bn_relu_bwd(x, x, v3, v8, None, v8, v8, True),
            r"mean must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "out dtype",
            lambda: ops.relu_bias_bwd(x, x.double()),
            r"out has dtype Double but grad_out has dtype Float",
        ),
        (
            "conv_bwd grad size",
            lambda: ops.conv_bwd(
                torch.randn(2, 4, 5, 5), x, w, None, None, False, *conv, [True, True]
            ),
            r"grad_out must have the convolution's output size \[2, 4, 6, 6\], got \[2, 4, 5, 5\]",
        ),
        (
            "finalize sumsq",
            lambda: ops.bn_finalize(v8, v3, None, None, None, None, None, 10, 0.1, 1e-5),
            r"sumsq must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "finalize dtype",
            lambda: ops.bn_finalize(
                v8.half(), v8.half(), None, None, None, None, None, 10, 0.1, 1e-5
            ),
            r"sum must be float32 or float64",
        ),
        (
            "finalize running length",
            lambda: ops.bn_finalize(v8, v8, None, None, v3, None, None, 10, 0.1, 1e-5),
            r"running_mean must be 1-D with 8 elements",
        ),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_message(case):
    _, fn, pattern = case[:3]
    exc = case[3] if len(case) > 3 else RuntimeError
    with pytest.raises(exc, match=pattern):
        fn()


def test_bn_finalize_count_raises_like_batchnorm():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.functional.batch_norm(torch.randn(1, 3), None, None, training=True)
    s = torch.ones(3)
    for count in (1, 0):
        with pytest.raises(
            ValueError, match=f"Expected more than 1 value per channel when training, got {count}"
        ):
            ops.bn_finalize(s, s, None, None, None, None, None, count, 0.1, 1e-5)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        ops.bn_finalize(s, s * 2, None, None, torch.zeros(3), None, None, 4, None, 1e-5)


# ----------------------------------------------------------------------------------------------
# Determinism, parallelism, instruction sets.


def _large_outputs(layout):
    """Every kernel (reductions and elementwise passes) on shapes that span many parallel chunks
    and several reduction row blocks."""
    torch.manual_seed(0)
    shape = (8, 64, 28, 28)
    go, out, x = (_act(shape, torch.float32, layout) for _ in range(3))
    c = shape[1]
    vecs = [_vec(c, torch.float32, positive=i % 2 == 1) for i in range(6)]
    # An identity 1x1 convolution: its output is exactly the prologue's, whatever oneDNN's
    # blocking for the thread count, so only fastres' own kernels are under test.
    w = torch.eye(c).view(c, c, 1, 1)
    wide = _act((8, 40, 56, 56), torch.float32, layout)
    return [
        *ops.conv_stats(x, w, vecs[0], vecs[1], True, [1, 1], [0, 0], [1, 1], 1),
        *ops.relu_bias_bwd(go, out),
        *ops.bn_add_relu_bwd(go, out, x, vecs[0], vecs[1], vecs[2], None, None, None, None),
        *ops.bn_add_relu_bwd(go, out, x, vecs[0], vecs[1], vecs[2], out, vecs[3], vecs[4], None),
        *ops.bn_relu_bwd(go, x, vecs[0], vecs[1], None, vecs[2], vecs[3], True),
        ops.bn_add_relu(
            x, vecs[0], vecs[1], wide[:, 4:36, ::2, ::2], vecs[2][:32], vecs[3][:32], 16, True
        ),
        ops.bn_add_relu(x, vecs[0], vecs[1], out, None, None, 0, False),
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_across_runs_and_thread_counts(layout, all_threads):
    first = _large_outputs(layout)
    second = _large_outputs(layout)
    torch.set_num_threads(1)
    single = _large_outputs(layout)
    for i, (a, b, s) in enumerate(zip(first, second, single, strict=True)):
        assert torch.equal(a, b), f"output {i} differs between two runs"
        assert torch.equal(a, s), f"output {i} differs between {all_threads} threads and 1"


def test_parallel_for_runs_on_several_threads(all_threads):
    if all_threads < 2:
        pytest.skip("torch runs on one thread here")
    assert torch.ops.fastres_cpu.parallel_threads(64) == all_threads


def test_kernel_isa_follows_aten():
    """AVX2 / AVX-512 kernels are built by GCC on x86-64 and used when ATen uses that ISA."""
    cap = torch.backends.cpu.get_cpu_capability()
    expect = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "base")
    if not (_mod.build_info()["compiler"].startswith("gcc") and os.uname().machine == "x86_64"):
        expect = "base"
    assert torch.ops.fastres_cpu.kernel_isa() == expect


def _smoke_all_ops():
    """Every kernel of kernels_impl.h in every dtype and layout (for the other-ISA subprocesses)."""
    for dtype, layout in itertools.product(DTYPES, LAYOUTS):
        torch.manual_seed(0)
        test_relu_bias_bwd(dtype, layout)
        test_bn_relu_bwd(dtype, layout)
        test_bn_add_relu_bwd(dtype, layout)
        test_bn_add_relu(dtype, layout)
        test_conv_stats((1, 1, 0, 1, 1), dtype, layout)
    test_conv_bias_act((3, 1, 1, 1, 1), torch.float64, "channels_last")  # the epilogue pass


_ISA_ORDER = ["base", "avx2", "avx512"]


@pytest.mark.parametrize("isa", _ISA_ORDER[:-1])
def test_narrower_instruction_sets(isa):
    """The AVX2 and baseline kernels, which this CPU would not pick by itself, run everything."""
    auto = torch.ops.fastres_cpu.kernel_isa()
    if _ISA_ORDER.index(isa) >= _ISA_ORDER.index(auto):
        pytest.skip(f"{isa} is the automatic choice here ({auto}) or wider: covered by the suite")
    torch.ops.fastres_cpu.set_kernel_isa(isa)
    try:
        assert torch.ops.fastres_cpu.kernel_isa() == isa
        _smoke_all_ops()
    finally:
        torch.ops.fastres_cpu.set_kernel_isa("auto")
    assert torch.ops.fastres_cpu.kernel_isa() == auto
    with pytest.raises(RuntimeError, match="is not available"):
        torch.ops.fastres_cpu.set_kernel_isa("sse9")
