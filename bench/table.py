"""Turn a benchmark run's JSON into markdown tables of times and ratios.

    python -m bench.table run.json [-o run.md]      # or: python bench/table.py run.json

Reads either the suite's own ``--bench-out`` file or pytest-benchmark's ``--benchmark-json``
file (the cases' ``extra_info`` carry everything). Ratios are speedups against eager PyTorch
(eager p50 / provider p50: above 1 is faster). Needs only the standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROVIDER_ORDER = ["eager", "compile", "compile-freezing", "openvino", "onnxruntime",
                  "fastres-cuda", "fastres-triton", "fastres-cpu", "fastres-cpu+compile",
                  "fastres-cpu-frozen", "fastres-reference"]
GROUP_TITLES = {
    "conv": "Single fused convs (ResNet-50 shapes, eval: conv + folded BN + ReLU [+ residual])",
    "block-eval": "Blocks, eval forward",
    "block-train": "Blocks, train forward + backward",
    "reference_case": "Reference case: fp32 channels_last BottleneckBlock(256, 64), N=8, 56x56",
    "resnet50": "Full ResNet-50",
    "peers-resnet50-fp32": "ResNet-50 eval against the CPU engines, fp32",
    "peers-resnet50-bf16": "ResNet-50 eval against the CPU engines, bf16",
    "peers-block-fp32": "Blocks eval against the CPU engines, fp32",
    "peers-block-bf16": "Blocks eval against the CPU engines, bf16",
}


def is_fastres(provider: str) -> bool:
    return provider.startswith("fastres-")


def best_peer(by: dict, case: str, provs: list[str]) -> tuple[str | None, float | None]:
    """The fastest provider of ``case`` that is not fastres (eager included): (name, p50)."""
    best = (None, None)
    for p in provs:
        t = (by.get((case, p)) or {}).get("p50_ms")
        if t and not is_fastres(p) and (best[1] is None or t < best[1]):
            best = (p, t)
    return best


def load(path: str) -> dict:
    """{"env", "meta", "records"} from either JSON format."""
    doc = json.loads(Path(path).read_text())
    if "records" in doc:
        return doc
    if "benchmarks" in doc:  # pytest-benchmark
        recs = []
        for b in doc["benchmarks"]:
            info = b.get("extra_info") or {}
            if "provider" not in info:
                continue
            if "p50_ms" not in info and b.get("stats"):
                info["p50_ms"] = b["stats"]["median"] * 1e3
            recs.append({"group": info.get("group"), "case": info.get("case"),
                         "provider": info["provider"], "extra_info": info})
        first = recs[0]["extra_info"] if recs else {}
        env = {k: first.get(k) for k in ("hardware", "torch", "torchvision", "triton",
                                         "fastres", "commit")}
        env["date"] = doc.get("datetime")
        return {"env": env, "meta": {}, "records": recs}
    raise ValueError(f"{path}: neither a fastres bench file nor a pytest-benchmark JSON")


def _providers(recs: list[dict]) -> list[str]:
    present = {r["provider"] for r in recs}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _ms(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _mb(v) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def render(doc: dict, compact: bool = False) -> str:
    env, meta, recs = doc.get("env", {}), doc.get("meta", {}), doc.get("records", [])
    hw = env.get("gpu") or env.get("cpu") or env.get("hardware") or "unknown hardware"
    commit = (env.get("commit") or "unknown")[:12] + ("+dirty" if env.get("commit_dirty")
                                                      else "")
    out = []
    if not compact:
        out += [f"# fastres benchmarks on {hw}", "",
                f"- torch {env.get('torch')}, torchvision {env.get('torchvision')}, triton "
                f"{env.get('triton')}, fastres {env.get('fastres')} @ {commit}"
                + (f", {env.get('date')}" if env.get("date") else ""),
                ]
        if meta:
            out.append(f"- device {meta.get('device')}, {meta.get('dtype')}, "
                       f"{meta.get('layout')}, conv/block batch {meta.get('batch')}, "
                       f"torch.compile ({env.get('compile_mode')}) on {meta.get('compile_scope')}")
        if env.get("loadavg_1min") is not None:
            out.append(f"- 1-minute load average at the start: {env['loadavg_1min']:.2f} "
                       f"({env.get('cpu_count')} CPUs)")
        out += ["- cells: p50 ms (speedup vs eager = eager p50 / provider p50; > 1 is faster); "
                "'vs best peer' = the fastest non-fastres provider's p50 / fastres p50",
                ""]
    groups = list(dict.fromkeys(r["group"] for r in recs))
    for g in groups:
        grecs = [r for r in recs if r["group"] == g]
        provs = _providers(grecs)
        cases = list(dict.fromkeys(r["case"] for r in grecs))
        by = {(r["case"], r["provider"]): r["extra_info"] for r in grecs}
        out += [f"## {GROUP_TITLES.get(g, g)}" if not compact else f"[{g}]", ""]
        ours = [p for p in provs if is_fastres(p)]
        vs_best = bool(ours) and any(not is_fastres(p) and p != "eager" for p in provs)
        extra = [f"{p} vs best peer" for p in ours] if vs_best else []
        out.append("| case | " + " | ".join(provs + extra) + " |")
        out.append("|---|" + "---:|" * len(provs + extra))
        for c in cases:
            base = (by.get((c, "eager")) or {}).get("p50_ms")
            cells = []
            for p in provs:
                info = by.get((c, p)) or {}
                t = info.get("p50_ms")
                cell = _ms(t)
                if t and base and p != "eager":
                    cell += f" ({base / t:.2f}x)"
                cells.append(cell)
            if vs_best:  # best peer p50 / fastres p50: above 1, fastres is ahead of every peer
                name, bt = best_peer(by, c, provs)
                for p in ours:
                    t = (by.get((c, p)) or {}).get("p50_ms")
                    cells.append(f"{bt / t:.2f}x vs {name}" if t and bt else "")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("")
        if not compact:
            out.append("Throughput, p50: TFLOP/s / GB/s against the bytes floor; p20-p80 ms")
            out.append("")
            out.append("| case | " + " | ".join(provs) + " |")
            out.append("|---|" + "---:|" * len(provs))
            for c in cases:
                cells = []
                for p in provs:
                    info = by.get((c, p)) or {}
                    if info.get("tflops") is None:
                        cells.append("")
                        continue
                    cells.append(f"{info['tflops']:.2f} / {info['gbps']:.1f}; "
                                 f"{_ms(info.get('p20_ms'))}-{_ms(info.get('p80_ms'))}")
                out.append(f"| {c} | " + " | ".join(cells) + " |")
            out.append("")
        mem = [r for r in grecs if r["extra_info"].get("saved_bytes") is not None
               or r["extra_info"].get("peak_mem_bytes") is not None]
        if mem:
            out.append("Memory, MiB: saved for backward (train) / peak above resident (CUDA)")
            out.append("")
            out.append("| case | " + " | ".join(provs) + " |")
            out.append("|---|" + "---:|" * len(provs))
            for c in cases:
                cells = []
                for p in provs:
                    info = by.get((c, p)) or {}
                    s, pk = info.get("saved_bytes"), info.get("peak_mem_bytes")
                    cells.append("" if s is None and pk is None else
                                 f"{_mb(s) or '-'} / {_mb(pk) or '-'}")
                if any(cells):
                    out.append(f"| {c} | " + " | ".join(cells) + " |")
            out.append("")
    if not recs:
        out.append("(no measured cases)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a --bench-out file or a pytest-benchmark --benchmark-json file")
    ap.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    ap.add_argument("--compact", action="store_true", help="times and ratios only")
    args = ap.parse_args(argv)
    text = render(load(args.json), compact=args.compact) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
