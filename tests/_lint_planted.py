"""Planted kernels for tests/test_triton_lint.py: compiled for sm_90 (no GPU) and linted by
fastres.triton_kernels.lint. Run as a script without TRITON_INTERPRET; prints one line per kernel:
'<name>: <problem>; <problem>' (nothing after the colon when clean)."""

import sys

import triton
import triton.language as tl


@triton.jit
def _gemm_good(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr):
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :])
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * stride_bk + offs_n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * BN + offs_n[None, :], acc)


@triton.jit
def _gemm_unaligned_b(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr):
    # The planted bug: a runtime offset of unknown divisibility (k0 // BK, the iteration index)
    # on the B pointer, as r + s was on a (K, C, 1, 1) weight: no 16-byte alignment proof.
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :])
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * stride_bk + offs_n[None, :] + k0 // BK)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * BN + offs_n[None, :], acc)


def main() -> int:
    from fastres.triton_kernels.lint import aot_check
    from triton.backends.compiler import GPUTarget

    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32", "stride_am": "i32",
           "stride_bk": "i32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    consts = {"BM": 128, "BN": 128, "BK": 64}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    opts = {"num_warps": 8, "num_stages": 3}
    cuobjdump = aot_check.cuobjdump_path()
    for kernel in (_gemm_good, _gemm_unaligned_b):
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        # linted as a forward-conv tile (128x128: 1 CTA per SM intended)
        _, problems = aot_check.lint_compiled("_conv_fwd_kernel", {**consts, "BLOCK_M": 128,
                                              "BLOCK_N": 128, "DOT_PRECISION": "tf32"}, opts,
                                              compiled, cuobjdump)
        print(f"{kernel.__name__}: {'; '.join(problems)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
