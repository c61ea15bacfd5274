"""Compile the Triton kernels for Hopper (sm_90) ahead of time, without a GPU.

    python -m fastres.triton_kernels.lint.aot_check [--quick] [--dtypes bfloat16,float32]
        [--arch 90]

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and accepts code the compiler rejects
(tl.dot tiles under 16, non-power-of-2 aranges, dtype mismatches in loop-carried values, ...).
This check runs the op bodies on CPU tensors with the launches captured instead of executed
(the GPU configs are chosen, since the interpreter is off), then compiles each captured launch
with triton.compile for a cuda target: TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas
bundled with triton. It reports registers and spills (cuobjdump) per variant and exits non-zero
if any variant fails to compile. Compiling proves nothing about speed or numerics on a GPU.

With --trace it also traces every op the way torch.compile does (aot_function over fake CUDA
tensors: the triton_op bodies decompose into triton_kernel_wrapper_functional nodes) and checks
that torch's TTIR mutation analysis marks only each kernel's outputs as written: a kernel it
cannot analyse makes torch.compile clone every input (a full copy of each activation per call).
The analysis needs a compile target, which a GPU-less driver cannot give, so a stub driver
answers sm_90.

Run it without TRITON_INTERPRET in the environment (it refuses otherwise).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
          "int64": "i64", "int32": "i32"}


def _signature(kernel, args, meta):
    """(signature, constexprs, attrs, options) as the JIT would specialise this launch: ints equal
    to 1 become constants, pointers and ints divisible by 16 get tt.divisibility (which is what
    enables vectorised, cp.async-pipelined loads)."""
    import torch  # noqa: PLC0415

    opts = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    values = dict(zip(kernel.arg_names, args, strict=False))  # constexprs come as kwargs
    values.update({k: v for k, v in meta.items() if k not in opts})
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        v = values[name]
        if kernel.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[str(v.dtype).split(".")[1]]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{name}: cannot type {type(v)}")
    return sig, consts, attrs, opts


def _capture(quick: bool, dtype_names: list[str], shapes: str = "test"):
    """Run the op bodies on CPU tensors with every launch recorded, not executed."""
    from .. import _common, bn, bn_bwd, bn_eval, conv, reduce  # noqa: PLC0415

    if _common.INTERPRETED:
        raise SystemExit("aot_check: unset TRITON_INTERPRET (the kernels are interpreted)")
    ops = importlib.import_module(__package__.rsplit(".", 1)[0] + "._ops")
    captured, label = [], [""]

    def record(kernel, grid, *args, **meta):
        # The signature now, not the tensors: holding every launch's activations alive would
        # keep GBs of (empty, but sometimes copied) batch-256 tensors.
        captured.append((kernel, _signature(kernel, args, meta), label[0]))

    def set_label(text):
        label[0] = text

    saved = {mod: mod.launch for mod in (_common, conv, bn, bn_bwd, bn_eval, reduce)}
    for mod in saved:
        mod.launch = record
    try:
        if shapes == "resnet50":
            from .resnet50_shapes import run_resnet50  # noqa: PLC0415

            run_resnet50(ops, dtype_names, set_label)
        else:
            _run_ops(ops, quick, dtype_names)
    finally:
        for mod, fn in saved.items():
            mod.launch = fn
    return captured


def _run_ops(ops, quick: bool, dtype_names: list[str]) -> None:
    import torch  # noqa: PLC0415

    def act(n, c, h, w, dt, cl=True):
        x = torch.randn(n, c, h, w).to(dt)
        return x.contiguous(memory_format=torch.channels_last) if cl else x

    for dt in (getattr(torch, name) for name in dtype_names):
        x = act(8, 64, 56, 56, dt)
        w = torch.randn(64, 64, 3, 3).to(dt)
        sc, sh = torch.rand(64), torch.randn(64)
        go = act(8, 64, 56, 56, dt)
        mean, invstd = torch.zeros(64), torch.ones(64)
        ops.conv_bias_act(x, w, torch.randn(64).to(dt), act(8, 64, 56, 56, dt), [1, 1], [1, 1],
                          [1, 1], 1, True)
        ops.conv_bias_act(x, w, sh, None, [1, 1], [1, 1], [1, 1], 1, True, sc, sh, sc, 1e-5)
        ops.conv_stats(x, w, sc, sh, True, [1, 1], [1, 1], [1, 1], 1)
        ops.conv_bwd(act(8, 64, 28, 28, dt), x, w, sc, sh, True, [2, 2], [1, 1], [1, 1], 1,
                     [True, True])
        ops.bn_add_relu(x, sc, sh, act(8, 32, 112, 112, dt)[:, :, ::2, ::2], sc[:32], sh[:32],
                        16, True)
        ops.bn_add_relu_bwd(go, x, x, mean, invstd, sc, x, mean, invstd, sc)
        ops.bn_relu_bwd(go, x, mean, invstd, sc, sc, sh, True)
        ops.relu_bias_bwd(go, x)
        # SyncBatchNorm's split: the reductions without the g write, the elementwise passes
        # given means (the identity residual's g written by the elementwise pass).
        ops.bn_add_relu_bwd_reduce(go, x, x, mean, invstd, x, mean, invstd)
        ops.bn_add_relu_bwd_elemt(go, x, x, mean, invstd, sc, sh, sc, None, None, None, None,
                                  None)
        ops.bn_add_relu_bwd_elemt(go, x, x, mean, invstd, sc, sh, sc, x, mean, invstd, sc, sh)
        ops.bn_relu_bwd_reduce(go, x, mean, invstd, sc, sh, True)
        ops.bn_relu_bwd_elemt(go, x, mean, invstd, sc, sc, sh, True, sh, sc)
        if not quick:
            ops.conv_bias_act(x, w, None, None, [2, 2], [1, 1], [1, 1], 1, False)
            ops.conv_stats(act(8, 3, 224, 224, dt), torch.randn(64, 3, 7, 7).to(dt), None, None,
                           False, [2, 2], [3, 3], [1, 1], 1)
            xb, wb = act(8, 256, 14, 14, dt), torch.randn(1024, 256, 1, 1).to(dt)
            ops.conv_stats(xb, wb, torch.rand(256), torch.randn(256), True, [1, 1], [0, 0],
                           [1, 1], 1)
            ops.conv_bwd(act(8, 1024, 14, 14, dt), xb, wb, None, None, False, [1, 1], [0, 0],
                         [1, 1], 1, [True, True])
            ops.bn_add_relu(x, sc, sh, None, None, None, 0, False)
            ops.bn_add_relu_bwd(go, None, x, mean, invstd, None, None, None, None, None)
            ops.bn_relu_bwd(go, x, mean, invstd, None, sc, sh, False)
            ops.relu_bias_bwd(go, None)
            ops.bn_add_relu_bwd_reduce(go, None, x, mean, invstd, None, None, None)
            ops.bn_relu_bwd_reduce(go, x, mean, invstd, sc, sh, False)
            ops.bn_relu_bwd_elemt(go, x, mean, invstd, None, sc, sh, False, sh, sc)
        # The training unit's first convolution's and downsample's split sums in one launch.
        from .. import reduce  # noqa: PLC0415

        reduce.sum_rows_pair(torch.empty(3, 64 * 256), torch.empty(64, 256, 1, 1, dtype=dt),
                             torch.empty(3, 256 * 256), torch.empty(256, 256, 1, 1, dtype=dt))
        # A float32 block plan's launch rounding its weights to TF32 (block.py).
        if dt == torch.float32:
            from .. import bn_eval  # noqa: PLC0415

            ws = [torch.randn(64, 256, 1, 1), w.float(), torch.randn(256, 64, 1, 1),
                  torch.randn(256, 64, 1, 1)]
            _, _, woffs, size = bn_eval.eval_vectors_layout([64] * 3 + [256],
                                                            [t.numel() for t in ws])
            grid, args, meta = bn_eval.round_weights_args(ws, torch.empty(size), woffs)
            bn_eval.launch(bn_eval._round_weights_kernel, grid, *args, **meta)
    s, ss = torch.randn(64), torch.rand(64)
    ops.bn_finalize(s, ss, sc, sh, torch.zeros(64), torch.ones(64), torch.tensor(0), 100, None,
                    1e-5)
    ops.bn_finalize_count(s, ss, torch.tensor([100.0]), sc, sh, torch.zeros(64), torch.ones(64),
                          torch.tensor(0), None, 1e-5)


# The pointers each kernel stores through; anything else marked "to clone" is a false mutation.
WRITES = {
    "_conv_fwd_kernel": {"out_ptr", "psum_ptr", "psumsq_ptr", "scale_ptr", "bias_ptr"},
    "_conv_dgrad_kernel": {"gi_ptr"},
    "_conv_wgrad_kernel": {"out_ptr"},
    "_sum_rows_kernel": {"out_ptr", "out1_ptr", "out2_ptr", "c_ptr", "c1_ptr", "c2_ptr",
                         "d_ptr"},
    "_round_tf32_kernel": {"out_ptr"},
    "_bn_finalize_kernel": {"rm_ptr", "rv_ptr", "nbt_ptr", "mean_ptr", "invstd_ptr", "scale_ptr",
                            "shift_ptr"},
    "_stats_finalize_kernel": {"sum_ptr", "sumsq_ptr", "rm_ptr", "rv_ptr", "nbt_ptr", "mean_ptr",
                               "invstd_ptr", "scale_ptr", "shift_ptr"},
    "_bn_eval_vectors_kernel": {"scale_ptr", "shift_ptr"},
    "_round_weights_kernel": {"out_ptr"},
    "_sum_rows_pair_kernel": {"out_a_ptr", "out_b_ptr"},
    "_bn_add_relu_kernel": {"out_ptr"},
    "_bn_bwd_reduce_kernel": {"g_ptr", "part_ptr", "wout_ptr"},
    "_bn_bwd_apply_kernel": {"gi_ptr", "gr_ptr"},
}


def _trace(arch: int) -> int:
    """aot_function-trace every op on fake CUDA tensors; returns the number of problems."""
    import torch  # noqa: PLC0415
    import triton  # noqa: PLC0415
    from functorch.compile import aot_function, make_boxed_func  # noqa: PLC0415
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: PLC0415
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    class _TargetOnly:  # what torch's mutation analysis asks of the driver
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    triton.runtime.driver.set_active(_TargetOnly())
    ops = torch.ops.fastres_triton
    importlib.import_module(__package__.rsplit(".", 1)[0] + "._ops")
    mode = FakeTensorMode()
    bf, cl = torch.bfloat16, torch.channels_last
    with mode:
        def t(*shape, dtype=bf, fmt=cl):
            return torch.empty(shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)

        x, w, go = t(2, 8, 6, 6), t(8, 8, 3, 3), t(2, 8, 6, 6)
        v = [torch.empty(8, device="cuda") for _ in range(6)]
        nbt = torch.empty((), device="cuda", dtype=torch.long)
        cnt = torch.empty(1, device="cuda")
    # (op, args): tensors are traced inputs (aot_function lifts only positional tensors).
    calls = {
        "conv_bias_act": (ops.conv_bias_act, (x, w, v[0].to(bf), go, [1, 1], [1, 1], [1, 1], 1,
                                              True)),
        # the eval BatchNorm's vectors computed by the convolution (BN_VECTORS): written into
        # the op's own buffer, the BatchNorm's tensors only read
        "conv_bias_act(bn)": (ops.conv_bias_act, (x, w, v[0], go, [1, 1], [1, 1], [1, 1], 1,
                                                  True, v[1], v[2], v[3], 1e-5)),
        "conv_stats": (ops.conv_stats, (x, w, v[0], v[1], True, [1, 1], [1, 1], [1, 1], 1)),
        "conv_bwd": (ops.conv_bwd, (go, x, w, v[0], v[1], True, [1, 1], [1, 1], [1, 1], 1,
                                    [True, True])),
        "bn_finalize": (ops.bn_finalize, (v[0], v[1], v[2], v[3], v[4], v[5], nbt, 72, None,
                                          1e-5)),
        "bn_add_relu": (ops.bn_add_relu, (x, v[0], v[1], go, v[2], v[3], 0, True)),
        "bn_add_relu_bwd": (ops.bn_add_relu_bwd, (go, x, x, v[0], v[1], v[2], x, v[3], v[4],
                                                  v[5])),
        "bn_relu_bwd": (ops.bn_relu_bwd, (go, x, v[0], v[1], v[2], v[3], v[4], True)),
        "relu_bias_bwd": (ops.relu_bias_bwd, (go, x)),
        "bn_finalize_count": (ops.bn_finalize_count, (v[0], v[1], cnt, v[2], v[3], v[4], v[5],
                                                      nbt, None, 1e-5)),
        "bn_add_relu_bwd_reduce": (ops.bn_add_relu_bwd_reduce, (go, x, x, v[0], v[1], x, v[2],
                                                                v[3])),
        "bn_add_relu_bwd_elemt": (ops.bn_add_relu_bwd_elemt, (go, x, x, v[0], v[1], v[2], v[3],
                                                              v[4], None, None, None, None,
                                                              None)),
        "bn_add_relu_bwd_elemt(bn)": (ops.bn_add_relu_bwd_elemt, (go, x, x, v[0], v[1], v[2],
                                                                  v[3], v[4], x, v[5], v[0],
                                                                  v[1], v[2])),
        "bn_relu_bwd_reduce": (ops.bn_relu_bwd_reduce, (go, x, v[0], v[1], v[2], v[3], True)),
        "bn_relu_bwd_elemt": (ops.bn_relu_bwd_elemt, (go, x, v[0], v[1], v[2], v[3], v[4], True,
                                                      v[5], v[0])),
    }
    problems = 0
    for name, (op, op_args) in calls.items():
        graphs = []

        def compiler(gm, inputs, graphs=graphs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        tensors = [i for i, a in enumerate(op_args) if isinstance(a, torch.Tensor)]

        def fn(*ts, op=op, op_args=op_args, tensors=tensors):
            full = list(op_args)
            for i, t_ in zip(tensors, ts, strict=True):
                full[i] = t_
            return op(*full)

        try:
            with mode:
                aot_function(fn, fw_compiler=compiler)(*[op_args[i] for i in tensors])
        except Exception as exc:  # noqa: BLE001 - reported, then counted
            problems += 1
            print(f"trace {name}: FAIL {exc!r}"[:2000])
            continue
        kernels = []
        for node in graphs[0].graph.nodes if graphs else []:
            if "triton_kernel_wrapper" not in str(node.target):
                continue
            kname = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            cloned = set(node.kwargs.get("tensors_to_clone", ()))
            extra = cloned - WRITES.get(kname, set())
            kernels.append(f"{kname}{sorted(cloned)}")
            if extra:
                problems += 1
                print(f"trace {name}: {kname} falsely mutates {sorted(extra)}")
        if not kernels:
            problems += 1
            print(f"trace {name}: no triton kernel in the traced graph")
        print(f"trace {name}: {' '.join(kernels)}")
    return problems


def cuobjdump_path() -> str:
    """The cuobjdump bundled with triton's NVIDIA backend (no CUDA toolkit needed)."""
    import triton  # noqa: PLC0415

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def _res_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """cuobjdump -res-usage of a cubin: REG, STACK, SHARED, LOCAL, ..."""
    from . import parse_res_usage  # noqa: PLC0415

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return parse_res_usage(out)


def _sass(cubin: bytes, cuobjdump: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


# Kernels whose tl.dot must reach the tensor cores (wgmma) unless DOT_PRECISION is "ieee".
DOT_KERNELS = ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel")


# Lint failures understood and not yet fixed, waived by (kernel, flag subset, check): printed as
# "known", counted apart from failures. Each says why; remove the entry when fixed.
KNOWN: list[tuple[str, dict, str]] = [
    # None since the stem's channel padding (conv._padded_channels) and the 16x64 tiles of the
    # BN-backward reduction with a BN'd residual (_common._rows_config).
]


def _known(name: str, consts: dict, problem: str) -> bool:
    return any(name == k and all(consts.get(f) == v for f, v in flags.items())
               and problem.startswith(check) for k, flags, check in KNOWN)


def lint_compiled(name: str, consts: dict, opts: dict, compiled, cuobjdump: str):
    """(summary, problems) of one compiled variant: lint.py's checks on its PTX and resources."""
    from .. import lint  # noqa: PLC0415
    from .._common import intended_ctas_per_sm  # noqa: PLC0415

    ru = _res_usage(compiled.asm["cubin"], cuobjdump)
    warps = opts.get("num_warps", 4)
    local_ops = None
    if ru.get("STACK", 0) or ru.get("LOCAL", 0):  # a spill, or a frame nothing touches?
        local_ops = lint.local_memory_ops(_sass(compiled.asm["cubin"], cuobjdump))
    res = lint.Resources(regs=ru.get("REG", 0), stack=ru.get("STACK", 0), local=ru.get("LOCAL", 0),
                         smem=compiled.metadata.shared, num_warps=warps, local_ops=local_ops)
    ctas = intended_ctas_per_sm(name, consts, warps)
    expect_wgmma = name in DOT_KERNELS and consts.get("DOT_PRECISION") != "ieee"
    problems = lint.lint_ptx(compiled.asm["ptx"], expect_wgmma)
    problems += lint.lint_resources(res, ctas)
    summary = (f"regs={res.regs} stack={res.stack}"
               + (f" ({local_ops} STL/LDL)" if local_ops is not None else "")
               + f" smem={res.smem} ctas/SM={ctas}"
               + (" wgmma" if "wgmma.mma_async" in compiled.asm["ptx"] else ""))
    return summary, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one call per op (the heaviest flags)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32",
                        help="comma-separated torch dtypes (bfloat16,float16,float32)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90)")
    parser.add_argument("--shapes", choices=("test", "resnet50"), default="test",
                        help="test: small shapes, one call per flag set; resnet50: every variant "
                             "ResNet-50 launches at batch 32/128/256, each linted (lint.py)")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="compile only the launches whose '[label] kernel' line matches")
    parser.add_argument("--trace", action="store_true",
                        help="also trace the ops as torch.compile does (fake CUDA tensors)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    cuobjdump = cuobjdump_path()
    seen, failures, waived, linted = set(), 0, 0, args.shapes == "resnet50"
    t_start = time.time()
    only = re.compile(args.only) if args.only else None
    for kernel, (sig, consts, attrs, opts), label in _capture(args.quick, args.dtypes.split(","),
                                                              args.shapes):
        # Deduplicated by what the compiler sees: kernel, types and specialisations, constexprs,
        # config (num_warps, num_stages).
        if only and not only.search(f"[{label}] {kernel.__name__}"):
            continue
        key = (kernel.__name__, repr(sorted(sig.items())), repr(sorted(consts.items(), key=str)),
               repr(sorted(attrs)), repr(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        flags = {k: v for k, v in consts.items() if k.isupper()}
        t0 = time.time()
        try:
            src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts,
                                            attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options=opts)
            summary, problems = lint_compiled(kernel.__name__, consts, opts, compiled, cuobjdump)
            real = [p for p in problems if not _known(kernel.__name__, consts, p)]
            waived += len(problems) > len(real)
            if real and linted:
                failures += 1
                status = f"FAIL {summary} " + "; ".join(real)
            elif problems and linted:
                status = f"ok (known: {'; '.join(problems)}) {summary}"
            else:
                status = f"ok {summary}" + (f" (lint: {'; '.join(problems)})" if problems else "")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then counted
            failures += 1
            status = f"FAIL {exc!r}"[:3000]
        where = f"[{label}] " if label else ""
        print(f"{where}{kernel.__name__} {flags} {opts}: {status} ({time.time() - t0:.1f}s)",
              flush=True)
    print(f"aot_check: triton {triton.__version__}, sm_{args.arch}, shapes {args.shapes}, "
          f"{time.time() - t_start:.0f}s")
    if args.trace:
        problems = _trace(args.arch)
        print(f"aot_check: trace: {problems} problems")
        failures += problems
    if waived:
        print(f"aot_check: {waived} variants with known lint findings (aot_check.KNOWN)")
    print(f"{len(seen)} variants, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
