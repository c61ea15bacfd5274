"""BatchNorm's forward kernels: finalize (from sums, or from a convolution's partials) and apply
+ residual + ReLU; the backward is in bn_bwd.py.

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
    tile_ptrs,
    tl,
    triton,
)
from .reduce import column_sums, sum_planes, sum_rows_blocks


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
