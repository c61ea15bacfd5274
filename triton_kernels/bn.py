"""BatchNorm kernels: finalize, apply + residual + ReLU, and the fused ReLU-mask/BN backward.

The activation kernels see a 4-D tensor as rows m = (n, h, w) by channels c, tiles of
BLOCK_M x BLOCK_C, each tensor with its own four strides, so channels_last, contiguous and strided
views (the option-A shortcut's x[:, :, ::2, ::2]) all work; channels_last (C contiguous) is the
fast one. Row offsets are int64 (N*H*W*C passes 2^31 for large batches).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    cast_to,
    cdiv,
    empty_like_format,
    hint,
    launch,
    rows_config,
    split_rows,
    strides4,
    tf32_operand,
    tile_ptrs,
    tl,
    triton,
)
from .reduce import column_sums, sum_planes, sum_planes_cast, sum_rows_blocks


@triton.jit
def _bn_finalize_kernel(
    sum_ptr, sumsq_ptr,  # (C,) float32
    weight_ptr, bias_ptr,  # (C,)
    rm_ptr, rv_ptr,  # (C,) running_mean, running_var, updated in place
    nbt_ptr,  # () int64 num_batches_tracked, incremented in place
    count_ptr,  # (1,) the number of values per channel (COUNT_ON_DEVICE)
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,  # (C,) float32 outputs
    C, inv_count, unbias, momentum, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_ON_DEVICE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program for all channels: num_batches_tracked is read, incremented and (momentum None)
    # turned into the factor 1/nbt by the only program that exists, so no program can see another
    # one's increment. C <= 2048 in a ResNet: 2 loop trips of 1024; floor ~ 10 * 4 B * C = 80 KB,
    # i.e. launch latency (~3 us), not bandwidth.
    if COUNT_ON_DEVICE:
        # SyncBatchNorm: the all-reduced count, read here rather than by the host (no sync). The
        # float64 divisions rounded once to float32 give the very bits the host's 1.0 / count and
        # count / (count - 1) give as float32 arguments, so both paths agree bitwise.
        n = tl.load(count_ptr).to(tl.float64)
        inv_count = (1.0 / n).to(tl.float32)
        unbias = (n / (n - 1.0)).to(tl.float32)
    factor = momentum
    if HAS_NBT:
        nbt = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nbt)
        if CUMULATIVE:
            factor = 1.0 / nbt.to(tl.float64)
    factor = factor.to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        ok = offs < C
        s = tl.load(sum_ptr + offs, mask=ok, other=0.0)
        ss = tl.load(sumsq_ptr + offs, mask=ok, other=0.0)
        _finalize_channels(s, ss, offs, ok, weight_ptr, bias_ptr, rm_ptr, rv_ptr, mean_ptr,
                           invstd_ptr, scale_ptr, shift_ptr, inv_count, unbias, factor, eps,
                           HAS_WEIGHT, HAS_BIAS, HAS_RM, HAS_RV)


@triton.jit
def _finalize_channels(s, ss, offs, ok, weight_ptr, bias_ptr, rm_ptr, rv_ptr, mean_ptr,
                       invstd_ptr, scale_ptr, shift_ptr, inv_count, unbias, factor, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RM: tl.constexpr,
                       HAS_RV: tl.constexpr):
    """Channels ``offs`` of bn_finalize from their sums ``s`` and ``ss``."""
    mean = s * inv_count
    # NaN (a NaN, or Inf - Inf from an Inf in the batch) stays NaN, as nn.BatchNorm2d's var
    var = tl.maximum(ss * inv_count - mean * mean, 0.0, propagate_nan=tl.PropagateNan.ALL)
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32) * invstd
    shift = -mean * scale
    if HAS_BIAS:
        shift = tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean * scale
    tl.store(mean_ptr + offs, mean, mask=ok)
    tl.store(invstd_ptr + offs, invstd, mask=ok)
    tl.store(scale_ptr + offs, scale, mask=ok)
    tl.store(shift_ptr + offs, shift, mask=ok)
    if HAS_RM:
        rm = tl.load(rm_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        rm = rm * (1.0 - factor) + mean * factor
        tl.store(rm_ptr + offs, cast_to(rm, rm_ptr.dtype.element_ty), mask=ok)
    if HAS_RV:
        rv = tl.load(rv_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        rv = rv * (1.0 - factor) + (var * unbias) * factor
        tl.store(rv_ptr + offs, cast_to(rv, rv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _stats_finalize_kernel(
    part_ptr,  # (2, P, C) float64: a conv_stats launch's partials of sum and sum of squares
    sum_ptr, sumsq_ptr,  # (C,) float32 outputs: the column sums (sum_rows' bits)
    weight_ptr, bias_ptr, rm_ptr, rv_ptr, nbt_ptr,  # as _bn_finalize_kernel's
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,  # (C,) float32 outputs
    P, C, stride_p, stride_q, inv_count, unbias, momentum, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    HAS_NBT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # sum_planes(part, 2) and bn_finalize in one launch, sum_rows' grid: each program finalizes
    # the channels it has just summed. With momentum set no program reads num_batches_tracked,
    # so program 0 increments it alone (momentum None: the two launches, bn_finalize_partials).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = offs < C
    s = column_sums(part_ptr, P, stride_p, offs, ok, BLOCK_P, BLOCK_L)
    ss = column_sums(part_ptr + stride_q, P, stride_p, offs, ok, BLOCK_P, BLOCK_L)
    tl.store(sum_ptr + offs, s, mask=ok)
    tl.store(sumsq_ptr + offs, ss, mask=ok)
    if HAS_NBT:
        if pid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    factor = momentum + tl.zeros((BLOCK_L,), tl.float32)  # float32, also where momentum is a float
    _finalize_channels(s, ss, offs, ok, weight_ptr, bias_ptr, rm_ptr, rv_ptr, mean_ptr,
                       invstd_ptr, scale_ptr, shift_ptr, inv_count, unbias, factor, eps,
                       HAS_WEIGHT, HAS_BIAS, HAS_RM, HAS_RV)


@triton.jit
def _row_tile(M, C, H, W, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (pid_m, pid_c)'s tile of BLOCK_M rows m = (n, h, w) by BLOCK_C channels: (n, h, w,
    offs_c, m_ok, c_ok, mask)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < M
    c_ok = offs_c < C
    n, h, w = split_rows(offs_m, H, W)
    return n, h, w, offs_c, m_ok, c_ok, m_ok[:, None] & c_ok[None, :]


@triton.jit
def _prologue_relu_mask(go, x, sc, sh):
    """0 where the prologue z = x*sc+sh is <= 0, else go (MASK == 2): threshold_backward, so a NaN
    z passes go. z is rounded to x's dtype before the comparison, as the reference's prologue is."""
    z = cast_to(x.to(tl.float32) * sc[None, :] + sh[None, :], x.dtype)
    return tl.where(z <= 0, 0.0, go)


@triton.jit
def _bn_input_grad(g, gmean, x, mean, invstd, gxmean, weight_ptr, offs_c, c_ok,
                   HAS_WEIGHT: tl.constexpr):
    """weight*invstd * (g - mean(g) - xhat * mean(g*xhat)), vectors broadcast on rows."""
    coef = invstd
    if HAS_WEIGHT:
        coef = tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32) * invstd
    xhat = (x.to(tl.float32) - mean[None, :]) * invstd[None, :]
    return coef[None, :] * (g - gmean[None, :] - xhat * gxmean[None, :])


@triton.jit
def _bn_add_relu_kernel(
    x_ptr,  # (N, C, H, W)
    scale_ptr, shift_ptr,  # (C,)
    res_ptr,  # (N, CR, H, W), any strides (channel j lands on output channel j + res_off)
    res_scale_ptr, res_shift_ptr,  # (CR,)
    out_ptr,  # (N, C, H, W)
    M, C, H, W, CR, res_off,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_rn, stride_rc, stride_rh, stride_rw,
    stride_on, stride_oc, stride_oh, stride_ow,
    HAS_RESIDUAL: tl.constexpr, HAS_RES_SCALE: tl.constexpr, HAS_RES_SHIFT: tl.constexpr,
    APPLY_RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Floor on H200 (analysis): 3 tensors x 2 B per element (x, residual, out); ResNet-50 layer1
    # output 256x256x56x56 bf16 = 205.5M elements = 411 MB, x 3 / 4.3 TB/s = 287 us, vs 7 tensor
    # passes as separate ops (BN 2, add 3, ReLU 2) = 669 us.
    n, h, w, offs_c, m_ok, c_ok, mask = _row_tile(M, C, H, W, BLOCK_M, BLOCK_C)
    x = tl.load(tile_ptrs(x_ptr, n, h, w, offs_c, stride_xn, stride_xc, stride_xh, stride_xw),
                mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    z = x * sc[None, :] + sh[None, :]
    if HAS_RESIDUAL:
        rc = offs_c - res_off
        rc_ok = c_ok & (rc >= 0) & (rc < CR)
        rmask = m_ok[:, None] & rc_ok[None, :]
        rv = tl.load(tile_ptrs(res_ptr, n, h, w, rc, stride_rn, stride_rc, stride_rh, stride_rw),
                     mask=rmask, other=0.0).to(tl.float32)
        if HAS_RES_SCALE:
            rv = rv * tl.load(res_scale_ptr + rc, mask=rc_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RES_SHIFT:
            rv = rv + tl.load(res_shift_ptr + rc, mask=rc_ok, other=0.0).to(tl.float32)[None, :]
        z += tl.where(rmask, rv, 0.0)
    if APPLY_RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN
    tl.store(tile_ptrs(out_ptr, n, h, w, offs_c, stride_on, stride_oc, stride_oh, stride_ow),
             cast_to(z, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_bwd_reduce_kernel(
    go_ptr,  # (N, C, H, W) grad_out
    out_ptr,  # (N, C, H, W) forward output, for the mask out > 0 (MASK == 1)
    x_ptr,  # (N, C, H, W) BN input
    scale_ptr, shift_ptr,  # (C,) prologue scale/shift, for the mask x*scale+shift > 0 (MASK == 2)
    mean_ptr, invstd_ptr,  # (C,)
    rx_ptr,  # (N, C, H, W) the residual branch's BN input (HAS_RES_BN)
    rmean_ptr, rinvstd_ptr,  # (C,)
    g_ptr,  # (N, C, H, W) output: the masked gradient g (WRITE_G)
    part_ptr,  # (3, GRID_M, C) float64 partials: sum g, sum g*xhat, sum g*xhat_res
    M, C, H, W,
    stride_gon, stride_goc, stride_goh, stride_gow,
    stride_outn, stride_outc, stride_outh, stride_outw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_rxn, stride_rxc, stride_rxh, stride_rxw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    MASK: tl.constexpr, HAS_XHAT: tl.constexpr, HAS_RES_BN: tl.constexpr, WRITE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Pass 1 of the BN backward: per-channel sums of g and g*xhat. Each program walks row blocks
    # pid_m, pid_m + GRID_M, ... adding each block's fp64 column sums to per-channel fp64
    # accumulators: one partial per (program, channel), summed in a fixed order afterwards.
    # Floor on H200 (analysis): reads grad_out, out, x (+ res_x): 3-4 x 2 B per element; ResNet-50
    # layer1 256x256x56x56 bf16 = 3 x 411 MB / 4.3 TB/s = 287 us (+ 96 us when writing g).
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    grid_m = tl.num_programs(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    if MASK == 2:
        sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_XHAT:
        mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
    if HAS_RES_BN:
        rmean = tl.load(rmean_ptr + offs_c, mask=c_ok, other=0.0)
        rinvstd = tl.load(rinvstd_ptr + offs_c, mask=c_ok, other=0.0)
    # Each row block is tree-summed in float64 and added to float64 per-channel accumulators: the
    # sums feed grad_input through sum/count differences, and an fp32 running sum over up to
    # 800k rows per channel (ResNet-50 layer1) drifts ~1e-4 relative.
    acc_g = tl.zeros((BLOCK_C,), dtype=tl.float64)
    acc_gx = tl.zeros((BLOCK_C,), dtype=tl.float64)
    acc_gr = tl.zeros((BLOCK_C,), dtype=tl.float64)
    num_mb = tl.cdiv(M, BLOCK_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    step = grid_m.to(tl.int64) * BLOCK_M
    for _mb in range(pid_m, num_mb, grid_m):
        m_ok = offs_m < M
        n, h, w = split_rows(offs_m, H, W)
        mask = m_ok[:, None] & c_ok[None, :]
        go = tl.load(tile_ptrs(go_ptr, n, h, w, offs_c,
                               stride_gon, stride_goc, stride_goh, stride_gow),
                     mask=mask, other=0.0)
        if MASK == 1:
            o = tl.load(tile_ptrs(out_ptr, n, h, w, offs_c,
                                  stride_outn, stride_outc, stride_outh, stride_outw),
                        mask=mask, other=0.0)
            go = tl.where(o <= 0, 0.0, go)  # threshold_backward: NaN out passes
        if HAS_XHAT or MASK == 2:
            x = tl.load(tile_ptrs(x_ptr, n, h, w, offs_c,
                                  stride_xn, stride_xc, stride_xh, stride_xw),
                        mask=mask, other=0.0)
        if MASK == 2:
            go = _prologue_relu_mask(go, x, sc, sh)
        if WRITE_G:
            tl.store(tile_ptrs(g_ptr, n, h, w, offs_c, stride_gn, stride_gc, stride_gh, stride_gw),
                     cast_to(go, g_ptr.dtype.element_ty), mask=mask)
        g = go.to(tl.float32)
        acc_g += tl.sum(g.to(tl.float64), axis=0)
        if HAS_XHAT:
            xhat = (x.to(tl.float32) - mean[None, :]) * invstd[None, :]
            acc_gx += tl.sum(tl.where(mask, g * xhat, 0.0).to(tl.float64), axis=0)
        if HAS_RES_BN:
            rx = tl.load(tile_ptrs(rx_ptr, n, h, w, offs_c,
                                   stride_rxn, stride_rxc, stride_rxh, stride_rxw),
                         mask=mask, other=0.0).to(tl.float32)
            grx = tl.where(mask, g * (rx - rmean[None, :]) * rinvstd[None, :], 0.0)
            acc_gr += tl.sum(grx.to(tl.float64), axis=0)
        offs_m += step
    row = pid_m.to(tl.int64) * C
    plane = grid_m.to(tl.int64) * C
    tl.store(part_ptr + row + offs_c, acc_g, mask=c_ok)
    if HAS_XHAT:
        tl.store(part_ptr + plane + row + offs_c, acc_gx, mask=c_ok)
    if HAS_RES_BN:
        tl.store(part_ptr + 2 * plane + row + offs_c, acc_gr, mask=c_ok)


@triton.jit
def _bn_bwd_apply_kernel(
    go_ptr, out_ptr, x_ptr,  # (N, C, H, W) as in the reduce kernel
    scale_ptr, shift_ptr,  # (C,) prologue scale/shift (MASK == 2)
    mean_ptr, invstd_ptr, weight_ptr,  # (C,)
    gsum_ptr, gxsum_ptr,  # (C,) float32 sums of g and g*xhat from pass 1 (or their means)
    gi_ptr,  # (N, C, H, W) output grad_input
    rx_ptr, rmean_ptr, rinvstd_ptr, rweight_ptr, grxsum_ptr,  # residual branch BN (HAS_RES_BN)
    gr_ptr,  # (N, C, H, W) output grad_res: the residual BN's (HAS_RES_BN) or g itself (WRITE_G)
    M, C, H, W,
    inv_count,  # 1/count turns the sums into means; 1.0 when the caller passes means (SyncBN)
    stride_gon, stride_goc, stride_goh, stride_gow,
    stride_outn, stride_outc, stride_outh, stride_outw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_gin, stride_gic, stride_gih, stride_giw,
    stride_rxn, stride_rxc, stride_rxh, stride_rxw,
    stride_grn, stride_grc, stride_grh, stride_grw,
    MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_RES_BN: tl.constexpr,
    HAS_RES_WEIGHT: tl.constexpr, WRITE_G: tl.constexpr, ROUND_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # ROUND_TF32: grad_input and the residual BN's grad_res (float32) are written rounded to TF32
    # (tf32_operand): the training unit's, whose only reader is a TF32 conv_bwd that would round
    # them in a launch of its own (round_tf32). g itself (WRITE_G) is never rounded.
    # Pass 2: grad_input = weight*invstd * (g - sum(g)/count - xhat * sum(g*xhat)/count), g
    # recomputed from grad_out and the mask rather than stored by pass 1 (a 2 B/element write and
    # read saved against one compare). Floor on H200 (analysis): reads grad_out, out, x, writes
    # grad_input: 4 x 411 MB / 4.3 TB/s = 382 us for ResNet-50 layer1 (+2 tensors with a BN'd
    # residual branch).
    n, h, w, offs_c, m_ok, c_ok, mask = _row_tile(M, C, H, W, BLOCK_M, BLOCK_C)
    go = tl.load(tile_ptrs(go_ptr, n, h, w, offs_c, stride_gon, stride_goc, stride_goh, stride_gow),
                 mask=mask, other=0.0)
    x = tl.load(tile_ptrs(x_ptr, n, h, w, offs_c, stride_xn, stride_xc, stride_xh, stride_xw),
                mask=mask, other=0.0)
    if MASK == 1:
        o = tl.load(tile_ptrs(out_ptr, n, h, w, offs_c,
                              stride_outn, stride_outc, stride_outh, stride_outw),
                    mask=mask, other=0.0)
        go = tl.where(o <= 0, 0.0, go)  # threshold_backward: NaN out passes
    if MASK == 2:
        sc = tl.load(scale_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        go = _prologue_relu_mask(go, x, sc, sh)
    if WRITE_G:
        # The identity residual's gradient is g. The single-process op has its reduction pass
        # write it; SyncBatchNorm's split reduction writes nothing, so the elementwise pass does.
        tl.store(tile_ptrs(gr_ptr, n, h, w, offs_c, stride_grn, stride_grc, stride_grh, stride_grw),
                 cast_to(go, gr_ptr.dtype.element_ty), mask=mask)
    g = go.to(tl.float32)
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_ok, other=0.0)
    gb = tl.load(gsum_ptr + offs_c, mask=c_ok, other=0.0) * inv_count
    gw = tl.load(gxsum_ptr + offs_c, mask=c_ok, other=0.0) * inv_count
    gi = _bn_input_grad(g, gb, x, mean, invstd, gw, weight_ptr, offs_c, c_ok, HAS_WEIGHT)
    if ROUND_TF32:
        gi = tf32_operand(gi, "tf32")
    tl.store(tile_ptrs(gi_ptr, n, h, w, offs_c, stride_gin, stride_gic, stride_gih, stride_giw),
             cast_to(gi, gi_ptr.dtype.element_ty), mask=mask)
    if HAS_RES_BN:
        rx = tl.load(tile_ptrs(rx_ptr, n, h, w, offs_c,
                               stride_rxn, stride_rxc, stride_rxh, stride_rxw),
                     mask=mask, other=0.0).to(tl.float32)
        rmean = tl.load(rmean_ptr + offs_c, mask=c_ok, other=0.0)
        rinvstd = tl.load(rinvstd_ptr + offs_c, mask=c_ok, other=0.0)
        grw = tl.load(grxsum_ptr + offs_c, mask=c_ok, other=0.0) * inv_count
        gr = _bn_input_grad(g, gb, rx, rmean, rinvstd, grw, rweight_ptr, offs_c, c_ok,
                            HAS_RES_WEIGHT)
        if ROUND_TF32:
            gr = tf32_operand(gr, "tf32")
        tl.store(tile_ptrs(gr_ptr, n, h, w, offs_c, stride_grn, stride_grc, stride_grh, stride_grw),
                 cast_to(gr, gr_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------


def bn_finalize(sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked,
                count, momentum, eps: float):
    """``count``: an int (bn_finalize, checked here) or a one-element tensor on sum's device
    (bn_finalize_count: read by the kernel, never by the host, so unchecked)."""
    on_device = isinstance(count, Tensor)
    if not on_device and count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} values")
    cumulative = momentum is None
    if cumulative and (running_mean is not None or running_var is not None) \
            and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    c = sum.shape[0]
    s = sum.to(torch.float32).contiguous()
    ss = sumsq.to(torch.float32).contiguous()
    mean, invstd, scale, shift = (torch.empty(c, device=sum.device, dtype=sum.dtype)
                                  for _ in range(4))
    launch(
        _bn_finalize_kernel, (1,),
        s, ss,
        weight if weight is not None else s, bias if bias is not None else s,
        running_mean if running_mean is not None else s,
        running_var if running_var is not None else s,
        num_batches_tracked if num_batches_tracked is not None else s,
        count if on_device else s,
        mean, invstd, scale, shift,
        c, 0.0 if on_device else 1.0 / count, 0.0 if on_device else count / (count - 1),
        0.0 if momentum is None else float(momentum), float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RM=running_mean is not None, HAS_RV=running_var is not None,
        HAS_NBT=num_batches_tracked is not None, CUMULATIVE=cumulative,
        COUNT_ON_DEVICE=on_device, BLOCK_C=1024, num_warps=4,
    )
    return mean, invstd, scale, shift


def bn_finalize_partials(part, weight, bias, running_mean, running_var, num_batches_tracked,
                         count: int, momentum, eps: float):
    """bn_finalize of the column sums of conv_forward_partials' ``part`` ((2, P, C) float64):
    (sum, sumsq, mean, invstd, scale, shift), the same bits as sum_planes(part, 2) then
    bn_finalize, in one launch (two with momentum None and a batch count, which every channel
    reads before one increments it)."""
    if momentum is None and (num_batches_tracked is not None or running_mean is not None
                             or running_var is not None):
        s, ss = sum_planes(part, 2)
        return (s, ss, *bn_finalize(s, ss, weight, bias, running_mean, running_var,
                                    num_batches_tracked, count, momentum, eps))
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} values")
    _, p, c = part.shape
    s, ss, mean, invstd, scale, shift = (torch.empty(c, device=part.device, dtype=torch.float32)
                                         for _ in range(6))
    block_p, block_l = sum_rows_blocks(hint(p), hint(c))
    launch(
        _stats_finalize_kernel, (cdiv(c, block_l),),
        part, s, ss,
        weight if weight is not None else s, bias if bias is not None else s,
        running_mean if running_mean is not None else s,
        running_var if running_var is not None else s,
        num_batches_tracked if num_batches_tracked is not None else s,
        mean, invstd, scale, shift,
        p, c, part.stride(1), part.stride(0), 1.0 / count, count / (count - 1),
        1.0 if momentum is None else float(momentum), float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RM=running_mean is not None, HAS_RV=running_var is not None,
        HAS_NBT=num_batches_tracked is not None, BLOCK_P=block_p, BLOCK_L=block_l, num_warps=4,
    )
    return s, ss, mean, invstd, scale, shift


def bn_add_relu(input, scale, shift, residual, res_scale, res_shift, res_channel_offset: int,
                relu: bool) -> Tensor:
    n, c, h, w = input.shape
    out = empty_like_format(input.shape, input)
    m = n * h * w
    cfg = rows_config(m, c)
    res = residual if residual is not None else input
    cr = residual.shape[1] if residual is not None else 0
    launch(
        _bn_add_relu_kernel, (cdiv(m, cfg.BLOCK_M), cdiv(c, cfg.BLOCK_C)),
        input, scale, shift, res,
        res_scale if res_scale is not None else scale,
        res_shift if res_shift is not None else shift,
        out, m, c, h, w, cr, int(res_channel_offset),
        *strides4(input), *strides4(res), *strides4(out),
        HAS_RESIDUAL=residual is not None, HAS_RES_SCALE=res_scale is not None,
        HAS_RES_SHIFT=res_shift is not None, APPLY_RELU=bool(relu),
        BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps,
    )
    return out


def bn_bwd_reduce(grad_out, out, x, scale, shift, mean, invstd, res_x, res_mean, res_invstd,
                  g_out, mask_mode: int, has_xhat: bool):
    """Pass 1: (sum g, sum g*xhat or None, sum g*xhat_res or None); writes g to g_out if given."""
    part, planes = bn_bwd_partials(grad_out, out, x, scale, shift, mean, invstd, res_x, res_mean,
                                   res_invstd, g_out, mask_mode, has_xhat)
    return bn_bwd_sums(part, planes, has_xhat, res_x is not None)


def bn_bwd_sums(part, planes: int, has_xhat: bool, has_res: bool,
                dtype: torch.dtype = torch.float32):
    """bn_bwd_reduce's sums of ``bn_bwd_partials``' partials, in ``dtype`` (each the float32 sum
    rounded once)."""
    sums = sum_planes(part, planes, dtype)
    return sums[0], sums[1] if has_xhat else None, sums[2] if has_res else None


def bn_bwd_grads(part, planes: int, has_res: bool, cast: torch.dtype | None):
    """The training unit's BatchNorm backward sums, from one launch: (the float32 sums for the
    elementwise pass, the BatchNorm gradients): each (sum g, sum g*xhat, sum g*xhat_res or None,
    with a residual BatchNorm its bias gradient, sum g again in a tensor of its own, else None),
    the gradients in ``cast`` (a 16-bit model's) or the float32 sums themselves (None)."""
    if cast is None:
        s = sum_planes(part, planes, dup=has_res)
        f32 = (s[0], s[1], s[2] if has_res else None)
        return f32, (*f32, s[3] if has_res else None)
    outs, casts = sum_planes_cast(part, planes, cast, dup=has_res)
    return ((outs[0], outs[1], outs[2] if has_res else None),
            (casts[0], casts[1], *((casts[2], casts[3]) if has_res else (None, None))))


def bn_bwd_partials(grad_out, out, x, scale, shift, mean, invstd, res_x, res_mean, res_invstd,
                    g_out, mask_mode: int, has_xhat: bool):
    """bn_bwd_reduce's reduction launch: (float64 partials (3, programs, C), planes to sum)."""
    n, c, h, w = grad_out.shape
    m = n * h * w
    cfg = rows_config(m, c, 4 if res_x is not None else 3)
    grid = (cfg.GRID_M, cdiv(c, cfg.BLOCK_C))
    part = torch.empty((3, cfg.GRID_M, c), device=grad_out.device, dtype=torch.float64)
    dummy = grad_out
    xx = x if x is not None else dummy
    rx = res_x if res_x is not None else dummy
    gg = g_out if g_out is not None else dummy
    f32 = part  # any tensor, for unused vector pointers
    launch(
        _bn_bwd_reduce_kernel, grid,
        grad_out, out if out is not None else dummy, xx,
        scale if scale is not None else f32, shift if shift is not None else f32,
        mean if mean is not None else f32, invstd if invstd is not None else f32,
        rx, res_mean if res_mean is not None else f32,
        res_invstd if res_invstd is not None else f32,
        gg, part,
        m, c, h, w,
        *strides4(grad_out), *strides4(out if out is not None else dummy), *strides4(xx),
        *strides4(rx), *strides4(gg),
        MASK=mask_mode, HAS_XHAT=bool(has_xhat), HAS_RES_BN=res_x is not None,
        WRITE_G=g_out is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps,
    )
    # planes 0 (g), 1 (g*xhat), 2 (g*xhat_res): the residual's only with xhat
    return part, 3 if res_x is not None else 2 if has_xhat else 1


def bn_bwd_apply(grad_out, out, x, scale, shift, mean, invstd, weight, gsum, gxsum,
                 res_x, res_mean, res_invstd, res_weight, grsum, mask_mode: int,
                 means: bool = False, g_out=None, round_tf32: bool = False):
    """Pass 2: (grad_input, grad_res or None). gsum/gxsum/grsum are pass 1's sums over this
    batch, or with ``means`` their global means (SyncBatchNorm, divided by the all-reduced
    count). ``g_out``: where to write g (the identity residual's gradient), if anywhere.
    ``round_tf32``: a float32 grad_input and grad_res written rounded to TF32 (for a TF32
    conv_bwd that takes them as they are)."""
    if round_tf32 and x.dtype != torch.float32:
        raise ValueError(f"bn_bwd_apply: round_tf32 for a {x.dtype} tensor")
    n, c, h, w = x.shape
    m = n * h * w
    gi = empty_like_format(x.shape, x)
    if res_x is not None:
        gr = empty_like_format(res_x.shape, res_x)
    else:
        gr = g_out if g_out is not None else gi
    cfg = rows_config(m, c)
    dummy = x
    f32 = gsum
    rx = res_x if res_x is not None else dummy
    o = out if out is not None else dummy
    launch(
        _bn_bwd_apply_kernel, (cdiv(m, cfg.BLOCK_M), cdiv(c, cfg.BLOCK_C)),
        grad_out, o, x,
        scale if scale is not None else f32, shift if shift is not None else f32,
        mean, invstd, weight if weight is not None else f32,
        gsum, gxsum, gi,
        rx, res_mean if res_mean is not None else f32,
        res_invstd if res_invstd is not None else f32,
        res_weight if res_weight is not None else f32,
        grsum if grsum is not None else f32, gr,
        m, c, h, w, 1.0 if means else 1.0 / m,
        *strides4(grad_out), *strides4(o), *strides4(x), *strides4(gi), *strides4(rx),
        *strides4(gr),
        MASK=mask_mode, HAS_WEIGHT=weight is not None, HAS_RES_BN=res_x is not None,
        HAS_RES_WEIGHT=res_weight is not None, WRITE_G=res_x is None and g_out is not None,
        ROUND_TF32=bool(round_tf32), BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C,
        num_warps=cfg.num_warps,
    )
    return gi, (gr if res_x is not None else None)
