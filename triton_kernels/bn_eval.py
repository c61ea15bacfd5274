"""An eval BatchNorm's scale and shift from its live tensors, for the convolutions' epilogues:
``eval_vectors_tile``, which the forward convolution runs on its own output channels before its
main loop (conv.py, ``BN_VECTORS``), and ``bn_eval_vectors`` (one launch, for a BatchNorm without
weight or bias); ``round_weights_args`` and ``round_weights``: up to four float32 conv weights
rounded to TF32 in one launch (a block's eval plan, block.py; the training unit's forward and
data gradients, unit.py).
"""

from __future__ import annotations

import torch

from ._common import INTERPRETED, cdiv, launch, next_pow2, tf32_operand, tl, triton


@triton.jit
def eval_vectors_tile(weight_ptr, bias_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, offs, ok,
                      eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """scale = weight / sqrt(var + eps) and shift = bias - mean * scale of the channels ``offs``
    (``ok``: in range), from the BatchNorm's live tensors (any float dtype), stored as float32.
    The one formula of every eval BatchNorm on the Triton path."""
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
def _eval_vectors(weight_ptr, bias_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, C, eps,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """eval_vectors_tile over C channels, BLOCK_C at a time: C <= 2048 in a ResNet, launch
    latency, not bandwidth (4 reads and 2 writes of 4 B per channel)."""
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        eval_vectors_tile(weight_ptr, bias_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, offs,
                          offs < C, eps, HAS_WEIGHT, HAS_BIAS)


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
def _round_weights_kernel(
    x0_ptr, x1_ptr, x2_ptr, x3_ptr,  # conv weights i: dense storage of n_i float32
    out_ptr,  # float32: rounded weight i from woff_i
    n0, n1, n2, n3,  # elements of each weight
    q1, q2, q3,  # the first chunk of weights 1, 2, 3 (weight 0's is 0)
    woff0, woff1, woff2, woff3,  # where each rounded weight starts in out_ptr
    BLOCK_R: tl.constexpr,
):
    # A block's float32 conv weights rounded to TF32, BLOCK_R elements per program: one launch
    # per block call instead of round_tf32's one per convolution. The weights are wgmma's
    # shared-memory operand, which it truncates; rounding them in the convolution's main loop
    # stored them back to shared memory every iteration behind a wgmma.wait_group 0 (sm_90 lint).
    q = tl.program_id(0)
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
    """A block call's float32 buffer: every BatchNorm's scale, then every shift (written by the
    convolution that reads them, ``BN_VECTORS``), then the weights rounded to TF32 (float32):
    (each BatchNorm's offset in the scales and in the shifts, the shifts' offset, each rounded
    weight's offset, elements in all). Offsets are multiples of
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


def round_weights_args(weights, out, woffs):
    """The launch of _round_weights_kernel (grid, args, meta) rounding up to four float32 conv
    weights (dense storage) to TF32 into the float32 buffer ``out``, weight i from element
    ``woffs[i]`` (eval_vectors_layout's)."""
    n = len(weights)
    if not 1 <= n <= 4:
        raise ValueError(f"round_weights: 1 to 4 weights, got {n}")
    block_r = 1024 if not INTERPRETED else 1 << 16
    ns = [w.numel() for w in weights] + [0] * (4 - n)
    chunks = [cdiv(k, block_r) for k in ns]
    starts = [sum(chunks[:i]) for i in range(1, 4)]
    xs = list(weights) + [weights[0]] * (4 - n)
    grid = (sum(chunks),)
    args = (*xs, out, *ns, *starts, *(list(woffs) + [0] * (4 - n)))
    return grid, args, {"BLOCK_R": block_r, "num_warps": 4}


def round_weights(weights) -> list | None:
    """Up to four float32 conv weights rounded to TF32 in one launch (_round_weights_kernel):
    views with each weight's shape and strides into one new buffer, or None where a weight's
    elements do not fill its storage span (a strided view: the rounding copies storage
    linearly)."""
    if not all(w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(
            memory_format=torch.channels_last)) for w in weights):
        return None
    _, _, woffs, size = eval_vectors_layout((), [w.numel() for w in weights])
    buf = torch.empty(size, dtype=torch.float32, device=weights[0].device)
    grid, args, meta = round_weights_args(weights, buf, woffs)
    launch(_round_weights_kernel, grid, *args, **meta)
    return [buf[off: off + w.numel()].as_strided(w.shape, w.stride())
            for off, w in zip(woffs, weights, strict=True)]
