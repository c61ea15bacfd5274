"""The fixed-order reduction of per-program partials (statistics, BN grads, split-K weight grads).

Every reduction in this package writes one partial per program and sums the partials here, row
by row in a fixed order: the result depends only on the shape (which fixes the config), never on
scheduling, so it is bitwise reproducible run to run. One hot atomic per channel would serialise
thousands of programs on the same 4 bytes and make the bits depend on arrival order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import INTERPRETED, cast_to, cdiv, clamp_pow2, hint, launch, tl, triton


@triton.jit
def column_sums(base, P, stride_p, offs_l, l_ok, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
    """Columns ``offs_l`` of the (P, L) partials at ``base`` (rows ``stride_p`` apart) summed in
    float64 row after row, rounded once to float32: an order no layout decides (a tl.sum over
    rows is a tree whose shape follows num_warps), so any kernel that calls this, whatever its
    warps, gets sum_rows' bits. BLOCK_P rows are loaded per step (independent loads in flight)."""
    acc = tl.zeros((BLOCK_L,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        for r in tl.static_range(BLOCK_P):
            row = p0 + r
            v = tl.load(base + row.to(tl.int64) * stride_p + offs_l, mask=l_ok & (row < P),
                        other=0.0)
            acc += v.to(tl.float64)
    return acc.to(tl.float32)


@triton.jit
def split_sums(ws_ptr, out_ptr, P, L, first, step, BLOCK_P: tl.constexpr,
               BLOCK_L: tl.constexpr):
    """out[l] = the sum over the P rows of ws[., l] (column_sums), for the column blocks first,
    first + step, ...: a split-K weight gradient's sum, run by programs of another kernel
    (bn.py's reduction, for the training unit)."""
    for blk in range(first, tl.cdiv(L, BLOCK_L), step):
        # (int64 from the arange: blk is a Python int under the interpreter where first is)
        offs = tl.arange(0, BLOCK_L).to(tl.int64) + blk * BLOCK_L
        ok = offs < L
        total = column_sums(ws_ptr, P, L, offs, ok, BLOCK_P, BLOCK_L)
        tl.store(out_ptr + offs, cast_to(total, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_rows_kernel(
    p_ptr,  # (Q, P, L) float32 or float64 partials: Q planes (stride_q), rows of stride_p,
    #         columns contiguous
    out_ptr, out1_ptr, out2_ptr,  # (L,) per plane 0, 1, 2: storage written linearly, any dtype
    c_ptr, c1_ptr, c2_ptr,  # (CAST) per plane, a second copy of the sums in another dtype
    d_ptr,  # (DUP) (L,) one more copy of plane 0's sums, in the dtype of c_ptr (CAST) or out_ptr
    P, L, stride_p, stride_q,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, CAST: tl.constexpr, DUP: tl.constexpr,
):
    pid = tl.program_id(0)
    plane = tl.program_id(1)
    offs_l = pid.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    total = column_sums(p_ptr + plane.to(tl.int64) * stride_q, P, stride_p, offs_l, l_ok,
                        BLOCK_P, BLOCK_L)
    if plane == 0:
        tl.store(out_ptr + offs_l, cast_to(total, out_ptr.dtype.element_ty), mask=l_ok)
        if CAST:
            tl.store(c_ptr + offs_l, cast_to(total, c_ptr.dtype.element_ty), mask=l_ok)
        if DUP:
            tl.store(d_ptr + offs_l, cast_to(total, d_ptr.dtype.element_ty), mask=l_ok)
    elif plane == 1:
        tl.store(out1_ptr + offs_l, cast_to(total, out1_ptr.dtype.element_ty), mask=l_ok)
        if CAST:
            tl.store(c1_ptr + offs_l, cast_to(total, c1_ptr.dtype.element_ty), mask=l_ok)
    else:
        tl.store(out2_ptr + offs_l, cast_to(total, out2_ptr.dtype.element_ty), mask=l_ok)
        if CAST:
            tl.store(c2_ptr + offs_l, cast_to(total, c2_ptr.dtype.element_ty), mask=l_ok)


@triton.jit
def _sum_rows_pair_kernel(
    a_ptr, out_a_ptr, Pa, La,  # (Pa, La) contiguous partials -> (La,) sums, any dtype
    b_ptr, out_b_ptr, Pb, Lb,  # a second such pair
    G,  # programs per pair
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Two split-K weight gradients' sums in one launch (the training unit's first convolution
    # and downsample): programs [0, G) sum the first, [G, 2G) the second, sum_rows' bits.
    pid = tl.program_id(0)
    if pid < G:
        split_sums(a_ptr, out_a_ptr, Pa, La, pid, G, BLOCK_P, BLOCK_L)
    else:
        split_sums(b_ptr, out_b_ptr, Pb, Lb, pid - G, G, BLOCK_P, BLOCK_L)


def sum_rows_pair(a: Tensor, out_a: Tensor, b: Tensor, out_b: Tensor) -> None:
    """sum_rows(a, out=out_a) and sum_rows(b, out=out_b) in one launch: the same bits (column
    sums add the rows in order whatever the blocks). ``a``, ``b``: contiguous (P, L)."""
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("sum_rows_pair: the partials must be contiguous")
    block_p, block_l = sum_rows_blocks(hint(max(a.shape[0], b.shape[0])),
                                       hint(max(a.shape[1], b.shape[1])))
    g = max(cdiv(a.shape[1], block_l), cdiv(b.shape[1], block_l))
    launch(_sum_rows_pair_kernel, (2 * g,), a, out_a, a.shape[0], a.shape[1], b, out_b,
           b.shape[0], b.shape[1], g, BLOCK_P=block_p, BLOCK_L=block_l, num_warps=4)


def sum_rows_blocks(p: int, length: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_L): 8 x 256 on a GPU (L/256 programs each reading P rows of 1 KiB)."""
    if INTERPRETED:
        return clamp_pow2(p, 1, 64), clamp_pow2(length, 16, 1024)
    return 8, 256


def sum_rows(partials: Tensor, out: Tensor | None = None) -> Tensor:
    """Column sums of a (P, L) float32/float64 tensor (columns contiguous) in a fixed order.

    ``out``: where to write them, a dense tensor of L elements written in storage order (so a
    channels_last weight gradient receives partials laid out like its storage); float32 (L,) by
    default."""
    p, length = partials.shape
    if out is None:
        out = torch.empty(length, device=partials.device, dtype=torch.float32)
    _launch(partials.unsqueeze(0), (out,))
    return out


def sum_planes(partials: Tensor, planes: int, dtype: torch.dtype = torch.float32,
               dup: bool = False) -> tuple[Tensor, ...]:
    """Column sums of the first ``planes`` (at most 3) planes of a (Q, P, L) partials tensor
    (each plane's columns contiguous), as ``planes`` (L,) tensors, in one launch: the same fixed
    order, so the same bits, as sum_rows of each plane (one launch instead of ``planes``: the
    statistics' sum and sum of squares, the BN backward's two or three sums). ``dtype``: of the
    outputs, each the float32 sum rounded once. ``dup``: one more output after them, a copy of
    plane 0's sums (a tensor of its own: the bias gradients of two BatchNorms that see one g)."""
    length = partials.shape[2]
    outs = tuple(torch.empty(length, device=partials.device, dtype=dtype)
                 for _ in range(planes + dup))
    _launch(partials[:planes], outs[:planes], None, outs[planes] if dup else None)
    return outs


def sum_planes_cast(partials: Tensor, planes: int, cast: torch.dtype,
                    dup: bool = False) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """sum_planes' float32 sums and, from the same launch, their copies in ``cast`` (each the
    float32 sum rounded once: the bits of ``sum_planes(partials, planes, cast)``); ``dup``: the
    copies end with one more of plane 0's."""
    length = partials.shape[2]

    def vectors(dt, n):
        return tuple(torch.empty(length, device=partials.device, dtype=dt) for _ in range(n))

    outs, casts = vectors(torch.float32, planes), vectors(cast, planes + dup)
    _launch(partials[:planes], outs, casts[:planes], casts[planes] if dup else None)
    return outs, casts


def _launch(partials: Tensor, outs: tuple[Tensor, ...],
            casts: tuple[Tensor, ...] | None = None, dup: Tensor | None = None) -> None:
    q, p, length = partials.shape
    block_p, block_l = sum_rows_blocks(hint(p), hint(length))
    cs = casts or outs
    launch(
        _sum_rows_kernel, (cdiv(length, block_l), q),
        partials, outs[0], outs[min(1, q - 1)], outs[q - 1], cs[0], cs[min(1, q - 1)], cs[q - 1],
        dup if dup is not None else cs[0], p, length, partials.stride(1), partials.stride(0),
        BLOCK_P=block_p, BLOCK_L=block_l, CAST=casts is not None, DUP=dup is not None,
        num_warps=4,
    )
