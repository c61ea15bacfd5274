"""fp32 convolutions through the Triton TF32 path under the interpreter, judged by the tolerance
rule against the TF32 yardstick (the reference on TF32-rounded operands, as tests/op_check.py
judges the CUDA kernels' TF32): operands rounded to nearest (what the kernels do) and, for
comparison, truncated (what wgmma does to unrounded fp32).

    python bench/tf32_emulated.py          # CPU only; TRITON_INTERPRET is set here

Prints one verdict per output (forward, statistics with the BN prologue, both gradients) and the
ratio err(ours) / err(yardstick); the rule allows 2 (plus atol 1e-5).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import fastres.triton_kernels as tk  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastres import reference  # noqa: E402
from fastres.harness.rule import verdict  # noqa: E402
from fastres.harness.selftest_cases import tf32_round  # noqa: E402

OPS = tk.ops()
from fastres.triton_kernels import _common, conv  # noqa: E402

CL = torch.channels_last
# (label, N, C, H, K, kernel, stride): a 3x3, a long 1x1 reduction, a stride-2 3x3
SHAPES = [("3x3 C72", 2, 72, 7, 16, 3, 1), ("1x1 C256", 2, 256, 5, 32, 1, 1),
          ("3x3s2 C128", 2, 128, 8, 16, 3, 2)]


@triton.jit
def _truncate(x, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "tf32":
        x = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


def _arg(a, f):
    return f(a) if isinstance(a, torch.Tensor) else a


def run(mode: str, label: str, n: int, c: int, h: int, k: int, r: int, stride: int) -> None:
    torch.manual_seed(0)
    x = (torch.randn(n, c, h, h) + 0.5).contiguous(memory_format=CL)  # nonzero means: a bias adds
    w = torch.randn(k, c, r, r) / (c * r * r) ** 0.5 + 0.02
    geo = ([stride] * 2, [r // 2] * 2, [1, 1], 1)
    p = (h + 2 * (r // 2) - r) // stride + 1
    go = (torch.randn(n, k, p, p) + 0.3).contiguous(memory_format=CL)
    sc, sh = torch.rand(c) + 0.5, torch.randn(c)
    calls = [("conv_bias_act", (x, w, None, None, *geo, False)),
             ("conv_stats", (x, w, sc, sh, True, *geo)),
             ("conv_bwd", (go, x, w, sc, sh, True, *geo, [True, True]))]
    for name, args in calls:
        ours = getattr(OPS, name)(*[_arg(a, torch.clone) for a in args])
        lo = getattr(reference, name)(*[_arg(a, lambda t: tf32_round(t.clone())) for a in args])
        hi = getattr(reference, name)(*[_arg(a, torch.Tensor.double) for a in args])
        if isinstance(ours, torch.Tensor):
            ours, lo, hi = (ours,), (lo,), (hi,)
        for i, (o, lo_i, hi_i) in enumerate(zip(ours, lo, hi, strict=True)):
            v = verdict(f"{mode:5} {label} {name}[{i}]", o, lo_i, hi_i, torch.float32)
            print(f"{v}  ratio {v.err / max(v.torch_err, 1e-30):.2f}", flush=True)


def main() -> None:
    _common.EMULATE_TF32 = True
    torch.backends.cudnn.allow_tf32 = True
    rounded = conv.tf32_operand, conv.round_tf32
    for mode in ("round", "trunc"):
        if mode == "trunc":
            conv.tf32_operand = _truncate
            conv.round_tf32 = lambda t: (t.view(torch.int32) & -0x2000).view(torch.float32)
        for shape in SHAPES:
            run(mode, *shape)
    conv.tf32_operand, conv.round_tf32 = rounded


if __name__ == "__main__":
    main()
