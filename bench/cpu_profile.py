"""Where the time goes in one ResNet-50 eval call on the CPU (issue 15, docs/performance.md).

    python bench/cpu_profile.py --provider fastres --dtype bf16 --batch 1
    python bench/cpu_profile.py --provider fastres+compile --dtype fp32 --batch 8 --json out.json
    python bench/cpu_profile.py --provider onnxruntime --batch 1     # ORT's per-node times, fp32

For one warm call (after ``--warmup`` untimed calls) it prints:

* the oneDNN primitives that call executes, from oneDNN's verbose log (``ONEDNN_VERBOSE``
  through ``torch.backends.mkldnn.verbose``): per primitive kind and implementation the number of
  executions and their summed time, the reorders (layout/dtype conversions) and the primitives
  *created* during the call (a warm call should create none: a creation is a primitive-cache miss);
* torch.profiler's per-op table (self CPU time, calls) and the number of ATen ops dispatched,
  so framework overhead per op can be set against the kernels' own time.

``--provider openvino`` prints OpenVINO's executed graph instead, ``--provider onnxruntime`` ONNX
Runtime's kernel time per operator type (its session profiler; median of 5 runs).

Relative numbers only when the machine is shared: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(provider: str, dtype: torch.dtype, batch: int):
    import benchlib as B
    import torchvision

    from fastres.harness.rule import randomise_bn

    torch.manual_seed(0)
    m = randomise_bn(torchvision.models.resnet50(), 1).eval()
    m = B.place(m, torch.device("cpu"), dtype, True)
    x = B.randn((batch, 3, 224, 224), torch.device("cpu"), dtype, True, seed=10)
    if provider == "eager":
        return m, x
    if provider.startswith("fastres"):
        import fastres

        m = fastres.convert(copy.deepcopy(m))
    if provider.endswith("compile") or provider == "compile-freezing":
        opts = {"freezing": True} if "freezing" in provider else None
        m = torch.compile(m, options=opts, dynamic=False)
    return m, x


def onednn_log(fn) -> list[str]:
    """oneDNN's verbose lines printed (to the C stdout) while ``fn()`` runs."""
    sys.stdout.flush()
    fd = sys.stdout.fileno()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    return [ln for ln in text.splitlines() if ln.startswith("onednn_verbose")]


def summarise_onednn(lines: list[str]) -> dict:
    """Per (kind, impl, src/dst descs' dtypes): executions and ms; creations; reorders."""
    execs: dict = collections.defaultdict(lambda: [0, 0.0])
    created: collections.Counter = collections.Counter()
    reorders: list[str] = []
    for ln in lines:
        f = ln.split(",")
        # onednn_verbose,[timestamp,]primitive,exec|create:...,cpu,KIND,IMPL,PROP,DESCS,...,ms
        try:
            i = next(k for k, v in enumerate(f) if v == "primitive")
        except StopIteration:
            continue
        stage, kind, impl = f[i + 1], f[i + 3], f[i + 4]
        ms = float(f[-1]) if f[-1].replace(".", "", 1).isdigit() else 0.0
        if stage == "exec":
            e = execs[(kind, impl)]
            e[0] += 1
            e[1] += ms
            if kind == "reorder":
                reorders.append(",".join(f[i + 4:i + 7]) + f" {ms:.3f} ms")
        elif stage.startswith("create"):
            created[(kind, impl, stage)] += 1
    return {"exec": {f"{k} {impl}": {"n": n, "ms": round(t, 3)}
                     for (k, impl), (n, t) in sorted(execs.items(), key=lambda kv: -kv[1][1])},
            "created": {" ".join(k): n for k, n in created.items()},
            "reorders": reorders,
            "exec_total": sum(n for n, _ in execs.values()),
            "exec_ms": round(sum(t for _, t in execs.values()), 3)}


def profile_ops(fn, top: int) -> tuple[str, int, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ka = prof.key_averages()
    n_ops = sum(e.count for e in ka if e.key.startswith(("aten::", "fastres", "mkldnn::")))
    table = ka.table(sort_by="self_cpu_time_total", row_limit=top)
    total_ms = sum(e.self_cpu_time_total for e in ka) / 1e3
    return table, n_ops, total_ms


def openvino_exec_graph(dtype: torch.dtype, batch: int, threads: int) -> dict:
    """OpenVINO's executed graph of the same ResNet-50 (compiled_model.get_runtime_model()):
    per (layer type, runtime precision, primitive) the number of nodes, and which original
    layers each fused node absorbed (what OpenVINO fuses that fastres does not)."""
    import peers as P

    m, x = build("eager", torch.float32, batch)
    os.environ.setdefault("FASTRES_BENCH_THREADS", str(threads))
    eng = P.build("openvino", m, x, dtype, True)
    rt = eng.compiled_model.get_runtime_model()
    kinds: collections.Counter = collections.Counter()
    fused: collections.Counter = collections.Counter()
    for op in rt.get_ordered_ops():
        info = op.get_rt_info()

        def get(k):
            return str(info[k].astype(str)) if k in info else "?"

        kinds[(get("layerType"), get("runtimePrecision"), get("primitiveType"))] += 1
        names = get("originalLayersNames").split(",")
        if get("layerType") == "Convolution":
            fused[len(names)] += 1
    return {"nodes": {" | ".join(k): n for k, n in kinds.most_common()},
            "conv_nodes_by_number_of_original_layers": dict(fused), **eng.info}


def onnxruntime_nodes(batch: int, threads: int, warmup: int, runs: int = 5) -> dict:
    """ONNX Runtime's per-node kernel times (its session profiler), fp32: for each of the last
    ``runs`` runs the summed time per operator type; the median run's sums are returned with
    its total, to set beside oneDNN's per-convolution sums of the other providers."""
    import onnxruntime as ort
    import peers as P

    m, x = build("eager", torch.float32, batch)
    os.environ.setdefault("FASTRES_BENCH_THREADS", str(threads))
    eng = P.build("onnxruntime", m, x, torch.float32, False)
    path = eng.model_path
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="fastres-ortprof-")) / "p")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.float().contiguous().numpy()}
    for _ in range(warmup + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = [e for e in events if e.get("name") == "model_run"][-runs:]
    per_run = []
    for r in model_runs:
        t0, t1 = r["ts"], r["ts"] + r["dur"]
        ops: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and t0 <= e["ts"] <= t1:
                ops[e["args"].get("op_name", "?")] += e["dur"] / 1e3
        per_run.append((r["dur"] / 1e3, ops))
    per_run.sort(key=lambda t: t[0])
    run_ms, ops = per_run[len(per_run) // 2]
    return {"run_ms": round(run_ms, 3), "ops_ms": {k: round(v, 3) for k, v in ops.most_common()},
            "runs_ms": [round(t, 3) for t, _ in per_run], "ort_version": ort.__version__}


def peak_rates(threads: int, reps: int = 5) -> dict:
    """This CPU's attainable rates for the floor: best-of-``reps`` torch.mm GFLOP/s (fp32,
    bf16; oneDNN/MKL with AVX-512 or AMX) at 2048^3, and copy bandwidth GB/s (read + write of a
    256 MiB tensor). Meaningful only on an idle machine."""
    torch.set_num_threads(threads)
    out = {}
    n = 2048
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
        out[f"mm_{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
    src = torch.randn(64 << 20)  # 256 MiB of fp32
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
    out["copy_gbps"] = round(2 * src.numel() * 4 / best / 1e9, 1)
    out["loadavg_1min"] = os.getloadavg()[0]
    return out


def _timed(fn) -> float:
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="fastres",
                    choices=["eager", "fastres", "fastres+compile", "compile",
                             "compile-freezing", "openvino", "onnxruntime"])
    ap.add_argument("--peak", action="store_true",
                    help="only measure the matmul (fp32, bf16) and copy rates of the floor")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.peak:
        print(json.dumps(peak_rates(args.threads), indent=1))
        return 0
    if args.provider == "openvino":
        g = openvino_exec_graph(dtype, args.batch, args.threads)
        print(f"# OpenVINO executed graph, ResNet-50 {args.dtype} N={args.batch}")
        print(json.dumps(g, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(g, indent=1))
        return 0
    if args.provider == "onnxruntime":
        if dtype != torch.float32:
            ap.error("onnxruntime: fp32 only (its CPU execution provider has no bf16 convolution)")
        g = onnxruntime_nodes(args.batch, args.threads, args.warmup)
        print(f"# ONNX Runtime node times (session profiler), ResNet-50 fp32 N={args.batch}, "
              f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
        print(json.dumps(g, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(g, indent=1))
        return 0
    m, x = build(args.provider, dtype, args.batch)

    def call():
        with torch.no_grad():
            m(x)

    for _ in range(args.warmup):
        call()
    load = os.getloadavg()[0]
    dnn = summarise_onednn(onednn_log(call))
    table, n_ops, prof_ms = profile_ops(call, args.top)
    print(f"# {args.provider} ResNet-50 eval {args.dtype} N={args.batch}, {args.threads} "
          f"threads, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"oneDNN: {dnn['exec_total']} primitive executions, {dnn['exec_ms']} ms summed")
    for k, v in dnn["exec"].items():
        print(f"  {v['n']:4d} x {k}: {v['ms']:.3f} ms")
    print(f"oneDNN primitives created during the warm call: {sum(dnn['created'].values())}")
    for k, n in dnn["created"].items():
        print(f"  {n:4d} x {k}")
    print(f"reorders executed: {len(dnn['reorders'])}")
    for r in dnn["reorders"][:20]:
        print(f"  {r}")
    print(f"torch.profiler: {n_ops} aten/fastres/mkldnn op calls, {prof_ms:.1f} ms self CPU "
          "summed (profiler overhead included)")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load": load, "onednn": dnn,
                                               "n_ops": n_ops}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
