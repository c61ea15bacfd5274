"""ResNet-50's blocks, provider by provider, every timing with its kind named.

    python -P bench/gpu_timing.py [--batch 32 256] [--modes eval train] [--dtype bf16]
        [--blocks quick|all] [--providers torchvision,fastres-cuda,...] [--budget-s 120]
        [--json OUT.json] [--markdown OUT.md]

Per block (the harness's cases, fastres.harness.cases), batch, mode (eval forward; train forward
and backward) and provider, the project's one timer (fastres.harness.timer) measures per call:

* ``device``: GPU kernel time summed from CUPTI (on a CPU: the profiler's op time, its stand-in);
* ``host``: host time until the call returns, no synchronisation;
* ``eager``: eager wall time (the call and a synchronisation);
* ``graph``: CUDA-graph replay wall time of the call captured with ``torch.cuda.graph`` (on a CPU:
  the fake graph, the callable re-run), for the providers that can be captured.

Providers: ``torchvision`` (eager; its graph column is torchvision + CUDA graphs),
``compile-default``, ``compile-max-autotune``, ``compile-reduce-overhead`` (torch.compile of the
torchvision block), ``fastres-<backend>`` (fastres.convert, the backend forced; its graph column is
fastres + CUDA graphs) and ``fastres-<backend>+compile`` (torch.compile of the converted block,
default mode). Backends: cuda and triton on a GPU, cpu on a CPU. A provider that cannot run here is
a row with its reason (the max-autotune and reduce-overhead modes need a GPU). The L2 is flushed
between timed calls the same way for all. Before timing, each provider's output is judged against
the float64 torchvision block by the tolerance rule (fastres.harness.rule), torchvision at the same
dtype the yardstick; a failing provider is reported, not timed.

The JSON is rewritten after every row, so a run cut short (``--budget-s``, a timeout) keeps what
was measured; rows past the budget are written as skipped with that reason.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also under python -P
import benchlib as B  # noqa: E402

from fastres.harness import rule, timer  # noqa: E402
from fastres.harness.cases import (
    DTYPES,
    BlockCase,
    build_torchvision_block,
    distinct_blocks,
    quick_subset,
)
from fastres.harness.run import forced_backend  # noqa: E402

COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")
GPU_ONLY_MODES = {
    "max-autotune": "needs a GPU: max-autotune tunes GPU kernel templates",
    "reduce-overhead": "needs a GPU: reduce-overhead is torch.compile with CUDA graphs",
}


@dataclass(frozen=True)
class Provider:
    name: str
    kinds: tuple[str, ...]
    backend: str | None = None  # the fastres backend forced, None for torchvision
    compile_mode: str | None = None


def providers(device: torch.device) -> list[Provider]:
    """Every provider of the table on ``device``, in table order."""
    out = [Provider("torchvision", timer.KINDS)]
    out += [Provider(f"compile-{m}", ("device", "host", "eager"), compile_mode=m)
            for m in COMPILE_MODES]
    for b in (("cuda", "triton") if device.type == "cuda" else ("cpu",)):
        out.append(Provider(f"fastres-{b}", timer.KINDS, backend=b))
        out.append(Provider(f"fastres-{b}+compile", ("device", "host", "eager"), backend=b,
                            compile_mode="default"))
    return out


def skip_reason(p: Provider, device: torch.device) -> str | None:
    """Why ``p`` cannot run on ``device`` here, or None."""
    if p.compile_mode in GPU_ONLY_MODES and device.type != "cuda":
        return GPU_ONLY_MODES[p.compile_mode]
    if p.backend is not None:
        from fastres import backends  # noqa: PLC0415

        why = backends.available().get(p.backend, f"no backend {p.backend!r}")
        if why is not None:
            return f"fastres-{p.backend}: {why}"
    return None


def build(p: Provider, tv: torch.nn.Module) -> torch.nn.Module:
    """The module ``p`` runs, made from a copy of the torchvision block ``tv``."""
    import fastres  # noqa: PLC0415

    m = copy.deepcopy(tv)
    if p.backend is not None:
        m = fastres.convert(m)
    if p.compile_mode is not None:
        torch._dynamo.reset()  # a fresh cache per provider: no recompile limit across cases
        m = torch.compile(m, mode=None if p.compile_mode == "default" else p.compile_mode)
    return m


# --------------------------------------------------------------------------------------------
# One case.


def _inputs(case: BlockCase, n: int, dtype: torch.dtype, device: torch.device, out_shape):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, case.inplanes, case.height, case.width, generator=g)
    go = torch.randn(out_shape, generator=g)
    cl = torch.channels_last
    return (x.to(dtype).to(device).contiguous(memory_format=cl),
            go.to(dtype).to(device).contiguous(memory_format=cl))


def _step(m: torch.nn.Module, x: torch.Tensor, go: torch.Tensor, train: bool
          ) -> Callable[[], torch.Tensor]:
    """One call: eval forward, or train forward + backward; returns the output (detached)."""
    if not train:
        def call():
            with torch.no_grad():
                return m(x)
        return call
    xr = x.detach().requires_grad_(True)

    def call():
        y = m(xr)
        y.backward(go)
        return y.detach()
    return call


def run_case(case: BlockCase, n: int, mode: str, dtype: torch.dtype, device: torch.device,
             provs: list[Provider], repeats: int, warmup: int,
             emit: Callable[[dict], None]) -> list[dict]:
    """Every provider of one (block, batch, mode): a row each, emitted as it is done."""
    train = mode == "train"
    tv = build_torchvision_block(case, seed=1).to(device=device, dtype=dtype)
    tv = tv.to(memory_format=torch.channels_last).train(train)
    ref = copy.deepcopy(tv).double().train(train)
    with torch.no_grad():
        out_shape = copy.deepcopy(tv).eval()(torch.zeros(
            1, case.inplanes, case.height, case.width, device=device, dtype=dtype)).shape[1:]
    x, go = _inputs(case, n, dtype, device, (n, *out_shape))
    with torch.no_grad():
        want = ref(x.double())
        theirs = copy.deepcopy(tv)(x)

    def check(out):
        return rule.verdict("output", out, theirs, want, dtype)

    rows = []
    base = {"block": case.label, "batch": n, "mode": mode,
            "dtype": {v: k for k, v in DTYPES.items()}[dtype], "device": str(device)}
    for p in provs:
        row = {**base, "provider": p.name, "kinds": list(p.kinds), "status": "ok",
               "reason": None, "times": {}, "check": None, "errors": {}}
        why = skip_reason(p, device)
        if why:
            row.update(status="skipped", reason=why)
        else:
            try:
                m = build(p, tv)
                with forced_backend(p.backend):
                    r = timer.measure(_step(m, x, go, train), device, kinds=p.kinds,
                                      warmup=warmup + (2 if p.compile_mode else 0),
                                      repeats=repeats, check=check)
                row["times"] = {k: r[k] for k in p.kinds if k in r}
                row["check"] = r["check"][0] if r["check"] else None
                row["errors"] = r["errors"]
                row["flush_bytes"] = r["flush_bytes"]
                row["top_kernels"] = dict(sorted(r["kernels"].items(),
                                                 key=lambda kv: -kv[1])[:8])
            except timer.CheckFailed as exc:
                row.update(status="FAIL", reason=str(exc)[:300])
            except Exception as exc:  # noqa: BLE001 - one provider's error is its row
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        emit(row)
    return rows


# --------------------------------------------------------------------------------------------
# The table.


def _cell(row: dict, kind: str) -> str:
    t = row["times"].get(kind)
    if t:
        return f"{t['p50']:.3f}"
    return "n/a" if kind not in row["kinds"] or kind not in row["errors"] else "err"


def render(doc: dict) -> str:
    """Markdown: the kinds in words, then one row per case and provider; ``tv/this`` is
    torchvision's device time over the provider's (above 1: faster kernels)."""
    dev = torch.device("cuda" if doc["env"].get("gpu") else "cpu")
    lines = [f"# ResNet-50 blocks by provider: {doc['env'].get('gpu') or doc['env'].get('cpu')}",
             "", f"commit {doc['env'].get('commit')}, torch {doc['env'].get('torch')}, "
             f"triton {doc['env'].get('triton')}; medians of {doc['meta']['repeats']} calls, "
             "L2 flushed between calls.", ""]
    lines += [f"* `{timer.column(k, dev)}`: {timer.kind_label(k, dev)}" for k in timer.KINDS]
    lines += ["", "| block | N | mode | provider | " + " | ".join(
        timer.column(k, dev) for k in timer.KINDS) + " | img/s [device] | tv/this [device] | "
        "check |", "|---" * (len(timer.KINDS) + 7) + "|"]
    tv_dev = {(r["block"], r["batch"], r["mode"]): r["times"]["device"]["p50"]
              for r in doc["rows"] if r["provider"] == "torchvision" and "device" in r["times"]}
    for r in doc["rows"]:
        head = f"| {r['block']} | {r['batch']} | {r['mode']} | {r['provider']} | "
        if r["status"] != "ok":
            lines.append(head + " | ".join("-" for _ in timer.KINDS)
                         + f" | - | - | {r['status']}: {r['reason']} |")
            continue
        d = r["times"].get("device", {}).get("p50")
        tvd = tv_dev.get((r["block"], r["batch"], r["mode"]))
        ips = f"{r['batch'] / (d * 1e-3):,.0f}" if d else "-"
        ratio = f"{tvd / d:.2f}x" if d and tvd else "-"
        chk = (r["check"] or "").split(": ", 1)[-1]
        lines.append(head + " | ".join(_cell(r, k) for k in timer.KINDS)
                     + f" | {ips} | {ratio} | {chk} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256] if gpu else [1])
    ap.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    ap.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=sorted(DTYPES))
    ap.add_argument("--blocks", default="quick", choices=["quick", "all", "first"],
                    help="the 8 ResNet-50 blocks, a covering subset of 4, or the first only")
    ap.add_argument("--image-size", type=int, default=224 if gpu else 64)
    ap.add_argument("--providers", help="comma-separated provider names (default: all)")
    ap.add_argument("--repeats", type=int, default=10 if gpu else 3)
    ap.add_argument("--warmup", type=int, default=3 if gpu else 1)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start a case only while one as long as the longest of its mode so far "
                         "fits in this many seconds (the rest: skipped rows)")
    B.add_output_args(ap)
    a = ap.parse_args(argv)
    if a.from_json:
        B.emit_table(a, render)
        return 0
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from fastres.harness.environment import environment  # noqa: PLC0415

    cases = distinct_blocks("resnet50", a.image_size)
    cases = {"all": cases, "quick": quick_subset(cases), "first": cases[:1]}[a.blocks]
    provs = providers(device)
    if a.providers:
        want = [s.strip() for s in a.providers.split(",")]
        unknown = set(want) - {p.name for p in provs}
        if unknown:
            ap.error(f"unknown providers {sorted(unknown)}: {[p.name for p in provs]}")
        provs = [p for p in provs if p.name in want]
    doc = {"format": "fastres-gpu-timing/1", "env": environment(device),
           "meta": {"repeats": a.repeats, "warmup": a.warmup, "argv": sys.argv[1:],
                    "kinds": {k: timer.kind_label(k, device) for k in timer.KINDS}},
           "rows": []}
    t0 = time.perf_counter()

    def emit(row):
        doc["rows"].append(row)
        t = " ".join(f"{k} {row['times'][k]['p50']:.3f}" for k in timer.KINDS
                     if k in row["times"])
        print(f"{row['block']} N={row['batch']} {row['mode']} {row['provider']}: "
              f"{row['status']} {t or row['reason'] or ''}", flush=True)
        B.write_json(a.json_out, doc)

    dt = DTYPES[a.dtype]
    failed, longest = 0, {}
    for case in cases:  # block by block, each at every batch: a cut-short run has both N
        for n in a.batch:
            for mode in a.modes:
                # A case starts only if one as long as the longest of its mode so far fits
                # (a mode not seen yet: 3x, a training step being about three forwards).
                est = longest.get(mode) or 3 * max(longest.values(), default=0.0)
                if a.budget_s is not None and time.perf_counter() - t0 + est > a.budget_s:
                    for p in provs:
                        emit({"block": case.label, "batch": n, "mode": mode, "provider": p.name,
                              "kinds": list(p.kinds), "status": "skipped", "times": {},
                              "reason": f"out of the time budget ({a.budget_s:.0f} s)",
                              "check": None, "errors": {}})
                    continue
                tc = time.perf_counter()
                rows = run_case(case, n, mode, dt, device, provs, a.repeats, a.warmup, emit)
                longest[mode] = max(longest.get(mode, 0.0), time.perf_counter() - tc)
                failed += sum(r["status"] in ("FAIL", "error") for r in rows)
    B.emit_table(a, render, doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
