"""An eval BatchNorm's scale and shift from its live tensors, for the convolutions' epilogues:
per convolution (``bn_eval_vectors``, the op path) or for every BatchNorm of a residual block in
one launch (``bn_eval_vectors_block_args``, the block launch plans of block.py), which also rounds
float32 weights to TF32 for them.
"""

from __future__ import annotations

import torch

from ._common import INTERPRETED, cdiv, launch, next_pow2, tf32_operand, tl, triton


@triton.jit
def _eval_vectors(weight_ptr, bias_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, C, eps,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """An eval BatchNorm's scale = weight / sqrt(var + eps) and shift = bias - mean * scale, from
    its live tensors, for a convolution's epilogue: C <= 2048 in a ResNet, launch latency, not
    bandwidth (4 reads and 2 writes of 4 B per channel)."""
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        ok = offs < C
        var = tl.load(var_ptr + offs, mask=ok, other=1.0).to(tl.float32)
        scale = 1.0 / tl.sqrt_rn(var + eps)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        shift = -(tl.load(mean_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale)
        if HAS_BIAS:
            shift = tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32) + shift
        tl.store(scale_ptr + offs, scale, mask=ok)
        tl.store(shift_ptr + offs, shift, mask=ok)


@triton.jit
def _bn_eval_vectors_kernel(
    weight_ptr, bias_ptr, mean_ptr, var_ptr,  # (C,) any float dtype; weight, bias may be absent
    scale_ptr, shift_ptr,  # (C,) float32 out
    C, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program; C <= 2048 in a ResNet.
    _eval_vectors(weight_ptr, bias_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, C, eps,
                  HAS_WEIGHT, HAS_BIAS, BLOCK_C)


@triton.jit
def _round_chunk(src_ptr, dst_ptr, q, n, BLOCK: tl.constexpr):
    """Elements [q * BLOCK, (q + 1) * BLOCK) of n rounded to TF32 (tf32_operand)."""
    offs = q.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(dst_ptr + offs, tf32_operand(tl.load(src_ptr + offs, mask=ok), "tf32"), mask=ok)


@triton.jit
def _bn_eval_vectors_block_kernel(
    w0_ptr, b0_ptr, m0_ptr, v0_ptr,  # (C0,) BatchNorm 0: weight, bias, running mean and var
    w1_ptr, b1_ptr, m1_ptr, v1_ptr,  # (C1,) BatchNorm 1
    w2_ptr, b2_ptr, m2_ptr, v2_ptr,  # (C2,) BatchNorm 2
    w3_ptr, b3_ptr, m3_ptr, v3_ptr,  # (C3,) BatchNorm 3 (a downsample's)
    x0_ptr, x1_ptr, x2_ptr, x3_ptr,  # conv weights i: dense storage of n_i float32 (ROUND_W)
    out_ptr,  # float32: scales [0, total), shifts [total, 2 total), rounded weights from 2 total
    C0, C1, C2, C3, off1, off2, off3, total,
    eps0, eps1, eps2, eps3,
    n_bn,  # the BatchNorms (programs 0 .. n_bn - 1); the weights' chunks come after
    n0, n1, n2, n3,  # elements of each weight
    q1, q2, q3,  # the first chunk of weights 1, 2, 3 (weight 0's is 0)
    woff0, woff1, woff2, woff3,  # where each rounded weight starts in out_ptr
    ROUND_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Every eval BatchNorm of a residual block at once, one program each: one launch per block
    # call instead of one per convolution (bn_eval_vectors). Affine BatchNorms only (weight and
    # bias present). With ROUND_W (float32 with TF32) the programs after them round the block's
    # conv weights to TF32 into out_ptr, BLOCK_R elements each: the weights are wgmma's shared-
    # memory operand, which it truncates, and rounding them in the convolution's main loop
    # stored them back to shared memory every iteration behind a wgmma.wait_group 0 (sm_90
    # lint); here they are rounded from the live weights once per call with no launch of their
    # own (round_tf32's one per convolution).
    pid = tl.program_id(0)
    if pid < n_bn:
        if pid == 0:
            _eval_vectors(w0_ptr, b0_ptr, m0_ptr, v0_ptr, out_ptr, out_ptr + total, C0, eps0,
                          True, True, BLOCK_C)
        elif pid == 1:
            _eval_vectors(w1_ptr, b1_ptr, m1_ptr, v1_ptr, out_ptr + off1, out_ptr + total + off1,
                          C1, eps1, True, True, BLOCK_C)
        elif pid == 2:
            _eval_vectors(w2_ptr, b2_ptr, m2_ptr, v2_ptr, out_ptr + off2, out_ptr + total + off2,
                          C2, eps2, True, True, BLOCK_C)
        else:
            _eval_vectors(w3_ptr, b3_ptr, m3_ptr, v3_ptr, out_ptr + off3, out_ptr + total + off3,
                          C3, eps3, True, True, BLOCK_C)
    elif ROUND_W:
        q = pid - n_bn
        if q < q1:
            _round_chunk(x0_ptr, out_ptr + woff0, q, n0, BLOCK_R)
        elif q < q2:
            _round_chunk(x1_ptr, out_ptr + woff1, q - q1, n1, BLOCK_R)
        elif q < q3:
            _round_chunk(x2_ptr, out_ptr + woff2, q - q2, n2, BLOCK_R)
        else:
            _round_chunk(x3_ptr, out_ptr + woff3, q - q3, n3, BLOCK_R)


def bn_eval_vectors(weight, bias, mean, var, eps: float):
    """(scale, shift), float32, of an eval BatchNorm from its contiguous vectors of any float
    dtype (weight, bias may be None), in one launch (no conversion of a 16-bit model's)."""
    c = var.shape[0]
    scale = torch.empty(c, device=var.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    launch(
        _bn_eval_vectors_kernel, (1,),
        weight if weight is not None else var, bias if bias is not None else var, mean, var,
        scale, shift, c, float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=min(1024, next_pow2(max(c, 16))),
    )
    return scale, shift


def eval_vectors_layout(channels, weights=()) -> tuple[list[int], int, list[int], int]:
    """bn_eval_vectors_block's output: (each BatchNorm's offset in the scales and in the shifts,
    the shifts' offset, each rounded weight's offset, elements in all). Offsets are multiples of
    16 elements (64 B), so every pointer into it keeps the 16-byte alignment the kernels are
    specialised on."""
    offs, total = [], 0
    for c in channels:
        offs.append(total)
        total += cdiv(c, 16) * 16
    woffs, end = [], 2 * total
    for n in weights:
        woffs.append(end)
        end += cdiv(n, 16) * 16
    return offs, total, woffs, end


def bn_eval_vectors_block_args(vectors, eps, out, weights=()):
    """The launch of _bn_eval_vectors_block_kernel (grid, args, meta) for up to four affine
    BatchNorms, ``vectors`` their (weight, bias, mean, var), ``out`` the float32 buffer of
    eval_vectors_layout's length; ``weights``: float32 conv weights (dense storage) to round to
    TF32 into it, up to four."""
    n = len(vectors)
    if not 1 <= n <= 4 or len(weights) > 4:
        raise ValueError(f"bn_eval_vectors_block: 1 to 4 BatchNorms and at most 4 weights, got "
                         f"{n} and {len(weights)}")
    chans = [v[3].shape[0] for v in vectors]
    offs, total, woffs, _ = eval_vectors_layout(chans, [w.numel() for w in weights])
    pad = 4 - n
    vecs = [t for v in vectors for t in v] + [vectors[0][0]] * (4 * pad)
    cs = chans + [0] * pad
    eps = [float(e) for e in eps] + [1.0] * pad
    block_r = 1024 if not INTERPRETED else 1 << 16
    ns = [w.numel() for w in weights] + [0] * (4 - len(weights))
    chunks = [cdiv(k, block_r) for k in ns]
    starts = [sum(chunks[:i]) for i in range(1, 4)]
    xs = list(weights) + [vectors[0][0]] * (4 - len(weights))
    woffs = woffs + [0] * (4 - len(weights))
    block_c = min(1024, next_pow2(max(16, *cs)))
    grid = (n + sum(chunks),)
    args = (*vecs, *xs, out, *cs, *(offs[1:] + [0] * pad), total, *eps, n, *ns, *starts, *woffs)
    return grid, args, {"ROUND_W": bool(weights), "BLOCK_C": block_c, "BLOCK_R": block_r,
                        "num_warps": 4}
