"""The plans' steady-state calls written out (fastres/nn/fast_path.py) and the C checks they use
(csrc/host_path.h): the written-out call serves what the plan serves, with the same bits, and
answers None (the plan's own checks then decide) wherever anything the plan decided on changed.

Run on cudasim (the CUDA launchers and kernels on the CPU), whose plans have a direct entry.
"""

from __future__ import annotations

import copy

import pytest
import torch
from dispatch_log import OpLog
from unit_steps import block as _block

import fastres
from fastres import backends
from fastres.backends import extension
from fastres.harness.rule import allow_tf32, assert_close_rule, randomise_bn
from fastres.nn._fused import _FusedMixin

pytestmark = pytest.mark.skipif(bool(backends.BACKENDS["cudasim"].unavailable_reason()),
                                reason="cudasim is not built")

CL = torch.channels_last


@pytest.fixture
def live(monkeypatch):
    """cudasim forced, eval as on a GPU (no fold cache): the plans with a direct entry."""
    monkeypatch.setenv("FASTRES_BACKEND", "cudasim")
    monkeypatch.setattr(_FusedMixin, "_fold_cacheable", staticmethod(lambda conv, bn: False))


def _eval_block(kind="downsample", grad=False):
    tv = randomise_bn(_block(kind)).eval()
    ours = fastres.convert(copy.deepcopy(tv)).eval().to(memory_format=CL)
    x = torch.randn(2, tv.conv1.in_channels, 9, 9).contiguous(memory_format=CL)
    with torch.set_grad_enabled(grad):
        ours(x)
    plan = ours.__dict__["_eval_plan"]
    assert plan is not None and plan.fast is not None
    return tv.to(memory_format=CL), ours, x, plan


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind", ["bottleneck", "downsample", "basic"])
def test_eval_fast_serves_with_the_plans_bits(kind, grad, live):
    tv, ours, x, plan = _eval_block(kind, grad)
    served = []
    fast = plan.fast

    def counted(block, xi, donate=False):
        out = fast(block, xi, donate)
        served.append(out is not None)
        return out

    plan.fast = counted
    with torch.set_grad_enabled(grad), allow_tf32(False):
        got = ours(x)
        plan.fast = None  # the plan's own checks and call
        want = ours(x)
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule(f"fast {kind}", got, tv(x), ref, torch.float32)
    assert served == [True]
    assert torch.equal(got, want)
    if grad:
        assert got.grad_fn.name() == "BlockEvalBackward"
        got.sum().backward()
        assert ours.conv1.weight.grad is not None


def test_eval_fast_steps_aside(live, monkeypatch):
    """Each thing a plan decided on, changed: the written-out call answers None."""
    tv, ours, x, plan = _eval_block()
    fast = plan.fast
    with torch.no_grad():
        assert fast(ours, x) is not None
        assert fast(ours, x.contiguous()) is None  # other strides
        assert fast(ours, x.double()) is None
        assert fast(ours, torch.randn(3, 32, 9, 9).contiguous(memory_format=CL)) is None
        h = ours.downsample[1].register_forward_pre_hook(lambda m, i: None)
        assert fast(ours, x) is None
        h.remove()
        h = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        assert fast(ours, x) is None
        h.remove()
        ours.bn2.eps = 1e-3
        assert fast(ours, x) is None
        ours.bn2.eps = 1e-5
        ours.bn3.train()
        assert fast(ours, x) is None
        ours.bn3.eval()
        ours.conv2.bias = torch.nn.Parameter(torch.zeros(16))
        assert fast(ours, x) is None
        ours.conv2.bias = None
        conv = ours.downsample[0]
        ours.downsample[0] = copy.deepcopy(conv)
        assert fast(ours, x) is None
        ours.downsample[0] = conv
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast(ours, x) is None
        with OpLog():
            assert fast(ours, x) is None
        monkeypatch.setenv("FASTRES_EVAL_PLAN", "1")  # on, but spelled otherwise than before
        assert fast(ours, x) is None
        monkeypatch.delenv("FASTRES_EVAL_PLAN")
        monkeypatch.setenv("FASTRES_BACKEND", "reference")
        assert fast(ours, x) is None
        monkeypatch.setenv("FASTRES_BACKEND", "cudasim")
        assert fast(ours, x) is not None
        ours.train()
        assert fast(ours, x) is None
    # with autograd needed, a plan made without it steps aside
    assert fast(ours.eval(), x) is None
    assert fast(ours, x.requires_grad_()) is None


def test_eval_fast_reads_the_tensors_now(live):
    """.data writes and new Parameters reach the written-out call: it reads the module dicts."""
    tv, ours, x, plan = _eval_block()
    with torch.no_grad(), allow_tf32(False):
        for m in (tv, ours):
            m.conv3.weight.data.mul_(-2.0)
            m.bn1.running_mean.data = m.bn1.running_mean + 0.5
            m.conv1.weight = torch.nn.Parameter(m.conv1.weight.detach() * 0.5)
        got = plan.fast(ours, x)
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule("fast after writes", got, tv(x), ref, torch.float32)


def test_train_fast_serves_and_steps_aside(live):
    tv = randomise_bn(_block("downsample")).train()
    ours = fastres.convert(copy.deepcopy(tv)).train()
    x = torch.randn(2, 32, 9, 9)
    with allow_tf32(False):
        ours(x)
        plan = ours.__dict__["_train_plan"]
        assert plan is not None and plan.fast is not None
        out = plan.fast(ours, x)
        assert out is not None and out.grad_fn.name() == "ResidualUnitBackward"
        ours.bn1.momentum = 0.3
        assert plan.fast(ours, x) is None
        ours.bn1.momentum = 0.1
        ours.eval()
        assert plan.fast(ours, x) is None
        ours.train()
        ours.bn2.float()  # unchanged: float32 already
        assert plan.fast(ours, x) is not None
        ours.bn2.double()
        assert plan.fast(ours, x) is None


def test_host_path_readers():
    mod = extension.load()[0]
    if not hasattr(mod, "tensor_key"):
        pytest.skip("fastres._C without tensor_key")
    a = torch.randn(2, 3, 4, 5)
    b = a.contiguous(memory_format=CL)
    assert mod.tensor_key(a) == mod.tensor_key(a.clone())
    assert mod.tensor_key(a) != mod.tensor_key(b)  # strides
    assert mod.tensor_key(a) != mod.tensor_key(a.double())
    assert mod.tensor_key(a) != mod.tensor_key(torch.randn(2, 3, 4, 6))
    shifted = torch.randn(121)[1:].view(2, 3, 4, 5)
    assert mod.tensor_key(a) != mod.tensor_key(shifted)  # alignment
    with pytest.raises(TypeError):
        mod.tensor_key(None)
    # not strided: a key no strided tensor has (a plan never matches it), not an error
    assert mod.tensor_key(a.to_sparse()) == b""
    if torch.backends.mkldnn.is_available():
        assert mod.tensor_key(a.to_mkldnn()) == b""
    ptrs = mod.tensor_ptrs((a, b))
    assert ptrs == mod.tensor_ptrs([a, b])
    assert int.from_bytes(ptrs[:8], "little") == a.data_ptr()
    assert int.from_bytes(ptrs[8:], "little") == b.data_ptr()
    assert mod.tensor_ptrs((a, None)) is None
    with pytest.raises(TypeError):
        mod.tensor_ptrs((a, 3))


def test_tensors_in_carves_one_pool():
    """tensors_in (the Triton replays' pooled outputs) against torch.as_strided, the Python
    fallback it replaces; a spec past the pool is refused."""
    from fastres.triton_kernels import _replay

    mod = extension.load()[0]
    if not hasattr(mod, "tensors_in"):
        pytest.skip("fastres._C without tensors_in")
    pool = torch.arange(200.0)[8:]  # a pool with an offset of its own
    specs = ((0, (4,), (1,)), (64, (2, 3), (3, 1)), (100, (3, 2), (1, 3)))
    got, want = mod.tensors_in(pool, specs), _replay._tensors_in_py(pool, specs)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.stride() == w.stride() and torch.equal(g, w)
        assert g.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    got[0].fill_(-1.0)  # the pool's storage itself
    assert pool[:4].eq(-1.0).all()
    # a dtype of its own: a byte workspace's regions (offsets in that dtype's elements)
    ws = torch.zeros(1024, dtype=torch.uint8)
    typed = ((64, (2, 3), (3, 1), torch.float32), (8, (4,), (1,), torch.bfloat16))
    got, want = mod.tensors_in(ws, typed), _replay._tensors_in_py(ws, typed)
    for g, w in zip(got, want, strict=True):
        assert (g.dtype, g.shape, g.stride()) == (w.dtype, w.shape, w.stride())
        assert g.data_ptr() == w.data_ptr()
    assert got[0].data_ptr() == ws.data_ptr() + 256
    with pytest.raises(ValueError):
        mod.tensors_in(ws, ((255, (2,), (1,), torch.float32),))
    with pytest.raises(ValueError):
        mod.tensors_in(pool, ((190, (4,), (1,)),))
    with pytest.raises(ValueError):
        mod.tensors_in(pool, ((0, (4,)),))
    with pytest.raises(TypeError):
        mod.tensors_in(None, ())


def test_plans_stay_with_their_block(live):
    """A plan (and its written-out call, which holds the block's modules) is not carried into a
    copy made by convert or revert, nor left on a reverted module."""
    tv = randomise_bn(_block("bottleneck")).train()
    ours = fastres.convert(copy.deepcopy(tv)).train()
    ours(torch.randn(2, 64, 9, 9))
    assert ours.__dict__.get("_train_plan") is not None
    copied = fastres.revert(ours)  # a copy
    assert "_train_plan" not in copied.__dict__
    again = fastres.convert(copied)
    assert "_train_plan" not in again.__dict__
    fastres.revert(ours, inplace=True)
    assert "_train_plan" not in ours.__dict__
