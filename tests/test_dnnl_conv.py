"""fastres' own oneDNN primitives for the CPU convolutions (csrc/cpu/dnnl_conv.cpp): results
against float64 by the suite's tolerance rule, PyTorch's NaN/Inf pattern, one primitive per
shape (kept and reused), the weight reordered again after every kind of write and never
otherwise, one OpenMP pool, and ATen's path when the own path is off. A build without oneDNN's
headers (no libdnnl-dev) has no own path: every test here is skipped with that reason."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torchvision
from op_check import Maker, check

import fastres
from fastres import reference
from fastres.backends import extension
from fastres.harness.rule import assert_close_rule, randomise_bn

_mod, _why = extension.load()
if _mod is None:
    raise ImportError(_why)

cpu_ops = torch.ops.fastres_cpu
BUILT = cpu_ops.own_primitives_built()
pytestmark = pytest.mark.skipif(
    not BUILT, reason="fastres built without oneDNN's headers (apt-get install libdnnl-dev and "
    "rebuild): no own-primitive path")
DTYPES = [torch.float32, torch.bfloat16]
# (k, c, kernel, stride, padding, dilation, input hw): 1x1, 3x3, strided, dilated, odd sizes, and
# a 1x1 map (an (N, C, 1, 1) activation is contiguous and channels_last at once: ResNet-50's
# layer4 at a 32x32 input)
CONVS = [
    (16, 8, 1, 1, 0, 1, (7, 5)),
    (24, 16, 3, 1, 1, 1, (9, 9)),
    (8, 12, 3, 2, 1, 1, (11, 6)),
    (32, 16, 1, 2, 0, 1, (8, 8)),
    (8, 8, 3, 1, 2, 2, (7, 7)),
    (5, 3, 7, 2, 3, 1, (13, 13)),
    (16, 8, 3, 1, 1, 1, (1, 1)),
    (24, 16, 1, 1, 0, 1, (1, 1)),
]


def _serves(dtype) -> bool:
    """Whether the own path serves ``dtype`` on this CPU (oneDNN 2.6 has optimized bf16
    convolutions only with AVX-512; elsewhere ATen's path serves bf16)."""
    if dtype not in _SERVES:
        prev = cpu_ops.set_own_primitives(True)
        x = torch.ones(1, 8, 2, 2, dtype=dtype).contiguous(memory_format=torch.channels_last)
        before = _served()
        torch.ops.fastres.conv_bias_act(x, torch.ones(8, 8, 1, 1, dtype=dtype), None, None,
                                        [1, 1], [0, 0], [1, 1], 1, False)
        _SERVES[dtype] = _served() > before
        cpu_ops.set_own_primitives(prev)
    return _SERVES[dtype]


_SERVES: dict = {}


@pytest.fixture(autouse=True)
def _own_on(request):
    dtype = request.node.callspec.params.get("dtype") if hasattr(request.node, "callspec") \
        else None
    if dtype is not None and not _serves(dtype):
        pytest.skip(f"the own path does not serve {dtype} on this CPU (no optimized oneDNN "
                    "kernel): ATen's path does, tested by tests/test_ops.py")
    prev = cpu_ops.set_own_primitives(True)
    yield
    cpu_ops.set_own_primitives(prev)


def _stats():
    created, reused, reorders = cpu_ops.own_primitives_stats()
    return created, reused, reorders


def _served():
    """Calls the own path served so far (made a primitive or reused one)."""
    created, reused, _ = _stats()
    return created + reused


def _operands(dtype, conv, residual, bias_acc, n=2):
    k, c, r, stride, pad, dil, (h, w) = conv
    m = Maker("cpu", dtype)
    x = m.act(n, c, h, w)
    wt = m.weight(k, c, r)
    b = m.vec(k) if bias_acc else m.vec(k).to(dtype)
    oh = (h + 2 * pad - dil * (r - 1) - 1) // stride + 1
    ow = (w + 2 * pad - dil * (r - 1) - 1) // stride + 1
    res = m.act(n, k, oh, ow) if residual else None
    if h == w == 1:
        # The strides fastres' own ops give an (N, C, 1, 1) output (format_of: contiguous), which
        # the next block's convolution reads, and a weight of the same format: PyTorch's
        # convolution then keeps them (a channels_last weight would make its output
        # channels_last; fastres' ops follow the input alone).
        x, wt = x.contiguous(), wt.contiguous()
        res = res.contiguous() if res is not None else None
    return x, wt, b, res, [stride] * 2, [pad] * 2, [dil] * 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"k{c[0]}c{c[1]}r{c[2]}s{c[3]}d{c[5]}")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_conv_bias_act_matches_float64(dtype, conv, residual, relu):
    x, w, b, res, st, pad, dil = _operands(dtype, conv, residual, bias_acc=False)
    before = _served()
    check("cpu", "conv_bias_act", (x, w, b, res, st, pad, dil, 1, relu), dtype)
    assert _served() == before + 1, "the own-primitive path did not serve the call"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"k{c[0]}c{c[1]}r{c[2]}s{c[3]}d{c[5]}")
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_training_forward_conv_stats(dtype, conv, prologue):
    """conv_stats (the training forward) runs its convolution on the own path: the output and
    both statistics by the tolerance rule, one primitive served per call, the weight (a live
    parameter) reordered per call."""
    x, w, _, _, st, pad, dil = _operands(dtype, conv, False, bias_acc=True)
    m = Maker("cpu", dtype)
    c = x.shape[1]
    pre = (m.vec(c, 0.5, 1.5), m.vec(c), True) if prologue else (None, None, False)
    before = _served()
    check("cpu", "conv_stats", (x, w, *pre, st, pad, dil, 1), dtype)
    assert _served() == before + 1, "the own-primitive path did not serve conv_stats"
    reorders = _stats()[2]
    torch.ops.fastres.conv_stats(x, w, *pre, st, pad, dil, 1)
    assert _stats()[2] == reorders + 1, "a training weight is reordered on every call"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"k{c[0]}c{c[1]}r{c[2]}s{c[3]}d{c[5]}")
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)],
                         ids=["both", "input", "weight"])
def test_training_backward_conv_bwd(dtype, conv, prologue, mask):
    """conv_bwd (the training backward's convolution) runs on the own backward-data and
    backward-weights primitives, except float32 backward data through a spatial kernel (ATen's
    path, faster there: csrc/cpu/dnnl_conv_bwd.cpp): grad_input and grad_weight by the tolerance
    rule, one primitive served per gradient it serves, grad_weight in the weight's strides."""
    x, w, _, _, st, pad, dil = _operands(dtype, conv, False, bias_acc=True)
    m = Maker("cpu", dtype)
    c = x.shape[1]
    pre = (m.vec(c, 0.5, 1.5), m.vec(c), True) if prologue else (None, None, False)
    y = reference.conv_stats(x, w, *pre, st, pad, dil, 1)[0]
    g = m.act(*y.shape)
    before = _served()
    ours = check("cpu", "conv_bwd", (g, x, w, *pre, st, pad, dil, 1, list(mask)), dtype)
    aten_data = dtype == torch.float32 and w.shape[2] * w.shape[3] > 1
    served = int(mask[0] and not aten_data) + int(mask[1])
    assert _served() == before + served, "the own backward primitives did not serve conv_bwd"
    if mask[1]:
        assert ours[1].stride() == w.stride()


@pytest.mark.parametrize("conv", [c for c in CONVS if c[2] > 1],
                         ids=lambda c: f"k{c[0]}c{c[1]}r{c[2]}s{c[3]}d{c[5]}")
def test_spatial_bwd_data_rule(conv):
    """A float32 3x3 backward data goes to ATen's path; with the rule off
    (set_aten_spatial_bwd_data(False), for A/B timing) the own primitive serves it, and both
    answers pass the tolerance rule."""
    dtype = torch.float32
    x, w, _, _, st, pad, dil = _operands(dtype, conv, False, bias_acc=True)
    g = Maker("cpu", dtype).act(*reference.conv_stats(x, w, None, None, False, st, pad, dil,
                                                      1)[0].shape)
    args = (g, x, w, None, None, False, st, pad, dil, 1, [True, False])
    for rule, served in ((True, 0), (False, 1)):
        prev = cpu_ops.set_aten_spatial_bwd_data(rule)
        try:
            before = _served()
            check("cpu", "conv_bwd", args, dtype)
            assert _served() == before + served, f"rule {'on' if rule else 'off'}"
        finally:
            cpu_ops.set_aten_spatial_bwd_data(prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv", CONVS[:3], ids=lambda c: f"k{c[0]}c{c[1]}r{c[2]}s{c[3]}")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("bias_acc", [False, True], ids=["bias_act", "bias_fp32"])
def test_finite_and_into_match_float64(dtype, conv, residual, bias_acc):
    """conv_bias_act_finite (the ReLU post-op) and _into (the sum post-op into the residual's
    buffer), the eval plans' ops, including a float32 bias with bfloat16 activations."""
    x, w, b, res, st, pad, dil = _operands(dtype, conv, residual, bias_acc)
    args = (x, w, b, res, st, pad, dil, 1, True)
    theirs = reference.conv_bias_act(*args)
    truth = reference.conv_bias_act(*[a.double() if isinstance(a, torch.Tensor) else a
                                      for a in args])
    before = _served()
    ours = cpu_ops.conv_bias_act_finite(*args)
    assert ours.stride() == theirs.stride()
    assert_close_rule(f"finite {dtype}", ours, theirs, truth, dtype)
    if residual:
        into = res.clone()
        out = cpu_ops.conv_bias_act_finite_into(into, x, w, b, st, pad, dil, 1, True)
        assert out.data_ptr() == into.data_ptr()
        assert_close_rule(f"finite_into {dtype}", into, theirs, truth, dtype)
    assert _served() == before + 1 + residual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_nonfinite_pattern_like_torch(dtype, value, residual):
    """conv_bias_act keeps PyTorch's NaN/Inf pattern (ReLU(NaN) = NaN: oneDNN's ReLU post-op
    would give 0) where a non-finite value sits in the input or the residual."""
    x, w, b, res, st, pad, dil = _operands(dtype, CONVS[1], residual, bias_acc=False)
    x[0, :, 2, 3] = value
    x[1, 3, 4, 4] = value
    if residual:
        res[1, :, 0, 0] = value
    before = _served()
    ours = torch.ops.fastres.conv_bias_act(x, w, b, res, st, pad, dil, 1, True)
    assert _served() == before + 1
    ref = reference.conv_bias_act(x, w, b, res, st, pad, dil, 1, True)
    assert not torch.isfinite(ref).all(), "the case is vacuous"
    for name, pick in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                       ("-Inf", lambda t: t == float("-inf"))):
        assert torch.equal(pick(ours), pick(ref)), f"{name} pattern differs"
    fin = torch.isfinite(ref)
    truth = reference.conv_bias_act(*[a.double() if isinstance(a, torch.Tensor) else a
                                      for a in (x, w, b, res, st, pad, dil, 1, True)])
    assert_close_rule(f"finite part {dtype}", ours[fin], ref[fin], truth[fin], dtype)


def test_primitive_made_once_per_shape():
    """The first call of a shape makes one primitive; every later call of it makes none (no
    descriptor per call); another shape, post-op chain or dtype makes its own."""
    cpu_ops.own_primitives_cache_clear()
    x, w, b, res, st, pad, dil = _operands(torch.float32, CONVS[1], True, bias_acc=False)
    op = torch.ops.fastres.conv_bias_act
    created, reused, _ = _stats()
    op(x, w, b, None, st, pad, dil, 1, True)
    assert _stats()[:2] == (created + 1, reused)
    for _ in range(3):
        op(x, w, b, None, st, pad, dil, 1, True)
    assert _stats()[:2] == (created + 1, reused + 3)
    op(x, w, b, res, st, pad, dil, 1, True)  # sum post-op: another primitive
    op(x[:1].contiguous(memory_format=torch.channels_last), w, b, None, st, pad, dil, 1, True)
    assert _stats()[0] == created + 3
    assert cpu_ops.own_primitives_cache_size() == 3
    impl = cpu_ops.own_primitives_impl(list(x.shape))
    assert impl, "no kept primitive for this input shape"


def test_weight_reordered_once_and_again_after_every_write():
    """An allowed weight is reordered into the primitive's layout once and kept; an in-place
    update (optimizer step), a new storage (.data =) each reorder it again before use. A weight
    nobody allowed (a parameter: writes through .data leave its version alone) is reordered per
    call, so a .data write is seen too. Every result against float64."""
    x, _, b, _, st, pad, dil = _operands(torch.float32, CONVS[1], False, bias_acc=False)
    m = Maker("cpu", torch.float32)

    def run(w):
        return check("cpu", "conv_bias_act", (x, w, b, None, st, pad, dil, 1, True),
                     torch.float32)

    w = m.weight(24, 16, 3)
    cpu_ops.weight_cache_allow(w)
    _, _, r0 = _stats()
    run(w)
    run(w)
    assert _stats()[2] == r0 + 1, "an unchanged allowed weight was reordered again"
    with torch.no_grad():
        w.mul_(-2)  # an optimizer step: the version moves
    run(w)
    assert _stats()[2] == r0 + 2
    w.data = m.weight(24, 16, 3)  # a new storage
    run(w)
    assert _stats()[2] == r0 + 3
    p = torch.nn.Parameter(m.weight(24, 16, 3))
    with torch.no_grad():
        run(p)
        p.data.mul_(-1)  # no version bump on p
        run(p)
    assert _stats()[2] == r0 + 5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packing_follows_the_primitives_layout(dtype):
    """One allowed weight under the primitives of several batch sizes, alternating: each call
    reads a packing in its own primitive's layout. oneDNN blocks a weight per primitive: on an
    AVX10/AMX Xeon, ResNet-50 layer4's 1x1 512x1024 weight at 14x14 is Acdb64a for a batch of 1
    and Acdb48a for 8; served the other primitive's packing, a convolution reads past it (errors
    of 1e2-1e10 there). Every result against float64; one primitive per batch
    size; a packing per layout at most (never more packings than primitives)."""
    m = Maker("cpu", dtype)
    w = m.weight(512, 1024, 1)
    cpu_ops.weight_cache_allow(w)
    created, _, r0 = _stats()
    for n in (1, 8, 2, 8, 1, 2):
        x = m.act(n, 1024, 14, 14)
        check("cpu", "conv_bias_act", (x, w, None, None, [1, 1], [0, 0], [1, 1], 1, False),
              dtype)
    primitives = _stats()[0] - created
    assert primitives == 3, f"{primitives} primitives for 3 batch sizes"
    assert 1 <= _stats()[2] - r0 <= primitives


def test_block_eval_sees_a_data_write():
    """A converted Bottleneck in eval (its plan folds BN into weights the cache keeps): a write
    through ``.data`` to a conv weight and to a BN statistic changes the output as it changes
    torchvision's; each output against float64 by the tolerance rule."""
    tv = torchvision.models.resnet.Bottleneck(32, 8).eval()
    with torch.no_grad():
        for mod in tv.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    fr = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(2, 32, 9, 9).contiguous(memory_format=torch.channels_last)

    def judge(what):
        before = _served()
        with torch.no_grad():
            ours = fr(x)
            theirs = tv(x)
            truth = copy.deepcopy(tv).double()(x.double())
        assert _served() > before, "the own-primitive path did not serve the block"
        assert_close_rule(what, ours, theirs, truth, torch.float32)

    judge("first call")
    judge("second call")
    for model in (tv, fr):
        model.conv2.weight.data.mul_(-1)
    judge("after conv2.weight.data.mul_(-1)")
    for model in (tv, fr):
        model.bn3.running_var.data.mul_(4)
    judge("after bn3.running_var.data.mul_(4)")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_calls_reuse_packed_weights_eager_and_compiled(mode):
    """A converted ResNet's eval calls, eager and under torch.compile (its body one opaque op),
    reorder no weight once warm: the packings of the BN-folded weights are kept, under
    torch.no_grad(), torch.inference_mode() (a fold made as an inference tensor has no version
    counter and could never be kept) and with grad mode on but every parameter frozen. A .data
    write to a conv weight is seen: the next call reorders again and matches torchvision's
    output by the tolerance rule. Frozen parameters unfrozen: the compiled model re-traces and
    its output carries gradients."""
    tv = torchvision.models.resnet18(num_classes=10)
    randomise_bn(tv, 0)
    tv = tv.eval().to(memory_format=torch.channels_last)
    fr = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "frozen": contextlib.nullcontext}[mode]
    if mode == "frozen":
        fr.requires_grad_(False)
    torch._dynamo.reset()
    compiled = torch.compile(fr, fullgraph=True, dynamic=False)

    def reorders_per_call(f):
        with ctx():
            f()
            f()
            _, reused, r0 = _stats()
            out = f()
            f()
            _, reused2, r1 = _stats()
        assert reused2 > reused, "the own path served no convolution"
        return r1 - r0, out

    def judge(what, out):
        with torch.no_grad():
            truth = copy.deepcopy(tv).double()(x.double())
            assert_close_rule(what, out, tv(x), truth, torch.float32)

    for name, f in (("eager", lambda: fr(x)), ("compiled", lambda: compiled(x))):
        got, out = reorders_per_call(f)
        assert got == 0, f"{name} calls under {mode} reordered {got / 2:g} weights per call"
        judge(name, out)
    for model in (tv, fr):
        model.layer2[1].conv1.weight.data.mul_(-1)
    _, _, r0 = _stats()
    with ctx():
        out = compiled(x)
    assert _stats()[2] > r0, "a .data write to a conv weight was not reordered"
    judge("compiled, after layer2[1].conv1.weight.data.mul_(-1)", out)
    got, _ = reorders_per_call(lambda: compiled(x))
    assert got == 0
    if mode == "frozen":
        fr.requires_grad_(True)
        out = compiled(x)
        assert out.requires_grad
        out.sum().backward()
        assert fr.conv1.weight.grad is not None
    torch._dynamo.reset()


def test_off_switch_takes_atens_path():
    """set_own_primitives(False) (FASTRES_CPU_OWN_PRIMITIVES=0 at start-up): ATen's path serves,
    with the same results within the rule."""
    x, w, b, res, st, pad, dil = _operands(torch.float32, CONVS[0], True, bias_acc=False)
    cpu_ops.set_own_primitives(False)
    before = _stats()
    check("cpu", "conv_bias_act", (x, w, b, res, st, pad, dil, 1, True), torch.float32)
    assert _stats() == before


def test_uncovered_calls_fall_back():
    """Contiguous (NCHW) input, groups > 1 and float64 are not the own path's: ATen's serves
    them, within the rule."""
    m = Maker("cpu", torch.float32, "contiguous")
    before = _served()
    x, w = m.act(2, 8, 6, 6), m.weight(8, 8, 3)
    check("cpu", "conv_bias_act", (x, w, None, None, [1, 1], [1, 1], [1, 1], 1, True),
          torch.float32)
    x = Maker("cpu", torch.float32).act(2, 8, 6, 6)
    w = Maker("cpu", torch.float32).weight(8, 4, 3)
    check("cpu", "conv_bias_act", (x, w, None, None, [1, 1], [1, 1], [1, 1], 2, True),
          torch.float32)
    md = Maker("cpu", torch.float64)
    check("cpu", "conv_bias_act",
          (md.act(2, 8, 6, 6), md.weight(8, 8, 3), None, None, [1, 1], [1, 1], [1, 1], 1, True),
          torch.float64)
    assert _served() == before


def test_one_openmp_runtime():
    """libdnnl and torch share one OpenMP runtime (the loader maps one libgomp.so.1): two would
    each keep a spinning pool of torch.get_num_threads() threads on the same cores."""
    x, w, b, _, st, pad, dil = _operands(torch.float32, CONVS[1], False, bias_acc=False, n=4)
    torch.ops.fastres.conv_bias_act(x, w, b, None, st, pad, dil, 1, True)
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(libs) == 1, f"more than one OpenMP runtime mapped: {sorted(libs)}"
