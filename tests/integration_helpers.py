"""Helpers shared by the integration tests (test_convert, test_integrations, test_timm,
test_distributed): the tolerance rule on everything a user keeps from a run.

Numerical comparisons follow the tolerance rule (fastres.harness.rule): against a float64 run of the
plain model with the same weights, err(fastres) <= 2 * err(plain PyTorch) + atol[dtype]. The
backend is whatever FASTRES_BACKEND (or the dispatcher) picks, so the suite is run once per
backend by the caller.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

import fastres
from fastres.harness.rule import (
    assert_close_rule,
    randomise_bn,  # noqa: F401  (re-exported to the tests)
    verdict_rms,
)

FUSED = (fastres.BasicBlock, fastres.BottleneckBlock, fastres.ConvBNReLU)

#: Per-rank batch sizes of the SyncBatchNorm tests: uneven, as the last batch of an epoch can be.
SYNC_SPLIT = [3, 5]


def n_fused(model: nn.Module) -> int:
    return sum(isinstance(m, FUSED) for m in model.modules())


def flat(out) -> dict[str, torch.Tensor]:
    """A model's output as named tensors (a tensor, or a dict of them as detection backbones)."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    return {f"out.{k}": v for k, v in out.items()}


def run_kept(model: nn.Module, x: torch.Tensor, train: bool, autocast=None, seed=None):
    """Forward (under ``autocast``, a dtype for torch.autocast on x's device) and, for train, a
    backward of a fixed random projection outside autocast. Returns what a user keeps: outputs,
    input grad, every parameter grad and every buffer. ``seed``: seed torch's generator first
    (models with random layers, e.g. stochastic depth, draw the same masks in every run)."""
    model.train(train)
    x = x.detach().clone().requires_grad_(train)
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    if seed is not None:
        torch.manual_seed(seed)
    with ctx:
        outs = flat(model(x))
    kept = {k: v.detach() for k, v in outs.items()}
    if train:
        g = torch.Generator().manual_seed(1)
        loss = sum(
            (v.double() * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.device)).sum()
            for v in outs.values()
        )
        loss.backward()
        kept["input.grad"] = x.grad.detach()
        for n, p in model.named_parameters():
            if p.requires_grad:
                kept[f"{n}.grad"] = p.grad.detach()
        for n, b in model.named_buffers():
            kept[n] = b.detach().clone()
    return kept


def check_rule(ours: dict, theirs: dict, ref: dict, dtype: torch.dtype,
               rms_grads: bool = False) -> None:
    """Every kept tensor by the tolerance rule (integer buffers exactly); same keys and dtypes as
    plain PyTorch. ``rms_grads``: parameter and input gradients of a whole network in low
    precision by the rule on the RMS error (fastres.harness.rule.verdict_rms says why)."""
    assert ours.keys() == theirs.keys() == ref.keys()
    for name, r in ref.items():
        assert ours[name].dtype == theirs[name].dtype, (name, ours[name].dtype, theirs[name].dtype)
        if not r.is_floating_point():
            assert torch.equal(ours[name], r), name
            continue
        if rms_grads and name.endswith(".grad"):
            v = verdict_rms(name, ours[name], theirs[name], r, dtype)
            assert v.ok, str(v)
            continue
        assert_close_rule(name, ours[name], theirs[name], r, dtype)


def small_resnet() -> nn.Module:
    # one block per stage: identity and downsample blocks, in a model that trains in seconds
    return torchvision.models.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


def spawn(fn, world: int, *args) -> None:
    """fn(rank, world, port, *args) in ``world`` processes, ``port`` a free one for the store."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(world, port, *args), nprocs=world)


def init_dist(rank: int, world: int, port: int, backend: str = "gloo"):
    """A worker's process group (CPU workers use one thread each: 2 processes, 2 cores)."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "gloo" and not torch.cuda.is_available():
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return dist
