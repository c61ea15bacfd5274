"""The full ResNet-50: eval forward and a training step (forward, cross-entropy, backward, SGD
step). On CUDA: inference N=256 and training N=128; on the CPU a small batch (N=1)."""

from __future__ import annotations

import copy

import benchlib as B
import pytest
import torch
import torch.nn.functional as F

from fastres.harness.rule import randomise_bn  # noqa: E402

SIZES = [
    ("eval", "cpu", B.MODEL_CPU_BATCH),
    ("train", "cpu", B.MODEL_CPU_BATCH),
    ("eval", "gpu", B.MODEL_GPU_INFER_BATCH),
    ("train", "gpu", B.MODEL_GPU_TRAIN_BATCH),
]


@pytest.mark.parametrize("mode,size,batch", SIZES,
                         ids=[f"{m}-N{n}-{s}" for m, s, n in SIZES])
def test_resnet50(bm, bctx, provider, mode: str, size: str, batch: int):
    import torchvision

    dev = bctx.device
    if size == "gpu" and dev.type != "cuda":
        pytest.skip(f"needs CUDA: the GPU case (N={batch}) of the full ResNet-50")
    if size == "cpu" and dev.type == "cuda":
        pytest.skip(f"CPU-sized case (N={batch}); on CUDA the N=256/128 cases run")
    bctx.skip_provider(provider, compile_ok=bctx.compile_scope == "all")
    dt, cl, train = bctx.dtype, bctx.channels_last, mode == "train"
    torch.manual_seed(0)
    eager = B.place(randomise_bn(torchvision.models.resnet50(), 1), dev, dt, cl)
    eager.train(train)
    elt = torch.tensor([], dtype=dt).element_size()
    x_bytes = batch * 3 * 224 * 224 * elt
    k = B.rotation_count(x_bytes, dev)
    xs = [B.randn((batch, 3, 224, 224), dev, dt, cl, seed=10 + i) for i in range(k)]
    g = torch.Generator().manual_seed(3)
    labels = [torch.randint(0, 1000, (batch,), generator=g).to(dev) for _ in range(k)]
    m = B.make_module(provider, eager, dev)
    m.train(train)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) if train else None

    def call(i):
        if train:
            loss = F.cross_entropy(m(xs[i % k]).float(), labels[i % k])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                m(xs[i % k])

    ref_m = copy.deepcopy(eager)
    want, diff, info, saved, pm = B.check_and_measure(
        bm, provider, m, ref_m, xs[0], call, dev, f"resnet50: {mode} N={batch}", train)
    meta_m = copy.deepcopy(eager).to("meta")
    x_meta = torch.empty(batch, 3, 224, 224, device="meta", dtype=dt)
    if train:
        def flop_fn():
            meta_m(x_meta).sum().backward()
    else:
        def flop_fn():
            with torch.no_grad():
                meta_m(x_meta)
    flops = B.flops_of(flop_fn)
    pbytes = B.param_bytes(eager)
    wbytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    out_bytes = B.nbytes(want)
    floor = x_bytes + pbytes + out_bytes
    if train:  # backward re-reads x and params and writes grads; SGD: grads, params, momentum
        floor += x_bytes + pbytes + out_bytes + wbytes + 5 * wbytes
    info.update(pm, saved_bytes=saved, max_abs_diff_vs_eager=diff, rotation=k, batch=batch,
                dtype=bctx.dtype_name, layout="channels_last" if cl else "contiguous",
                mode=mode)
    bctx.record(bm, "resnet50", f"ResNet-50 {mode} N={batch}", provider,
                B.finish(info, flops, floor))
