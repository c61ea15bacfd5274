"""Which kernel variants and tile configurations a convolution call launches, per backend.

A variant never launched by the self-test is not verified by it, so the self-test lists every
variant the dispatcher can launch at real ResNet-18/50 sizes (:func:`reachable`), adds the
cheapest shape that launches each one its base cases miss (:func:`completion`), and prints which
were launched (:func:`launched`).

* ``triton``: the tile rules themselves, ``_gemm_config`` / ``_wgrad_config`` / ``_rows_config``
  of fastres.triton_kernels._common (called, not copied; they depend on the shape and dtype only,
  NUM_SMS being a constant). A variant is (kernel, precision, R x S, tile, split or not).
* ``cuda`` and ``cudasim`` (the same launchers): the C++ choice mirrored by
  :func:`cuda_conv_tile` and :func:`cuda_wgrad_tile`. fastres._C has no capability query for it,
  so tests/test_selftest.py pins the mirror to the C++ source text (conv_igemm.cuh,
  conv_fwd_f32.cu, conv_wgrad.cu): a change there fails that test until this file follows.

The Triton interpreter (CPU) has its own tile rule (one program per tile, larger tiles), so a CPU
run's Triton coverage is the interpreter's, not a GPU's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DTYPE_OF = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}

# CUDA tile choice (csrc/cuda/conv_igemm.cuh launch_conv_mma16, conv_fwd_f32.cu, conv_wgrad.cu
# wgrad_cfg_id); the thresholds are pinned to the source by tests/test_selftest.py.
CUDA_CONV_SMALL_MAX_OC = 64
CUDA_WGRAD_SMALL_MAX = 64


def cuda_conv_tile(precision: str, oc: int) -> str:
    """The ConvCfg of the CUDA implicit-GEMM kernel (forward, stats and dgrad): ``oc`` is the
    GEMM's column count, output channels K forward, input channels C for dgrad."""
    if precision == "fp32":
        return "simt:CfgSimt"
    if precision == "tf32":
        return "tf32:CfgTcSmall"
    return "mma16:" + ("CfgTcSmall" if oc <= CUDA_CONV_SMALL_MAX_OC else "CfgTcBig")


def cuda_wgrad_tile(precision: str, k: int, c: int) -> str:
    """The WgradCfg of the CUDA weight-gradient kernel (fp32 and TF32 both run the SIMT one)."""
    if precision in ("fp32", "tf32"):
        return "simt:WgCfgSimt"
    small = k <= CUDA_WGRAD_SMALL_MAX or c <= CUDA_WGRAD_SMALL_MAX
    return "mma16:" + ("WgCfgSmall" if small else "WgCfgBig")


@dataclass(frozen=True)
class Conv:
    """One convolution call: batch, input channels, output channels, kernel, stride, input size
    (padding is ResNet's: kernel // 2)."""

    n: int
    c: int
    k: int
    r: int
    stride: int
    h: int
    w: int

    @property
    def pad(self) -> int:
        return self.r // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        p = (self.h + 2 * self.pad - self.r) // self.stride + 1
        q = (self.w + 2 * self.pad - self.r) // self.stride + 1
        return p, q

    @property
    def flops(self) -> int:
        p, q = self.out_hw
        return 2 * self.n * p * q * self.k * self.c * self.r * self.r

    def label(self) -> str:
        return (f"{self.n}x{self.c}x{self.h}x{self.w} -> {self.k}, {self.r}x{self.r} "
                f"s{self.stride}")


FAMILIES = ("fwd", "dgrad", "wgrad")


def conv_variants(backend: str, precision: str, cv: Conv, families=FAMILIES,
                  interpreted: bool = False) -> set[str]:
    """The kernel variants ``backend`` launches for ``cv`` at ``precision``: forward (conv_bias_act,
    conv_stats), dgrad and wgrad (conv_bwd). Empty for backends without tile choices."""
    out: set[str] = set()
    p, q = cv.out_hw
    rs = f"{cv.r}x{cv.r}"
    if backend in ("cuda", "cudasim"):
        for fam in families:
            if fam == "wgrad":
                tile = cuda_wgrad_tile(precision, cv.k, cv.c)
            else:
                tile = cuda_conv_tile(precision, cv.k if fam == "fwd" else cv.c)
            out.add(f"{fam} {precision} {tile}")
        return out
    if backend != "triton":
        return out
    from fastres.triton_kernels import _common as tc  # noqa: PLC0415

    dtype = DTYPE_OF[precision]
    # tl.dot's input_precision is a constexpr: fp32 compiles once for TF32 and once exact (with
    # tiles of its own: the FMA path); the interpreter always multiplies exactly (upcast operands).
    prec = precision if not interpreted else ("fp32" if precision == "tf32" else precision)
    exact = precision == "fp32" and not interpreted

    def gemm(g):
        return f"BM{g.BLOCK_M} BN{g.BLOCK_N} BK{g.BLOCK_K} w{g.num_warps} s{g.num_stages}"

    for fam in families:
        if fam == "fwd":
            # conv_bias_act and conv_stats without and with the BN prologue (its own tile rule)
            for prologue in (False, True):
                g = tc._gemm_config(cv.n * p * q, cv.k, cv.c, dtype, interpreted, exact, prologue)
                out.add(f"{fam} {prec} {rs} {gemm(g)}")
            continue
        if fam == "dgrad":
            mq = cv.n * math.ceil(cv.h / cv.stride) * math.ceil(cv.w / cv.stride)
            tile = gemm(tc._gemm_config(mq, cv.c, cv.k, dtype, interpreted, exact,
                                        strided_dgrad=cv.stride > 1))
        else:
            m = cv.n * p * q
            g = tc._wgrad_config(cv.k, cv.c, cv.r * cv.r, m, dtype, interpreted, exact)
            split = max(1, min(g.SPLIT, math.ceil(m / g.BLOCK_M)))
            tile = (f"BK{g.BLOCK_K} BC{g.BLOCK_C} BM{g.BLOCK_M} w{g.num_warps} "
                    f"{'split' if split > 1 else 'nosplit'}")
        out.add(f"{fam} {prec} {rs} {tile}")
    return out


def rows_variants(backend: str, precision: str, n: int, c: int, h: int, w: int,
                  interpreted: bool = False) -> set[str]:
    """The Triton bandwidth kernels' tile (BN-ReLU-add forward and the BN backwards)."""
    if backend != "triton":
        return set()
    from fastres.triton_kernels import _common as tc  # noqa: PLC0415

    cfg = tc._rows_config(n * h * w, c, interpreted)
    prec = "fp32" if precision == "tf32" else precision
    return {f"rows {prec} BM{cfg.BLOCK_M} BC{cfg.BLOCK_C} w{cfg.num_warps}"}


# --------------------------------------------------------------------------------------------
# Real sizes.

BATCHES = (1, 2, 8, 32, 64, 128, 256)


def resnet_convs(image: int = 224) -> list[Conv]:
    """Every distinct convolution of torchvision's ResNet-18 and ResNet-50 at batch 1 (the stem,
    the blocks' convolutions and downsamples; stride on the 3x3 as torchvision does)."""
    out: list[Conv] = [Conv(1, 3, 64, 7, 2, image, image)]
    s = image // 4  # after the stem and the max-pool
    for kind, blocks in (("basic", (2, 2, 2, 2)), ("bottleneck", (3, 4, 6, 3))):
        inplanes, h = 64, s
        for i, nb in enumerate(blocks):
            planes = 64 * 2**i
            for b in range(nb):
                stride = 2 if (i > 0 and b == 0) else 1
                ho = (h + 2 - 3) // stride + 1
                if kind == "basic":
                    out += [Conv(1, inplanes, planes, 3, stride, h, h),
                            Conv(1, planes, planes, 3, 1, ho, ho)]
                    exp = planes
                else:
                    exp = planes * 4
                    out += [Conv(1, inplanes, planes, 1, 1, h, h),
                            Conv(1, planes, planes, 3, stride, h, h),
                            Conv(1, planes, exp, 1, 1, ho, ho)]
                if stride != 1 or inplanes != exp:
                    out.append(Conv(1, inplanes, exp, 1, stride, h, h))
                inplanes, h = exp, ho
    return list(dict.fromkeys(out))


def _with_batch(cv: Conv, n: int) -> Conv:
    return Conv(n, cv.c, cv.k, cv.r, cv.stride, cv.h, cv.w)


def _small_candidates() -> list[Conv]:
    """Synthetic shapes, far cheaper than the real ones, that can launch the same tiles."""
    out = []
    for r, stride in ((1, 1), (1, 2), (3, 1), (3, 2), (7, 2)):
        for c in (3, 8, 24, 72, 136):
            for k in (8, 24, 72, 136):
                for h in (9, 28, 56):
                    for n in (1, 2, 8):
                        out.append(Conv(n, c, k, r, stride, h, h))
    return out


def reachable(backend: str, precisions=PRECISIONS, interpreted: bool = False) -> set[str]:
    """Every variant the dispatcher can launch on ``backend`` for ResNet-18/50 at the batch sizes
    of BATCHES."""
    out: set[str] = set()
    for cv in resnet_convs():
        for n in BATCHES:
            for prec in precisions:
                out |= conv_variants(backend, prec, _with_batch(cv, n), interpreted=interpreted)
    return out


def completion(backend: str, covered: set[str], precisions=PRECISIONS,
               interpreted: bool = False) -> list[tuple[str, str, Conv]]:
    """(variant, precision, cheapest conv launching it) for each reachable variant not in
    ``covered``; a variant only real shapes reach gets the cheapest real one."""
    missing = reachable(backend, precisions, interpreted) - covered
    if not missing:
        return []
    cands = _small_candidates() + [_with_batch(cv, n) for cv in resnet_convs() for n in BATCHES]
    cands.sort(key=lambda cv: cv.flops)
    out = []
    for cv in cands:
        if not missing:
            break
        for prec in precisions:
            for fam in FAMILIES:
                hit = conv_variants(backend, prec, cv, (fam,), interpreted) & missing
                for v in sorted(hit):
                    out.append((v, prec, cv))
                    missing.discard(v)
    return out


__all__ = ["Conv", "conv_variants", "rows_variants", "reachable", "completion", "resnet_convs",
           "cuda_conv_tile", "cuda_wgrad_tile"]
