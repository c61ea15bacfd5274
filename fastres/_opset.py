"""The fastres op set: one schema per op, declared once (here), implemented per device.

This module is the contract every backend implements (csrc/cpu, csrc/cuda, triton_kernels/ and
fastres/reference.py): each op's schema is written here once, and the schemas, the fakes, the
backends' registrations and the tests all take it from here. fastres/reference.py gives the
exact semantics in plain PyTorch.

Conventions shared by all ops:
  * activations are 4-D (N, C, H, W) tensors in any memory format; outputs take the input's
    suggested memory format (channels_last in, channels_last out);
  * input, weight and residual share one floating dtype (float32, float16, bfloat16, or
    float64 for gradcheck on the CPU); conv_bias_act's bias has that dtype or the accumulation
    dtype (a folded BN shift kept in float32 under autocast: rounded to bf16 it biases every
    output of its channel);
  * per-channel vectors (scale, shift, mean, invstd, sum, sumsq and the BN parameter grads) are
    float32, or float64 when the activations are float64 ("the accumulation dtype");
  * a mutated input is declared Tensor(a!) and never returned;
  * non-finite values propagate exactly as through the composition of PyTorch ops each op
    replaces (conv2d, batch_norm, add, relu), so that an overflow under torch.amp.GradScaler
    reaches the gradients as Inf/NaN and the step is skipped: relu(NaN) = NaN (torch.relu; a
    max(x, 0) instruction usually returns 0 for NaN: oneDNN's ReLU post-op, x86 maxps with
    NaN second, Triton's default tl.maximum, CUDA fmaxf); every ReLU mask "out > 0" below is
    threshold_backward's, i.e. "not out <= 0" (the gradient passes where out is NaN); batch
    statistics of a channel holding NaN/Inf are nn.BatchNorm2d's (mean NaN or +-Inf, var NaN
    since Inf - Inf = NaN, running statistics updated with them); the folded-BN inference
    path gives the NaN/Inf pattern of the unfolded conv + BatchNorm (Inf * 0 = NaN in both:
    a zero gamma gives a zero folded weight).
"""

from __future__ import annotations

import torch

__all__ = ["DOCS", "OP_NAMES", "SCHEMAS", "define"]


#: name -> (schema, what it computes). The order is the ops' order everywhere.
_OPS: dict[str, tuple[str, str]] = {
    "conv_bias_act": (
        "(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] "
        "padding, int[2] dilation, int groups, bool relu, Tensor? scale=None, Tensor? "
        "bn_mean=None, Tensor? bn_var=None, float bn_eps=0.0) -> Tensor",
        "Inference: out = act(conv2d(input, weight) * scale[k] + bias[k] + residual), one output "
        "write. bias is the BatchNorm shift (of a fold, or beta - mean * scale), residual has the "
        "output's shape. scale (the accumulation dtype, given only with bias) is the BatchNorm "
        "scale gamma / sqrt(var + eps) applied in the epilogue, so that the weight is the live "
        "parameter and nothing folded needs keeping; without it the weight is a folded one. "
        "With bn_mean and bn_var (given together) the BatchNorm itself runs in the epilogue, "
        "from its live tensors: s[k] = scale[k] / sqrt(bn_var[k] + bn_eps) and t[k] = bias[k] - "
        "bn_mean[k] * s[k] in the accumulation dtype, out = act(conv2d(input, weight) * s + t + "
        "residual); scale and bias are then the BatchNorm's weight and bias (either may be "
        "absent: 1 and 0), all four vectors of any floating dtype.",
    ),
    "relu_bias_bwd": (
        "(Tensor grad_out, Tensor? out) -> (Tensor grad_z, Tensor grad_bias)",
        "Backward of the bias/ReLU epilogue: grad_z = grad_out * (out > 0) (no mask when out is"
        " None), grad_bias[k] = sum of grad_z over N, H, W in the accumulation dtype.",
    ),
    "conv_stats": (
        "(Tensor input, Tensor weight, Tensor? pre_scale, Tensor? pre_shift, bool pre_relu, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor out, Tensor "
        "sum, Tensor sumsq)",
        "Training forward: a = relu?(input * pre_scale[c] + pre_shift[c]) applied on load (the "
        "previous BatchNorm + ReLU; zero padding stays zero after the transform), out = "
        "conv2d(a, weight), and the per-output-channel sum and sum of squares of out over N, H,"
        " W.",
    ),
    "bn_finalize": (
        "(Tensor sum, Tensor sumsq, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, int count, float? momentum, "
        "float eps) -> (Tensor mean, Tensor invstd, Tensor scale, Tensor shift)",
        "BatchNorm finalize from (sum, sumsq) over `count` values per channel: mean, invstd = "
        "1/sqrt(var_biased + eps), scale = weight * invstd, shift = bias - mean * scale. When "
        "running_mean/var are given they are updated exactly as nn.BatchNorm2d does (unbiased "
        "variance, momentum, or the cumulative average when momentum is None), and "
        "num_batches_tracked += 1.",
    ),
    "bn_add_relu": (
        "(Tensor input, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, "
        "Tensor? res_shift, int res_channel_offset, bool relu) -> Tensor",
        "BN-apply + residual + ReLU: out = relu?(input * scale[c] + shift[c] + r), where r is "
        "residual * res_scale[c] + res_shift[c] when res_scale is given (the downsample "
        "branch's un-normalised conv output and its BN), else residual. residual may have fewer"
        " channels than input: its channel j lands on output channel j + res_channel_offset "
        "(the option-A shortcut); it may be any strided view (e.g. x[:, :, ::2, ::2]).",
    ),
    "bn_add_relu_bwd": (
        "(Tensor grad_out, Tensor? out, Tensor input, Tensor mean, Tensor invstd, Tensor? "
        "weight, Tensor? res_input, Tensor? res_mean, Tensor? res_invstd, Tensor? res_weight) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_res, Tensor "
        "grad_res_weight, Tensor grad_res_bias)",
        "Training backward of bn_add_relu with batch statistics. g = grad_out * (out > 0) (no "
        "mask when out is None); grad_input is BatchNorm's backward of g through (input, mean, "
        "invstd, weight); grad_weight = sum(g * xhat), grad_bias = sum(g). When res_input is "
        "given (a BN'd downsample branch) grad_res and grad_res_weight/bias are its BN backward"
        " likewise; otherwise grad_res = g (identity residual) and grad_res_weight/bias are "
        "empty.",
    ),
    "bn_relu_bwd": (
        "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor "
        "scale, Tensor shift, bool relu) -> (Tensor grad_input, Tensor grad_weight, Tensor "
        "grad_bias)",
        "Training backward of a prologue BatchNorm + ReLU: grad_out is dL/da for a = "
        "relu?(input * scale + shift) (scale/shift as bn_finalize returned them); the ReLU mask"
        " is recomputed from them, then BatchNorm's backward as in bn_add_relu_bwd.",
    ),
    "bn_finalize_count": (
        "(Tensor sum, Tensor sumsq, Tensor count, Tensor? weight, Tensor? bias, Tensor(a!)? "
        "running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? "
        "momentum, float eps) -> (Tensor mean, Tensor invstd, Tensor scale, Tensor shift)",
        "---- SyncBatchNorm: the batch statistics of one BatchNorm are all-reduced across "
        "processes between their reduction and their use, in both directions, so the ops below "
        "split bn_finalize and the two BN backwards at those points. Single-process training "
        "never uses them.  bn_finalize with the count as a tensor: the all-reduced number of "
        "values per channel (one element, accumulation dtype, on sum's device), read on the "
        "device (no host sync). The caller makes sure the global count exceeds 1 (it knows each"
        " process's count).",
    ),
    "bn_add_relu_bwd_reduce": (
        "(Tensor grad_out, Tensor? out, Tensor input, Tensor mean, Tensor invstd, Tensor? "
        "res_input, Tensor? res_mean, Tensor? res_invstd) -> (Tensor sum_g, Tensor sum_g_xhat, "
        "Tensor res_sum_g_xhat)",
        "Pass 1 of bn_add_relu_bwd on this process's batch: with g = grad_out * (out > 0) (no "
        "mask when out is None) and xhat = (input - mean) * invstd, sum_g = sum(g), sum_g_xhat "
        "= sum(g * xhat) over N, H, W (they are also this process's grad_bias and grad_weight),"
        " and res_sum_g_xhat likewise with the residual's xhat when res_input is given (else "
        "empty).",
    ),
    "bn_add_relu_bwd_elemt": (
        "(Tensor grad_out, Tensor? out, Tensor input, Tensor mean, Tensor invstd, Tensor? "
        "weight, Tensor mean_g, Tensor mean_g_xhat, Tensor? res_input, Tensor? res_mean, "
        "Tensor? res_invstd, Tensor? res_weight, Tensor? res_mean_g_xhat) -> (Tensor "
        "grad_input, Tensor grad_res)",
        "Pass 2, given the global means of those sums (all-reduced sum / global count): "
        "grad_input = weight * invstd * (g - mean_g - xhat * mean_g_xhat); with res_input, "
        "grad_res is the residual BN's likewise (res_weight, res_invstd, the same mean_g and "
        "res_mean_g_xhat), otherwise grad_res = g (identity residual).",
    ),
    "bn_relu_bwd_reduce": (
        "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor scale, Tensor "
        "shift, bool relu) -> (Tensor sum_g, Tensor sum_g_xhat)",
        "The same split of bn_relu_bwd: g = grad_out * (input * scale + shift > 0) when relu.",
    ),
    "bn_relu_bwd_elemt": (
        "(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor "
        "scale, Tensor shift, bool relu, Tensor mean_g, Tensor mean_g_xhat) -> Tensor",
        "Pass 2 of that split, given the global means of the sums: grad_input = weight * invstd * "
        "(g - mean_g - xhat * mean_g_xhat).",
    ),
    "conv_bwd": (
        "(Tensor grad_out, Tensor input, Tensor weight, Tensor? pre_scale, Tensor? pre_shift, "
        "bool pre_relu, int[2] stride, int[2] padding, int[2] dilation, int groups, bool[2] "
        "output_mask) -> (Tensor grad_input, Tensor grad_weight)",
        "Backward of conv_stats' convolution: grad_input is dL/da (the gradient with respect to"
        " the prologue's output, same shape as input), grad_weight is computed from a "
        "recomputed from input (never stored). An output whose output_mask entry is false is "
        "returned empty.",
    ),
}

#: The op names, in order.
OP_NAMES: tuple[str, ...] = tuple(_OPS)
#: name -> schema without the name, as torch.library takes it.
SCHEMAS: dict[str, str] = {name: schema for name, (schema, _) in _OPS.items()}
#: name -> what the op computes.
DOCS: dict[str, str] = {name: doc for name, (_, doc) in _OPS.items()}

_LIBRARIES: dict[str, torch.library.Library] = {}  # kept alive: a library lives as long as this


def define(namespace: str) -> None:
    """Define every op of the set in ``namespace`` (``fastres``: the CPU and CUDA kernels of
    fastres._C; ``fastres_cudasim``: the CUDA launchers on CPU tensors), once per process. The
    compiled extensions only register kernels for these schemas (TORCH_LIBRARY_IMPL); Triton's
    ops (``fastres_triton``) pass SCHEMAS to torch.library themselves."""
    if namespace in _LIBRARIES:
        return
    lib = torch.library.Library(namespace, "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
    _LIBRARIES[namespace] = lib

