"""fastres in the rest of the ecosystem: autocast, FrozenBatchNorm2d (detection backbones),
torch.export / torch.compile, and their GPU variants (bench/device_check.sh runs this file's
``gpu_integration`` tests). Checkpoints, convert and revert: test_convert.py; timm: test_timm.py;
DDP and SyncBatchNorm: test_distributed.py.

Numerical comparisons follow the tolerance rule (fastres.harness.rule): against a float64 run of the
plain model with the same weights, err(fastres) <= 2 * err(plain PyTorch) + atol[dtype]. The
backend is whatever FASTRES_BACKEND (or the dispatcher) picks, so the suite is run once per
backend by the caller.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision
from integration_helpers import (
    FUSED,
    SYNC_SPLIT,
    check_rule,
    init_dist,
    n_fused,
    randomise_bn,
    run_kept,
    small_resnet,
    spawn,
)
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d

import fastres

# ------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet18_cpu_autocast_bf16(train):
    """A converted resnet18 under torch.autocast("cpu", bfloat16) against torchvision's under the
    same autocast: same output dtype (bfloat16), float32 parameter grads and running statistics,
    all within the tolerance rule of a float64 run without autocast."""
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10))
    ref = copy.deepcopy(tv).double()
    ours = fastres.convert(copy.deepcopy(tv))
    # 64x64 and N=4: layer4's BatchNorms see 16 values per channel (see test_blocks).
    x = torch.randn(4, 3, 64, 64)
    k_ref = run_kept(ref, x.double(), train)
    k_theirs = run_kept(tv, x, train, autocast=torch.bfloat16)
    k_ours = run_kept(ours, x, train, autocast=torch.bfloat16)
    assert k_ours["out"].dtype == torch.bfloat16
    if train:
        assert k_ours["layer1.0.bn1.running_mean"].dtype == torch.float32
        assert k_ours["layer1.0.conv1.weight.grad"].dtype == torch.float32
    check_rule(k_ours, k_theirs, k_ref, torch.bfloat16, rms_grads=train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_block_autocast_float32_input(train):
    """A block fed float32 under autocast (the identity shortcut is float32, the convolutions
    bfloat16) returns what torchvision's returns: bfloat16; the same for ConvBNReLU."""
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    for tv in (
        tv_resnet.Bottleneck(16, 8, stride=2, downsample=ds),
        tv_resnet.BasicBlock(16, 16),
        Conv2dNormActivation(16, 8, 3),
    ):
        tv = randomise_bn(tv)
        ref = copy.deepcopy(tv).double()
        ours = fastres.convert(copy.deepcopy(tv))
        assert n_fused(ours) == 1
        x = torch.randn(4, 16, 8, 8)
        k_ref = run_kept(ref, x.double(), train)
        k_theirs = run_kept(tv, x, train, autocast=torch.bfloat16)
        k_ours = run_kept(ours, x, train, autocast=torch.bfloat16)
        check_rule(k_ours, k_theirs, k_ref, torch.bfloat16)


# ------------------------------------------------------------------------------- FrozenBatchNorm2d


def frozen_detection_backbone() -> nn.Module:
    """The backbone fasterrcnn_resnet50_fpn builds around an ImageNet backbone: ResNet-50 with
    FrozenBatchNorm2d, layer2-4 trainable, an FPN on top. (With weights_backbone=None,
    fasterrcnn_resnet50_fpn switches to nn.BatchNorm2d, so it is built here without downloads.)"""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )


def test_frozen_bn_detection_backbone_train():
    """Train mode: FrozenBatchNorm2d is folded (its statistics never change), gradients reach
    the conv weights through the fold; outputs, input grad and every trainable parameter's grad
    by the tolerance rule."""
    tv = randomise_bn(frozen_detection_backbone())
    ours, rep = fastres.convert(copy.deepcopy(tv), report=True)
    # 16 blocks and the body (IntermediateLayerGetter: its stem conv1, bn1, relu)
    assert len(rep.swapped) == 17 and ("body", "FusedLayerGetter") in rep.swapped, rep
    # the FPN's Conv2dNormActivation have a conv bias and no norm layer: nothing to fuse there,
    # which is no failure
    assert not rep.left and rep.convs[0] == rep.norms[0] == rep.norms[1] == 53, rep
    assert all(p.startswith("fpn.") and "without a norm layer" in s.why
               for p, s in rep.layers.items() if not s.fused), rep
    assert type(ours.body.layer1[0].bn1) is FrozenBatchNorm2d
    ref = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 64, 64)
    k_ref = run_kept(ref, x.double(), True)
    k_theirs = run_kept(tv, x, True)
    k_ours = run_kept(ours, x, True)
    assert "body.layer4.2.conv3.weight.grad" in k_ours
    assert "body.layer1.0.conv1.weight.grad" not in k_ours  # frozen by trainable_layers=3
    check_rule(k_ours, k_theirs, k_ref, torch.float32)


def test_frozen_bn_blocks_and_reasons():
    """Blocks and ConvBNReLU with FrozenBatchNorm2d: fused in train and eval, also under autocast,
    where torchvision's block returns float32 (FrozenBatchNorm2d computes in its buffers' dtype);
    a block mixing BatchNorm2d and FrozenBatchNorm2d is left with the reason; a BatchNorm2d
    downsample of a frozen block runs as a module."""
    frozen_ds = nn.Sequential(nn.Conv2d(8, 32, 1, stride=2, bias=False), FrozenBatchNorm2d(32))
    bn_ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    every = [(t, ac) for t in (True, False) for ac in (None, torch.bfloat16)]
    cases = [
        (tv_resnet.Bottleneck(8, 8, 2, frozen_ds, norm_layer=FrozenBatchNorm2d), every),
        (Conv2dNormActivation(8, 8, 3, norm_layer=FrozenBatchNorm2d), every),
        # Not bf16 training: gradients through a batch-statistics BatchNorm in bf16 are so
        # ill-conditioned at this size that PyTorch's own max error changes 2x from seed to seed.
        (
            tv_resnet.BasicBlock(8, 16, 2, bn_ds, norm_layer=FrozenBatchNorm2d),
            [(True, None), (False, None), (False, torch.bfloat16)],
        ),
    ]
    # 48x48: enough ReLU-mask flips for bf16 gradient errors to be an average, not a coin toss
    x = torch.randn(4, 8, 48, 48)
    for tv, modes in cases:
        tv = randomise_bn(tv)
        ours = fastres.convert(copy.deepcopy(tv))
        assert n_fused(ours) == 1
        ref = copy.deepcopy(tv).double()
        for train, ac in modes:
            k_ref = run_kept(ref, x.double(), train)
            k_theirs = run_kept(tv, x, train, autocast=ac)
            k_ours = run_kept(ours, x, train, autocast=ac)
            if ac is not None:
                assert k_ours["out"].dtype == torch.float32
            check_rule(k_ours, k_theirs, k_ref, ac or torch.float32)
    mixed = tv_resnet.BasicBlock(8, 8)
    mixed.bn2 = FrozenBatchNorm2d(8)
    _, rep = fastres.convert(mixed, report=True)
    assert not rep.swapped and "mixes BatchNorm2d and FrozenBatchNorm2d" in rep.left[0][1]


# ------------------------------------------------------------------------------- export, compile

slow = pytest.mark.skipif(
    os.environ.get("FASTRES_SLOW") != "1",
    reason="slow on a CPU machine (minutes of Inductor compilation): set FASTRES_SLOW=1",
)


def test_export_eval_resnet18():
    """torch.export of a converted model in eval mode: the folds and fused ops are traced (the
    compiled backends' ops through their fake kernels) and the exported program computes what
    torchvision does."""
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    ours = fastres.convert(tv).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(ours, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    backend = fastres.functional.select_backend(
        x, [tv.conv1.weight], [fastres.functional.ConvSpec()]
    )
    if backend.name != "reference":
        assert "fastres.conv_bias_act.default" in targets, targets
    # the fold is part of the program (not a constant of the trace): new weights are picked up
    assert not any(m._fold_cache for m in ours.modules() if isinstance(m, FUSED))
    with torch.no_grad():
        k_ref = {"out": copy.deepcopy(tv).double()(x.double())}
        check_rule({"out": ep.module()(x)}, {"out": tv(x)}, k_ref, torch.float32)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_resnet18_no_graph_breaks(train):
    """Dynamo traces a whole converted ResNet-18 as one graph, in eval and in training (the
    autograd.Function of the training path included)."""
    ours = fastres.convert(torchvision.models.resnet18(num_classes=10)).train(train)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(ours)(torch.randn(2, 3, 32, 32))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


def test_compile_channels_last_eval_block():
    """torch.compile (Inductor) of a converted block on channels_last CPU input, eval: the case
    where the CPU backend prepacks weights. Inductor computes the folds in the graph and reuses
    conv1's folded-weight buffer for conv2's (written without a version bump); a cache keyed on
    the tensor then ran conv2 with conv1's weight (max error 2.09 before the fix)."""
    tv = randomise_bn(tv_resnet.BasicBlock(16, 16)).eval().to(memory_format=torch.channels_last)
    ours = fastres.convert(tv)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(ours, dynamic=False)
    with torch.no_grad():
        k_ref = {"out": copy.deepcopy(tv).double()(x.double())}
        for _ in range(2):  # the second call runs with every cache warm
            check_rule({"out": compiled(x)}, {"out": tv(x)}, k_ref, torch.float32)


def test_compile_max_autotune_small_resnet():
    """torch.compile(mode="max-autotune", fullgraph=True) of a converted ResNet (one block per
    stage: identity and downsample blocks), eval and a training step: outputs and running
    statistics by the tolerance rule against float64 torchvision, with the worse of eager and
    max-autotune-compiled torchvision as PyTorch's yardstick (test_compile_resnet50_modes runs
    ResNet-50 in both modes with FASTRES_SLOW=1)."""
    tv = randomise_bn(small_resnet())
    ours = fastres.convert(copy.deepcopy(tv))
    ref = copy.deepcopy(tv).double()
    torch._dynamo.reset()
    compiled = {
        "ours": torch.compile(ours, mode="max-autotune", fullgraph=True),
        "tv": torch.compile(tv, mode="max-autotune"),
    }
    x = torch.randn(4, 3, 32, 32)
    for train in (False, True):
        _check_compiled(compiled, {"tv": tv, "ours": ours}, ref, x, train)


def _check_compiled(compiled: dict, models: dict, ref: nn.Module, x, train: bool) -> None:
    """compiled["ours"] by the tolerance rule against float64 ``ref``, PyTorch's yardstick being
    the worse of eager and compiled torchvision; gradients only checked finite (see
    test_compile_resnet50_modes)."""
    k_ref = run_kept(ref, x.double(), train)
    k_eager = run_kept(copy.deepcopy(models["tv"]), x, train)
    kept = {}
    for name in ("tv", "ours"):
        models[name].train(train)
        k = run_kept(compiled[name], x, train)
        kept[name] = {n.replace("_orig_mod.", ""): v for n, v in k.items()}
    grads = [n for n in k_ref if n.endswith(".grad")]
    for n in grads:
        assert torch.isfinite(kept["ours"].pop(n)).all(), n
        kept["tv"].pop(n), k_eager.pop(n), k_ref.pop(n)
    theirs = {
        n: max(
            (kept["tv"][n], k_eager[n]),
            key=lambda t, n=n: (t.double() - k_ref[n].double()).abs().max().item(),
        )
        for n in k_ref
    }
    check_rule(kept["ours"], theirs, k_ref, torch.float32)


def test_compile_first_call_fullgraph_fresh_process():
    """The very first call of a converted model may be a compiled one: the backend probes
    (loading fastres._C, importing triton) run outside the trace, so fullgraph holds. In a fresh
    interpreter, where nothing has been probed yet (Dynamo's eager backend: only the trace)."""
    import subprocess
    import sys

    code = (
        "import torch, torchvision, fastres\n"
        "from torchvision.models import resnet as tv\n"
        "m = fastres.convert(torchvision.models.ResNet(tv.BasicBlock, [1, 1, 1, 1]))\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "for train in (False, True):\n"
        "    torch._dynamo.reset()\n"
        "    y = torch.compile(m.train(train), fullgraph=True, backend='eager')(x)\n"
        "    assert y.shape == (2, 1000)\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@slow
@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_compile_resnet50_modes(mode):
    """torch.compile (Inductor, ``mode``), fullgraph, on a whole converted ResNet-50, eval and
    a training step, by the tolerance rule against float64 torchvision: outputs and running
    statistics. PyTorch's yardstick is the worse of eager and Inductor-compiled torchvision:
    Inductor rounds differently from eager (measured 0.4x to 3x eager's error on torchvision's
    own ResNets) and either is "PyTorch at the same dtype". Gradients are only checked to exist
    and be finite here: through ~50 ReLUs at this size one activation within rounding of zero
    takes the other branch in one of the runs, and that single decision dominates a gradient's
    max error (eager gradient parity: test_blocks; compiled: test_compile_fullgraph_bottleneck)."""
    tv = randomise_bn(torchvision.models.resnet50(num_classes=10))
    ours = fastres.convert(copy.deepcopy(tv))
    ref = copy.deepcopy(tv).double()
    torch._dynamo.reset()
    compiled = {
        "ours": torch.compile(ours, mode=mode, fullgraph=True),
        "tv": torch.compile(tv, mode=mode),
    }
    x = torch.randn(4, 3, 64, 64)
    for train in (False, True):
        _check_compiled(compiled, {"tv": tv, "ours": ours}, ref, x, train)


# ------------------------------------------------------------------------------- GPU variants
# Run by bench/device_check.sh on a CUDA machine (its last extra step, with DEVICE_CHECK_EXTRA=1 or a
# budget of 600 s or more: marker gpu_integration); skipped elsewhere.


def _gpu_backends() -> list:
    """Every backend that can run on CUDA here, forced by name; "auto" is the dispatcher's pick."""
    return [
        "auto",
        *(
            pytest.param(b, marks=pytest.mark.skipif(True, reason=f"{b} unavailable"))
            if not torch.cuda.is_available() or fastres.backends.BACKENDS[b].unavailable_reason()
            else b
            for b in ("cuda", "triton")
        ),
    ]


def _gpu_sync_worker(rank, world, port, backend, state, x, proj, out_dir) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    if backend != "auto":
        os.environ["FASTRES_BACKEND"] = backend
    n_gpu = torch.cuda.device_count()
    dev = torch.device("cuda", rank % n_gpu)
    torch.cuda.set_device(dev)
    # NCCL needs one GPU per process; with one GPU both processes share it over gloo
    dist = init_dist(rank, world, port, "nccl" if n_gpu >= world else "gloo")
    try:
        kept = {}
        runs = {
            "ours": (torch.float32, lambda m: fastres.convert(m, sync_bn=True)),
            "theirs": (torch.float32, nn.SyncBatchNorm.convert_sync_batchnorm),
            "ref": (torch.float64, nn.SyncBatchNorm.convert_sync_batchnorm),
        }
        for name, (dtype, make) in runs.items():
            model = make(small_resnet()).to(dev, dtype)
            model.load_state_dict(state, strict=True)
            ddp = DDP(model, device_ids=[dev.index])
            out = ddp(x.split(SYNC_SPLIT)[rank].to(dev, dtype))
            (out * proj.split(SYNC_SPLIT)[rank].to(dev, dtype)).sum().backward()
            k = {"out": out.detach()}
            k.update({f"{n}.grad": p.grad.detach() for n, p in model.named_parameters()})
            k.update({n: b.detach() for n, b in model.named_buffers()})
            kept[name] = {n: v.cpu() for n, v in k.items()}
        torch.save(kept, os.path.join(out_dir, f"gpu_sync{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.gpu_integration
@pytest.mark.parametrize("backend", _gpu_backends())
def test_sync_bn_gpu_matches_nn_syncbatchnorm(backend, tmp_path):
    """On a GPU the same fused SyncBatchNorm path (NCCL with 2 GPUs, gloo on CUDA tensors with
    one) matches torchvision with nn.SyncBatchNorm under the same DDP step: outputs, gradients,
    running statistics, by the tolerance rule against the float64 nn.SyncBatchNorm run."""
    world = 2
    state = randomise_bn(small_resnet()).state_dict()
    x, proj = torch.randn(sum(SYNC_SPLIT), 3, 64, 64), torch.randn(sum(SYNC_SPLIT), 10)
    spawn(_gpu_sync_worker, world, backend, state, x, proj, str(tmp_path))
    for rank in range(world):
        k = torch.load(tmp_path / f"gpu_sync{rank}.pt")
        check_rule(k["ours"], k["theirs"], k["ref"], torch.float32)


@pytest.mark.gpu
@pytest.mark.gpu_integration
@pytest.mark.parametrize("backend", _gpu_backends())
def test_cuda_graph_capture_forward_and_training_step(backend, monkeypatch):
    """CUDA graph capture of a converted model's fused forward (eval) and of a whole training
    step (forward, backward, SGD step): replays compute what eager runs compute from the same
    state (no host sync or allocation outside the graph's pool in the fused path)."""
    if backend != "auto":
        monkeypatch.setenv("FASTRES_BACKEND", backend)
    dev = torch.device("cuda")
    base = fastres.convert(randomise_bn(small_resnet())).to(dev)
    base = base.to(memory_format=torch.channels_last)
    x0 = torch.randn(8, 3, 64, 64, device=dev).contiguous(memory_format=torch.channels_last)
    proj = torch.randn(8, 10, device=dev)

    def warm(fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)

    # eval: capture, then replay on new data
    model = copy.deepcopy(base).eval()
    static_x = x0.clone()
    with torch.no_grad():
        warm(lambda: model(static_x))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = model(static_x)
        for _ in range(2):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            g.replay()
            torch.testing.assert_close(static_y, model(x), rtol=1e-5, atol=1e-5)

    # training step: capture forward + backward + optimizer step
    model = copy.deepcopy(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        out = model(static_x)
        (out * proj).sum().backward()
        opt.step()

    static_x.copy_(x0)
    warm(lambda: (opt.zero_grad(set_to_none=True), step()))
    opt.zero_grad(set_to_none=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    twin = copy.deepcopy(model)  # the state the next replay starts from
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    for _ in range(2):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        g.replay()
        twin_opt.zero_grad(set_to_none=True)
        (twin(x) * proj).sum().backward()
        twin_opt.step()
        ours = dict(model.state_dict())
        for n, v in twin.state_dict().items():
            torch.testing.assert_close(ours[n], v, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.gpu
@pytest.mark.gpu_integration
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet18_cuda_autocast_bf16(backend, train, monkeypatch):
    """test_resnet18_cpu_autocast_bf16 on CUDA (torch.autocast("cuda", bfloat16)), per backend."""
    if backend != "auto":
        monkeypatch.setenv("FASTRES_BACKEND", backend)
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10)).cuda()
    ref = copy.deepcopy(tv).double()
    ours = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(4, 3, 64, 64, device="cuda")
    k_ref = run_kept(ref, x.double(), train)
    k_theirs = run_kept(tv, x, train, autocast=torch.bfloat16)
    k_ours = run_kept(ours, x, train, autocast=torch.bfloat16)
    assert k_ours["out"].dtype == torch.bfloat16
    check_rule(k_ours, k_theirs, k_ref, torch.bfloat16)

