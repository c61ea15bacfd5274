"""The C++ CPU ops' (csrc/cpu) answers to bad input: a clear message naming the offending sizes
(or BatchNorm's own error), never a crash. Their numerics are tests/test_ops.py's (the ``cpu``
backend) and tests/test_ops_cpu.py's."""

from __future__ import annotations

import pytest
import torch

from fastres.backends import extension

_mod, _why = extension.load()
if _mod is None:  # a test module for compiled ops has nothing to say without them: fail loudly
    raise ImportError(_why)

ops = torch.ops.fastres

def _bad_cases():
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    v8, v3 = torch.ones(8), torch.ones(3)
    return [
        (
            "conv rank",
            lambda: ops.conv_bias_act(x[0], w, None, None, *conv, True),
            r"input must be 4-D .*got 3-D tensor of size \[8, 6, 6\]",
        ),
        (
            "conv channels",
            lambda: ops.conv_bias_act(x, torch.randn(4, 5, 3, 3), None, None, *conv, True),
            r"input of size \[2, 8, 6, 6\] has 8 channels but weight of size \[4, 5, 3, 3\]",
        ),
        (
            "conv dtype",
            lambda: ops.conv_bias_act(x, w.double(), None, None, *conv, True),
            r"weight has dtype Double but input has dtype Float",
        ),
        (
            "conv bias length",
            lambda: ops.conv_bias_act(x, w, torch.ones(5), None, *conv, True),
            r"bias must be 1-D with 4 elements .*got size \[5\]",
        ),
        (
            "conv residual size",
            lambda: ops.conv_bias_act(x, w, None, torch.randn(2, 4, 5, 6), *conv, True),
            r"residual must have the output's size \[2, 4, 6, 6\], got \[2, 4, 5, 6\]",
        ),
        (
            "conv residual dtype",
            lambda: ops.conv_bias_act(x, w, None, torch.randn(2, 4, 6, 6).half(), *conv, True),
            r"residual has dtype Half but input has dtype Float",
        ),
        (
            "conv kernel too big",
            lambda: ops.conv_bias_act(x, torch.randn(4, 8, 9, 9), None, None, *conv, True),
            r"smaller than the dilated kernel",
        ),
        (
            "conv groups",
            lambda: ops.conv_stats(
                x, torch.randn(6, 2, 1, 1), None, None, False, [1, 1], [0, 0], [1, 1], 4
            ),
            r"6 output channels, not divisible by groups=4",
        ),
        (
            "int dtype",
            lambda: ops.bn_add_relu(x.int(), v8, v8, None, None, None, 0, True),
            r"input must be float32, float16, bfloat16 or float64, got Int",
        ),
        (
            "prologue length",
            lambda: ops.conv_stats(x, w, v3, None, True, *conv),
            r"pre_scale must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "scale length",
            lambda: ops.bn_add_relu(x, v3, v8, None, None, None, 0, True),
            r"scale must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "residual offset",
            lambda: ops.bn_add_relu(x, v8, v8, torch.randn(2, 4, 6, 6), None, None, 5, True),
            r"residual's 4 channels at res_channel_offset=5 do not fit in input's 8 channels",
        ),
        (
            "residual hw",
            lambda: ops.bn_add_relu(x, v8, v8, torch.randn(2, 8, 3, 3), None, None, 0, True),
            r"residual of size \[2, 8, 3, 3\] must match input of size \[2, 8, 6, 6\] in N, H",
        ),
        (
            "res_scale length",
            lambda: ops.bn_add_relu(x, v8, v8, torch.randn(2, 4, 6, 6), v8, None, 0, True),
            r"res_scale must be 1-D with 4 elements",
        ),
        (
            "grad_out size",
            lambda: ops.bn_add_relu_bwd(x, None, x[:, :4], v8, v8, None, None, None, None, None),
            r"input has size \[2, 4, 6, 6\] but grad_out has size \[2, 8, 6, 6\]",
        ),
        (
            "res_input stats",
            lambda: ops.bn_add_relu_bwd(x, None, x, v8, v8, None, x, None, None, None),
            r"res_input needs res_mean and res_invstd",
            ValueError,
        ),
        (
            "mean length",
            lambda: ops.bn_relu_bwd(x, x, v3, v8, None, v8, v8, True),
            r"mean must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "out dtype",
            lambda: ops.relu_bias_bwd(x, x.double()),
            r"out has dtype Double but grad_out has dtype Float",
        ),
        (
            "conv_bwd grad size",
            lambda: ops.conv_bwd(
                torch.randn(2, 4, 5, 5), x, w, None, None, False, *conv, [True, True]
            ),
            r"grad_out must have the convolution's output size \[2, 4, 6, 6\], got \[2, 4, 5, 5\]",
        ),
        (
            "finalize sumsq",
            lambda: ops.bn_finalize(v8, v3, None, None, None, None, None, 10, 0.1, 1e-5),
            r"sumsq must be 1-D with 8 elements .*got size \[3\]",
        ),
        (
            "finalize dtype",
            lambda: ops.bn_finalize(
                v8.half(), v8.half(), None, None, None, None, None, 10, 0.1, 1e-5
            ),
            r"sum must be float32 or float64",
        ),
        (
            "finalize running length",
            lambda: ops.bn_finalize(v8, v8, None, None, v3, None, None, 10, 0.1, 1e-5),
            r"running_mean must be 1-D with 8 elements",
        ),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_message(case):
    _, fn, pattern = case[:3]
    exc = case[3] if len(case) > 3 else RuntimeError
    with pytest.raises(exc, match=pattern):
        fn()


def test_bn_finalize_count_raises_like_batchnorm():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.functional.batch_norm(torch.randn(1, 3), None, None, training=True)
    s = torch.ones(3)
    for count in (1, 0):
        with pytest.raises(
            ValueError, match=f"Expected more than 1 value per channel when training, got {count}"
        ):
            ops.bn_finalize(s, s, None, None, None, None, None, count, 0.1, 1e-5)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        ops.bn_finalize(s, s * 2, None, None, torch.zeros(3), None, None, 4, None, 1e-5)



def test_split_ops_bad_input():
    s = torch.ones(3)
    with pytest.raises(RuntimeError, match="count must be one floating-point value"):
        ops.bn_finalize_count(s, s, torch.tensor([4, 4]), None, None, None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel when training, got 1"):
        ops.bn_finalize_count(s, s, torch.tensor(1.0), None, None, None, None, None, 0.1, 1e-5)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="res_input needs res_mean_g_xhat"):
        ops.bn_add_relu_bwd_elemt(x, None, x, s, s, None, s, s, x, s, s, None, None)
    with pytest.raises(RuntimeError, match="mean_g must be 1-D with 3 elements"):
        ops.bn_relu_bwd_elemt(x, x, s, s, None, s, s, True, torch.ones(4), s)
