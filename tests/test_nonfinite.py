"""Non-finite values: every backend propagates NaN and Inf as the PyTorch ops it replaces.

The rule is in fastres/_opset.py: relu(NaN) = NaN, ReLU masks as threshold_backward (the gradient
passes where the output is NaN), batch statistics and running statistics as nn.BatchNorm2d, and
the folded-BN inference path gives the unfolded blocks' pattern. Checked here against torchvision's
own blocks: NaN, +Inf and -Inf at one input value and at one whole pixel, eval (with and without
input gradients) and training; compared are the NaN/+Inf/-Inf pattern of the output, the input
gradient, every parameter gradient and every buffer, and the finite values beside them. Then a
bf16 autocast training step under torch.amp.GradScaler with an injected overflow: the step is
skipped and the scale drops exactly as with the torchvision model.

Backends: reference and cpu as they are; triton under the interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported) and the CUDA kernels on cudasim (their own source on
the CPU execution harness), so the shapes are tiny. A backend that cannot run here is skipped with
its reason; on a GPU "cuda" joins by adding it to BACKENDS.
"""

from __future__ import annotations

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as conftest)

import pytest  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models import resnet as tv_resnet  # noqa: E402

import fastres  # noqa: E402
from fastres import backends  # noqa: E402
from fastres.harness.rule import randomise_bn  # noqa: E402

BACKENDS = ["reference", "cpu", "triton", "cudasim"]
INF = float("inf")
VALUES = {"nan": float("nan"), "+inf": INF, "-inf": -INF}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name = request.param
    why = backends.BACKENDS[name].unavailable_reason()
    if why is not None:
        pytest.skip(f"{name}: {why}")
    monkeypatch.setenv("FASTRES_BACKEND", name)
    # exact fp32 convolutions on the CUDA kernels (TF32 would need a looser value comparison;
    # the NaN/Inf patterns are the same either way)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return name


def _blocks(kind: str) -> tuple[nn.Module, nn.Module]:
    """(torchvision block, fastres block) with the same weights; both have a downsample branch
    (stride 2) so every op and both residual kinds of the op set run."""
    if kind == "basic":
        tv_cls, fr_cls, inp, planes = tv_resnet.BasicBlock, fastres.BasicBlock, 4, 6
    else:
        tv_cls, fr_cls, inp, planes = tv_resnet.Bottleneck, fastres.BottleneckBlock, 8, 3
    out = planes * tv_cls.expansion
    ds = nn.Sequential(nn.Conv2d(inp, out, 1, 2, bias=False), nn.BatchNorm2d(out))
    tv = randomise_bn(tv_cls(inp, planes, 2, ds))
    fr = fr_cls(inp, planes, 2, copy.deepcopy(ds))
    fr.load_state_dict(tv.state_dict())
    return tv, fr


def _input(kind: str, where: str, value: float) -> torch.Tensor:
    c = 4 if kind == "basic" else 8
    x = torch.randn(2, c, 6, 5)  # odd width: a stride-2 tail
    if where == "value":
        x[1, 1, 2, 3] = value
    else:
        x[1, :, 2, 3] = value
    return x.contiguous(memory_format=torch.channels_last)


def _run(model: nn.Module, x: torch.Tensor, train: bool, grad: bool) -> dict[str, torch.Tensor]:
    model.train(train)
    x = x.detach().clone().requires_grad_(grad)
    out = model(x)
    kept = {"out": out.detach()}
    if grad:
        g = torch.Generator().manual_seed(1)
        (out * torch.randn(out.shape, generator=g)).sum().backward()
        kept["input.grad"] = x.grad
        for n, p in model.named_parameters():
            kept[f"{n}.grad"] = p.grad
    for n, b in model.named_buffers():
        kept[n] = b.detach().clone()
    return kept


def _pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    return t.isnan() * 1 + (t == INF) * 2 + (t == -INF) * 3


def assert_same_nonfinite(ours: dict, theirs: dict, what: str) -> None:
    """Same NaN/+Inf/-Inf pattern in every kept tensor, and the finite values close (float32
    rounding: the kernels sum in other orders than oneDNN)."""
    assert ours.keys() == theirs.keys(), what
    for name, t in theirs.items():
        o = ours[name]
        assert o is not None and t is not None, f"{what}: {name} is None"
        pt, po = _pattern(t), _pattern(o)
        diff = (pt != po).sum().item()
        assert diff == 0, (
            f"{what}: {name}: {diff} of {t.numel()} elements differ in NaN/Inf pattern "
            f"(torchvision NaN/+Inf/-Inf {[(pt == k).sum().item() for k in (1, 2, 3)]}, "
            f"fastres {[(po == k).sum().item() for k in (1, 2, 3)]})"
        )
        if t.is_floating_point():
            fin = pt == 0
            torch.testing.assert_close(
                o[fin].float(), t[fin].float(), rtol=1e-4, atol=1e-4, msg=f"{what}: {name}"
            )
        else:
            assert torch.equal(o, t), f"{what}: {name}"


MODES = {"eval": (False, False), "eval+grad": (False, True), "train": (True, True)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("where", ["value", "pixel"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_block_nonfinite_like_torchvision(backend, kind, value, where, mode):
    train, grad = MODES[mode]
    tv, fr = _blocks(kind)
    x = _input(kind, where, VALUES[value])
    theirs = _run(tv, x, train, grad)
    ours = _run(fr, x, train, grad)
    # the case is not vacuous: torchvision's output holds non-finite values
    assert _pattern(theirs["out"]).any()
    assert_same_nonfinite(ours, theirs, f"{backend} {kind} {value} at one {where}, {mode}")


# ------------------------------------------------------------------------------------------
# Folding: eval folds each BN into its conv; where the fold itself would move NaN/Inf (a weight
# that underflows to 0 or overflows to Inf in the folded dtype) the block runs unfolded.


def _edit_bn(tv: nn.Module, case: str) -> None:
    with torch.no_grad():
        if case == "zero gamma":  # zero_init_residual-style: Inf * 0 = NaN folded or not
            tv.bn2.weight[::2] = 0
            tv.bn1.weight[1] = 0
        elif case == "non-finite stats":  # a model after a divergence
            tv.bn1.running_var[1] = float("nan")
            tv.bn1.running_mean[2] = INF
            tv.bn2.running_var[0] = INF
        elif case == "underflow":  # 1e-30 * 1e-15 * invstd rounds to 0 in float32
            tv.conv1.weight[0] *= 1e-30
            tv.bn1.weight[0] = 1e-15
        elif case == "fp16 overflow":  # 1 * 300 / sqrt(0 + 1e-5) = 94868 > 65504
            tv.conv1.weight[0, 0] = 1.0
            tv.bn1.weight[0] = 300
            tv.bn1.running_var[0] = 0


@pytest.mark.parametrize("path", ["cached", "live"])
@pytest.mark.parametrize("value", ["finite", *VALUES])
@pytest.mark.parametrize("case", ["zero gamma", "non-finite stats", "underflow", "fp16 overflow"])
def test_fold_keeps_the_pattern(backend, case, value, path, monkeypatch):
    """``cached``: the CPU's folds (or the unfolded path where a fold would move NaN/Inf);
    ``live``: the path off the CPU cache (a GPU's), each BatchNorm in its convolution's epilogue
    from its live tensors."""
    if path == "live":
        from fastres.nn._fused import _FusedMixin  # noqa: PLC0415

        monkeypatch.setattr(_FusedMixin, "_fold_cacheable", staticmethod(lambda conv, bn: False))
    tv, fr = _blocks("basic")
    _edit_bn(tv, case)
    fr.load_state_dict(tv.state_dict())
    x = _input("basic", "value", VALUES.get(value, 1.0))
    x[0, :, 1, 1] = 0  # zeros (as after a ReLU): 0 * Inf = NaN where a folded weight overflowed
    if case == "fp16 overflow":
        x, tv, fr = x.half(), tv.half(), fr.half()
    theirs = _run(tv, x, False, False)
    ours = _run(fr, x, False, False)
    if x.dtype == torch.float16:  # compare patterns; float16 values are the rest of the suite's
        theirs = {k: _pattern(v) for k, v in theirs.items()}
        ours = {k: _pattern(v) for k, v in ours.items()}
    assert_same_nonfinite(ours, theirs, f"{backend} {case} {value}")


# ------------------------------------------------------------------------------------------
# The ops themselves, one non-finite value each: the cheapest place to see a max(x, 0) or a
# "> 0" mask that drops NaN (every vectorised lane position is tried, odd channel count).


def _ops(backend: str):
    return backends.BACKENDS[backend].op


def test_relu_keeps_nan_in_every_lane(backend):
    c = 19  # past one AVX-512 vector of floats, with a tail
    x = torch.randn(2, c, 3, 3).contiguous(memory_format=torch.channels_last)
    x[0, :, 1, 1] = float("nan")
    x[1, :, 0, 2] = INF
    x[1, :, 2, 0] = -INF
    op = _ops(backend)
    ones, zeros = torch.ones(c), torch.zeros(c)
    out = op("bn_add_relu")(x, ones, zeros, None, None, None, 0, True)
    assert torch.equal(_pattern(out), _pattern(torch.relu(x)))
    w = torch.eye(c).reshape(c, c, 1, 1).contiguous(memory_format=torch.channels_last)
    # conv_bias_act with an identity 1x1 weight: x * 1 + sum of 0 * (finite) per output; the
    # non-finite pixels make the whole pixel NaN (NaN * 0), as F.conv2d does
    ref = torch.relu(torch.nn.functional.conv2d(x, w))
    out = op("conv_bias_act")(x, w, None, None, [1, 1], [0, 0], [1, 1], 1, True)
    assert torch.equal(_pattern(out), _pattern(ref))
    out, _, _ = op("conv_stats")(x, w, ones, zeros, True, [1, 1], [0, 0], [1, 1], 1)
    assert torch.equal(_pattern(out), _pattern(torch.nn.functional.conv2d(torch.relu(x), w)))


def test_relu_masks_pass_the_gradient_where_out_is_nan(backend):
    c = 19
    out = torch.randn(2, c, 3, 3).contiguous(memory_format=torch.channels_last)
    out[0, :, 1, 1] = float("nan")
    go = torch.randn_like(out)
    expect = torch.ops.aten.threshold_backward(go, out, 0)
    op = _ops(backend)
    gz, gb = op("relu_bias_bwd")(go, out)
    assert torch.equal(gz, expect)
    torch.testing.assert_close(gb, expect.sum((0, 2, 3)))
    # the prologue's mask, recomputed from input * scale + shift
    ones, zeros = torch.ones(c), torch.zeros(c)
    mean, invstd = torch.zeros(c), torch.ones(c)
    # grad_bias = sum(g) stays finite (g passes at the NaN pixel); grad_weight = sum(g * xhat)
    # holds xhat = NaN there, and grad_input = invstd * (g - mean(g) - xhat * mean(g * xhat))
    # is then NaN in every element, as in BatchNorm's backward
    gi, gw, gbias = op("bn_relu_bwd")(go, out, mean, invstd, None, ones, zeros, True)
    torch.testing.assert_close(gbias, expect.sum((0, 2, 3)))
    assert gw.isnan().all() and gi.isnan().all()
    gi, gw, gbias, gres, _, _ = op("bn_add_relu_bwd")(
        go, out, out, mean, invstd, None, None, None, None, None
    )
    assert torch.equal(gres, expect)
    torch.testing.assert_close(gbias, expect.sum((0, 2, 3)))
    assert gw.isnan().all() and gi.isnan().all()


@pytest.mark.parametrize("value", list(VALUES))
def test_bn_finalize_like_batchnorm(backend, value):
    """mean and var of a channel holding one NaN/Inf, and the running statistics, as
    nn.BatchNorm2d computes them (measured: +-Inf -> mean +-Inf, var NaN; NaN -> both NaN)."""
    x = torch.randn(4, 3, 5, 5)
    x[2, 1, 2, 2] = VALUES[value]
    bn = nn.BatchNorm2d(3)
    bn(x)
    op = _ops(backend)
    s = x.double().sum((0, 2, 3)).float()
    q = (x.double() ** 2).sum((0, 2, 3)).float()
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    mean, invstd, scale, shift = op("bn_finalize")(
        s, q, torch.ones(3), torch.zeros(3), rm, rv, nbt, 100, 0.1, 1e-5
    )
    assert torch.equal(_pattern(rm), _pattern(bn.running_mean))
    assert torch.equal(_pattern(rv), _pattern(bn.running_var))
    assert _pattern(invstd)[1] == 1 and _pattern(invstd)[[0, 2]].eq(0).all()
    assert torch.equal(_pattern(mean), _pattern(x.mean((0, 2, 3))))


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_cpu_narrower_instruction_sets(isa):
    """The AVX2 and baseline CPU kernels (which this CPU may not pick by itself) keep NaN too:
    _mm256_max_ps / _mm512_max_ps return their second operand when either is NaN, so the
    operand order of clamp_min decides."""
    if backends.BACKENDS["cpu"].unavailable_reason() is not None:
        pytest.skip("cpu backend unavailable")
    order = ["base", "avx2", "avx512"]
    auto = torch.ops.fastres_cpu.kernel_isa()
    if order.index(isa) >= order.index(auto):
        pytest.skip(f"{isa} is the automatic choice here ({auto}) or wider: covered above")
    torch.ops.fastres_cpu.set_kernel_isa(isa)
    try:
        test_relu_keeps_nan_in_every_lane("cpu")
        test_relu_masks_pass_the_gradient_where_out_is_nan("cpu")
    finally:
        torch.ops.fastres_cpu.set_kernel_isa("auto")


# ------------------------------------------------------------------------------------------
# Mixed precision: GradScaler must see the overflow.


def _net(block: nn.Module) -> nn.Module:
    width = block.conv1.in_channels
    out = block.downsample[1].num_features
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        block,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(out, 5),
    )


def _amp_steps(model: nn.Module, xs: list[torch.Tensor], y: torch.Tensor):
    """bf16 CPU autocast training steps under GradScaler; per step (scale after update,
    parameters after the step, buffers, scaled gradients)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    model.train()
    trace = []
    for x in xs:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        scaler.step(opt)
        scaler.update()
        trace.append(
            (
                scaler.get_scale(),
                {n: p.detach().clone() for n, p in model.named_parameters()},
                {n: b.detach().clone() for n, b in model.named_buffers()},
                grads,
            )
        )
    return trace


@pytest.mark.parametrize("value", ["nan", "+inf"])
def test_grad_scaler_skips_the_step_like_torchvision(backend, value):
    tv, fr = _blocks("basic")
    tv_net = _net(tv)
    fr_net = copy.deepcopy(tv_net)
    fr_net[3] = fr
    fr_net.load_state_dict(tv_net.state_dict())
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 3, 6, 5, generator=g) for _ in range(3)]
    xs[1][1, 2, 3, 1] = VALUES[value]  # the overflow, as a layer upstream would have produced it
    y = torch.tensor([1, 3])
    theirs = _amp_steps(tv_net, xs, y)
    ours = _amp_steps(fr_net, xs, y)
    # torchvision: step 0 taken (scale grows), step 1 skipped (scale halves, no parameter moves)
    assert theirs[0][0] == 2.0**11 and theirs[1][0] == 2.0**10
    assert all(torch.equal(theirs[0][1][n], p) for n, p in theirs[1][1].items())
    for step, ((s_t, p_t, b_t, g_t), (s_o, p_o, b_o, g_o)) in enumerate(
        zip(theirs, ours, strict=True)
    ):
        assert s_o == s_t, f"step {step}: scale {s_o} vs torchvision {s_t}"
        # every gradient, the block's own included (the head's NaN alone would skip the step)
        for n, gr in g_t.items():
            assert torch.equal(_pattern(g_o[n]), _pattern(gr)), f"step {step}: {n}.grad"
        for n, p in p_t.items():
            assert torch.equal(_pattern(p_o[n]), _pattern(p)), f"step {step}: {n}"
            # bf16 rounding of a few SGD steps (lr 0.1) on O(1) weights
            torch.testing.assert_close(p_o[n], p, rtol=2e-2, atol=2e-2, equal_nan=True)
        for n, b in b_t.items():
            assert torch.equal(_pattern(b_o[n]), _pattern(b)), f"step {step}: buffer {n}"
    # the skipped step left the parameters exactly where step 0 put them
    assert all(torch.equal(ours[0][1][n], p) for n, p in ours[1][1].items())


# ------------------------------------------------------------------------------------------
# The rest of bad input: a clear error naming the offending tensor, or torchvision's result.
# (Inputs that need grad in eval mode: the "eval+grad" cases above.)


def _bad_bn(tv: nn.Module, case: str) -> str:
    """Make one BN tensor of ``tv`` wrong; returns the name the error must give."""
    bn = tv.bn2
    if case == "weight float64":
        bn.weight = nn.Parameter(bn.weight.detach().double())
        return "bn2.weight"
    if case == "running_var float16":
        bn.running_var = bn.running_var.half()
        return "bn2.running_var"
    if case == "bias bfloat16":
        bn.bias = nn.Parameter(bn.bias.detach().bfloat16())
        return "bn2.bias"
    if case == "running_mean on meta":
        bn.running_mean = bn.running_mean.to("meta")
        return "bn2.running_mean"
    if case == "downsample weight on meta":
        tv.downsample[1].weight = nn.Parameter(tv.downsample[1].weight.detach().to("meta"))
        return "downsample.1.weight"
    raise AssertionError(case)


BAD_BN = [
    "weight float64",
    "running_var float16",
    "bias bfloat16",
    "running_mean on meta",
    "downsample weight on meta",
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", BAD_BN)
def test_bn_tensor_on_wrong_device_or_dtype(backend, case, train):
    tv, fr = _blocks("basic")
    _bad_bn(tv, case)
    name = _bad_bn(fr, case)
    x = _input("basic", "value", 1.0)
    with pytest.raises(RuntimeError):  # torchvision refuses too (without naming the tensor)
        _run(tv, x, train, train)
    with pytest.raises((RuntimeError, TypeError), match=name.replace(".", r"\.")):
        _run(fr, x, train, train)


def test_bn_float32_with_low_precision_input_is_allowed(backend):
    """A bf16 model whose BN tensors stay float32: ATen's batch_norm accepts it, so do we."""
    tv, fr = _blocks("basic")
    for m in (tv, fr):
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.bfloat16()
    x = _input("basic", "value", float("nan")).bfloat16()
    theirs = _run(tv, x, False, False)
    ours = _run(fr, x, False, False)
    assert torch.equal(_pattern(ours["out"]), _pattern(theirs["out"]))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_weight_that_is_a_non_contiguous_view(backend, mode):
    tv, fr = _blocks("basic")
    w = tv.conv2.weight.detach()
    big = torch.randn(w.shape[0], 2 * w.shape[1], *w.shape[2:])
    big[:, ::2] = w
    for m in (tv, fr):
        m.conv2.weight = nn.Parameter(big.clone()[:, ::2])  # every other input channel
        assert not m.conv2.weight.is_contiguous()
    fr.conv1.weight = nn.Parameter(fr.conv1.weight.detach().transpose(2, 3).contiguous().mT)
    train, grad = MODES[mode]
    x = _input("basic", "pixel", float("nan"))
    assert_same_nonfinite(_run(fr, x, train, grad), _run(tv, x, train, grad), mode)


def test_triton_refuses_int32_channel_offsets_past_2_31():
    """The Triton kernels index channels in int32: a tensor whose channel offsets pass 2^31 - 1
    is refused naming its size (checked on meta tensors: no 8 GB allocation). channels_last
    (channel stride 1) passes; row offsets are int64 in every kernel."""
    if backends.BACKENDS["triton"].unavailable_reason() is not None:
        pytest.skip("triton unavailable")
    from fastres.triton_kernels import _ops

    x = torch.empty(1, 2**12, 2**10, 2**10, device="meta")  # (4095) * 2^20 > 2^31 - 1
    with pytest.raises(ValueError, match=r"size \(1, 4096, 1024, 1024\).*2\^31"):
        _ops._check_act("bn_add_relu", x)
    _ops._check_act("bn_add_relu", x.contiguous(memory_format=torch.channels_last))
    # a convolution whose NCHW output passes it while its input does not
    xi = torch.empty(1, 64, 2**10, 2**10, device="meta")
    w = torch.empty(2**12, 64, 1, 1, device="meta")
    _ops._check_act("conv_stats", xi)
    with pytest.raises(ValueError, match=r"output of size \(1, 4096, 1024, 1024\)"):
        _ops._check_conv_out("conv_stats", xi, w, [1, 1], [0, 0], [1, 1])
