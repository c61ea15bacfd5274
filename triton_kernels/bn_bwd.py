"""BatchNorm's backward kernels (bn.py has the forward): the fused ReLU mask and per-channel
reductions (pass 1) and the elementwise BatchNorm backward (pass 2), as bn.py's tiles: rows
m = (n, h, w) by channels c, any four strides per tensor, int64 row offsets.
"""

from __future__ import annotations

import torch

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
from .bn import _row_tile
from .reduce import split_sums, sum_planes, sum_planes_cast, sum_rows_blocks


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
    ws_ptr, wout_ptr,  # (WSUM) a weight gradient's (splits, WL) float32 partials, its (WL,) out
    M, C, H, W, WP, WL,
    stride_gon, stride_goc, stride_goh, stride_gow,
    stride_outn, stride_outc, stride_outh, stride_outw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_rxn, stride_rxc, stride_rxh, stride_rxw,
    stride_gn, stride_gc, stride_gh, stride_gw,
    MASK: tl.constexpr, HAS_XHAT: tl.constexpr, HAS_RES_BN: tl.constexpr, WRITE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    WSUM: tl.constexpr, WBLOCK_P: tl.constexpr, WBLOCK_L: tl.constexpr,
):
    # Pass 1 of the BN backward: per-channel sums of g and g*xhat. Each program walks row blocks
    # pid_m, pid_m + GRID_M, ... adding each block's fp64 column sums to per-channel fp64
    # accumulators: one partial per (program, channel), summed in a fixed order afterwards.
    # Floor on H200 (analysis): reads grad_out, out, x (+ res_x): 3-4 x 2 B per element; ResNet-50
    # layer1 256x256x56x56 bf16 = 3 x 411 MB / 4.3 TB/s = 287 us (+ 96 us when writing g).
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    grid_m = tl.num_programs(0)
    # WSUM: the grid's second z-slice sums a weight gradient's splits (the training unit's
    # previous conv_bwd left it to this launch: one launch fewer); the first does the reduction.
    wsum_slice = False
    if WSUM:
        wsum_slice = tl.program_id(2) == 1
    if wsum_slice:
        split_sums(ws_ptr, wout_ptr, WP, WL, pid_c * grid_m + pid_m, grid_m * tl.num_programs(1),
                   WBLOCK_P, WBLOCK_L)
    else:
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
        # Each row block is tree-summed in float64 and added to float64 per-channel accumulators:
        # the sums feed grad_input through sum/count differences, and an fp32 running sum over up
        # to 800k rows per channel (ResNet-50 layer1) drifts ~1e-4 relative.
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
                tl.store(tile_ptrs(g_ptr, n, h, w, offs_c,
                                   stride_gn, stride_gc, stride_gh, stride_gw),
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
                    g_out, mask_mode: int, has_xhat: bool, wsum=None):
    """bn_bwd_reduce's reduction launch: (float64 partials (3, programs, C), planes to sum).
    ``wsum``: a weight gradient's split sum the same launch runs (conv.conv_wgrad's deferred
    ``(partials, out)``), or None."""
    n, c, h, w = grad_out.shape
    m = n * h * w
    cfg = rows_config(m, c, 4 if res_x is not None else 3)
    grid = (cfg.GRID_M, cdiv(c, cfg.BLOCK_C), 2 if wsum is not None else 1)
    ws, wout = wsum if wsum is not None else (grad_out, grad_out)
    wp, wl = ws.shape if wsum is not None else (0, 0)
    wblock_p, wblock_l = sum_rows_blocks(hint(wp), hint(wl)) if wsum is not None else (1, 16)
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
        gg, part, ws, wout,
        m, c, h, w, wp, wl,
        *strides4(grad_out), *strides4(out if out is not None else dummy), *strides4(xx),
        *strides4(rx), *strides4(gg),
        MASK=mask_mode, HAS_XHAT=bool(has_xhat), HAS_RES_BN=res_x is not None,
        WRITE_G=g_out is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C,
        WSUM=wsum is not None, WBLOCK_P=wblock_p, WBLOCK_L=wblock_l, num_warps=cfg.num_warps,
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
