"""The parity report: one line per result, the summary, markdown and a plot."""


from __future__ import annotations

import math

from fastres.harness.environment import hardware_line

# --------------------------------------------------------------------------------------------
# Reporting.

HEAD = (f"{'block':44s} {'dtype':5s} {'mode':5s} {'backend':9s} {'worst check':28s} "
         f"{'err':>9s} {'torch':>9s} {'bound':>9s} {'':4s} {'fused ms':>9s} {'tv ms':>9s} "
         f"{'tv/fused':>8s}")


def _g(v: float | None, fmt: str = ".2e") -> str:
    return "-" if v is None else format(v, fmt)


def row_line(r: dict) -> str:
    if r["status"] in ("error", "skipped"):
        mark = "ERR" if r["status"] == "error" else "skip"
        msg = r["error"] or ""
        msg = msg if len(msg) <= 110 else msg[:107] + "..."
        return (f"{r['block']:44s} {r['dtype']:5s} {r['mode']:5s} {r['backend']:9s} "
                f"{mark}: {msg}")
    w = r["worst"] or {}
    mark = "ok" if r["status"] == "pass" else "FAIL"
    sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
    line = (f"{r['block']:44s} {r['dtype']:5s} {r['mode']:5s} {r['backend']:9s} "
            f"{w.get('name', '-'):28.28s} {_g(w.get('err')):>9s} {_g(w.get('torch_err')):>9s} "
            f"{_g(w.get('bound')):>9s} {mark:4s} {_g(r['time_fused_ms'], '.3f'):>9s} "
            f"{_g(r['time_torchvision_ms'], '.3f'):>9s} {sp:>8s}")
    if r["status"] == "fail":
        bad = [c for c in r["checks"] if not c["ok"]]
        rms = (r.get("diagnostics") or {}).get("rms", {})
        for c in bad:
            line += (f"\n    FAIL {c['name']}: err {c['err']:.3g} > bound {c['bound']:.3g} "
                     f"(PyTorch {c['torch_err']:.3g})")
            if c["name"] in rms:
                line += (f"; rms {rms[c['name']]['fastres']:.3g} vs PyTorch "
                         f"{rms[c['name']]['torch']:.3g}")
        fl = (r.get("diagnostics") or {}).get("relu_flips")
        if fl:
            line += (f"\n    output ReLU decisions differing from float64: fastres "
                     f"{fl['fastres']}, PyTorch {fl['torch']} (of {fl['elements']})")
        fi = (r.get("diagnostics") or {}).get("inner_relu_flips")
        if fi:
            line += (f"\n    inner ReLU decisions differing from float64: fastres "
                     f"{fi['fastres']}, PyTorch {fi['torch']} (of {fi['elements']})")
    return line


def summarise(results: list[dict]) -> dict:
    s = {k: sum(r["status"] == k for r in results) for k in ("pass", "fail", "error", "skipped")}
    s["cases"] = len(results)
    s["ok"] = s["fail"] == 0 and s["error"] == 0 and s["pass"] > 0
    return s


def to_markdown(report: dict) -> str:
    meta, env = report["meta"], report["env"]
    lines = [
        f"# fastres parity: {meta['model']} blocks on {env['gpu'] or env['cpu']}",
        "",
        f"- hardware: {hardware_line(env)}",
        f"- device {meta['device']}, batch {meta['batch']}, {meta['layout']}, dtypes "
        f"{', '.join(meta['dtypes'])}, modes {', '.join(meta['modes'])}; "
        + (f"timing: median, {meta['timer']}" if meta.get("timing", True) else "no timing"),
        f"- backends run: {', '.join(meta['backends']) or 'none'}"
        + "".join(f"; {n} skipped: {why}" for n, why in meta["skipped_backends"].items()),
        f"- rule: err(fastres) <= 2 * err(PyTorch at the dtype) + atol[dtype], errors are max "
        f"|x - float64 reference| of the worst check (of {meta['checks_per_case']})",
        f"- result: {report['summary']['pass']} pass, {report['summary']['fail']} fail, "
        f"{report['summary']['error']} error, {report['summary']['skipped']} skipped "
        f"({report['summary']['duration_s']:.0f} s)"
        + (" -- PARTIAL: the run was cut short" if report["summary"].get("partial") else ""),
        "",
        "| block | dtype | mode | backend | worst check | err | PyTorch err | bound | ok | "
        "fused ms | torchvision ms | tv/fused |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in report["cases"]:
        if r["status"] in ("error", "skipped"):
            err = (r["error"] or "").replace("|", "\\|")
            lines.append(f"| {r['block']} | {r['dtype']} | {r['mode']} | {r['backend']} | "
                         f"{r['status'].upper()}: {err} | | | | "
                         f"{'ERR' if r['status'] == 'error' else 'skip'} | | | |")
            continue
        w = r["worst"] or {}
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['block']} | {r['dtype']} | {r['mode']} | {r['backend']} | {w.get('name', '')} "
            f"| {_g(w.get('err'))} | {_g(w.get('torch_err'))} | {_g(w.get('bound'))} | "
            f"{'ok' if r['status'] == 'pass' else '**FAIL**'} | {_g(r['time_fused_ms'], '.3f')} "
            f"| {_g(r['time_torchvision_ms'], '.3f')} | {sp} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> str | None:
    """Speedup per block and backend, and error against PyTorch's own error. Returns why it was
    not drawn (matplotlib missing), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    rows = [r for r in report["cases"] if r["status"] in ("pass", "fail")]
    series = sorted({(r["backend"], r["dtype"], r["mode"]) for r in rows})
    blocks = list(dict.fromkeys(r["name"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(1, len(series))
    for k, key in enumerate(series):
        ys = []
        for b in blocks:
            hit = [r for r in rows if (r["backend"], r["dtype"], r["mode"]) == key
                   and r["name"] == b and r["speedup"]]
            ys.append(hit[0]["speedup"] if hit else 0.0)
        ax1.bar([i + k * width for i in range(len(blocks))], ys, width, label=" ".join(key))
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(blocks))])
    ax1.set_xticklabels(blocks, rotation=30, ha="right")
    ax1.set_ylabel("speedup (torchvision time / fused time)")
    ax1.set_title("speed: > 1 means fastres is faster")
    ax1.legend(fontsize=7)
    markers = {"eval": "o", "train": "^"}
    for key in series:
        pts = [(c["torch_err"], c["err"]) for r in rows
               if (r["backend"], r["dtype"], r["mode"]) == key
               for c in r["checks"] if c["bound"] > 0]
        if pts:
            ax2.scatter([max(p[0], 1e-12) for p in pts], [max(p[1], 1e-12) for p in pts], s=10,
                        marker=markers.get(key[2], "o"), label=" ".join(key))
    allv = [max(v, 1e-12) for r in rows for c in r["checks"] if c["bound"] > 0
            for v in (c["err"], c["torch_err"]) if math.isfinite(v)] or [1e-12, 1.0]
    lo, hi = math.floor(math.log10(min(allv))), math.ceil(math.log10(max(allv)))
    xs = [10 ** e for e in range(lo, hi + 1)]
    ax2.plot(xs, [2 * v for v in xs], "k--", lw=0.8, label="err = 2 x PyTorch err")
    ax2.plot(xs, xs, "k:", lw=0.8, label="err = PyTorch err")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("PyTorch error vs float64 (max abs)")
    ax2.set_ylabel("fastres error vs float64 (max abs)")
    ax2.set_title("accuracy: every check (output, grads, running stats)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"fastres parity, {report['meta']['model']}: {hardware_line(report['env'])}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
