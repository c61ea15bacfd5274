"""ResNet-50's convolutions and BatchNorms as the dispatcher launches them (fastres/functional.py's
residual unit: conv_stats with the previous BN+ReLU as prologue, bn_finalize, bn_add_relu with
the identity or the downsample's BN as residual; backward bn_add_relu_bwd, conv_bwd with the
prologue, bn_relu_bwd; eval: conv_bias_act with the BatchNorm in its epilogue, residual and ReLU;
eval with autograd: the same with the BatchNorm's scale and shift), at batch 32, 128 and 256, for
aot_check's capture. Tensors are torch.empty: only shapes, strides, dtypes and the
16-byte alignment of the pointers decide the compiled variant; untouched pages cost no memory.
"""

from __future__ import annotations

import torch

from fastres.harness.rule import allow_tf32

BATCHES = (32, 128, 256)
# (width, out channels, stride of the first block, input side, blocks) of layer1..layer4
LAYERS = ((64, 256, 1, 56, 3), (128, 512, 2, 56, 4), (256, 1024, 2, 28, 6), (512, 2048, 2, 14, 3))


def resnet50_convs():
    """Distinct (name, C, K, kernel, stride, pad, H, prologue, needs_input_grad) of ResNet-50
    (torchvision v1.5: the stride on the 3x3)."""
    convs = {("stem", 3, 64, 7, 2, 3, 224, False, False)}
    in_c = 64
    for li, (width, out, stride, h, blocks) in enumerate(LAYERS, start=1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            hin = h if b == 0 else h // stride
            convs.add((f"l{li}.conv1", in_c, width, 1, 1, 0, hin, False, True))
            convs.add((f"l{li}.conv2", width, width, 3, s, 1, hin, True, True))
            convs.add((f"l{li}.conv3", width, out, 1, 1, 0, hin // s, True, True))
            if b == 0:
                convs.add((f"l{li}.down", in_c, out, 1, s, 0, hin, False, True))
            in_c = out
    return sorted(convs, key=lambda c: (c[0], c[1:]))


def modes(dtype_names):
    """(label, dtype, allow_tf32): fp32 both with TF32 (cuDNN's default) and exact."""
    for name in dtype_names:
        dt = getattr(torch, name)
        if dt == torch.float32:
            yield "fp32-tf32", dt, True
            yield "fp32-ieee", dt, False
        else:
            yield name.replace("bfloat", "bf").replace("float", "fp"), dt, True


def run_resnet50(ops, dtype_names, set_label) -> None:
    cl = torch.channels_last

    def t(*shape, dt, fmt=cl):
        return torch.empty(shape, dtype=dt, memory_format=fmt)  # no copy: pages stay untouched

    def v(c):
        return torch.empty(c, dtype=torch.float32)

    for label, dt, tf32 in modes(dtype_names):
        with allow_tf32(tf32):
            for n in BATCHES:
                for name, c, k, ks, st, pd, h, pro, need_x in resnet50_convs():
                    p = (h + 2 * pd - ks) // st + 1
                    x, go = t(n, c, h, h, dt=dt), t(n, k, p, p, dt=dt)
                    # A 1x1 weight is the same memory contiguous or channels_last, but its strides
                    # differ ((C,1,1,1) vs (C,1,C,C)) and so does the specialisation: lint both.
                    fmts = (cl, torch.contiguous_format) if ks == 1 else (cl,)
                    for fmt in fmts:
                        w = t(k, c, ks, ks, dt=dt, fmt=fmt)
                        wf = "w-nchw" if fmt != cl else "w-nhwc"
                        geo = ([st, st], [pd, pd], [1, 1], 1)
                        sc, sh = (v(c), v(c)) if pro else (None, None)
                        set_label(f"{label} n={n} {name} {wf} fwd")
                        ops.conv_stats(x, w, sc, sh, pro, *geo)
                        set_label(f"{label} n={n} {name} {wf} eval")
                        res = t(n, k, p, p, dt=dt) if name.endswith("conv3") else None
                        # On a GPU the BatchNorm is never folded: it runs in the epilogue from
                        # its live tensors (no_grad), or its scale and shift, computed first, go
                        # there (autograd); the weight is the live parameter.
                        relu = not name.endswith("down")
                        ops.conv_bias_act(x, w, v(k), res, *geo, relu, v(k), v(k), v(k), 1e-5)
                        set_label(f"{label} n={n} {name} {wf} eval-grad")
                        ops.conv_bias_act(x, w, v(k), res, *geo, relu, v(k))
                        set_label(f"{label} n={n} {name} {wf} bwd")
                        ops.conv_bwd(go, x, w, sc, sh, pro, *geo, [need_x, True])
                    set_label(f"{label} n={n} {name} bn")
                    y, cv = t(n, k, p, p, dt=dt), v(k)
                    ops.bn_finalize(cv, cv, cv, cv, cv, cv, torch.zeros((), dtype=torch.long),
                                    n * p * p, 0.1, 1e-5)
                    if name.endswith("conv3"):  # the unit's end: identity or downsample residual
                        ops.bn_add_relu(y, cv, cv, y, None, None, 0, True)
                        ops.bn_add_relu(y, cv, cv, y, cv, cv, 0, True)
                        ops.bn_add_relu_bwd(go, y, y, cv, cv, cv, None, None, None, None)
                        ops.bn_add_relu_bwd(go, y, y, cv, cv, cv, y, cv, cv, cv)
                    else:  # stem and inner BNs: BN+ReLU (forward fused into the next conv)
                        ops.bn_add_relu(y, cv, cv, None, None, None, 0, True)
                        ops.bn_relu_bwd(go, y, cv, cv, cv, cv, cv, True)
                    unit_bn_finalize(cv, n, p, k)
                    if dt != torch.float32 or tf32:
                        unit_bn_backward(go, y, cv, torch.empty(k, dtype=dt),
                                         name.endswith("conv3"), dt == torch.float32)


def unit_bn_finalize(cv, n: int, p: int, k: int) -> None:
    """The training unit's forward statistics: a conv_stats launch's partials summed and
    finalized in one launch (bn.bn_finalize_partials), momentum set and None."""
    from .. import bn  # noqa: PLC0415

    part = torch.empty(2, 7, k, dtype=torch.float64)
    for momentum in (0.1, None):
        bn.bn_finalize_partials(part, cv, cv, cv, cv, torch.zeros((), dtype=torch.long),
                                n * p * p, momentum, 1e-5)


def unit_bn_backward(go, y, cv, weight, last: bool, round_tf32: bool = False) -> None:
    """The training unit's BatchNorm backward launches where they differ from the ops': for a
    16-bit model the BatchNorm weight in the model's dtype (``weight``) and the column sums
    written in it too (the gradients); for a float32 one with TF32 (``round_tf32``) the input
    gradients written rounded to TF32. ``last``: the unit's last BatchNorm, with the identity and
    with the downsample's BatchNorm as residual; else an inner one (its ReLU recomputed from the
    scale and shift), whose reduction runs a weight gradient's split sum too."""
    from .. import bn_bwd  # noqa: PLC0415
    from ..reduce import sum_planes, sum_planes_cast  # noqa: PLC0415

    cases = ([(None, torch.empty_like(go)), (y, None)] if last else [(None, None)])
    for res, g in cases:
        rv = cv if res is not None else None
        pro = None if last else cv
        mask = 1 if last else 2
        # an inner BatchNorm's reduction also runs the previous weight gradient's split sum
        wsum = None if last else (torch.empty(4, 9 * 64 * 64), torch.empty(64, 64, 3, 3,
                                                                          dtype=weight.dtype))
        part, planes = bn_bwd.bn_bwd_partials(go, y if last else None, y, pro, pro, cv, cv, res, rv,
                                          rv, g, mask, True, wsum)
        if round_tf32:
            sums = sum_planes(part, planes, dup=res is not None)
        else:
            sums, _ = sum_planes_cast(part, planes, weight.dtype, dup=res is not None)
        bn_bwd.bn_bwd_apply(go, y if last else None, y, pro, pro, cv, cv, weight, sums[0], sums[1],
                        res, rv, rv, weight if res is not None else None,
                        sums[2] if res is not None else None, mask, round_tf32=round_tf32)
