"""``python -m fastres.parity``: the fused blocks against torchvision, block by block.

For each distinct residual block of a ResNet (ResNet-50 by default: its 8 Bottleneck types, at
their real channel counts and spatial sizes for a 224x224 image), each dtype, eval and train, and
each available backend, the fused fastres block runs next to the torchvision block it replaces:

* correctness: everything a user keeps (eval: the output and the buffers; train: the output, the
  input grad, every parameter grad, running_mean, running_var and num_batches_tracked) is compared
  with the torchvision block run in float64 on the same weights, and judged by the tolerance rule
  ``err(fastres) <= 2 * err(PyTorch at that dtype) + atol[dtype]`` (``fastres.harness.rule``);
* speed: the median time of the fused block and of the torchvision block (eval: forward under
  no_grad; train: forward + backward), and their ratio.

BatchNorm affine parameters and running statistics are randomised so that folding is exercised.
Every backend is forced in turn (``FASTRES_BACKEND`` set around the calls), including those the
dispatcher would not choose by itself on this device. The exit status is non-zero when any case
fails parity or raises.

    python -m fastres.parity                          # ResNet-50 blocks, default device
    python -m fastres.parity --quick                  # about a minute on a small CPU
    python -m fastres.parity --model resnet18 --dtype fp16 bf16 --json r.json --markdown r.md \\
        --plot r.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fastres.harness.cases import DTYPE_NAMES, DTYPES, MODELS, TINY, distinct_blocks, quick_subset
from fastres.harness.environment import environment, hardware_line
from fastres.harness.progress import emit
from fastres.harness.report import HEAD, plot, summarise, to_markdown
from fastres.harness.run import auto_choice, backend_plan, run_cases

# --------------------------------------------------------------------------------------------
# Command line.


def _parse_dtypes(vals: list[str] | None, device: torch.device) -> list[torch.dtype]:
    if not vals:
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    out = []
    for v in vals:
        for name in v.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in DTYPES:
                raise SystemExit(f"--dtype {name!r}: choose from {', '.join(DTYPES)}")
            if DTYPES[name] not in out:
                out.append(DTYPES[name])
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fastres.parity",
        description="Fused fastres blocks against torchvision: float64-referenced errors under "
                    "the tolerance rule, and median times. Exit status 1 when a case fails.")
    ap.add_argument("--model", default="resnet50", choices=MODELS + (TINY,),
                    help="whose distinct blocks to run (default resnet50; 'tiny' = two small "
                         "blocks for smoke tests)")
    ap.add_argument("--dtype", nargs="+", metavar="DTYPE",
                    help="fp32, fp16, bf16 (several allowed; default fp32 on CPU, bf16 on CUDA)")
    fmt = ap.add_mutually_exclusive_group()
    fmt.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                     help="channels_last activations and weights (default)")
    fmt.add_argument("--contiguous", dest="channels_last", action="store_false",
                     help="NCHW-contiguous activations and weights")
    ap.add_argument("--batch", type=int, help="batch size (default 2 on CPU, 32 on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    help="default: cuda when available, else cpu")
    ap.add_argument("--backend", action="append", metavar="NAME",
                    help="only this backend (repeatable; default: every available backend)")
    ap.add_argument("--mode", action="append", choices=("eval", "train"),
                    help="only this mode (repeatable; default eval and train)")
    ap.add_argument("--quick", action="store_true",
                    help="a quick run: 4 representative blocks, fewer repeats")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--warmup", type=int, help="warm-up calls before timing (CPU timer)")
    ap.add_argument("--repeats", type=int, help="timed calls per measurement")
    ap.add_argument("--no-timing", dest="timing", action="store_false",
                    help="check parity only")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bar")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    ap.add_argument("--plot", metavar="PNG", help="plot speedups and errors (needs matplotlib)")
    ap.add_argument("--from-json", metavar="PATH",
                    help="run nothing: write --markdown/--plot from an earlier --json report "
                         "(also a partial one, from a run that was cut short)")
    return ap


def _write_outputs(report: dict, args) -> None:
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(report))
        print(f"wrote {args.markdown}")
    if args.plot:
        why = plot(report, args.plot)
        print(f"plot skipped: {why}" if why else f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        _write_outputs(report, args)
        return 0 if report["summary"]["ok"] and not report["summary"].get("partial") else 1
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastres.parity: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.backend and "triton" in args.backend:
        # The Triton interpreter must be chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtypes = _parse_dtypes(args.dtype, device)
    modes = args.mode or ["eval", "train"]
    batch = args.batch or (32 if device.type == "cuda" else 2)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    cases = distinct_blocks(args.model, args.image_size)
    if args.quick:
        cases = quick_subset(cases)
    names, skipped = backend_plan(device, args.backend)
    env = environment(device)
    print(f"fastres parity: {args.model} ({len(cases)} distinct blocks) on {device}")
    print(f"hardware: {hardware_line(env)}")
    print(f"batch {batch}, {'channels_last' if args.channels_last else 'contiguous'}, dtypes "
          f"{', '.join(DTYPE_NAMES[d] for d in dtypes)}, modes {', '.join(modes)}"
          + ((f", timing: median of {repeats} after {warmup} warm-up" if device.type == "cpu"
              else ", timing: median by triton.testing.do_bench (CUDA events without triton)")
             if args.timing else ", no timing"))
    for d in dtypes:
        print(f"dispatcher's own choice at {DTYPE_NAMES[d]}: "
              f"{auto_choice(device, d, args.channels_last)}")
    print(f"backends: {', '.join(names) or 'none'}"
          + "".join(f"\n  skipped {n}: {why}" for n, why in skipped.items()))
    if not names:
        print("fastres.parity: no backend to run", file=sys.stderr)
        return 2
    print(HEAD)

    def make_report(results: list[dict], partial: bool) -> dict:
        summary = summarise(results)
        summary["duration_s"] = time.perf_counter() - t_start
        summary["partial"] = partial
        timer = next((r["time_torchvision"]["timer"] for r in results
                      if r.get("time_torchvision")), None)
        checks = max((len(r["checks"]) for r in results), default=0)
        return {
            "meta": {
                "tool": "fastres.parity", "argv": sys.argv[1:] if argv is None else list(argv),
                "model": args.model, "device": str(device), "batch": batch,
                "layout": "channels_last" if args.channels_last else "contiguous",
                "dtypes": [DTYPE_NAMES[d] for d in dtypes], "modes": modes,
                "image_size": args.image_size, "quick": args.quick, "warmup": warmup,
                "repeats": repeats, "timing": args.timing, "timer": timer,
                "backends": names, "skipped_backends": skipped,
                "auto_backend": {DTYPE_NAMES[d]: auto_choice(device, d, args.channels_last)
                                 for d in dtypes},
                "checks_per_case": checks,
                "blocks": [asdict(c) for c in cases],
            },
            "env": env,
            "summary": summary,
            "cases": results,
        }

    def checkpoint(results: list[dict]) -> None:
        # A run cut short (a time-boxed device check) keeps what it measured.
        if args.json:
            Path(args.json).write_text(json.dumps(make_report(results, True), indent=1,
                                                  default=str) + "\n")

    results = run_cases(cases, dtypes, modes, names, device, batch, args.channels_last, warmup,
                        repeats, timing=args.timing, progress=args.progress, emit=emit,
                        seed=args.seed, checkpoint=checkpoint)
    report = make_report(results, False)
    summary = report["summary"]
    print(f"\n{summary['pass']} pass, {summary['fail']} fail, {summary['error']} error, "
          f"{summary['skipped']} skipped in {summary['duration_s']:.1f} s -- "
          f"{'PARITY OK' if summary['ok'] else 'PARITY FAILED'}")
    train_fails = [r for r in results if r["status"] == "fail" and r["mode"] == "train"]
    if train_fails:
        print(f"note: {len(train_fails)} failing case(s) are training. The verdict already gives "
              "each run a float64 reference with its own ReLU decisions (inner and output), so "
              "rounding that flips a decision near zero is not what failed. Compare the RMS "
              "errors printed with each failure, and diagnostics.plain_reference_checks in the "
              "JSON.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    _write_outputs(report, args)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
