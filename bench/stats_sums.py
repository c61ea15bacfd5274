"""How a conv_stats tile's column sums are accumulated, against the tolerance rule.

    PYTHONPATH=. python bench/stats_sums.py [SEEDS]

For the self-test's fp32 statistics cases (fastres.harness.selftest_cases: its 6 conv shapes, with and
without the BN prologue, SEEDS seeds each, default 10) it takes the Triton kernel's fp32 output
(interpreted on the CPU) and sums each channel's values and squares per tile of the
interpreter's BLOCK_M rows in three ways, then across tiles in float64 as the kernel does:

* chunk32: fp32 sequentially within 32-row chunks, fp64 across chunks (the interpreter's way
  before colsum_f64 summed in fp64);
* tree: a pairwise fp32 tree over the tile (a model of a GPU's tl.sum, not a measurement);
* f64: float64 (the reference's way, and colsum_f64's under the interpreter).

Each is judged by the rule err <= 2 * err(PyTorch) + 1e-5 against the float64 reference; it
prints the outputs over their bound and the worst ratio per way. No timing.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastres import backends  # noqa: E402
from fastres.harness.rule import allow_tf32, dtype_tols, max_abs_err  # noqa: E402
from fastres.harness.selftest_cases import BASE_CONVS, _clone, _f64, conv_cases  # noqa: E402


def _seq(v: np.ndarray) -> np.ndarray:
    acc = np.zeros(v.shape[1], np.float32)
    for row in v:
        acc = (acc + row).astype(np.float32)
    return acc


def _tree(v: np.ndarray) -> np.ndarray:
    while v.shape[0] > 1:
        if v.shape[0] % 2:
            v = np.concatenate([v, np.zeros((1, v.shape[1]), np.float32)])
        v = (v[0::2] + v[1::2]).astype(np.float32)
    return v[0]


def tile_sums(terms: np.ndarray, way: str, block_m: int) -> torch.Tensor:
    """Column sums of (M, K) fp32 terms, per tile of block_m rows as ``way``, fp64 across."""
    pad = -terms.shape[0] % block_m
    terms = np.concatenate([terms, np.zeros((pad, terms.shape[1]), np.float32)])
    total = np.zeros(terms.shape[1], np.float64)
    for t in range(0, terms.shape[0], block_m):
        tile = terms[t:t + block_m]
        if way == "chunk32":
            total += sum(_seq(tile[c:c + 32]).astype(np.float64) for c in range(0, block_m, 32))
        elif way == "tree":
            total += _tree(tile).astype(np.float64)
        else:
            total += tile.astype(np.float64).sum(0)
    return torch.from_numpy(total.astype(np.float32))


def main(seeds: int) -> None:
    triton = backends.BACKENDS["triton"]
    why = triton.unavailable_reason()
    if why:
        raise SystemExit(f"triton: {why}")
    ref, op = backends.BACKENDS["reference"].op("conv_stats"), triton.op("conv_stats")
    from fastres.triton_kernels._common import _gemm_config  # noqa: PLC0415

    ways = ("chunk32", "tree", "f64")
    worst = dict.fromkeys(ways, 0.0)
    fails = dict.fromkeys(ways, 0)
    n = 0
    for name, cv in BASE_CONVS.items():
        for suffix in ("stats", "stats+prologue"):
            for seed in range(seeds):
                case = next(c for c in conv_cases(name, cv, "fp32", "channels_last", seed)
                            if c.label.endswith(" " + suffix))
                args = case.build(torch.device("cpu"))
                with allow_tf32(False):
                    theirs = ref(*[_clone(a) for a in args])
                    truth = ref(*[_f64(_clone(a)) for a in args])
                    out = op(*[_clone(a) for a in args])[0]
                o = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).contiguous().numpy()
                p, q = cv.out_hw
                block_m = _gemm_config(cv.n * p * q, cv.k, cv.c, torch.float32, True).BLOCK_M
                for i, terms in ((1, o), (2, (o * o).astype(np.float32))):
                    n += 1
                    bound = 2 * max_abs_err(theirs[i], truth[i]) + dtype_tols(torch.float32)
                    ratios = {w: max_abs_err(tile_sums(terms, w, block_m), truth[i]) / bound
                              for w in ways}
                    for w, r in ratios.items():
                        worst[w] = max(worst[w], r)
                        fails[w] += r > 1
                    if any(r > 1 for r in ratios.values()):
                        print(f"{name} {suffix} seed {seed} conv_stats[{i}]: "
                              + " ".join(f"{w} {r:.2f}" for w, r in ratios.items()))
    print(f"{n} outputs (sum and sum of squares of {n // 2} cases)")
    for w in ways:
        print(f"{w:8s} over the bound: {fails[w]:3d}  worst err/bound {worst[w]:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
