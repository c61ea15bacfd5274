"""The degradation problem (He et al. 2015, Sec. 4.2, Fig. 6) on real data, fused vs eager.

    python -m fastres.experiments.degradation              # the committed run (docs/degradation/)
    python -m fastres.experiments.degradation --quick      # a smoke run into a temporary folder

Trains plain-20, plain-56, ResNet-20 and ResNet-56 (option A) on scikit-learn's digits (1,797
real 8x8 grey-scale handwritten digits, shipped with scikit-learn: no download) twice each: with
the fastres blocks (the backend the dispatcher picks, or FASTRES_BACKEND) and with the eager
plain-PyTorch twin (``fastres.models.cifar_resnet(..., fused=False)``). Both start from the same
weights and see the same mini-batches in the same order; they step in lock step, so the per-
iteration loss difference is measured directly and both feel the same machine load.

Yardstick for "agree within numerics": a third run, the eager twin in channels_last, computes
the same mathematics with another summation order (oneDNN picks other convolution kernels). How
far it drifts from the contiguous eager run is how far two correct float32 implementations drift
on this problem; the fused run should drift no further. Trajectories of a deep network at this
learning rate are chaotic: a difference in the last bit grows to O(1) in tens of iterations.

So the numerics are also checked with the same weights: at a few iterations (``--checks``), the
eager twin's current weights and BN statistics are copied into a fused float32, an eager float32
and an eager float64 model, which compute the training loss and gradients of that iteration's
mini-batch. The loss is judged by the tolerance rule (fastres.harness.rule); the gradients' largest
error relative to the largest gradient is reported for both float32 runs (a ReLU decision within
rounding of zero can flip in either run and move a gradient by its whole value).

Data: the 8x8 images are kept at 8x8. The three stages then run at 8x8, 4x4 and 2x2, the paper's
CIFAR layout (32, 16, 8) scaled by 1/4; upsampling to 16x16 adds no information, costs 4x the
compute and would not fit the few-minute budget of 2 CPU cores. Pixels are scaled to [0, 1] and
the per-pixel training mean is subtracted (the paper's preprocessing); no augmentation (flips do
not preserve digits). Fixed stratified split: 1,297 training and 500 test images (seed 0).

Training as in the paper: SGD, momentum 0.9, weight decay 1e-4, He initialisation, BatchNorm
after every convolution, the learning rate divided by 10 at 50% and 75% of the iterations;
mini-batches of 64 (the paper: 128 of CIFAR's 50k images; 64 of our 1,297 gives 20 iterations an
epoch and halves the step time) and so a learning rate of 0.05 (the paper's 0.1 scaled linearly
with the batch; at 0.1, measured here, plain-56 does not leave 79% training error in 300
iterations and ResNet-56's loss spikes to 19 in the first 30). Training error (dashed) is the
mean mini-batch error over each evaluation interval (train-mode BN, as the paper's curves); test
error (bold) is measured in eval mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastres
from fastres import backends, models
from fastres.harness.environment import commit
from fastres.harness.rule import verdict

NETS = (  # (name, depth, plain)
    ("plain-20", 20, True),
    ("plain-56", 56, True),
    ("ResNet-20", 20, False),
    ("ResNet-56", 56, False),
)
COLORS = {20: "tab:orange", 56: "tab:red"}


# --------------------------------------------------------------------------------------------
# Data


def load_digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): (N, 1, 8, 8) float32 and int64, 1,297 / 500 images."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(
        x, digits.target, test_size=500, stratify=digits.target, random_state=seed
    )
    mean = xtr.mean(axis=0, keepdims=True)  # per-pixel mean of the training set
    xtr, xte = xtr - mean, xte - mean
    return (
        torch.from_numpy(xtr).unsqueeze(1),
        torch.from_numpy(ytr).long(),
        torch.from_numpy(xte).unsqueeze(1),
        torch.from_numpy(yte).long(),
    )


def batch_order(n: int, batch: int, iters: int, seed: int) -> list[Tensor]:
    """The mini-batch indices of every iteration: reshuffled each epoch, last partial batch
    dropped, from a seeded generator (the same order for every run)."""
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    while len(out) < iters:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i : i + batch] for i in range(0, n - batch + 1, batch))
    return out[:iters]


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class Run:
    name: str
    model: nn.Module
    channels_last: bool = False
    opt: torch.optim.Optimizer | None = None
    losses: list[float] = field(default_factory=list)
    batch_errors: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    eval_iters: list[int] = field(default_factory=list)
    train_err: list[float] = field(default_factory=list)  # mean mini-batch error per interval
    test_err: list[float] = field(default_factory=list)
    final: dict = field(default_factory=dict)

    def prep(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, x: Tensor, y: Tensor, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(self.prep(x))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        self.step_s.append(time.perf_counter() - t0)
        self.losses.append(loss.item())
        self.batch_errors.append((logits.argmax(1) != y).float().mean().item())

    @torch.no_grad()
    def error(self, x: Tensor, y: Tensor) -> float:
        self.model.eval()
        wrong = sum(
            (self.model(self.prep(x[i : i + 500])).argmax(1) != y[i : i + 500]).sum().item()
            for i in range(0, len(x), 500)
        )
        self.model.train()
        return wrong / len(x)


def same_weights_check(fused: nn.Module, eager: nn.Module, x: Tensor, y: Tensor) -> dict:
    """Loss and gradients of one mini-batch from the eager model's current state, computed by a
    fused float32, an eager float32 and an eager float64 copy (the models are not touched)."""
    state = eager.state_dict()
    ours = copy.deepcopy(fused)
    ours.load_state_dict(state)
    runs = {"fused": (ours, x), "eager": (copy.deepcopy(eager), x),
            "float64": (copy.deepcopy(eager).double(), x.double())}
    got = {}
    for name, (m, xx) in runs.items():
        m.train()
        loss = F.cross_entropy(m(xx), y)
        loss.backward()
        got[name] = (loss.detach(), [p.grad for p in m.parameters()])
    ref_loss, ref_grads = got["float64"]
    gmax = max(g.abs().max().item() for g in ref_grads)
    v = verdict("loss", got["fused"][0], got["eager"][0], ref_loss, torch.float32)
    out = {"loss": ref_loss.item(), "loss_err_fused": v.err, "loss_err_eager": v.torch_err,
           "loss_ok": v.ok}
    for name in ("fused", "eager"):
        pairs = zip(got[name][1], ref_grads, strict=True)
        err = max((g.double() - r).abs().max().item() for g, r in pairs)
        out[f"grad_rel_err_{name}"] = err / gmax
    return out


def lr_at(it: int, iters: int, lr: float) -> float:
    """The paper's schedule: divide by 10 at 50% and 75% of training (32k and 48k of 64k)."""
    return lr * (0.1 if it >= iters // 2 else 1.0) * (0.1 if it >= 3 * iters // 4 else 1.0)


def train_network(name: str, depth: int, plain: bool, data, args, progress: bool) -> list[Run]:
    from tqdm import tqdm  # noqa: PLC0415

    xtr, ytr, xte, yte = data
    torch.manual_seed(args.seed)
    eager = models.cifar_resnet(depth, plain=plain, num_classes=10, in_channels=1, fused=False)
    fused = models.cifar_resnet(depth, plain=plain, num_classes=10, in_channels=1, fused=True)
    fused.load_state_dict(eager.state_dict(), strict=True)
    runs = [Run("fused", fused), Run("eager", eager)]
    if args.yardstick:
        twin = copy.deepcopy(eager).to(memory_format=torch.channels_last)
        runs.append(Run("eager-nhwc", twin, channels_last=True))
    for r in runs:
        r.model.train()
        r.opt = torch.optim.SGD(r.model.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    order = batch_order(len(xtr), args.batch_size, args.iters, args.seed)
    check_at = set(np.linspace(0, args.iters - 1, args.checks).round().astype(int).tolist())
    checks = []
    last_eval = 0
    bar = tqdm(total=args.iters, desc=f"{name:>9}", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for it, idx in enumerate(order):
        x, y = xtr[idx], ytr[idx]
        lr = lr_at(it, args.iters, args.lr)
        if it in check_at:
            checks.append({"iter": it, **same_weights_check(fused, eager, x, y)})
        for r in runs:
            r.step(x, y, lr)
        done = it + 1
        if done % args.eval_every == 0 or done == args.iters:
            for r in runs:
                r.eval_iters.append(done)
                r.train_err.append(statistics.fmean(r.batch_errors[last_eval:done]))
                r.test_err.append(r.error(xte, yte))
            last_eval = done
            bar.set_postfix(loss=f"{runs[0].losses[-1]:.3f}",
                            test_err=f"{100 * runs[0].test_err[-1]:.1f}%")
        bar.update(1)
    bar.close()
    for r in runs:
        r.final = {
            "train_error": r.error(xtr, ytr),
            "test_error": r.test_err[-1],
            "train_wall_s": sum(r.step_s),
            "median_step_ms": 1e3 * statistics.median(r.step_s),
        }
    return runs, checks


def max_loss_diff(a: Run, b: Run, upto: int | None = None) -> float:
    la, lb = np.asarray(a.losses[:upto]), np.asarray(b.losses[:upto])
    return float(np.abs(la - lb).max())


# --------------------------------------------------------------------------------------------
# Reporting


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "fastres": fastres.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        info["cpus"] = fields.get("CPU(s)", "?").strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        info["cpu"] = f"lscpu failed: {exc}"
    sha, dirty = commit()  # FASTRES_COMMIT, set by the project's scripts
    info["commit"] = None if sha == "unknown" else sha[:12] + ("+dirty" if dirty else "")
    return info


def fused_backend(data) -> str:
    x = data[0][:2]
    conv = models.cifar_resnet(20, in_channels=1).stem[0]
    name = backends.select(backends.Inputs.of(x, conv)).name
    return name + (" (forced by FASTRES_BACKEND)" if backends.forced() else "")


def plot(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, plain, title in ((axes[0], True, "plain"), (axes[1], False, "ResNet (option A)")):
        for name, depth, is_plain in NETS:
            if is_plain != plain or name not in results:
                continue
            runs = results[name]["runs"]
            c = COLORS[depth]
            f, e = runs["fused"], runs["eager"]
            ax.plot(f["eval_iters"], [100 * v for v in f["train_err"]], "--", color=c, lw=1.0)
            ax.plot(f["eval_iters"], [100 * v for v in f["test_err"]], "-", color=c, lw=2.4,
                    label=f"{name}")
            ax.plot(e["eval_iters"], [100 * v for v in e["test_err"]], "x", color="k", ms=3.5,
                    mew=0.8)
        ax.set_title(title)
        ax.set_xlabel("iter.")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    axes[0].set_ylabel("error (%)")
    top = max(
        100 * max(max(r["runs"]["fused"]["test_err"][1:] or [0]),
                  max(r["runs"]["fused"]["train_err"][1:] or [0]))
        for r in results.values()
    )
    axes[0].set_ylim(0, min(100, max(5.0, 1.15 * top)))
    fig.suptitle("digits (8x8), fastres fused: dashed = training error, bold = test error; "
                 "x = eager PyTorch test error", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        "# Degradation experiment: results",
        "",
        f"Measured on {m['cpu']} ({m['cpus']} CPUs, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, fastres {m['fastres']} (commit {m.get('commit')}), fused backend: "
        f"`{report['fused_backend']}`. Load average at start / end: "
        f"{report['loadavg_start']} / {report['loadavg_end']} (a shared machine: wall times "
        "are lock-step, so fused and eager feel the same load).",
        "",
        f"{cfg['iters']} iterations, batch {cfg['batch_size']}, SGD momentum 0.9, weight decay "
        f"{cfg['weight_decay']}, lr {cfg['lr']} (/10 at 50% and 75%), seed {cfg['seed']}; "
        f"digits 8x8, {cfg['n_train']} train / {cfg['n_test']} test images. Total wall time "
        f"{report['total_wall_s']:.0f} s.",
        "",
        "| network | backend | final train error | final test error | train wall time (s) "
        "| median ms / iter |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, res in report["results"].items():
        for rname, r in res["runs"].items():
            fin = r["final"]
            lines.append(
                f"| {name} | {rname} | {100 * fin['train_error']:.2f}% | "
                f"{100 * fin['test_error']:.2f}% | {fin['train_wall_s']:.1f} | "
                f"{fin['median_step_ms']:.1f} |"
            )
    lines += [
        "",
        "Train error here: eval mode on the whole training set after the last iteration.",
        "",
        "Numerics, same weights: at each check the eager twin's current state is copied into "
        "a fused float32, an eager float32 and an eager float64 model, which compute that "
        "iteration's training loss and gradients. Loss: largest |error| vs float64 (fused / "
        "eager) and the tolerance rule; gradients: largest |error| over all parameters "
        "relative to the largest gradient.",
        "",
        "| network | checks (iterations) | loss err fused / eager | loss rule | "
        "grad rel. err fused / eager |",
        "|---|---|---:|---:|---:|",
    ]
    for name, res in report["results"].items():
        ch = res["same_weights"]
        if not ch:
            continue
        its = ", ".join(str(c["iter"]) for c in ch)
        lf = max(c["loss_err_fused"] for c in ch)
        le = max(c["loss_err_eager"] for c in ch)
        ok = sum(c["loss_ok"] for c in ch)
        gf = max(c["grad_rel_err_fused"] for c in ch)
        ge = max(c["grad_rel_err_eager"] for c in ch)
        lines.append(f"| {name} | {its} | {lf:.2e} / {le:.2e} | {ok}/{len(ch)} pass | "
                     f"{gf:.2e} / {ge:.2e} |")
    lines += [
        "",
        "Trajectories: fused vs eager training loss per iteration, max |difference|, next to the "
        "yardstick (eager channels_last vs eager contiguous: two correct float32 "
        "implementations). Training at this learning rate is chaotic; the drift of the fused "
        "run should match the yardstick's, not be zero.",
        "",
        "| network | fused − eager, first 10 | whole run | yardstick, first 10 | whole run "
        "| wall time fused / eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, res in report["results"].items():
        d = res["loss_diff"]
        fmt = lambda v: "n/a" if v is None else f"{v:.2e}"  # noqa: E731
        lines.append(
            f"| {name} | {fmt(d['first10'])} | {fmt(d['all'])} | "
            f"{fmt(d.get('yardstick_first10'))} | {fmt(d.get('yardstick_all'))} | "
            f"{res['wall_ratio']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default docs/degradation; --quick: a temporary folder)")
    p.add_argument("--iters", type=int, default=None, help="iterations per network (default 300)")
    p.add_argument("--quick", action="store_true", help="40 iterations, into a temporary folder")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 on a busy shared machine, "
                        "where OpenMP barriers of 2 threads make each step 10x slower)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--checks", type=int, default=6,
                   help="same-weights numerics checks per network (fused, eager, float64)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-yardstick", dest="yardstick", action="store_false",
                   help="skip the eager channels_last run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.iters is None:
        args.iters = 40 if args.quick else 300
    if args.eval_every is None:
        args.eval_every = max(1, args.iters // 30)
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "fastres-degradation-quick" if args.quick
                    else Path("docs/degradation"))
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_digits_split(args.seed)
    report = {
        "machine": machine(),
        "fused_backend": fused_backend(data),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"n_train": len(data[0]), "n_test": len(data[2]), "input": "1x8x8"},
        "results": {},
    }
    print(f"fastres degradation: {report['machine']['cpu']}, fused backend "
          f"{report['fused_backend']}, {args.iters} iterations -> {args.out}", file=sys.stderr)
    t0 = time.perf_counter()
    for name, depth, plain in NETS:
        runs, checks = train_network(name, depth, plain, data, args, not args.no_progress)
        by = {r.name: r for r in runs}
        diff = {"first10": max_loss_diff(by["fused"], by["eager"], 10),
                "all": max_loss_diff(by["fused"], by["eager"])}
        if "eager-nhwc" in by:
            diff["yardstick_first10"] = max_loss_diff(by["eager-nhwc"], by["eager"], 10)
            diff["yardstick_all"] = max_loss_diff(by["eager-nhwc"], by["eager"])
        report["results"][name] = {
            "depth": depth,
            "plain": plain,
            "loss_diff": diff,
            "same_weights": checks,
            "wall_ratio": by["fused"].final["train_wall_s"] / by["eager"].final["train_wall_s"],
            "runs": {
                r.name: {
                    "final": r.final,
                    "eval_iters": r.eval_iters,
                    "train_err": r.train_err,
                    "test_err": r.test_err,
                    "losses": r.losses,
                }
                for r in runs
            },
        }
        f = by["fused"].final
        print(f"{name}: train err {100 * f['train_error']:.2f}%, test err "
              f"{100 * f['test_error']:.2f}%, max |loss fused - eager| {diff['all']:.2e}",
              file=sys.stderr)
    report["total_wall_s"] = time.perf_counter() - t0
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    plot(report["results"], args.out / "degradation.png")
    print(f"wrote {args.out}/results.json, results.md, degradation.png "
          f"({report['total_wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
