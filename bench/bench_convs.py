"""ResNet-50's 23 distinct conv shapes as single fused convs (eval): conv + folded BN + ReLU
(or + residual + ReLU, or no ReLU for the downsample), fastres.functional.conv_bias_act against
eager conv + BatchNorm + ReLU and torch.compile of it."""

from __future__ import annotations

import benchlib as B
import pytest
import torch

from fastres.harness.rule import randomise_bn  # noqa: E402

CASES = B.resnet50_conv_cases()
assert len(CASES) == 23, f"ResNet-50 has 23 distinct conv shapes at 224x224, found {len(CASES)}"
# --bench-quick: the stem, one 3x3 of each stride, a residual epilogue and a stride-2 downsample.
QUICK = {"conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.1.conv1", "layer3.0.conv3",
         "layer4.0.downsample.0"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conv(bm, bctx, provider, case: B.ConvCase):
    if bctx.quick and case.name not in QUICK:
        pytest.skip("not in --bench-quick")
    bctx.skip_provider(provider, compile_ok=bctx.compile_scope == "all")
    dev, dt, cl, n = bctx.device, bctx.dtype, bctx.channels_last, bctx.batch
    eager = B.place(randomise_bn(B.ConvBNAct(case), 1), dev, dt, cl).eval()
    p = (case.h + 2 * case.pad - case.k) // case.stride + 1
    q = (case.w + 2 * case.pad - case.k) // case.stride + 1
    x_bytes = n * case.cin * case.h * case.w * torch.tensor([], dtype=dt).element_size()
    has_res = case.epilogue == "residual+relu"
    k = B.rotation_count(x_bytes * (2 if has_res else 1), dev)
    xs = [B.randn((n, case.cin, case.h, case.w), dev, dt, cl, seed=10 + i) for i in range(k)]
    rs = [B.randn((n, case.cout, p, q), dev, dt, cl, seed=100 + i) if has_res else None
          for i in range(k)]

    if provider.startswith("fastres-"):
        from fastres import functional as FF

        backend = provider.split("-", 1)[1]
        with torch.no_grad():
            w, b = FF.fold_bn(eager.conv.weight, eager.bn.weight, eager.bn.bias,
                              eager.bn.running_mean, eager.bn.running_var, eager.bn.eps, dt)
        # Prepacked across calls as a converted model's fold cache has it (the CPU backend packs
        # only parameters and weights their owner registers).
        from fastres.nn._fused import _allow_prepacking

        _allow_prepacking(w)

        def call(i):
            return FF.conv_bias_act(xs[i % k], w, b, rs[i % k], case.stride, case.pad, 1, 1,
                                    relu=eager.relu, backend=backend)
    else:
        m = B.make_module(provider, eager, dev)

        def call(i):
            return m(xs[i % k], rs[i % k])

    with torch.no_grad():
        try:
            got = call(0)
        except NotImplementedError as exc:
            if B.is_missing_kernel(exc):
                pytest.skip(f"{provider}: {str(exc).splitlines()[0][:120]}")
            raise
        want = got if provider == "eager" else eager(xs[0], rs[0])
        diff = (got.double() - want.double()).abs().max().item()
        info = B.measure(bm, call, dev, warmup=B.warmup_calls(provider, dev),
                         group=f"conv: {case.id}")
        with B.peak_memory(dev) as pm:
            if dev.type == "cuda":
                call(0)
    flops = 2 * n * case.cout * p * q * case.cin * case.k * case.k
    floor = B.nbytes(xs[0], rs[0], want) + eager.conv.weight.numel() * want.element_size() \
        + case.cout * want.element_size()
    info.update(pm, max_abs_diff_vs_eager=diff, rotation=k, batch=n,
                shape=[n, case.cin, case.h, case.w], epilogue=case.epilogue,
                dtype=bctx.dtype_name, layout="channels_last" if cl else "contiguous",
                mode="eval")
    bctx.record(bm, "conv", case.id, provider, B.finish(info, flops, floor))
