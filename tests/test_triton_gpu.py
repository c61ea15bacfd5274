"""The Triton kernels on a CUDA device only: ResNet-50's real shapes, bitwise reproducible
statistics, int64 offsets past 2^31 elements, no host sync in the SyncBatchNorm ops. (Every op
of the contract at small shapes: tests/test_ops.py, ``triton`` backend.)"""

from __future__ import annotations

import pytest
import torch
from op_check import Maker, check

from fastres import reference
from fastres.harness.rule import assert_close_rule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
tk = pytest.importorskip("fastres.triton_kernels")
OPS = tk.ops() if tk.unavailable_reason() is None else None
DEVICE = "cuda"
CL = torch.channels_last


def act(n, c, h, w, dtype):
    """Drawn on the device in float32 (Maker draws float64 on the host: 17 GB for the int64
    test's tensors)."""
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
    return x.contiguous(memory_format=CL)


def vec(c, lo=None, hi=None):
    return torch.randn(c, device=DEVICE) if lo is None else \
        torch.rand(c, device=DEVICE) * (hi - lo) + lo


_stats = Maker("cuda", torch.float32).stats


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


# (N, C, H, W, K, kernel, stride, padding) of ResNet-50's convs at batch 32.
R50_GPU = [
    pytest.param((32, 3, 224, 224, 64, 7, 2, 3), id="stem"),
    pytest.param((32, 256, 56, 56, 64, 1, 1, 0), id="l1-reduce"),
    pytest.param((32, 64, 56, 56, 64, 3, 1, 1), id="l1-3x3"),
    pytest.param((32, 128, 56, 56, 128, 3, 2, 1), id="l2-3x3s2"),
    pytest.param((32, 256, 56, 56, 512, 1, 2, 0), id="l2-down"),
    pytest.param((32, 512, 7, 7, 2048, 1, 1, 0), id="l4-expand"),
]


@pytest.mark.parametrize("geom", R50_GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_resnet50_shapes(geom, dtype):
    n, c, h, w, k, ks, stride, pad = geom
    x = act(n, c, h, w, dtype)
    wt = (torch.randn(k, c, ks, ks, device=DEVICE) / (c * ks * ks) ** 0.5).to(dtype)
    wt = wt.contiguous(memory_format=CL)
    st, pd, dl = [stride, stride], [pad, pad], [1, 1]
    cv = (st, pd, dl, 1)
    out, s, _ = check("triton", "conv_stats", (x, wt, vec(c, 0.5, 1.5), vec(c), True, *cv), dtype)
    res = act(*out.shape, dtype)
    check("triton", "conv_bias_act", (x, wt, vec(k).to(dtype), res, *cv, True), dtype)
    go = act(*out.shape, dtype)
    check("triton", "conv_bwd", (go, x, wt, vec(c, 0.5, 1.5), vec(c), True, *cv, [True, True]),
          dtype)
    mean, invstd = _stats(out)
    check("triton", "bn_add_relu_bwd",
          (go, out, out, mean, invstd, vec(k), None, None, None, None), dtype)


@pytest.mark.parametrize("geom", [g for g in R50_GPU if g.id in ("l1-reduce", "l2-3x3s2")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_eval_bn_vectors_in_the_convolution(geom, dtype):
    """The eval BatchNorm's scale and shift computed by each program of the forward convolution
    (BN_VECTORS: written into the call's buffer, read back after a barrier) against the same
    convolution given them from bn_eval_vectors' launch, bit for bit. Hundreds of programs share
    each column tile here, which the interpreter's one-at-a-time programs cannot race; the
    buffer is first handed NaN (the caching allocator gives the op the block just freed), so a
    program reading before the writes land shows."""
    from fastres.triton_kernels import bn_eval  # noqa: PLC0415

    n, c, h, w, k, ks, stride, pad = geom
    x = act(n, c, h, w, dtype)
    wt = (torch.randn(k, c, ks, ks, device=DEVICE) / (c * ks * ks) ** 0.5).to(dtype)
    wt = wt.contiguous(memory_format=CL)
    cv = ([stride, stride], [pad, pad], [1, 1], 1)
    g, b, m, v = vec(k), vec(k), vec(k), vec(k, 0.5, 2.0)
    scale, shift = bn_eval.bn_eval_vectors(g, b, m, v, 1e-5)
    want = OPS.conv_bias_act(x, wt, shift, None, *cv, True, scale)
    for _ in range(3):
        torch.full((2, k), float("nan"), device=DEVICE)  # freed at once: the op's next buffer
        got = OPS.conv_bias_act(x, wt, b, None, *cv, True, g, m, v, 1e-5)
        assert torch.equal(got, want)


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
