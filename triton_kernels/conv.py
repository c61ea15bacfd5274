"""Implicit-GEMM convolution kernels: forward (bias/residual/ReLU or prologue-BN + statistics),
data gradient and weight gradient, all NHWC-friendly, any N/H/W, masked channel tails.

Notation: input x (N, C, H, W), weight w (K, C, R, S), output (N, K, P, Q). The forward GEMM has
M = N*P*Q rows, K columns and a reduction of R*S*C, walked tap by tap (r, s) and BLOCK_K
channels at a time in one flat loop (one loop keeps Triton's software pipelining when C is small).
Row indices are int64: N*P*Q*K is 256*112*112*64 = 2.06e8 for the ResNet-50 stem at batch 256,
only 10x under 2^31 = 2.1e9 (batch 2560, or 4x the image side at batch 160, passes it).
Channel offsets stay int32: they are bounded by one image (C*H*W < 2^31).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    UPCAST_DOT,
    _pad_channels,
    _pad_vector,
    _padded_channels,
    _prologue_vectors,
    cast_to,
    cdiv,
    clamp_pow2,
    colsum_f64,
    dot_precision,
    empty_like_format,
    gemm_config,
    hint,
    launch,
    next_pow2,
    round_tf32,
    split_rows,
    strides4,
    tf32_operand,
    tile_offsets,
    tile_ptrs,
    tl,
    to_nhwc,
    triton,
    wgrad_config,
)
from .bn_eval import eval_vectors_tile
from .reduce import sum_planes, sum_rows


@triton.jit
def _gemm_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr):
    """Program pid's tile of an (M, N) GEMM output in grouped ordering (GROUP_M row tiles run one
    after another on the same column tile, so they share its weight tiles in L2): (pid_m, offs_m
    (int64), offs_n, offs_k)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_m, offs_m, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)


@triton.jit
def _tap_rs(tap, R: tl.constexpr, S: tl.constexpr):
    """(r, s) of a flat tap index; a constexpr 0 along a kernel dimension of size 1. A 1x1
    weight stored (K, C, 1, 1) contiguous has stride_wr = stride_ws = 1, which the JIT specialises
    to the constant 1: w + ... + r + s then adds a runtime tap index of unknown divisibility, the
    weight tile loses its 16-byte alignment proof and is loaded with scalar ld.global.b16 outside
    the cp.async pipeline, and the K loop waits with wgmma.wait_group 0 (aot_check --shapes
    resnet50 before this: 1x1 forward and dgrad with such weights failed sync-load and wait0)."""
    if R == 1:
        r = 0
    else:
        r = tap // S
    if S == 1:
        s = 0
    else:
        s = tap % S
    return r, s


@triton.jit
def _prologue(a, a_mask, sc, sh, PROLOGUE_BN: tl.constexpr, PRE_RELU: tl.constexpr,
              C_AXIS: tl.constexpr):
    """relu?(a * sc + sh) (sc, sh: per-channel vectors along a's axis C_AXIS, unused without
    PROLOGUE_BN) back in a's dtype. Padding and the masked tails (a_mask off) stay zero:
    relu(shift) is not zero."""
    af = a.to(tl.float32)
    if PROLOGUE_BN:
        if C_AXIS == 1:
            af = af * sc[None, :] + sh[None, :]
        else:
            af = af * sc[:, None] + sh[:, None]
    if PRE_RELU:
        # NaN stays NaN as in torch.relu: the default NaN policy (PropagateNan.NONE) returns 0
        af = tl.maximum(af, 0.0, propagate_nan=tl.PropagateNan.ALL)
    af = tl.where(a_mask, af, 0.0)
    return cast_to(af, a.dtype)


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # (N, C, H, W), any strides (channels_last: C contiguous)
    w_ptr,  # (K, C, R, S), any strides; with DOT_PRECISION "tf32": rounded to TF32 (round_tf32)
    bias_ptr,  # (K,)
    scale_ptr,  # (K,) float32: a BatchNorm scale applied before the bias (HAS_SCALE)
    res_ptr,  # (N, K, P, Q), any strides
    out_ptr,  # (N, K, P, Q), any strides
    pre_scale_ptr,  # (C,) float32
    pre_shift_ptr,  # (C,) float32
    psum_ptr,  # (cdiv(M, BLOCK_M), K) float64: per-program partial sums
    psumsq_ptr,  # (cdiv(M, BLOCK_M), K) float64
    bn_w_ptr, bn_b_ptr, bn_m_ptr, bn_v_ptr,  # (K,) an eval BatchNorm's tensors (BN_VECTORS)
    M, C, H, W, K, P, Q,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_rn, stride_rk, stride_rp, stride_rq,
    stride_on, stride_ok, stride_op, stride_oq,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w, bn_eps,
    R: tl.constexpr, S: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RES_LIKE_OUT: tl.constexpr, APPLY_RELU: tl.constexpr,
    PROLOGUE_BN: tl.constexpr, PRE_RELU: tl.constexpr, STATS: tl.constexpr,
    BN_VECTORS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Floor on H200 (analysis): ResNet-50 layer3 3x3 conv, N=256, 14x14, C=K=256, bf16:
    # 2*M*K*R*S*C = 2*50176*256*9*256 = 59.2 GFLOP / 790 TFLOP/s = 75 us; bytes (in + out +
    # weights) = 2 B * (12.8M + 12.8M + 0.6M) = 52 MB / 4.3 TB/s = 12 us -> compute bound. A 1x1
    # conv with C=K=64 at 56x56 (2*802816*64*64 = 6.6 GFLOP = 8.3 us vs 2*2*51.4M = 206 MB =
    # 48 us) is bandwidth bound: the fused prologue and statistics save a full read+write pass each.
    pid_m, offs_m, offs_n, offs_k = _gemm_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, BLOCK_K,
                                               GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < K
    if BN_VECTORS:
        # The epilogue's scale and shift of this tile's channels, computed here from the eval
        # BatchNorm's live tensors into scale_ptr and bias_ptr (a per-call buffer), then read
        # back by the epilogue below as any scale and bias: no launch of their own. Every
        # program of a column tile writes the same bits there, so whichever write a program
        # reads is its own value; the barrier orders the program's writes before its reads.
        # Computing them in the epilogue instead held the four BatchNorm vectors in the
        # accumulator's column layout at once: the 16-bit 128x128 forward spilled (255
        # registers, 64 B of stack) and the fp32 TF32 128x64 one took 165 (sm_90 AOT, triton
        # 3.8; 255 without a spill and 148 with rsqrt.approx for 1/sqrt_rn, 165 with the
        # vectors loaded one pair at a time behind a barrier).
        eval_vectors_tile(bn_w_ptr, bn_b_ptr, bn_m_ptr, bn_v_ptr, scale_ptr, bias_ptr, offs_n,
                          n_ok, bn_eps, True, True)
        tl.debug_barrier()
    n_img, p, q = split_rows(offs_m, P, Q)
    h0 = p * conv_sh - pad_h
    w0 = q * conv_sw - pad_w
    x_row = x_ptr + n_img * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_cb = tl.cdiv(C, BLOCK_K)
    for it in range(0, R * S * num_cb):
        tap = it // num_cb
        c0 = (it % num_cb) * BLOCK_K
        r, s = _tap_rs(tap, R, S)
        h = h0 + r * dil_h
        w = w0 + s * dil_w
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        cc = c0 + offs_k
        c_ok = cc < C
        a_mask = row_ok[:, None] & c_ok[None, :]
        a_ptrs = x_row[:, None] + (h * stride_xh + w * stride_xw)[:, None] + cc[None, :] * stride_xc
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if PROLOGUE_BN or PRE_RELU:
            sc, sh = 1.0, 0.0  # unused without PROLOGUE_BN
            if PROLOGUE_BN:
                sc = tl.load(pre_scale_ptr + cc, mask=c_ok, other=0.0)
                sh = tl.load(pre_shift_ptr + cc, mask=c_ok, other=0.0)
            a = _prologue(a, a_mask, sc, sh, PROLOGUE_BN, PRE_RELU, 1)
        a = tf32_operand(a, DOT_PRECISION)  # the register operand; w came rounded
        b_ptrs = (w_ptr + offs_n[None, :] * stride_wk + cc[:, None] * stride_wc
                  + r * stride_wr + s * stride_ws)
        b = tl.load(b_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if STATS:
        # Rows past M loaded zeros, so they add nothing. One float64 partial per program and
        # channel, summed later in a fixed order: bitwise reproducible, no atomics. float64
        # because var = E[x^2] - E[x]^2 cancels: over 3.2M values (ResNet-50 stem) fp32 sums lose
        # ~1e-4 relative, which the cancellation then amplifies. Within a tile see
        # colsum_f64: fp32 within the tile (a tree) on the GPU, fp64 under the interpreter.
        prow = pid_m.to(tl.int64) * K
        tl.store(psum_ptr + prow + offs_n, colsum_f64(acc, BLOCK_M, BLOCK_N), mask=n_ok)
        tl.store(psumsq_ptr + prow + offs_n, colsum_f64(acc * acc, BLOCK_M, BLOCK_N),
                 mask=n_ok)
    if HAS_SCALE:  # the BatchNorm scale, not folded into the weight
        acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    o_off = tile_offsets(n_img, p, q, offs_n, stride_on, stride_ok, stride_op, stride_oq)
    o_ptrs = out_ptr + o_off
    if HAS_RESIDUAL:
        if RES_LIKE_OUT:
            # One offset tile for both: a second tile of 64-bit addresses cost the fp32 TF32
            # 128x64 1x1 eval forward (scale, bias, residual, ReLU) 147 registers where 2
            # CTAs/SM allow 128; shared, 128 (sm_90 AOT, triton 3.8).
            r_ptrs = res_ptr + o_off
        else:
            r_ptrs = tile_ptrs(res_ptr, n_img, p, q, offs_n,
                               stride_rn, stride_rk, stride_rp, stride_rq)
        acc += tl.load(r_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) = NaN
    tl.store(o_ptrs, cast_to(acc, out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _conv_dgrad_kernel(
    go_ptr,  # (N, K, P, Q) grad of the conv output, any strides; rounded like w
    w_ptr,  # (K, C, R, S), any strides; with DOT_PRECISION "tf32": rounded to TF32 (round_tf32)
    gi_ptr,  # (N, C, H, W) dL/da, any strides
    C, H, W, K, P, Q, N,
    stride_gn, stride_gk, stride_gp, stride_gq,
    stride_wk, stride_wc, stride_wr, stride_ws,
    stride_in, stride_ic, stride_ih, stride_iw,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    step_r, step_s,  # conv_s / gcd(conv_s, dil): the tap period of one output phase
    R: tl.constexpr, S: tl.constexpr, STRIDE_POW2: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # da[n, c, h, w] = sum over (k, r, s), h = p*sh - ph + r*dh, of go[n, k, p, q] * w[k, c, r, s].
    # Rows are split by output phase (h % sh, w % sw) (grid axis 1): within a phase the taps that
    # hit an output pixel are the same for every row, so a stride-2 3x3 dgrad runs its 9/4 valid
    # taps per phase instead of masking 3/4 of 9 (4x fewer MMAs than the masked gather).
    # Floor on H200 (analysis): same FLOPs and bytes as the forward conv it differentiates
    # (layer3 3x3: 59.2 GFLOP = 75 us).
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    ph_h = phase // conv_sw
    ph_w = phase % conv_sw
    Hq = tl.cdiv(H, conv_sh)
    Wq = tl.cdiv(W, conv_sw)
    Mq = N * Hq * Wq
    _, offs_m, offs_n, offs_k = _gemm_tile(pid, Mq, C, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    n_ok = offs_n < C
    n_img, hq, wq = split_rows(offs_m, Hq, Wq)
    h = hq * conv_sh + ph_h
    w = wq * conv_sw + ph_w
    m_ok = (offs_m < Mq) & (h < H) & (w < W)

    # First valid tap of this phase: the smallest r < step_r with (ph_h + pad_h - r*dil_h) % sh
    # == 0 (C and Python remainders agree on "== 0"); none -> count 0.
    cand = tl.arange(0, STRIDE_POW2)
    ok_r = (cand < step_r) & (((ph_h + pad_h - cand * dil_h) % conv_sh) == 0)
    r0 = tl.min(tl.where(ok_r, cand, R), axis=0)
    ok_s = (cand < step_s) & (((ph_w + pad_w - cand * dil_w) % conv_sw) == 0)
    s0 = tl.min(tl.where(ok_s, cand, S), axis=0)
    count_r = tl.maximum(tl.cdiv(R - r0, step_r), 0)
    count_s = tl.maximum(tl.cdiv(S - s0, step_s), 0)
    count_s_div = tl.maximum(count_s, 1)

    go_row = go_ptr + n_img * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_kb = tl.cdiv(K, BLOCK_K)
    for it in range(0, count_r * count_s * num_kb):
        tap = it // num_kb
        k0 = (it % num_kb) * BLOCK_K
        # R == 1 or S == 1: the only tap is 0, a constexpr (see _tap_rs: the weight's alignment).
        if R == 1:
            r = 0
        else:
            r = r0 + (tap // count_s_div) * step_r
        if S == 1:
            s = 0
        else:
            s = s0 + (tap % count_s_div) * step_s
        # Exact divisions: the numerators are multiples of the strides by construction.
        p = hq + (ph_h + pad_h - r * dil_h) // conv_sh
        q = wq + (ph_w + pad_w - s * dil_w) // conv_sw
        row_ok = m_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        kk = k0 + offs_k
        k_ok = kk < K
        a_ptrs = (go_row[:, None] + (p * stride_gp + q * stride_gq)[:, None]
                  + kk[None, :] * stride_gk)
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_ptrs = (w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wc
                  + r * stride_wr + s * stride_ws)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    o_ptrs = tile_ptrs(gi_ptr, n_img, h, w, offs_n, stride_in, stride_ic, stride_ih, stride_iw)
    tl.store(o_ptrs, cast_to(acc, gi_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_wgrad_kernel(
    go_ptr,  # (N, K, P, Q), any strides; with DOT_PRECISION "tf32": rounded to TF32 (round_tf32)
    x_ptr,  # (N, C, H, W), any strides: the prologue is recomputed from it on load
    pre_scale_ptr,  # (C,) float32
    pre_shift_ptr,  # (C,) float32
    out_ptr,  # (SPLIT, K, C, R, S) float32 partials, or grad_weight itself when SPLIT == 1
    M, C, H, W, K, P, Q,
    stride_gn, stride_gk, stride_gp, stride_gq,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_ok, stride_oc, stride_or, stride_os, stride_osplit,
    conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
    iters_per_split,
    R: tl.constexpr, S: tl.constexpr,
    PROLOGUE_BN: tl.constexpr, PRE_RELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # dW[k, c, r, s] = sum over m = (n, p, q) of go[m, k] * a[n, c, p*sh - ph + r*dh, ...], with
    # a = relu?(x * scale + shift) recomputed here, never stored: storing a would cost a write and
    # a read of the whole activation (2 * 2 bytes per element) to save 2 FMAs per loaded element.
    # Floor on H200 (analysis): FLOPs as the forward conv (layer3 3x3: 59.2 GFLOP = 75 us).
    # Grid: (K tiles x C tiles, R*S taps, SPLIT slices of the N*P*Q reduction).
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    num_pid_c = tl.cdiv(C, BLOCK_C)
    pid_k = pid // num_pid_c
    pid_c = pid % num_pid_c
    r = tap // S
    s = tap % S
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = offs_k < K
    c_ok = offs_c < C
    sc, sh = 1.0, 0.0  # unused without PROLOGUE_BN
    if PROLOGUE_BN:
        sc = tl.load(pre_scale_ptr + offs_c, mask=c_ok, other=0.0)
        sh = tl.load(pre_shift_ptr + offs_c, mask=c_ok, other=0.0)

    # The transposed product dW^T (BLOCK_C, BLOCK_K) = a^T (BLOCK_C, BLOCK_M) @ go (BLOCK_M,
    # BLOCK_K): wgmma takes its first operand from registers but its second only from shared
    # memory, so the recomputed activation goes first. As dW = go^T @ a, the activation was the
    # shared-memory operand: stored back to shared memory every iteration after the prologue,
    # and the loop waited with wgmma.wait_group 0 (aot_check --shapes resnet50, sm_90).
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    offs_m = split.to(tl.int64) * iters_per_split * BLOCK_M + tl.arange(0, BLOCK_M)
    for _i in range(0, iters_per_split):
        m_ok = offs_m < M
        n_img, p, q = split_rows(offs_m, P, Q)
        g_ptrs = tile_ptrs(go_ptr, n_img, p, q, offs_k, stride_gn, stride_gk, stride_gp,
                           stride_gq)
        g = tl.load(g_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        h = p * conv_sh - pad_h + r * dil_h
        w = q * conv_sw - pad_w + s * dil_w
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        a_mask = c_ok[:, None] & row_ok[None, :]
        a_ptrs = (x_ptr + (n_img * stride_xn + h * stride_xh + w * stride_xw)[None, :]
                  + offs_c[:, None] * stride_xc)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)  # (BLOCK_C, BLOCK_M)
        if PROLOGUE_BN or PRE_RELU:
            a = _prologue(a, a_mask, sc, sh, PROLOGUE_BN, PRE_RELU, 0)
        a = tf32_operand(a, DOT_PRECISION)  # the register operand; go came rounded
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(a, g, acc, input_precision=DOT_PRECISION)
        offs_m += BLOCK_M

    o_ptrs = (out_ptr + split.to(tl.int64) * stride_osplit + offs_c[:, None] * stride_oc
              + offs_k[None, :] * stride_ok + r * stride_or + s * stride_os)
    tl.store(o_ptrs, cast_to(acc, out_ptr.dtype.element_ty), mask=c_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------
# Launchers (called from the op bodies in ops.py; tensors already checked there).
# ------------------------------------------------------------------------------------------


def out_hw(h: int, w: int, r: int, s: int, stride, padding, dilation) -> tuple[int, int]:
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


def conv_forward(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    relu: bool,
    pre_scale: Tensor | None,
    pre_shift: Tensor | None,
    pre_relu: bool,
    stats: bool,
    stride,
    padding,
    dilation,
    scale: Tensor | None = None,
    bn=None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """relu?(conv(x) * scale + bias + residual), optionally with the BN prologue on its input and
    the output's per-channel statistics (``scale``: float32, contiguous; ``bn``: see
    conv_forward_args)."""
    out, part, grid, args, meta = conv_forward_args(
        input, weight, bias, residual, relu, pre_scale, pre_shift, pre_relu, stats, stride,
        padding, dilation, scale, bn=bn)
    launch(_conv_fwd_kernel, grid, *args, **meta)
    if not stats:
        return out, None, None
    s, ss = sum_planes(part, 2)
    return out, s, ss


def conv_forward_partials(input, weight, pre_scale, pre_shift, pre_relu: bool, stride, padding,
                          dilation, weight_rounded: bool = False) -> tuple[Tensor, Tensor]:
    """conv_forward with statistics, its partials not summed: (out, (2, programs, K) float64
    partials), for bn.bn_finalize_partials to sum and finalize in one launch
    (``weight_rounded``: see conv_forward_args)."""
    out, part, grid, args, meta = conv_forward_args(
        input, weight, None, None, False, pre_scale, pre_shift, pre_relu, True, stride, padding,
        dilation, weight_rounded=weight_rounded)
    launch(_conv_fwd_kernel, grid, *args, **meta)
    return out, part


def conv_forward_args(input, weight, bias, residual, relu, pre_scale, pre_shift, pre_relu,
                      stats, stride, padding, dilation, scale=None, out=None,
                      weight_rounded=False, bn=None):
    """conv_forward's launch of _conv_fwd_kernel, not launched: (out, partials or None, grid,
    positional arguments, keyword arguments). ``out``: the output tensor to write (made here when
    None); ``weight_rounded``: a float32 weight comes rounded to TF32 already (else, where the
    dot runs TF32, round_tf32 makes a rounded copy); ``bn``: an eval BatchNorm's (weight, bias,
    running mean, running var, eps), contiguous, whose scale and shift the kernel computes into
    ``scale`` and ``bias`` (float32 buffers of K, written) before its epilogue reads them. The
    launch plans (block.py) call this once per shape class and keep the result."""
    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    p, q = out_hw(h, w, r, s, stride, padding, dilation)
    if out is None:
        out = empty_like_format((n, k, p, q), input)
    x = to_nhwc(input)
    # (K, R, S, C) storage: each B tile row is BLOCK_K contiguous channels, not a 2-byte gather
    # every R*S elements. A no-op for a channels_last model and for 1x1 weights.
    weight = to_nhwc(weight)
    cp = _padded_channels(c, input.dtype)
    if cp != c:
        x, weight = _pad_channels(x, cp), _pad_channels(weight, cp)
        pre_scale = _pad_vector(pre_scale, cp) if pre_scale is not None else None
        pre_shift = _pad_vector(pre_shift, cp) if pre_shift is not None else None
        c = cp
    precision = dot_precision(input.dtype)
    if precision == "tf32" and weight.dtype == torch.float32 and not weight_rounded:
        weight = round_tf32(weight)
    if bn is not None and (scale is None or bias is None):
        raise ValueError("conv_forward: an eval BatchNorm's vectors need the scale and bias "
                         "buffers they are written to")
    m = n * p * q
    prologue, sc, sh = _prologue_vectors(x, pre_scale, pre_shift)
    cfg = gemm_config(m, k, c, input.dtype, exact=precision == "ieee", prologue=prologue)
    num_pid_m = cdiv(m, cfg.BLOCK_M)
    psum = psumsq = x
    part = None
    if stats:  # both partials in one buffer: one reduction launch sums both
        part = torch.empty((2, num_pid_m, k), device=x.device, dtype=torch.float64)
        psum, psumsq = part[0], part[1]
    res = residual if residual is not None else x
    grid = (num_pid_m * cdiv(k, cfg.BLOCK_N),)
    args = (
        x, weight, bias if bias is not None else x, scale if scale is not None else x, res,
        out, sc, sh, psum, psumsq, *(bn[:4] if bn is not None else (x,) * 4),
        m, c, h, w, k, p, q,
        *strides4(x), *strides4(weight),
        *(strides4(residual) if residual is not None else (0, 0, 0, 0)),
        *strides4(out),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        float(bn[4]) if bn is not None else 0.0,
    )
    meta = dict(
        R=r, S=s,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_RESIDUAL=residual is not None,
        RES_LIKE_OUT=residual is not None and residual.stride() == out.stride(),
        APPLY_RELU=bool(relu), PROLOGUE_BN=prologue, PRE_RELU=bool(pre_relu), STATS=bool(stats),
        BN_VECTORS=bn is not None, DOT_PRECISION=precision, UPCAST=UPCAST_DOT,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, part, grid, args, meta


def grad_out_nhwc(grad_out: Tensor, rounded: bool = False) -> Tensor:
    """grad_out as conv_dgrad and conv_wgrad take it: channels_last and, when they run TF32,
    rounded to TF32 once for both (round_tf32). wgrad takes it as wgmma's shared-memory operand,
    which wgmma truncates: rounded in registers in the kernel, it went back to shared memory every
    iteration and the loop waited with wgmma.wait_group 0 (sm_90 lint). dgrad takes it unchanged
    from its cp.async stages too, with 15-20 fewer registers than rounding it in the kernel
    (135-137 at 128x64: over the 128 of 2 CTAs/SM). One extra pass over grad_out (8 B/element),
    none when its producer wrote it rounded (``rounded``: the training unit's bn_bwd_apply)."""
    go = to_nhwc(grad_out)
    if not rounded and go.dtype == torch.float32 and dot_precision(go.dtype) == "tf32":
        go = round_tf32(go)
    return go


def conv_dgrad(grad_out: Tensor, input: Tensor, weight: Tensor, stride, padding,
               dilation, weight_rounded: bool = False) -> Tensor:
    """dL/dinput; grad_out from grad_out_nhwc; ``weight_rounded``: a float32 weight comes
    rounded to TF32 already (else rounded here where the dots run TF32)."""
    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    p, q = grad_out.shape[2], grad_out.shape[3]
    gi = empty_like_format(input.shape, input)
    go = to_nhwc(grad_out)
    weight = to_nhwc(weight)
    precision = dot_precision(input.dtype)
    if precision == "tf32" and weight.dtype == torch.float32 and not weight_rounded:
        weight = round_tf32(weight)
    hq = cdiv(h, stride[0])
    wq = cdiv(w, stride[1])
    mq = n * hq * wq
    cfg = gemm_config(mq, c, k, input.dtype, exact=precision == "ieee",
                      strided_dgrad=stride[0] * stride[1] > 1)
    grid = (cdiv(mq, cfg.BLOCK_M) * cdiv(c, cfg.BLOCK_N), stride[0] * stride[1])
    import math  # noqa: PLC0415

    step_r = stride[0] // math.gcd(stride[0], dilation[0])
    step_s = stride[1] // math.gcd(stride[1], dilation[1])
    launch(
        _conv_dgrad_kernel, grid,
        go, weight, gi,
        c, h, w, k, p, q, n,
        *strides4(go), *strides4(weight), *strides4(gi),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        step_r, step_s,
        R=r, S=s, STRIDE_POW2=next_pow2(max(stride[0], stride[1], 2)),
        DOT_PRECISION=precision, UPCAST=UPCAST_DOT,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return gi


def conv_wgrad(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    pre_scale: Tensor | None,
    pre_shift: Tensor | None,
    pre_relu: bool,
    stride,
    padding,
    dilation,
    defer: bool = False,
):
    """dL/dweight; grad_out from grad_out_nhwc. ``defer``: (dL/dweight, its split sum left to
    a later launch as ``(partials, out)``, or None where there is none to leave: one split, or
    padded channels), for bn_bwd.bn_bwd_partials or reduce.sum_rows(partials, out=out)."""
    n, c, h, w = input.shape
    k, _, r, s = weight.shape
    p, q = grad_out.shape[2], grad_out.shape[3]
    m = n * p * q
    gw = torch.empty_like(weight)  # the fake's choice: weight's memory format
    if not (gw.is_contiguous() or gw.is_contiguous(memory_format=torch.channels_last)):
        gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    x = to_nhwc(input)
    go = to_nhwc(grad_out)
    c_real, gw_real = c, gw
    cp = _padded_channels(c, input.dtype)
    if cp != c:
        # The padded channels' weight gradient is computed, then sliced off.
        x = _pad_channels(x, cp)
        pre_scale = _pad_vector(pre_scale, cp) if pre_scale is not None else None
        pre_shift = _pad_vector(pre_shift, cp) if pre_shift is not None else None
        c = cp
        gw = torch.empty((k, c, r, s), dtype=weight.dtype, device=weight.device,
                         memory_format=torch.channels_last)
    precision = dot_precision(input.dtype)
    prologue, sc, sh = _prologue_vectors(x, pre_scale, pre_shift)
    cfg = wgrad_config(k, c, r * s, m, input.dtype, exact=precision == "ieee")
    # The split count comes from the size hint (no guard on a dynamic size); the row blocks per
    # split from the real M, so the splits cover it whatever it is (trailing ones may be empty
    # and then contribute zeros).
    split = max(1, min(cfg.SPLIT, cdiv(hint(m), cfg.BLOCK_M)))
    iters = cdiv(cdiv(m, cfg.BLOCK_M), split)
    numel = gw.numel()
    if split == 1:
        target, split_stride = gw, 0
    else:
        # Partials laid out like gw's storage, one slice per split: the reduction then writes gw's
        # storage linearly, whatever its memory format.
        target = torch.empty((split, numel), device=x.device, dtype=torch.float32)
        split_stride = numel
    grid = (cdiv(k, cfg.BLOCK_K) * cdiv(c, cfg.BLOCK_C), r * s, split)
    launch(
        _conv_wgrad_kernel, grid,
        go, x, sc, sh, target,
        m, c, h, w, k, p, q,
        *strides4(go), *strides4(x), *strides4(gw), split_stride,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        iters,
        R=r, S=s, PROLOGUE_BN=prologue, PRE_RELU=bool(pre_relu),
        DOT_PRECISION=precision, UPCAST=UPCAST_DOT,
        BLOCK_K=cfg.BLOCK_K, BLOCK_C=cfg.BLOCK_C, BLOCK_M=cfg.BLOCK_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if defer and split > 1 and gw is gw_real:
        return gw, (target, gw)
    if split > 1:
        sum_rows(target, out=gw)
    if gw is not gw_real:
        gw_real.copy_(gw[:, :c_real])
    return (gw_real, None) if defer else gw_real


__all__ = ["conv_forward", "conv_dgrad", "conv_wgrad", "out_hw", "clamp_pow2"]
