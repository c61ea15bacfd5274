"""fastres against the CPU inference engines a user would pick instead (issue 15): eager,
torch.compile (default and Inductor freezing), OpenVINO and ONNX Runtime, on the whole ResNet-50
(N = 1 and 8) and on Bottleneck/BasicBlock cases (N = 8), eval, fp32 and bf16, channels_last,
every engine on the same thread count (peers.threads()).

    pytest bench/bench_peers.py --bench-out peers.json     # the whole comparison (CPU)
    python -m bench.table peers.json                       # table with fastres vs the best peer

Each provider's output is judged against float64 eager before it is timed, with the suite's
tolerance rule (fastres.harness.rule): max-abs in fp32, RMS in bf16 (bf16 engines round at different
points, so one element's max error is a coin toss; a wrong engine is off by orders of
magnitude in RMS). A provider that fails the check fails its case: a wrong engine cannot win.
The peers are CUDA-free CPU engines: every case here skips on a CUDA machine.
"""

from __future__ import annotations

import copy
import os

import benchlib as B
import peers as P
import pytest
import torch

from fastres.harness.cases import BlockCase, build_torchvision_block
from fastres.harness.rule import (
    randomise_bn,  # noqa: E402
    verdict,
    verdict_rms,
)

DTYPES = ["fp32", "bf16"]
RESNET_BATCHES = [1, 8]
PEER_BLOCK_BATCH = 8  # the reference batch
# Bottleneck: the first (downsampling) block and a mid-network identity block; BasicBlock: an
# identity block at 56x56 and a downsampling one. --bench-quick keeps ResNet-50 and the first two.
PEER_BLOCKS = [
    BlockCase("layer1.0", "Bottleneck", 64, 64, 1, True, 56, 56),
    BlockCase("layer3.1", "Bottleneck", 1024, 256, 1, False, 14, 14),
    BlockCase("layer1.0", "BasicBlock", 64, 64, 1, False, 56, 56),
    BlockCase("layer3.0", "BasicBlock", 128, 256, 2, True, 28, 28),
]
QUICK_BLOCKS = 2

# Engines of the current model (key, dtype, layout), by provider (and batch for ONNX Runtime,
# whose export is static): reused across batch sizes, since the suite runs every provider of one
# case before the next case. A new model drops them (ResNet-50 engines hold 100+ MB each) and
# Dynamo's cache with them.
_ENGINES: dict = {}
_MODEL: list = [None]


def _check(provider: str, got: torch.Tensor, want: torch.Tensor, ref64: torch.Tensor,
           dtype: torch.dtype):
    """The tolerance rule against float64, eager at ``dtype`` the yardstick."""
    got = got.to(ref64.dtype).reshape(ref64.shape)
    rule = verdict_rms if dtype == torch.bfloat16 else verdict
    return rule(provider, got, want, ref64, dtype)


def run_case(bm, bctx, provider: str, key: str, eager32: torch.nn.Module, shape: tuple,
             dtype_name: str, group: str, case_id: str) -> None:
    if bctx.device.type != "cpu":
        pytest.skip("bench_peers compares CPU engines; this is a CUDA machine")
    if bctx.providers is not None and provider not in bctx.providers:
        pytest.skip(f"{provider}: not in --bench-providers")
    opt_dt = bctx.config.getoption("--bench-dtype")
    if opt_dt is not None and opt_dt != dtype_name:
        pytest.skip(f"--bench-dtype={opt_dt}")
    dtype = B.DTYPES[dtype_name]
    why = P.skip_reason(provider, dtype)
    if why:
        pytest.skip(why)
    cl = bctx.channels_last
    eager32.eval()
    eager = B.place(copy.deepcopy(eager32), bctx.device, dtype, cl)
    xs = [B.randn(shape, bctx.device, dtype, cl, seed=10 + i) for i in range(2)]
    model_key = (key, dtype_name, cl)
    if _MODEL[0] != model_key:
        _ENGINES.clear()
        torch._dynamo.reset()
        _MODEL[0] = model_key
    ek = (provider, shape[0] if provider == "onnxruntime" else None)
    with B.forced_backend("fastres-cpu" if provider.startswith("fastres-") else provider):
        if ek not in _ENGINES:
            _ENGINES[ek] = P.build(provider, eager, xs[0], dtype, cl)
        eng = _ENGINES[ek]
        prepared = [eng.prepare(x) for x in xs]
        with torch.no_grad():
            ref64 = copy.deepcopy(eager32).double()(xs[0].double())
            want = eager(xs[0])
            got = eng.run(prepared[0])
        v = _check(provider, got, want, ref64, dtype)
        assert v.ok, f"{provider} is wrong, not timed: {v}"

        def call(i):
            with torch.no_grad():
                eng.run(prepared[i % 2])

        warm = 2 if "compile" in provider else 1
        info = B.measure(bm, call, bctx.device, warmup=warm, group=f"{group}: {case_id}")
    meta_m = copy.deepcopy(eager32).to("meta")
    with torch.no_grad():
        flops = B.flops_of(lambda: meta_m(torch.empty(shape, device="meta")))
    elt = torch.tensor([], dtype=dtype).element_size()
    x_bytes = elt
    for s in shape:
        x_bytes *= s
    floor = x_bytes + B.param_bytes(eager) + B.nbytes(want)
    info.update(eng.info, check=str(v), check_err=v.err, check_bound=v.bound,
                threads=P.threads(), torch_threads=torch.get_num_threads(),
                loadavg_1min=os.getloadavg()[0], batch=shape[0], shape=list(shape),
                dtype=dtype_name, layout="channels_last" if cl else "contiguous", mode="eval")
    bctx.record(bm, group, case_id, provider, B.finish(info, flops, floor))


@pytest.mark.parametrize("provider", P.PEER_PROVIDERS)
@pytest.mark.parametrize("batch", RESNET_BATCHES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_peers_resnet50(bm, bctx, provider: str, dtype_name: str, batch: int):
    import torchvision

    torch.manual_seed(0)
    eager32 = randomise_bn(torchvision.models.resnet50(), 1)
    run_case(bm, bctx, provider, "resnet50", eager32, (batch, 3, 224, 224), dtype_name,
             f"peers-resnet50-{dtype_name}", f"ResNet-50 eval N={batch} {dtype_name}")


@pytest.mark.parametrize("provider", P.PEER_PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", PEER_BLOCKS, ids=lambda c: f"{c.kind}-{c.name}")
def test_peers_block(bm, bctx, provider: str, dtype_name: str, case: BlockCase):
    if bctx.quick and PEER_BLOCKS.index(case) >= QUICK_BLOCKS:
        pytest.skip("not in --bench-quick")
    n = bctx.config.getoption("--bench-batch") or PEER_BLOCK_BATCH
    case_id = f"{case.kind}({case.inplanes},{case.planes},s{case.stride}" \
              f"{',ds' if case.downsample else ''}) N={n} {case.height}x{case.width} " \
              f"{dtype_name} [{case.name}]"
    run_case(bm, bctx, provider, f"{case.kind}-{case.name}", build_torchvision_block(case, 1),
             (n, case.inplanes, case.height, case.width), dtype_name,
             f"peers-block-{dtype_name}", case_id)
