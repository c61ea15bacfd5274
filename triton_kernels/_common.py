"""Shared helpers of the Triton kernels: interpreter detection, launching, configs, layouts.

Imported only once triton is known to be importable (see ``__init__.py``).
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _direct


@triton.jit
def _probe_kernel(x_ptr):  # never launched: only its type tells whether @triton.jit interprets
    pass


# triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set at decoration time, so
# the kernels of this package are interpreted exactly when this probe is.
INTERPRETED: bool = type(_probe_kernel).__name__ == "InterpretedFunction"

# H200: 132 SMs. Grids of bandwidth kernels aim at a few waves of this.
NUM_SMS = 132

# The interpreter's tl.dot on bfloat16 operands returns garbage (triton-lang/triton#11584): there
# the operands are upcast to float32 (exact: bf16/fp16 embed in fp32), on a GPU never.
UPCAST_DOT: bool = INTERPRETED

# The interpreter also truncates float32 -> bfloat16 (cast_impl passes no rounding mode, and its
# RTNE path rounds half up without carrying into the exponent), where the GPU rounds to nearest
# even: 2x PyTorch's rounding error, enough to fail the tolerance rule. cast_to() rounds by hand
# there; on a GPU it is a plain .to().
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)

# Under the interpreter float32 runs exact, as F.conv2d on CPU tensors ignores cudnn.allow_tf32.
# A test sets this to run the TF32 path instead (operands rounded as on the GPU, then multiplied
# exactly: TF32 products are exact in fp32) and judges it against the TF32 yardstick.
EMULATE_TF32: bool = False


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """x (float32) converted to ``dtype`` rounding to nearest even, also under the interpreter."""
    if _ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tf32_operand(x, DOT_PRECISION: tl.constexpr):
    """A float32 dot operand rounded to TF32 to nearest, ties away from zero (PTX cvt.rna.tf32.f32,
    what cuDNN and the CUDA kernels multiply) when DOT_PRECISION is "tf32"; anything else as is.
    wgmma would truncate the 13 low mantissa bits instead: a bias of half an ulp of TF32 on every
    product, which measured 2.4-3.8x cuDNN's TF32 error on the H200
    (bench/results/h200_1dd399b2dd3c_parity.md). Rounded once here, the truncation is exact.
    Integer bit operations, so the interpreter runs the same code: + 0x1000 rounds the magnitude
    (sign and magnitude are separate bits) and carries into the exponent when the mantissa is
    full (the largest finite floats become Inf, as cvt.rna); Inf stays Inf. NaN is kept as it is:
    the canonical NaN 0x7FFFFFFF would carry into the sign bit and become -0."""
    if DOT_PRECISION == "tf32":
        if x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            r = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
            x = tl.where(x == x, r, x)
    return x


@triton.jit
def _round_tf32_kernel(
    x_ptr,  # (n,) float32: a dense tensor's storage
    out_ptr,  # (n,) float32
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, tf32_operand(tl.load(x_ptr + offs, mask=ok), "tf32"), mask=ok)


def round_tf32(t: Tensor) -> Tensor:
    """A float32 tensor rounded to TF32 as tf32_operand rounds (a new tensor, same strides when
    dense): for the operands a kernel takes from shared memory as they are (the weights and
    grad_out), rounded once per call instead of once per tile load and program. One launch over
    the storage (the same bit operations as torch ops were four launches: add, and, isnan,
    where)."""
    if not (t.is_contiguous()
            or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
        t = t.contiguous()
    out = torch.empty_like(t)
    n = t.numel()
    block = clamp_pow2(n, 16, 1 << 16) if INTERPRETED else 1024
    launch(_round_tf32_kernel, (cdiv(n, block),), t, out, n, BLOCK=block, num_warps=4)
    return out


# The interpreter's tl.sum is numpy's; a GPU's is a tree (a few rows per thread, then shuffles,
# then one partial per warp).
_SEQUENTIAL_SUMS = tl.constexpr(INTERPRETED)


@triton.jit
def colsum_f64(v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column sums of a (BLOCK_M, BLOCK_N) fp32 tile as float64: under the interpreter an fp64
    sum of the fp32 values, as the contract's statistics are (fastres.reference, the CPU and CUDA
    kernels: fp64 sums rounded once to fp32); on the GPU one fp32 tl.sum (a tree), widened.

    Why fp64 under the interpreter: the tolerance rule holds a sum to about one ulp. A sum S in
    [256, 512) has an ulp of 3.05e-5; the reference's error is its one final rounding (as low as
    7.7e-6 when S lies near a float), so the bound 2 * err + 1e-5 can be 2.5e-5, under one ulp:
    an fp32 accumulation error that moves S across a rounding midpoint fails it. fp32 within
    32-row chunks and fp64 across them failed the self-test's fp32 statistics with the BN
    prologue (3x3 s2, 2x7x9x11->13: sum of squares err 3.79e-5 vs bound 2.53e-5, of which 4.29e-5
    was the chunked sum against the exact sum of the same fp32 outputs) and 13 of 240 statistics
    outputs (bench/stats_sums.py: 6 shapes, with and without the prologue, 10 seeds) at
    1.01-1.85x the bound; fp64 sums of the same outputs failed none (at most 0.46x).

    On the GPU the tree stays fp32 for registers: a pairwise fp32 tree (a model of a GPU's
    tl.sum, not measured on one) failed 5 of those 240 at up to 1.77x. Exact alternatives cost
    too much on sm_90 (aot_check --shapes resnet50, triton 3.8, the 52 statistics forwards):
    acc.to(float64) 255 registers and 24 B of stack at 128x128; TwoSum-compensated pairs through
    one tl.reduce 255 and 8-32 B of stack at 128x128, 136-190 at 128x64 (2 CTAs/SM allow 128);
    an error-free split (sigma = 2^k >= 2 * BLOCK_M * max|v|, hi = (sigma + v) - sigma summed
    exactly in fp32, lo = v - hi) fit the 16-bit ones but not 5 of the 11 fp32 ones (143
    registers at 128x64 TF32, 192 for the exact stem, 8-16 B of stack for the exact 3x3 with the
    prologue)."""
    if _SEQUENTIAL_SUMS:
        return tl.sum(v.to(tl.float64), axis=0)
    else:
        return tl.sum(v, axis=0).to(tl.float64)


@triton.jit
def split_rows(offs_m, H, W):
    """Flat row indices m = (n, h, w) of an (N, ., H, W) tensor split into (n, h, w)."""
    n = offs_m // (H * W)
    hw = offs_m % (H * W)
    return n, hw // W, hw % W


@triton.jit
def tile_offsets(n, h, w, offs_c, stride_n, stride_c, stride_h, stride_w):
    """Element offsets of the (rows, channels) tile of a 4-D tensor with any strides: rows
    (n, h, w) from split_rows, channels offs_c."""
    return (n * stride_n + h * stride_h + w * stride_w)[:, None] + offs_c[None, :] * stride_c


@triton.jit
def tile_ptrs(ptr, n, h, w, offs_c, stride_n, stride_c, stride_h, stride_w):
    """Pointers to the (rows, channels) tile of a 4-D tensor with any strides: rows (n, h, w)
    from split_rows, channels offs_c."""
    return ptr + tile_offsets(n, h, w, offs_c, stride_n, stride_c, stride_h, stride_w)


#: Eager launches go straight to the compiled kernel (``_direct``); FASTRES_TRITON_DIRECT=0 sends
#: them through wrap_triton as traced ones (read once: a per-process fact).
DIRECT: bool = not INTERPRETED and os.environ.get("FASTRES_TRITON_DIRECT", "1") != "0"
_PLAIN = (Tensor, torch.nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack
#: (thread id, list) of the runs being recorded (``_replay.record``: op bodies kept to be
#: replayed): each launch of that thread is appended to its list as (kernel, grid, args, meta).
#: The args keep the run's tensors alive, so no two of them share an address.
RECORD: list[tuple[int, list]] = []


def _record(kernel, grid, args, meta) -> None:
    me = threading.get_ident()
    for tid, launches in RECORD:
        if tid == me:
            launches.append((kernel, grid, args, meta))


def _is_fake(t: object) -> bool:
    from torch._subclasses.fake_tensor import is_fake  # noqa: PLC0415

    return isinstance(t, Tensor) and is_fake(t)


def launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``: in eager straight to the compiled kernel (``_direct``), where
    torch.compile or torch.export trace through ``wrap_triton`` (which records the launch in the
    graph).

    Eager: not compiling, no TorchDispatchMode active (fake, functional and proxy tracing modes
    are, and so is a user's op counter), the first argument a plain tensor (not a fake or
    functional subclass). Interpreted kernels cannot be traced; under the interpreter the ops are
    plain custom ops whose fake implementation is the same Python body, so a launch on fake
    tensors is skipped here.
    """
    if RECORD:
        _record(kernel, grid, args, meta)
    if (DIRECT and type(args[0]) in _PLAIN and not _dispatch_modes()
            and not torch.compiler.is_compiling()):
        if 0 not in grid:  # an empty batch: nothing to compute (reductions over it still launch)
            _direct.launch(kernel, grid, args, meta)
        return
    if any(isinstance(g, int) and g == 0 for g in grid):
        return
    if INTERPRETED:
        if any(_is_fake(a) for a in args) or any(_is_fake(v) for v in meta.values()):
            return
        kernel[grid](*args, **meta)
        return
    wrap_triton(kernel)[grid](*args, **meta)


def hint(v) -> int:
    """A plain int for a size that may be a SymInt (torch.compile with dynamic shapes): configs
    are picked from the size hint, without guarding on it; the kernels are correct for any size."""
    if isinstance(v, torch.SymInt):
        h = v.node.hint
        return int(h) if h is not None else 1 << 16
    return int(v)


def cdiv(a, b):
    """ceil(a / b) for host-side sizes (ints or SymInts). triton.cdiv is a ConstexprFunction in
    triton 3.8: ~3 µs per host call through its wrapper, several per launch."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, next_pow2(n)))


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The format the fakes give an output shaped like ``x`` (fastres/_meta.py's _like_format)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if cl and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_like_format(shape, ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(
        shape, dtype=dtype or ref.dtype, device=ref.device, memory_format=memory_format_of(ref)
    )


def to_nhwc(x: Tensor) -> Tensor:
    """x in channels_last (a no-op when it already is): the conv kernels load C-contiguous rows."""
    return x.contiguous(memory_format=torch.channels_last)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype, upcast: bool = UPCAST_DOT) -> str:
    """tl.dot's input_precision: TF32 tensor cores for float32 when cuDNN may use TF32 (as F.conv2d
    would), exact "ieee" otherwise. bf16/fp16 operands go to the tensor cores whatever this says;
    operands upcast to float32 (the interpreter) are multiplied exactly, unless EMULATE_TF32.

    Float32 with TF32 is "tf32" on operands rounded to nearest first (tf32_operand on the
    activation tile in the kernels, round_tf32 on the weights and grad_out): one TF32 MMA per
    tile, the products cuDNN's TF32 computes. Plain "tf32" on unrounded operands truncates them
    (2.4-3.8x cuDNN's error on the H200, 14 of 14 fp32 parity cases failed,
    bench/results/h200_1dd399b2dd3c_parity.md). "tf32x3" (three MMAs on big and small halves,
    about fp32-exact, never measured on a GPU) split the operands in registers every iteration:
    wgmma.wait_group 0 in the main loop of 50 of 69 TF32 variants (sm_90 lint,
    bench/results/epyc-2cpu_e3cf8cf44533_triton38-lint-fp32.txt), at 3x the MMA work."""
    if dtype != torch.float32 or not torch.backends.cudnn.allow_tf32:
        return "ieee" if upcast or dtype == torch.float32 else "tf32"
    if upcast and not EMULATE_TF32:
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------
# Configs. Shape-keyed and cached; chosen by rule, not by timing: a timed pick may differ from
# one process to the next, and BLOCK_M decides how the statistics are summed, so a timed pick
# would break bitwise run-to-run reproducibility of sum/sumsq. Hopper defaults: 128x128x64 bf16
# tiles (32 KiB of shared memory per stage, 3 stages = 96 KiB of the 228 KiB an SM has).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8


def gemm_config(m, n, k_chunk, dtype: torch.dtype, exact: bool = False,
                prologue: bool = False, strided_dgrad: bool = False) -> GemmConfig:
    """Tile for an implicit GEMM with m rows, n columns and k_chunk reduction elements per tap
    (the channel count: the reduction is looped tap by tap, k_chunk channels at a time). ``exact``:
    float32 with DOT_PRECISION "ieee" (FMA units, not tensor cores); ``prologue``: the forward
    with the BN prologue on its A tile; ``strided_dgrad``: the data gradient of a stride > 1
    convolution (per-phase row and tap indices)."""
    return _gemm_config(hint(m), hint(n), hint(k_chunk), dtype, INTERPRETED, exact, prologue,
                        strided_dgrad)


@functools.lru_cache(maxsize=1024)
def _gemm_config(m: int, n: int, k_chunk: int, dtype: torch.dtype, interpreted: bool,
                 exact: bool = False, prologue: bool = False,
                 strided_dgrad: bool = False) -> GemmConfig:
    if interpreted:
        # One program per output tile covering as much as possible: the interpreter costs ~1 ms
        # per tl op per program, whatever the block size.
        return GemmConfig(
            clamp_pow2(m, 16, 256), clamp_pow2(n, 16, 128), clamp_pow2(k_chunk, 16, 128), 4, 1
        )
    wide = dtype in (torch.float16, torch.bfloat16)
    # float32: 16 channels per step. At 32, the 128x64 TF32 forward and dgrad needed 132-157
    # registers (8 warps; 2 CTAs/SM allow 128) and the exact ones 128-182 with 8-16 B of stack
    # (sm_90 lint); at 16, 116-137 and 128.
    block_k = clamp_pow2(k_chunk, 16, 64 if wide else 16)
    block_n = 64 if n <= 64 or not wide else 128
    block_m = 128
    if cdiv(m, block_m) * cdiv(n, block_n) < NUM_SMS:
        # fill the 132 SMs before growing tiles. Exact fp32 always: its FMA dot holds operand
        # slices per thread, and the 128x64 forward with the BN prologue spilled (8 B of stack,
        # 6 local loads/stores at 128 registers, 8 warps).
        block_m = 64
    if prologue and block_n == 64 and (wide or exact):
        # The prologue's A tile goes through registers (and a staging buffer in shared memory):
        # at 128x64 the 16-bit forward needed 175 registers and 113 KiB (1 CTA/SM where 2 are
        # intended) and the exact fp32 one spilled (6 local loads/stores at 128 registers). TF32
        # fits at 128x64 (120 registers at BLOCK_K 16).
        block_m = 64
    if strided_dgrad and not wide:
        # The per-phase row indices (int64 vectors live across the loop) cost the fp32 TF32
        # dgrad of a stride-2 conv 133-134 registers at 128x64 and at 64x128 (8 warps; 2 CTAs/SM
        # allow 128); at 64x64 and 4 warps, 116-136.
        block_m = 64
        block_n = 64
    # 8 warps from 128x64 up: with 4, the prologue's fp32 copy of the A tile and the accumulator
    # need 255 registers per thread and ptxas spills (sm_90 AOT compile of the 1x1 prologue+stats
    # variant: 256 B of stack); with 8, 178 registers and no spill.
    warps = 8 if block_m * block_n >= 128 * 64 else 4
    stages = 3 if block_m * block_n >= 128 * 128 else 4
    if exact and block_m * block_n >= 128 * 64:
        # Exact fp32 at 128x64: the stem's eval forward (49 taps of 16 padded channels, bias and
        # ReLU) needed 164 registers at 4 stages (2 CTAs/SM allow 128; the 18 other exact 128x64
        # variants 123-128) and 128 at 3 (sm_90 AOT, triton 3.8).
        stages = 3
    return GemmConfig(block_m, block_n, block_k, warps, stages)


@dataclass(frozen=True)
class WgradConfig:
    BLOCK_K: int  # output channels (rows of dW)
    BLOCK_C: int  # input channels (columns of dW)
    BLOCK_M: int  # reduction over N*P*Q, per iteration
    SPLIT: int  # programs along the reduction; their partials are summed in a fixed order
    num_warps: int
    num_stages: int


def wgrad_config(k, c, taps, m, dtype: torch.dtype, exact: bool = False) -> WgradConfig:
    return _wgrad_config(hint(k), hint(c), hint(taps), hint(m), dtype, INTERPRETED, exact)


@functools.lru_cache(maxsize=1024)
def _wgrad_config(k: int, c: int, taps: int, m: int, dtype: torch.dtype,
                  interpreted: bool, exact: bool = False) -> WgradConfig:
    if interpreted:
        # BLOCK_M 32, not 256: the interpreter's tl.dot is one numpy/BLAS matmul whose 256-term
        # sums lost 3.6x more than PyTorch's conv backward on a BN-backward gradient (zero mean per
        # channel, so the sum cancels): 6.8e-5 vs 1.9e-5 on a 297-row fp32 1x1 wgrad; 1.5e-5 at 32.
        return WgradConfig(clamp_pow2(k, 16, 128), clamp_pow2(c, 16, 128), clamp_pow2(m, 16, 32),
                           1, 4, 1)
    wide = dtype in (torch.float16, torch.bfloat16)
    bk = 64 if k <= 64 or not wide else 128
    bc = 64 if c <= 64 or not wide else 128
    # Exact fp32 (FMA): 16 rows per step and 8 warps. At 32 rows and 4 warps every exact wgrad
    # spilled (255 registers and 888 B of stack; 2.8-2.9 KB with the BN prologue, sm_90 lint).
    bm = 64 if wide else 16 if exact else 32
    tiles = cdiv(k, bk) * cdiv(c, bc) * taps
    # Two waves of programs, each reducing at least 8 blocks of BLOCK_M rows.
    split = max(1, min(cdiv(2 * NUM_SMS, tiles), cdiv(m, 8 * bm)))
    warps = 8 if exact or bk * bc >= 128 * 128 else 4
    return WgradConfig(bk, bc, bm, split, warps, 3)


@dataclass(frozen=True)
class RowsConfig:
    """Tiles of (BLOCK_M rows of N*H*W) x (BLOCK_C channels) for the bandwidth kernels."""

    BLOCK_M: int
    BLOCK_C: int
    GRID_M: int  # programs along the rows of a reduction (each loops over its row blocks)
    num_warps: int


def rows_config(m, c, live_tiles: int = 3) -> RowsConfig:
    """``live_tiles``: the activation tiles a kernel holds per iteration (the BN-backward reduction
    with a BN'd residual holds 4: grad_out, out, x, res_x)."""
    return _rows_config(hint(m), hint(c), INTERPRETED, live_tiles)


@functools.lru_cache(maxsize=1024)
def _rows_config(m: int, c: int, interpreted: bool, live_tiles: int = 3) -> RowsConfig:
    if interpreted:
        bc = clamp_pow2(c, 16, 128)
        bm = clamp_pow2(m, 16, max(16, 8192 // bc))
        return RowsConfig(bm, bc, 1, 4)
    bc = clamp_pow2(c, 16, 64)
    # 4096 elements per tile: 8 KiB of bf16 per tensor per iteration. With 4 tiles live, 1024:
    # the BN-backward reduction with a BN'd residual takes 172 registers at 64x64 and still 164 at
    # 32x64 in bf16 (8 channels per thread, each with 3 fp64 accumulators), so 1 CTA of 8 warps
    # per SM instead of 2; at 16x64 it takes 78-80 (bf16, fp16, fp32; sm_90 AOT, triton 3.8).
    # Half the bytes per iteration of 32x64, but 2 CTAs per SM instead of 1 (not timed on a GPU).
    bm = max(16, (4096 if live_tiles <= 3 else 1024) // bc)
    grid_c = cdiv(c, bc)
    # ~4 programs per SM for the reductions, each looping over its share of row blocks.
    grid_m = max(1, min(cdiv(m, bm), cdiv(4 * NUM_SMS, grid_c)))
    # 8 warps: 16 elements per thread per tensor. With 4, the fp32 BN-backward reduction with a
    # BN'd residual (4 tiles live, plus their fp64 row sums) needs 240 registers (sm_90 AOT).
    return RowsConfig(bm, bc, grid_m, 8)


def intended_ctas_per_sm(kernel_name: str, consts: dict, num_warps: int) -> int:
    """CTAs per SM a launch config is meant to run at, which aot_check's lint holds the compiled
    registers and shared memory to. GEMM tiles of 128x128 and up: 1 (8 warps, a 128x128 fp32
    accumulator is 64 registers per thread of 256; the tile alone feeds the tensor cores). Smaller
    GEMM tiles: 2, so one CTA's epilogue or load wait overlaps the other's MMAs. Bandwidth
    kernels: 2 CTAs of 8 warps (16 warps per SM keep ~2x the bytes in flight of one CTA; one
    CTA per SM would leave the loads of the next tile unissued during the reduction)."""
    if kernel_name == "_conv_wgrad_kernel":
        tile = consts["BLOCK_K"] * consts["BLOCK_C"]
    elif "BLOCK_N" in consts and kernel_name.startswith("_conv"):
        tile = consts["BLOCK_M"] * consts["BLOCK_N"]
    else:
        return 2 if num_warps >= 8 else 4
    return 1 if tile >= 128 * 128 else 2


# Channel padding of the convolutions' operands (conv.py).


def _prologue_vectors(x: Tensor, pre_scale: Tensor | None, pre_shift: Tensor | None):
    """(scale, shift) as float32 vectors, or (x, x) as unused pointers when there is no BN
    prologue. A missing one of the pair becomes ones/zeros: x*1 and x+0 are exact in fp32."""
    if pre_scale is None and pre_shift is None:
        return False, x, x
    c = x.shape[1]
    sc = (torch.ones(c, device=x.device, dtype=torch.float32) if pre_scale is None
          else pre_scale.to(torch.float32).contiguous())
    sh = (torch.zeros(c, device=x.device, dtype=torch.float32) if pre_shift is None
          else pre_shift.to(torch.float32).contiguous())
    return True, sc, sh


def _padded_channels(c: int, dtype: torch.dtype) -> int:
    """Channels to run a convolution with: c, or 16 when a pixel's channel row is under 16 bytes
    (the stem: C = 3, a 6-byte row in bf16). Such a row admits no cp.async chunk: the A tile was
    loaded with scalar ld.global and the wgrad loop waited with wait_group 0 (sm_90 lint). 16, not
    the 8 (bf16) or 4 (fp32) of a 16-byte row: the JIT proves divisibility only for integers that
    are multiples of 16, and C, stride_xh and stride_xw must all be to vectorise the row. The MMAs
    already pad the reduction to BLOCK_K = 16 per tap, so the FLOPs do not change; the cost is a
    zero-padded copy of the input per call (ResNet-50's stem at batch 256 in bf16: 77 MB read,
    411 MB written, then read by the kernel) and of the weight (64x16x7x7)."""
    return 16 if c * dtype.itemsize < 16 else c


def _pad_channels(t: Tensor, c: int) -> Tensor:
    """t (A, B, R, S) with dimension 1 zero-padded to c, channels_last. Padded channels hold 0
    and meet only zeros (padded weight, or a gradient column that is sliced off): 0 * 0 adds an
    exact 0 to each real output, and NaN or Inf stays in the channels it came from."""
    out = torch.empty((t.shape[0], c, t.shape[2], t.shape[3]), dtype=t.dtype, device=t.device,
                      memory_format=torch.channels_last)
    out[:, t.shape[1]:] = 0
    out[:, : t.shape[1]] = t
    return out


def _pad_vector(v: Tensor, c: int) -> Tensor:
    """A per-channel prologue vector zero-padded to c: a padded channel's 0 * 0 + 0 stays 0."""
    return torch.cat([v, v.new_zeros(c - v.shape[0])]) if v.shape[0] != c else v


def strides4(t: Tensor) -> tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], s[3]


__all__ = [
    "INTERPRETED",
    "UPCAST_DOT",
    "launch",
    "tl",
    "triton",
]
