"""``python -m fastres.info``: what was built and which backends are available, and why not."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from fastres import __version__, backends
from fastres.backends import extension, records


def report() -> dict:
    info = {
        "fastres": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "extension": extension.build_info(),
        "backends": backends.available(),
        "forced": None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    st = records.state(dev)
    info["selftest"] = {"device": dev, "verdicts": st["verdicts"], "records": st["by"],
                        "ranking_record": st["ranking_by"], "wins": st["wins"],
                        "error": st.get("error")}
    try:
        info["forced"] = backends.forced()
    except ValueError as exc:
        info["forced"] = f"invalid: {exc}"
    if dev == "cpu":
        info["cpu_serves"] = _cpu_serves()
    info["own_primitives"] = own_primitives()
    return info


def own_primitives() -> str:
    """Whether the CPU convolutions run on fastres' own oneDNN primitives
    (csrc/cpu/dnnl_conv.cpp), and why not."""
    if not info_built():
        return "no (fastres._C not built)"
    try:
        built = torch.ops.fastres_cpu.own_primitives_built()
    except (AttributeError, RuntimeError):
        return "no (an older build without them)"
    if not built:
        return ("no: built without oneDNN's headers (apt-get install libdnnl-dev, or "
                "scripts/setup_env.sh as root, then rebuild); ATen's oneDNN ops serve")
    if os.environ.get("FASTRES_CPU_OWN_PRIMITIVES", "1").strip() == "0":
        return f"built ({built}), off (FASTRES_CPU_OWN_PRIMITIVES=0)"
    return (f"yes ({built}): fp32/bf16 channels_last convolutions, eval and training "
            "(forward and backward)")


def info_built() -> bool:
    return extension.load()[0] is not None


def _cpu_serves() -> dict[str, str]:
    """dtype -> the backend the dispatcher picks for a CPU convolution of that dtype (or why
    none can)."""
    out = {}
    for dtype in backends.FLOAT_DTYPES:
        inputs = backends.Inputs(torch.device("cpu"), dtype, kernel_size=(3, 3),
                                 channels_last=True)
        try:
            out[str(dtype).split(".")[1]] = backends.select(inputs).name
        except (RuntimeError, ValueError) as exc:
            out[str(dtype).split(".")[1]] = f"none ({exc})"
    return out


def cpu_guide(info: dict) -> list[str]:
    """What applies to a user without a CUDA device."""
    serves = info["cpu_serves"]
    by = {}
    for dtype, name in serves.items():
        by.setdefault(name, []).append(dtype)
    lines = ["on this machine (no CUDA device):",
             "  serving the ops: " + "; ".join(f"{name} ({', '.join(d)})"
                                                for name, d in by.items())
             + " -- chosen automatically, no self-test record needed (a record is needed only "
             "to let a GPU backend run on a GPU)"]
    lines.append("  not serving: cuda (needs a CUDA device); triton (on CPU tensors only under "
                 "TRITON_INTERPRET=1 with FASTRES_BACKEND=triton, thousands of times slower: a "
                 "check, not a backend); cudasim (FASTRES_BACKEND=cudasim only: the CUDA kernels' "
                 "source run on the CPU, a check)")
    lines.append("  python -m fastres.selftest here is optional: it checks this installation's "
                 "kernels against fastres.reference (the cpu and reference backends, the CUDA "
                 "kernels under cudasim, the Triton kernels under the interpreter; a minute or "
                 "two) and exits 0 when all pass; it enables nothing and needs no GPU")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastres.info", description=(
        "What fastres was built with, which backends are available here and why not, and what "
        "the self-test recorded on this device."))
    ap.add_argument("--brief", action="store_true", help="one line per backend")
    args = ap.parse_args(argv)
    info = report()
    if not args.brief:
        print(
            f"fastres {info['fastres']}  python {info['python']}  torch {info['torch']} "
            f"(CUDA {info['torch_cuda']})  triton {info['triton']}"
        )
        print(f"devices: {', '.join(info['cuda_devices']) or 'no CUDA device'}")
        ext = info["extension"]
        if ext.get("built"):
            print(
                f"fastres._C: {ext['version']}, CUDA kernels {'yes' if ext['cuda'] else 'no'}"
                f"{' (arch ' + ext['cuda_arch_list'] + ')' if ext['cuda'] else ''}, "
                f"{ext['compiler']}, built against torch {ext['torch_version']}"
            )
            try:
                print(f"CPU kernels: {torch.ops.fastres_cpu.kernel_isa()} instruction set")
            except (AttributeError, RuntimeError):
                pass
        else:
            print(f"fastres._C: not available: {ext['reason']}")
    st = info["selftest"]
    on_gpu = st["device"] == "cuda"
    for name, why in info["backends"].items():
        b = backends.BACKENDS[name]
        state = "available" if why is None else f"unavailable: {why}"
        seen = st["verdicts"].get(name)
        if seen == "pass":
            state += f" (verified on this {'GPU' if on_gpu else 'CPU'} by the self-test)"
        elif seen:
            state += f" (self-test here: {seen}" + (
                ", not chosen automatically)" if on_gpu and b.requires_verification("cuda")
                else ")")
        elif why is None and not b.verified_on_gpu and on_gpu:
            state += (" (not yet verified on a GPU: chosen only when forced; python -m "
                      "fastres.selftest verifies it on this one)")
        elif why is None and name not in backends.PRIORITY:
            state += " (chosen only when forced)"
        print(f"backend {name:9s} {state}")
    if not args.brief:
        if st["records"]:
            print(f"self-test records for this {st['device']} device and software:")
            for name, path in st["records"].items():
                print(f"  {name}: {st['verdicts'][name]} ({path})")
        elif on_gpu:
            print("self-test: no record for this GPU and software (run python -m fastres.selftest "
                  "once: it verifies the GPU backends here)")
        else:
            print("self-test: no record for this CPU and software (none needed)")
        if st["error"]:
            print(f"self-test records unreadable: {st['error']}")
        if st["wins"]:
            print(f"fastest verified backend per shape class ({st['ranking_record']}):")
            for name, classes in sorted(st["wins"].items()):
                print(f"  {name}: {len(classes)} class(es): {'; '.join(sorted(classes)[:12])}"
                      + (" ..." if len(classes) > 12 else ""))
    if not on_gpu and not args.brief:
        for line in cpu_guide(info):
            print(line)
    print(f"CPU own oneDNN primitives: {info['own_primitives']}")
    if info["forced"]:
        print(f"FASTRES_BACKEND forces: {info['forced']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
