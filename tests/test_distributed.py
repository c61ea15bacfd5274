"""Distributed training with fused models: DDP (gloo, 2 processes) and SyncBatchNorm in the fused
path (fastres.nn.distributed), against one process running the whole batch; the tolerance rule
(fastres.harness.rule) against float64. The GPU variant is test_integrations.py's
test_sync_bn_gpu_matches_nn_syncbatchnorm."""

from __future__ import annotations

import copy
import os

import pytest
import torch
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

import fastres
from fastres.harness.rule import rms_err, verdict

# ------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, state: dict, xs, projs, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = init_dist(rank, world, port)
    try:
        model = fastres.convert(small_resnet())
        model.load_state_dict(state, strict=True)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        out = ddp(xs[rank])
        (out * projs[rank]).sum().backward()
        kept = {f"{n}.grad": p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        kept.update({n: p.detach().clone() for n, p in model.named_parameters()})
        kept.update({n: b.detach().clone() for n, b in model.named_buffers()})
        kept["n_fused"] = torch.tensor(n_fused(model))
        torch.save(kept, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_step(model: nn.Module, xs, projs) -> list[dict]:
    """What DDP must reproduce, in one process: per-rank forward/backward from the same start,
    gradients averaged, one SGD step with the average; per-rank running statistics."""
    start = copy.deepcopy(model.state_dict())
    grads, bufs = [], []
    for x, proj in zip(xs, projs, strict=True):
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        model.train()
        (model(x.to(proj.dtype)) * proj).sum().backward()
        grads.append({f"{n}.grad": p.grad.detach().clone() for n, p in model.named_parameters()})
        bufs.append({n: b.detach().clone() for n, b in model.named_buffers()})
    avg = {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}
    model.load_state_dict(start)
    with torch.no_grad():
        params = {n: p - 0.1 * avg[f"{n}.grad"] for n, p in model.named_parameters()}
    return [{**avg, **params, **b} for b in bufs]


def test_ddp_gloo_two_processes(tmp_path):
    """DDP (gloo, 2 processes, no SyncBatchNorm) of a converted model: one SGD step; gradients
    (DDP's average), updated parameters and each rank's running statistics against the same
    fused model in one process running the per-rank batches and averaging the gradients (what
    DDP must reproduce), by the tolerance rule against float64 torchvision. The yardstick is the
    fused model, not torchvision: the fused-vs-torchvision numerics are the other tests' business,
    and a ReLU decision flipped by rounding would make the comparison a coin toss here."""
    tv = randomise_bn(small_resnet())
    state = tv.state_dict()
    # N=4 at 64x64 per rank: layer4's BatchNorms see 16 values per channel (see test_blocks)
    xs = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    projs = [torch.randn(4, 10) for _ in range(2)]
    spawn(_ddp_worker, 2, state, xs, projs, str(tmp_path))
    k_ref = _single_process_step(copy.deepcopy(tv).double(), xs, [p.double() for p in projs])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same reduction orders
    try:
        k_single = _single_process_step(fastres.convert(copy.deepcopy(tv)), xs, projs)
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        k_ours = torch.load(tmp_path / f"rank{rank}.pt")
        assert int(k_ours.pop("n_fused")) == 4
        check_rule(k_ours, k_single[rank], k_ref[rank], torch.float32)


# ------------------------------------------------------------------------------- SyncBatchNorm


def _sync_worker(
    rank: int, world: int, port: int, split, state: dict, x, proj, out_dir: str
) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = init_dist(rank, world, port)
    try:
        kept = {}
        for dtype in (torch.float64, torch.float32):
            model = fastres.convert(small_resnet(), sync_bn=True).to(dtype)
            model.load_state_dict(state, strict=True)
            ddp = DDP(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            out = ddp(x.split(split)[rank].to(dtype))
            (out * proj.split(split)[rank].to(dtype)).sum().backward()
            k = {"out": out.detach().clone()}
            k.update({f"{n}.grad": p.grad.detach().clone() for n, p in model.named_parameters()})
            opt.step()
            k.update({n: p.detach().clone() for n, p in model.named_parameters()})
            k.update({n: b.detach().clone() for n, b in model.named_buffers()})
            k["n_fused"] = torch.tensor(n_fused(model))
            k["n_sync"] = torch.tensor(
                sum(type(m) is fastres.SyncBatchNorm for m in model.modules())
            )
            kept[str(dtype)] = k
        torch.save(kept, os.path.join(out_dir, f"sync{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _whole_batch_step(model: nn.Module, x, proj, world: int, split) -> list[dict]:
    """What a DDP step with SyncBatchNorm must reproduce, in one process: the whole batch through
    plain BatchNorm, the loss of every rank summed and divided by the world size (DDP averages
    the ranks' gradients), one SGD step. Returns each rank's view (its rows of the output)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x.to(proj.dtype))
    ((out * proj).sum() / world).backward()
    k = {f"{n}.grad": p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        k.update({n: p - 0.1 * p.grad for n, p in model.named_parameters()})
    k.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return [{"out": o.detach(), **k} for o in out.split(split)]


@pytest.mark.parametrize("split", [SYNC_SPLIT, [0, 8]], ids=["3+5", "0+8"])
def test_sync_bn_ddp_gloo_matches_whole_batch(tmp_path, split):
    """SyncBatchNorm in the fused path: a converted model (``convert(sync_bn=True)``: every
    block fused with synced statistics, the stem's BatchNorm a fastres.SyncBatchNorm) under DDP,
    gloo, 2 processes with ``split`` images of the batch (3 and 5; or 0 and 8: an empty process
    still takes part in every all-reduce, as with nn.SyncBatchNorm), one SGD step, must match one
    process running the whole batch with plain BatchNorm: each rank's outputs, the gradients, the
    updated parameters, the running statistics and num_batches_tracked. In float64 against
    float64 torchvision (the rule's float64 bar), and in float32 by the tolerance rule against
    float64 with the single-process fused model as PyTorch's yardstick (see
    test_ddp_gloo_two_processes). Without the all-reduces every BatchNorm would see only its
    process's images and this fails."""
    world = 2
    tv = randomise_bn(small_resnet())
    state = tv.state_dict()
    # 64x64 images: layer4's BatchNorms see 4 values per channel per image
    n = sum(split)
    x, proj = torch.randn(n, 3, 64, 64), torch.randn(n, 10)
    spawn(_sync_worker, world, split, state, x, proj, str(tmp_path))
    k_ref = _whole_batch_step(copy.deepcopy(tv).double(), x, proj.double(), world, split)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        k_single = {
            torch.float64: _whole_batch_step(
                fastres.convert(copy.deepcopy(tv)).double(), x, proj.double(), world, split
            ),
            torch.float32: _whole_batch_step(
                fastres.convert(copy.deepcopy(tv)), x, proj, world, split
            ),
        }
        k_plain32 = _whole_batch_step(copy.deepcopy(tv), x, proj, world, split)
    finally:
        torch.set_num_threads(threads)
    for rank in range(world):
        kept = torch.load(tmp_path / f"sync{rank}.pt")
        for dtype in (torch.float64, torch.float32):
            k_ours = kept[str(dtype)]
            assert int(k_ours.pop("n_fused")) == 4
            assert int(k_ours.pop("n_sync")) == 1 + 2 * 4 + 3  # stem + 2 per block + downsamples
            if dtype == torch.float64:
                check_rule(k_ours, k_single[dtype][rank], k_ref[rank], dtype)
                continue
            # float32: a ReLU whose pre-activation is within rounding of 0 flips between float64
            # and float32 in some runs and not others, depending on the reduction order (2
            # processes or 1, stem fused or not), and a flip moves the gradients of every layer
            # before it by ~1e-3 (measured: conv1.weight.grad 1.3e-3 off float64 in this 2-process
            # run and in the single-process one before the stem was fused; 2.4e-5 in the
            # single-process run with the fused stem, 2.5e-5 in plain torchvision's). Such a
            # flip is a correct result, so a tensor passes by the rule against either
            # single-process yardstick (fused, or plain torchvision) or, failing both, with an
            # RMS error under 1e-3 of its RMS (one flip: 1e-4 measured; a wrong statistic or a
            # lost all-reduce moves whole layers by 1e-2 and more).
            for name, r in k_ref[rank].items():
                if not r.is_floating_point():
                    assert torch.equal(k_ours[name], r), name
                    continue
                vs = [verdict(name, k_ours[name], y[rank][name], r, dtype)
                      for y in (k_single[dtype], k_plain32)]
                if any(v.ok for v in vs):
                    continue
                rel = rms_err(k_ours[name], r) / max(float(r.double().pow(2).mean().sqrt()), 1e-30)
                assert rel < 1e-3, " | ".join(map(str, vs)) + f" | relative RMS error {rel:.2e}"


def _mlp() -> nn.Module:
    # BatchNorm1d on (N, C) and on (N, C, L): fastres.SyncBatchNorm's non-4-D inputs
    return nn.Sequential(
        nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Unflatten(1, (3, 2)), nn.BatchNorm1d(3)
    )


def _sync_mlp_worker(rank, world, port, state, x, proj, out_dir) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist = init_dist(rank, world, port)
    try:
        model = fastres.convert(_mlp().double(), sync_bn=True)
        model.load_state_dict(state, strict=True)
        ddp = DDP(model)  # held: its reducer averages the gradients during backward
        out = ddp(x.split(SYNC_SPLIT)[rank])
        (out * proj.split(SYNC_SPLIT)[rank]).sum().backward()
        k = {"out": out.detach(), **{n: b.detach() for n, b in model.named_buffers()}}
        k.update({f"{n}.grad": p.grad.detach() for n, p in model.named_parameters()})
        torch.save(k, os.path.join(out_dir, f"mlp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_standalone_non_4d_inputs(tmp_path):
    """fastres.SyncBatchNorm outside a fused block, on 2-D and 3-D inputs (a converted
    BatchNorm1d), float64, gloo, 2 processes with 3 and 5 rows: outputs, gradients and running
    statistics equal those of plain BatchNorm on the whole batch (float64's bar)."""
    base = _mlp().double()
    state = base.state_dict()
    n = sum(SYNC_SPLIT)
    x, proj = torch.randn(n, 8, dtype=torch.float64), torch.randn(n, 3, 2, dtype=torch.float64)
    spawn(_sync_mlp_worker, 2, state, x, proj, str(tmp_path))
    ref = copy.deepcopy(base).train()
    out = ref(x)
    (out * proj / 2).sum().backward()  # DDP averages the two processes' gradients
    want = {n: b for n, b in ref.named_buffers()}
    want.update({f"{n}.grad": p.grad for n, p in ref.named_parameters()})
    for rank, rows in enumerate(out.detach().split(SYNC_SPLIT)):
        k = torch.load(tmp_path / f"mlp{rank}.pt")
        check_rule(k, {"out": rows, **want}, {"out": rows, **want}, torch.float64)


def _sync_compile_worker(rank: int, world: int, port: int, state: dict, x, out_dir: str) -> None:
    dist = init_dist(rank, world, port)
    try:
        kept = {}
        for name in ("eager", "compiled"):
            model = fastres.convert(small_resnet(), sync_bn=True)
            model.load_state_dict(state, strict=True)
            run = model
            if name == "compiled":
                torch._dynamo.reset()
                run = torch.compile(model, fullgraph=True, backend="aot_eager")
            out = run(x.split(SYNC_SPLIT)[rank])
            out.square().sum().backward()
            k = {"out": out.detach()}
            k.update({f"{n}.grad": p.grad.detach() for n, p in model.named_parameters()})
            k.update({n: b.detach().clone() for n, b in model.named_buffers()})
            kept[name] = k
        torch.save(kept, os.path.join(out_dir, f"compiled{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_compiled_fullgraph(tmp_path):
    """A model with fused SyncBatchNorm compiles as one graph (fullgraph; Dynamo turns the
    all-reduces of the forward and of the autograd.Function's backward into traceable
    collectives) and a compiled training step (AOTAutograd, forward and backward graphs) computes
    what the eager one does, on every rank."""
    state = randomise_bn(small_resnet()).state_dict()
    x = torch.randn(sum(SYNC_SPLIT), 3, 32, 32)
    spawn(_sync_compile_worker, 2, state, x, str(tmp_path))
    for rank in range(2):
        k = torch.load(tmp_path / f"compiled{rank}.pt")
        assert k["eager"].keys() == k["compiled"].keys()
        for n, v in k["eager"].items():
            torch.testing.assert_close(k["compiled"][n], v, rtol=1e-5, atol=1e-6, msg=n)


def test_sync_bn_convert_round_trip_and_single_process():
    """convert(sync_bn=True): the same state_dict keys; unconvert gives nn.SyncBatchNorm; without
    an initialized process group it trains and evaluates as the plain fused model, on the CPU,
    where nn.SyncBatchNorm would be needed on a GPU only."""
    tv = randomise_bn(small_resnet())
    synced, rep = fastres.convert(tv, sync_bn=True, report=True)
    assert n_fused(synced) == 4
    assert sum(why == "SyncBatchNorm" for _, why in rep.swapped) == 12
    assert synced.state_dict().keys() == tv.state_dict().keys()
    plain = fastres.unconvert(synced)
    assert not any(isinstance(m, (fastres.SyncBatchNorm, *FUSED)) for m in plain.modules())
    assert sum(type(m) is nn.SyncBatchNorm for m in plain.modules()) == 12
    plain_tv = small_resnet()
    plain_tv.load_state_dict(synced.state_dict(), strict=True)

    x = torch.randn(4, 3, 64, 64)
    for train in (False, True):
        k_ours = run_kept(copy.deepcopy(synced), x, train)
        k_fused = run_kept(fastres.convert(copy.deepcopy(tv)), x, train)
        k_ref = run_kept(copy.deepcopy(tv).double(), x.double(), train)
        check_rule(k_ours, k_fused, k_ref, torch.float32)
    with pytest.raises(ValueError, match="process_group is used with sync_bn=True only"):
        fastres.convert(tv, process_group=object())


def test_sync_bn_blocks_mixed_norms_are_left():
    """A block mixing BatchNorm2d and SyncBatchNorm, or SyncBatchNorms over different groups,
    is left unfused with the reason."""
    block = tv_resnet.BasicBlock(8, 8)
    block.bn2 = nn.SyncBatchNorm(8)
    _, rep = fastres.convert(block, report=True)
    assert rep.left and "mixes BatchNorm2d and SyncBatchNorm" in rep.left[0][1], rep
    block = nn.SyncBatchNorm.convert_sync_batchnorm(tv_resnet.BasicBlock(8, 8))
    block.bn2.process_group = object()
    _, rep = fastres.convert(block, report=True)
    assert rep.left and "different process groups" in rep.left[0][1], rep


