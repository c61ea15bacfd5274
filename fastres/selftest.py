"""``python -m fastres.selftest``: are fastres's kernels correct on this device?

The command line of :mod:`fastres.harness.selftest` (which runs the cases and writes the record).
``fastres.selftest(...)`` calls :func:`fastres.harness.selftest.run` (the module is callable).
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch

from fastres.harness.selftest import LAYOUTS, PRECISION_DTYPE, run

_DESCRIPTION = """\
Are fastres's kernels correct on this device? Every op of the contract on every available
backend, against fastres.reference, at scaled-down ResNet-18/50 shapes, then whole converted
blocks (eval and training), judged by the suite's tolerance rule.

On a GPU (the default there: --full) a backend that passes becomes eligible for the
dispatcher on this device. On a CPU (the default there: --quick) nothing needs verifying: the
cpu and reference backends serve without a record; the run checks the cpu and reference
backends, the CUDA kernels' source under cudasim and the Triton kernels under the interpreter
(TRITON_INTERPRET=1, set for you), in a minute or two."""

_EPILOG = """\
examples:
  python -m fastres.selftest                  this device, every backend
  python -m fastres.selftest --device cpu --backend cpu --backend reference
  python -m fastres.selftest --bench          also the speedup report
  python -m fastres.selftest --record-to bench/results/h200_<commit>_selftest.json

exit status: 0 when every backend run passed, 1 on any failure, 2 when nothing could run."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastres.selftest", description=_DESCRIPTION,
                                 epilog=_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--backend", action="append", metavar="NAME",
                    help="only this backend (repeatable; default every available one: cuda, "
                         "triton, cpu, reference, cudasim)")
    q = ap.add_mutually_exclusive_group()
    q.add_argument("--quick", dest="quick", action="store_true", default=None,
                   help="3 conv shapes, fp32 + bf16, channels_last; kernel-variant coverage "
                        "shapes for cuda and cudasim only (the default on a CPU)")
    q.add_argument("--full", dest="quick", action="store_false",
                   help="every shape, precision and layout, and coverage shapes for every "
                        "kernel variant (the default on a GPU; on a CPU many minutes)")
    ap.add_argument("--precision", action="append", choices=tuple(PRECISION_DTYPE),
                    help="only this precision (repeatable; tf32 is fp32 on TF32 tensor cores, "
                         "run by the CUDA kernels and by Triton on a GPU)")
    ap.add_argument("--layout", action="append", choices=LAYOUTS,
                    help="only this memory layout (repeatable)")
    ap.add_argument("--no-blocks", dest="blocks", action="store_false",
                    help="ops only, no whole blocks")
    ap.add_argument("--bench", action="store_true",
                    help="also time each passing backend against the reference path")
    ap.add_argument("--no-record", dest="record", action="store_false",
                    help="do not store the record in the cache")
    ap.add_argument("--record-to", metavar="PATH",
                    help="also write the record here (bench/results/<gpu>_<commit>_selftest.json)")
    ap.add_argument("--time-limit", type=float, metavar="S",
                    help="stop starting cases after S seconds and still write the record (the "
                         "backends then count as partial, not verified); --bench then starts "
                         "no shape class after S/2 more seconds")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bar on stderr")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the random operands (default 0)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastres.selftest: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    if (on_cpu and "TRITON_INTERPRET" not in os.environ and argv is None
            and (not args.backend or "triton" in args.backend)):
        # The Triton kernels run on CPU tensors only under the interpreter, which must be chosen
        # before triton is imported, and `import fastres` imports it (through torch._dynamo):
        # start again with it chosen.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastres.selftest", *sys.argv[1:]])
    rec = run(args.device, args.backend, args.quick, args.precision, args.layout, args.blocks,
              args.bench, args.record, args.record_to, args.progress, args.seed,
              args.time_limit)
    if not rec["backends"]:
        return 2
    return 0 if rec["summary"]["ok"] else 1


class _CallableModule(types.ModuleType):
    """``fastres.selftest(...)`` is :func:`run` (the module itself is callable)."""

    def __call__(self, **kwargs) -> dict:
        return run(**kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
