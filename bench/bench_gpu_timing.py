"""The provider table of bench/gpu_timing.py as a `pytest bench/` case: ResNet-50 blocks, every
provider side by side, each timing's kind named (device, host, eager wall, graph replay).

On a GPU: the covering subset of blocks (all 8 without --bench-quick) at N=32 and N=256, bf16
(--bench-dtype). On the CPU: the first block at 64x64 input, N=1, fp32, with the CPU stand-ins
(profiler op time, the fake graph); torch.compile runs there in eval only (default mode, with
--bench-compile=ref, the CPU default) or also in train (--bench-compile=all), and its
max-autotune and reduce-overhead modes are rows that say they need a GPU."""

from __future__ import annotations

import gpu_timing as G
import pytest
import torch

from fastres.harness import timer
from fastres.harness.cases import distinct_blocks, quick_subset


def _setup(bctx, mode: str):
    dev = bctx.device
    if dev.type == "cuda":
        cases = distinct_blocks("resnet50")
        return (cases if not bctx.quick else quick_subset(cases)), (32, 256), bctx.dtype, 10, 3
    return distinct_blocks("resnet50", 64)[:1], (1,), torch.float32, 3, 1


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_provider_table(bctx, mode: str):
    dev = bctx.device
    cases, batches, dtype, repeats, warmup = _setup(bctx, mode)
    provs = G.providers(dev)
    if bctx.providers is not None:
        provs = [p for p in provs if p.name in bctx.providers]
    compiled_here = bctx.compile_scope == "all" or (bctx.compile_scope == "ref" and mode == "eval")
    if not compiled_here:
        provs = [p for p in provs if p.compile_mode is None]
    rows = []
    for n in batches:
        for case in cases:
            rows += G.run_case(case, n, mode, dtype, dev, provs, repeats, warmup, lambda r: None)
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    assert not bad, [(r["provider"], r["reason"]) for r in bad]
    for r in rows:
        if r["status"] == "skipped":
            assert r["reason"], r
            continue
        assert set(r["times"]) | set(r["errors"]) == set(r["kinds"]), r
        assert "device" in r["times"] and "[ok]" in r["check"], r
    from fastres.harness.environment import environment

    doc = {"env": environment(dev), "meta": {"repeats": repeats}, "rows": rows}
    text = G.render(doc)
    for k in timer.KINDS:
        assert timer.column(k, dev) in text
    print(text)
