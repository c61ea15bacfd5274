"""The host path off the CPU cache: BatchNorm in the convolution's epilogue, no host-device sync.

On a GPU (and with autograd, or under a trace, anywhere) eval never folds a BatchNorm into a kept
weight: each convolution gets the BatchNorm's scale and shift, computed from the live tensors on
every call, in its epilogue (``conv_bias_act(..., scale=)``). So nothing can go stale, no sync
asks whether a fold moved NaN/Inf, and a replayed CUDA graph reads the tensors as they are. The
GPU is not here: these tests force that path on the CPU (``_fold_cacheable`` false) and run it on
the cpu, reference and cudasim backends (cudasim: the CUDA kernels' own source).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from dispatch_log import OpLog
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres import backends, reference
from fastres.harness.rule import assert_close_rule, randomise_bn
from fastres.nn._fused import _FusedMixin

BACKENDS = [b for b in ("cpu", "reference", "cudasim")
            if backends.BACKENDS[b].unavailable_reason() is None]

#: Ops that make the host wait for the device (on a GPU): a tensor read back as a Python value.
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "allclose",
            "masked_select", "unique", "_unique2", "tolist"}


class SyncCounter(TorchDispatchMode):
    """Counts the ops of a call that read a tensor's value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def live(monkeypatch):
    """Eval as on a GPU: no fold cache, the BatchNorm in the epilogue."""
    monkeypatch.setattr(_FusedMixin, "_fold_cacheable", staticmethod(lambda conv, bn: False))


def _epilogue_operands(backend: str, dtype: torch.dtype, seed: int):
    """The backend (skipping when it cannot run here), a generator, and a 3x3 stride-2 conv's
    channels_last input, weight and residual: 16 -> 24 channels, 9x7 -> 5x4."""
    b = backends.BACKENDS[backend]
    if b.unavailable_reason():
        pytest.skip(b.unavailable_reason())
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = torch.randn(2, 16, 9, 7, generator=g).to(dtype).contiguous(memory_format=cl)
    w = (torch.randn(24, 16, 3, 3, generator=g) / 12).to(dtype).contiguous(memory_format=cl)
    res = torch.randn(2, 24, 5, 4, generator=g).to(dtype).contiguous(memory_format=cl)
    return b, g, x, w, res


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_bias_act_scale_in_the_epilogue(backend, dtype):
    b, g, x, w, res = _epilogue_operands(backend, dtype, 0)
    bias = torch.randn(24, generator=g)
    scale = torch.rand(24, generator=g) + 0.5
    args = (x, w, bias, res, [2, 2], [1, 1], [1, 1], 1, True, scale)
    with fastres.harness.rule.allow_tf32(False):
        ours = b.op("conv_bias_act")(*args)
    theirs = reference.conv_bias_act(*args)
    truth = reference.conv_bias_act(*(a.double() if isinstance(a, torch.Tensor) else a
                                      for a in args))
    assert_close_rule(f"{backend} conv_bias_act with scale", ours, theirs, truth, dtype)
    with pytest.raises((RuntimeError, ValueError), match="scale"):
        b.op("conv_bias_act")(x, w, None, res, [2, 2], [1, 1], [1, 1], 1, True, scale)


@pytest.mark.parametrize("backend", [*BACKENDS, "triton"])
@pytest.mark.parametrize("affine", ["gamma+beta", "none", "bf16 params", "fp16 params",
                                    "mixed params"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_bias_act_batchnorm_in_the_epilogue(backend, dtype, affine):
    """conv_bias_act(..., scale=gamma, bn_mean, bn_var, bn_eps): the eval BatchNorm computed in
    the epilogue from its live tensors (bias = beta), against float64."""
    b, g, x, w, res = _epilogue_operands(backend, dtype, 1)
    gamma, beta = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
    mean, var = torch.randn(24, generator=g), torch.rand(24, generator=g) * 3 + 0.01
    if affine == "none":
        gamma = beta = None
    elif affine in ("bf16 params", "fp16 params"):  # a model.to(dtype)'s BatchNorm
        pdt = torch.bfloat16 if affine == "bf16 params" else torch.float16
        gamma, beta, mean, var = (t.to(pdt) for t in (gamma, beta, mean, var))
    elif affine == "mixed params":  # read as float32 then
        mean = mean.to(torch.bfloat16)
    args = (x, w, beta, res, [2, 2], [1, 1], [1, 1], 1, True, gamma, mean, var, 1e-3)
    with fastres.harness.rule.allow_tf32(False):
        ours = b.op("conv_bias_act")(*args)
    theirs = reference.conv_bias_act(*args)
    truth = reference.conv_bias_act(*(a.double() if isinstance(a, torch.Tensor) else a
                                      for a in args))
    assert_close_rule(f"{backend} conv_bias_act with the BatchNorm", ours, theirs, truth, dtype)
    # The same as the scale and shift computed first (torch.nn.BatchNorm2d's eval arithmetic).
    bn = torch.nn.BatchNorm2d(24, eps=1e-3, affine=affine != "none").eval().double()
    bn.running_mean.copy_(mean.double())
    bn.running_var.copy_(var.double())
    if affine != "none":
        bn.weight.data.copy_(gamma.double())
        bn.bias.data.copy_(beta.double())
    conv = torch.nn.functional.conv2d(x.double(), w.double(), None, 2, 1)
    with torch.no_grad():
        assert_close_rule(f"{backend} conv_bias_act with the BatchNorm vs BatchNorm2d", ours,
                          theirs, torch.relu(bn(conv) + res.double()), dtype)
    with pytest.raises((RuntimeError, ValueError), match="together"):
        b.op("conv_bias_act")(*args[:10], mean, None, 1e-3)
    if backend != "reference":  # the oracle does not validate
        with pytest.raises((RuntimeError, ValueError), match="bn_var"):
            b.op("conv_bias_act")(*args[:11], var[:20], 1e-3)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_scale_gradients(backend):
    """Gradients through the epilogue's scale (the data one from one conv_bwd on W * s, the
    weight's s * G, the scale's <W, G>), float64 gradcheck."""
    if backends.BACKENDS[backend].unavailable_reason():
        pytest.skip(backends.BACKENDS[backend].unavailable_reason())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    r = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, b, s, r: fastres.functional.conv_bias_act(
            x, w, b, r, padding=1, relu=True, backend=backend, scale=s),
        (x, w, b, s, r), fast_mode=True)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_epilogue_gradients(backend, affine):
    """Gradients through the BatchNorm in the epilogue: gamma and beta (and mean and var, should
    they require them) chained from ds and dt, float64 gradcheck."""
    if backends.BACKENDS[backend].unavailable_reason():
        pytest.skip(backends.BACKENDS[backend].unavailable_reason())
    g = torch.Generator().manual_seed(2)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, **f64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, **f64, requires_grad=True)
    gam = (torch.rand(4, **f64) + 0.5).requires_grad_(True)
    bet = torch.randn(4, **f64, requires_grad=True)
    mean = torch.randn(4, **f64, requires_grad=True)
    var = (torch.rand(4, **f64) + 0.5).requires_grad_(True)
    r = torch.randn(2, 4, 5, 5, **f64, requires_grad=True)
    if affine:
        torch.autograd.gradcheck(
            lambda x, w, gam, bet, mean, var, r: fastres.functional.conv_bias_act(
                x, w, bet, r, padding=1, relu=True, backend=backend, scale=gam, bn_mean=mean,
                bn_var=var, bn_eps=1e-3),
            (x, w, gam, bet, mean, var, r), fast_mode=True)
    else:
        torch.autograd.gradcheck(
            lambda x, w, mean, var: fastres.functional.conv_bias_act(
                x, w, None, None, padding=1, relu=False, backend=backend, bn_mean=mean,
                bn_var=var, bn_eps=1e-3),
            (x, w, mean, var), fast_mode=True)


def _pair():
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    return tv, fastres.convert(copy.deepcopy(tv)).eval()


def _check(tv, ours, x, name):
    # fp32 exact: cudasim runs the CUDA kernels, which take TF32 when cuDNN's switch allows it.
    with torch.no_grad(), fastres.harness.rule.allow_tf32(False):
        ref = copy.deepcopy(tv).double()(x.double())
        assert_close_rule(name, ours(x), tv(x), ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_eval_matches_torchvision_and_reads_the_tensors_now(backend, live, monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    tv, ours = _pair()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    _check(tv, ours, x, "live eval")
    plans = {id(m): m.__dict__.get("_eval_plan") for m in ours.modules()}
    assert any(p is not None and p.folds is None for p in plans.values())  # live plans
    for m in (tv, ours):
        m.layer2[0].conv1.weight.data.mul_(1.5)
        m.layer3[1].bn2.running_var.data.mul_(2.0)
        m.bn1.weight.data.mul_(0.5)
    _check(tv, ours, x, "live eval after .data writes")
    # The same plans ran: nothing was rebuilt, they read the tensors on each call.
    assert {id(m): m.__dict__.get("_eval_plan") for m in ours.modules()} == plans
    # New tensor objects assigned to the modules (weight surgery): read from the modules too.
    for m in (tv, ours):
        conv, bn = m.layer2[0].conv2, m.layer2[0].bn2
        conv.weight = torch.nn.Parameter(conv.weight.detach() * -0.5)
        bn.bias = torch.nn.Parameter(bn.bias.detach() + 1.0)
        bn.running_mean = bn.running_mean * 0.25
    _check(tv, ours, x, "live eval after assigning new tensors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_enabled_eval_plans_give_torchvision_gradients(backend, monkeypatch):
    """Eval with autograd runs the blocks' plans (live, each convolution through its autograd
    Function, the BatchNorm in its epilogue): the input's, the conv weights' and the BatchNorm
    affine parameters' gradients are torchvision's (Grad-CAM, fine-tuning with BN in eval)."""
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    tv, ours = _pair()
    ref = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    proj = torch.randn(2, 10)
    grads = {}
    with fastres.harness.rule.allow_tf32(False):
        for name, m, xi in (("ours", ours, x), ("tv", tv, x), ("ref", ref, x.double())):
            for _ in range(2):  # the second call runs the plans the first one made
                xg = xi.clone().requires_grad_(True)
                m.zero_grad(set_to_none=True)
                (m(xg) * proj.to(xg.dtype)).sum().backward()
            grads[name] = {"input": xg.grad, **{n: p.grad for n, p in m.named_parameters()}}
    plans = [m.__dict__.get("_eval_plan") for m in ours.modules()]
    assert any(p is not None and p.grad for p in plans), "no plan made with autograd on"
    for n in ("input", "conv1.weight", "layer2.0.conv1.weight", "layer3.1.bn2.weight",
              "layer4.0.downsample.1.bias", "fc.weight"):
        assert_close_rule(f"grad-enabled eval: d/d {n}", grads["ours"][n], grads["tv"][n],
                          grads["ref"][n], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_mode_plans_follow_requires_grad(backend, monkeypatch):
    """Grad mode on but nothing requiring gradients (inference without torch.no_grad on a
    frozen model) runs the plain eval plan; an input or a parameter that starts requiring
    gradients gets them on the next call."""
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    _, ours = _pair()
    ours.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ours(x)
    ours(x)
    blk = ours.layer2[0]
    assert blk.__dict__["_eval_plan"].grad is False
    blk.bn2.weight.requires_grad_(True)
    ours(x).sum().backward()
    assert blk.bn2.weight.grad is not None and blk.bn2.weight.grad.abs().sum() > 0
    assert blk.__dict__["_eval_plan"].grad is True
    blk.bn2.weight.requires_grad_(False)
    ours(x)
    assert blk.__dict__["_eval_plan"].grad is False
    xg = x.clone().requires_grad_(True)
    ours(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_eval_frozen_batchnorm(backend, live, monkeypatch):
    """FrozenBatchNorm2d (detection backbones) keeps its weight and bias as buffers: the live
    plan reads them, and their in-place changes, as torchvision does."""
    from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: PLC0415

    monkeypatch.setenv("FASTRES_BACKEND", backend)
    tv = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    g = torch.Generator().manual_seed(3)
    for m in tv.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if t is m.weight else 0.0))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    ours = fastres.convert(copy.deepcopy(tv)).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    _check(tv, ours, x, "live eval, FrozenBatchNorm2d")
    assert any(p is not None and p.folds is None
               for p in (m.__dict__.get("_eval_plan") for m in ours.modules()))
    for m in (tv, ours):
        m.layer1[0].bn1.weight.mul_(-2.0)
        m.layer2[0].bn2.bias.add_(1.0)
    _check(tv, ours, x, "live eval, FrozenBatchNorm2d changed in place")



@pytest.mark.skipif(bool(backends.BACKENDS["cudasim"].unavailable_reason()),
                    reason="cudasim is not built")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("kind", ["identity", "downsample"])
def test_eval_is_one_launch_per_convolution(kind, grad, live, monkeypatch):
    """Eval of a Bottleneck on the CUDA path (cudasim, its launches counted, not run), with and
    without autograd, in steady state: one conv_bias_act per convolution, one kernel each, no
    other op but autograd's detach (no BatchNorm scale/shift ops, no copies, no casts)."""
    from fastres import _C_cudasim as sim  # noqa: PLC0415

    monkeypatch.setenv("FASTRES_BACKEND", "cudasim")
    tvb = torchvision.models.resnet
    if kind == "identity":
        block, convs = tvb.Bottleneck(64, 16), 3
    else:
        block = tvb.Bottleneck(64, 32, stride=2, downsample=torch.nn.Sequential(
            torch.nn.Conv2d(64, 128, 1, stride=2, bias=False), torch.nn.BatchNorm2d(128)))
        convs = 4
    ours = fastres.convert(randomise_bn(block)).eval().to(torch.bfloat16,
                                                          memory_format=torch.channels_last)
    x = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    prev = sim.set_dry_run(True)
    try:
        with torch.set_grad_enabled(grad):
            ours(x)
            ours(x)
            n0 = sim.launch_count()
            with OpLog() as log:
                ours(x)
            launches = sim.launch_count() - n0
    finally:
        sim.set_dry_run(prev)
    assert launches == convs
    assert [op for op in log.seen if op != "aten::detach"] == \
        ["fastres_cudasim::conv_bias_act"] * convs, log.seen


@pytest.mark.skipif(bool(backends.BACKENDS["cudasim"].unavailable_reason()),
                    reason="cudasim is not built")
@pytest.mark.parametrize("kind", ["identity", "downsample"])
def test_training_step_launches(kind, monkeypatch):
    """A training step of a Bottleneck on the CUDA path (cudasim's dry run: launches counted per
    source file, not run) launches what the unit's design says and no more: per convolution its
    kernel, one column-sum-and-finalize launch per BatchNorm, bn_add_relu; per BatchNorm backward
    a reduction (which also runs a weight gradient's split sum), its column sums and the
    elementwise pass; the data gradients (none for the first convolution without dx); one split
    weight-gradient kernel per convolution and one launch for the split sums no reduction ran.
    22 launches for the identity block, 25 with the downsample (docs/performance.md)."""
    from fastres import _C_cudasim as sim  # noqa: PLC0415

    monkeypatch.setenv("FASTRES_BACKEND", "cudasim")
    tvb = torchvision.models.resnet
    if kind == "identity":
        block, convs, bns = tvb.Bottleneck(64, 16), 3, 3
    else:
        block = tvb.Bottleneck(64, 32, stride=2, downsample=torch.nn.Sequential(
            torch.nn.Conv2d(64, 128, 1, stride=2, bias=False), torch.nn.BatchNorm2d(128)))
        convs, bns = 4, 4
    ours = fastres.convert(randomise_bn(block)).train().to(torch.bfloat16,
                                                           memory_format=torch.channels_last)
    x = torch.randn(2, 64, 8, 8, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)

    def step():
        ours(x).float().sum().backward()
        ours.zero_grad(set_to_none=True)

    prev = sim.set_dry_run(True)
    try:
        step()
        step()
        before = sim.launch_sites()
        step()
        after = sim.launch_sites()
    finally:
        sim.set_dry_run(prev)
    per_file: dict = {}
    for site, n in after.items():
        if n - before.get(site, 0):
            name = site.rsplit("/", 1)[-1].split(":")[0]
            per_file[name] = per_file.get(name, 0) + n - before.get(site, 0)
    # bn.cu: the forward's column sums with finalize and bn_add_relu, each BatchNorm backward's
    # column sums; bn_bwd.cu: each BatchNorm backward's reduction and elementwise pass (three of
    # them: bn_add_relu_bwd covers the downsample's BatchNorm too)
    want = {"bn.cu": bns + 1 + 3, "bn_bwd.cu": 2 * 3,
            # forward convolutions and the data gradients of all but the first convolution (and
            # the downsample, whose input is the block's: no dx asked)
            "conv_igemm.cuh": convs + 2,
            # a split kernel per weight gradient, one launch of the sums no reduction ran
            "conv_wgrad.cu": convs + 1}
    assert per_file == want, per_file


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "eval-grad", "train"])
@pytest.mark.parametrize("cached", [False, True], ids=["live", "cpu-cache"])
def test_no_host_device_sync(backend, mode, cached, monkeypatch):
    """After the first calls, no call reads a tensor back to the host: eval (live and, on the
    CPU, the cached fold), grad-enabled eval, training forward and backward."""
    if not cached:
        monkeypatch.setattr(_FusedMixin, "_fold_cacheable",
                            staticmethod(lambda conv, bn: False))
    monkeypatch.setenv("FASTRES_BACKEND", backend)
    # One block per stage (identity and downsample blocks, the stem), at 16x16: cudasim runs
    # every CUDA thread of a training step on the CPU (ResNet-18 at 32x32 took minutes).
    tv = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                   num_classes=10)
    ours = fastres.convert(randomise_bn(tv))
    ours.train(mode == "train")
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)

    def call():
        with torch.set_grad_enabled(mode != "eval"):
            out = ours(x)
            if mode != "eval":
                out.sum().backward()

    call()
    call()  # plans, folds and packings are made; from here on, steady state
    with SyncCounter() as counter:
        call()
    assert counter.seen == [], counter.seen
