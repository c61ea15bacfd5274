"""The C++ CPU ops (csrc/cpu): what only this backend has. Their numerics against float64 on
every case of the op table are tests/test_ops.py's (``cpu`` backend); bad-input messages are
tests/test_ops_cpu_errors.py's. Here: the prepacked-weight cache, BatchNorm's running
statistics against nn.BatchNorm2d, bitwise claims (the SyncBatchNorm split against the one-op
backwards, bn_finalize_count against bn_finalize), opcheck on every op, the empty batch, bitwise
determinism across runs and thread counts, OpenMP parallelism, and the kernels of every
instruction set this CPU can run.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from op_cases import CASES
from op_check import Maker, check

from fastres import backends, reference
from fastres.backends import extension

_mod, _why = extension.load()
if _mod is None:  # a test module for compiled ops has nothing to say without them: fail loudly
    raise ImportError(_why)

ops = torch.ops.fastres
CPU = backends.BACKENDS["cpu"]
DTYPES = [
    d for d in CPU.dtypes if not CPU.not_supported_reasons(backends.Inputs(torch.device("cpu"), d))
]
LAYOUTS = ["contiguous", "channels_last"]

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
        check("cpu", "conv_bias_act", args, torch.float32)

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
# SyncBatchNorm's split ops: reduce -> mean -> elemt against the single-process op it splits.


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_chain_matches_one_op(dtype, layout):
    """The sums bitwise (the same kernel), the gradients up to the rounding of the means to the
    accumulation dtype; bn_add_relu_bwd with identity, BN'd and weightless BN'd residuals, with
    and without out and weight; bn_relu_bwd with and without ReLU and weight."""
    m = Maker("cpu", dtype, layout)
    shape = (3, 21, 7, 5)
    c, count = shape[1], shape[0] * shape[2] * shape[3]
    go, out, x, x2 = (m.act(*shape) for _ in range(4))
    for has_out, res, has_w in itertools.product(
        [False, True], ["identity", "bn", "bn_noweight"], [False, True]
    ):
        mean, invstd = m.vec(c), m.pos(c)
        weight = m.vec(c) if has_w else None
        o = out if has_out else None
        r, rw = (None, None, None), None
        if res != "identity":
            r = (x2, m.vec(c), m.pos(c))
            rw = m.vec(c) if res == "bn" else None
        sums = ops.bn_add_relu_bwd_reduce(go, o, x, mean, invstd, *r)
        full = ops.bn_add_relu_bwd(go, o, x, mean, invstd, weight, *r, rw)
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
    shape = (2, 37, 6, 5)
    c, count = shape[1], shape[0] * shape[2] * shape[3]
    go, x = m.act(*shape), m.act(*shape)
    for relu, has_w in itertools.product([False, True], [False, True]):
        mean, invstd = m.vec(c), m.pos(c)
        weight = m.vec(c) if has_w else None
        scale, shift = m.vec(c), m.vec(c)
        sums = ops.bn_relu_bwd_reduce(go, x, mean, invstd, scale, shift, relu)
        full = ops.bn_relu_bwd(go, x, mean, invstd, weight, scale, shift, relu)
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
    # against the reference (a 0-d count too): tests/op_cases.py's sweep bn_finalize_count


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
    """Every kernel of kernels_impl.h in every dtype and layout (for the other-ISA runs): the op
    table's sweep cases of the batch-norm family and 1x1 conv_stats, and the epilogue pass after
    the convolution (conv_bias_act at 3x3 in float64)."""
    bn_ops = {"relu_bias_bwd", "bn_add_relu", "bn_add_relu_bwd", "bn_add_relu_bwd_reduce",
              "bn_add_relu_bwd_elemt", "bn_relu_bwd", "bn_relu_bwd_reduce", "bn_relu_bwd_elemt"}
    cases = [c for c in CASES if c.family == "sweep" and c.layout != "mixed" and (
        c.op in bn_ops or (c.op == "conv_stats" and c.geometry.id == "1x1s1p0")
        or (c.op == "conv_bias_act" and c.geometry.id == "3x3s1p1"
            and c.dtype == torch.float64 and c.layout == "channels_last"))]
    assert len(cases) == len(bn_ops) * len(DTYPES) * len(LAYOUTS) * 1 + len(DTYPES) * 2 + 1
    for case in cases:
        torch.manual_seed(0)
        for args, mutated in case.calls(Maker("cpu", case.dtype, case.layout)):
            check("cpu", case.op, args, case.dtype, mutated)
    for dtype, layout in itertools.product(DTYPES, LAYOUTS):
        test_split_chain_matches_one_op(dtype, layout)


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
