"""Residual blocks: ResNet-50's 8 Bottleneck types and ResNet-18/34's 7 BasicBlock types at their
real widths and 224x224 spatial sizes (eval forward; train forward + backward), plus the issue's
reference case: fp32 channels_last BottleneckBlock(256, 64) on N=8 at 56x56."""

from __future__ import annotations

import copy

import benchlib as B
import pytest
import torch

from fastres.harness.cases import BlockCase, build_torchvision_block

BLOCKS = B.block_cases()
QUICK = {("Bottleneck", "layer1.0"), ("Bottleneck", "layer2.0"), ("Bottleneck", "layer3.1"),
         ("Bottleneck", "layer4.1"), ("BasicBlock", "layer1.0"), ("BasicBlock", "layer3.0")}
REF_CASE = BlockCase("ref", "Bottleneck", 256, 64, 1, False, 56, 56)


def run_block(bm, bctx, provider: str, case: BlockCase, mode: str, batch: int,
              dtype: torch.dtype, dtype_name: str, channels_last: bool, group: str,
              case_id: str) -> None:
    dev = bctx.device
    eager = B.place(build_torchvision_block(case, seed=1), dev, dtype, channels_last)
    eager.train(mode == "train")
    meta_block = copy.deepcopy(eager).to("meta")
    x_meta = torch.empty(batch, case.inplanes, case.height, case.width, device="meta", dtype=dtype)
    out_shape = meta_block(x_meta).shape
    elt = torch.tensor([], dtype=dtype).element_size()
    x_bytes = batch * case.inplanes * case.height * case.width * elt
    k = B.rotation_count(x_bytes, dev)
    train = mode == "train"
    xs = [B.randn((batch, case.inplanes, case.height, case.width), dev, dtype, channels_last,
                  seed=10 + i).requires_grad_(train) for i in range(k)]
    gs = [B.randn(tuple(out_shape), dev, dtype, channels_last, seed=100 + i) for i in range(k)]
    m = B.make_module(provider, eager, dev)
    m.train(train)
    ref_m = copy.deepcopy(eager)  # eager's own copy: the check below must not step its stats

    def call(i):
        if train:
            m(xs[i % k]).backward(gs[i % k])
        else:
            with torch.no_grad():
                m(xs[i % k])

    want, diff, info, saved, pm = B.check_and_measure(
        bm, provider, m, ref_m, xs[0], call, dev, f"{group}: {case_id}", train)
    if train:
        def flop_fn():
            meta_block.train()
            xm = x_meta.clone().requires_grad_(True)
            meta_block(xm).backward(torch.empty(out_shape, device="meta", dtype=dtype))
    else:
        def flop_fn():
            meta_block.eval()
            with torch.no_grad():
                meta_block(x_meta)
    flops = B.flops_of(flop_fn)
    pbytes = B.param_bytes(eager)
    out_bytes = B.nbytes(want)
    floor = x_bytes + pbytes + out_bytes
    if train:  # backward: grad_out in, x and params re-read, grad_x and param grads out
        floor += out_bytes + 2 * x_bytes + pbytes + sum(
            p.numel() * p.element_size() for p in eager.parameters())
    info.update(pm, saved_bytes=saved, max_abs_diff_vs_eager=diff, rotation=k, batch=batch,
                shape=[batch, case.inplanes, case.height, case.width], dtype=dtype_name,
                layout="channels_last" if channels_last else "contiguous", mode=mode,
                block=case.label)
    bctx.record(bm, group, case_id, provider, B.finish(info, flops, floor))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", BLOCKS, ids=lambda c: f"{c.kind}-{c.name}")
def test_block(bm, bctx, provider, case: BlockCase, mode: str):
    if bctx.quick and (case.kind, case.name) not in QUICK:
        pytest.skip("not in --bench-quick")
    bctx.skip_provider(provider, compile_ok=bctx.compile_scope == "all")
    case_id = f"{case.kind}({case.inplanes},{case.planes},s{case.stride}" \
              f"{',ds' if case.downsample else ''}) {case.height}x{case.width} [{case.name}]"
    run_block(bm, bctx, provider, case, mode, bctx.batch, bctx.dtype, bctx.dtype_name,
              bctx.channels_last, f"block-{mode}", case_id)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_reference_case(bm, bctx, provider, mode: str):
    """The issue's case, always fp32 channels_last N=8, every provider including compile."""
    bctx.skip_provider(provider, compile_ok=bctx.compile_scope in ("ref", "all"))
    run_block(bm, bctx, provider, REF_CASE, mode, B.REF_CASE_BATCH, torch.float32,
              "fp32", True, "reference_case",
              f"BottleneckBlock(256, 64) N=8 56x56 {mode}")
