"""The timm ResNet-family table of docs/integrations.md: what fastres.convert fuses in each model
and its parity with timm's own model.

    python tests/timm_table.py            # print the table (runs every parity check)
    python tests/timm_table.py --write    # and write it into docs/integrations.md

tests/test_timm_table.py runs :func:`parity` per model and checks that the table in the docs is
the one :func:`table` makes. Models are built with ``pretrained=False`` and random BatchNorm
statistics and affine parameters (so that folding is exercised), inputs are small.

Parity, by the tolerance rule of fastres.harness.rule (err(fastres) <= 2 * err(PyTorch at the same
dtype) + atol[dtype], errors against a float64 run of timm's model):

* eval: the output, float32 (N=2, 32x32);
* train, one step (N=4, 48x48: layer4's BatchNorms see 16 values per channel): the output and
  every running statistic in float32; and everything a user keeps -- output, input gradient,
  every parameter gradient, running statistics -- of the converted model run in float64, to
  float64's bar. Float32 gradients of a whole 50-layer network are no yardstick: a ReLU input
  within rounding of zero takes the other branch in one float32 run and not in another, and moves
  the gradients of every layer before it (measured on resnetblur50: timm's own model run in
  channels_last has 11x the median gradient error of its contiguous run). Float32 gradients are
  judged block by block in tests/test_timm.py, where no such cascade exists.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import re
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from integration_helpers import randomise_bn, run_kept  # noqa: E402

import fastres  # noqa: E402
from fastres.harness.rule import verdict  # noqa: E402

#: (family, timm model name)
MODELS = [
    ("resnet", "resnet18"),
    ("resnet", "resnet50"),
    ("resnetd", "resnet50d"),
    ("resnet-t", "resnet26t"),
    ("resnext", "resnext50_32x4d"),
    ("wide", "wide_resnet50_2"),
    ("seresnet", "seresnet50"),
    ("ecaresnet", "ecaresnet50d"),
    ("resnetblur", "resnetblur50"),
    ("resnetv2", "resnetv2_50"),
    ("resnetv2", "resnetv2_50d"),
    ("skresnet", "skresnet18"),
    ("skresnet", "skresnet50"),
    ("resnest", "resnest14d"),
]

DOC = pathlib.Path(__file__).parent.parent / "docs" / "integrations.md"
BEGIN, END = "<!-- timm-table: begin -->", "<!-- timm-table: end -->"


@dataclass
class Row:
    family: str
    name: str
    blocks: tuple[int, int]
    convs: tuple[int, int]
    norms: tuple[int, int]
    left: str  # what stays unfused, in short


def _short(why: str, n: int) -> str:
    m = re.search(r"attention module \((\w+)\)", why)
    if m:
        return f"in {m.group(1).removeprefix('Timm')} (attention): {n}"
    for key, label in (
        ("final pre-activation", "final BN + ReLU"),
        ("pre-activation BatchNorm", "pre-activation BN + ReLU (norm1)"),
        ("pre-activation projection", "projection conv, no BN"),
        ("pre-activation stem", "stem conv, no BN"),
        ("conv with a bias", "classifier conv"),
    ):
        if key in why:
            return f"{label}: {n}"
    return f"{why}: {n}"


def build(name: str):
    import timm

    return randomise_bn(timm.create_model(name, pretrained=False, num_classes=10))


def row(family: str, name: str) -> Row:
    """What convert fuses in ``name`` (no computation)."""
    _, rep = fastres.convert(build(name), report=True)
    if rep.left:
        raise AssertionError(f"{name}: left {rep.left}")
    left = "; ".join(_short(why, len(p)) for why, p in rep.not_fused().items()) or "-"
    return Row(family, name, rep.blocks, rep.convs, rep.norms, left)


def parity(name: str) -> dict[str, list[str]]:
    """The verdicts of the eval and training checks (see the module docstring) that fail, by
    mode: empty lists when the converted model passes."""
    tm = build(name)
    ref = copy.deepcopy(tm).double()
    ours = fastres.convert(copy.deepcopy(tm))
    ours64 = fastres.convert(copy.deepcopy(ref))
    fails: dict[str, list[str]] = {"eval": [], "train": []}

    def judge(mode, k_ours, k_theirs, k_ref, dtype, keys):
        for k in keys:
            if not k_ref[k].is_floating_point():
                if not torch.equal(k_ours[k], k_ref[k]):
                    fails[mode].append(f"{k} ({dtype}): {k_ours[k]} != {k_ref[k]}")
                continue
            v = verdict(f"{k} ({dtype})", k_ours[k], k_theirs[k], k_ref[k], dtype)
            if not v.ok:
                fails[mode].append(str(v))

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        k = [run_kept(m, xx, False) for m, xx in ((ours, x), (tm, x), (ref, x.double()))]
    judge("eval", *k, torch.float32, ["out"])

    x = torch.randn(4, 3, 48, 48)
    k_ref = run_kept(ref, x.double(), True)
    k_ours, k_theirs = run_kept(ours, x, True), run_kept(tm, x, True)
    judge("train", k_ours, k_theirs, k_ref, torch.float32,
          [k for k in k_ref if not k.endswith(".grad")])
    judge("train", run_kept(ours64, x.double(), True), k_ref, k_ref, torch.float64, list(k_ref))
    return fails


def _frac(v: tuple[int, int]) -> str:
    return f"{v[0]}/{v[1]}"


def table(rows: list[Row], passed: dict[str, dict[str, list[str]]] | None = None) -> str:
    """The markdown table; ``passed``: the parity failures by model (None: every model passes,
    which tests/test_timm_table.py asserts)."""
    lines = [
        "| family | timm model | blocks fused | convs fused | BNs fused | eval | train step "
        "| left as timm runs it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = (passed or {}).get(r.name, {"eval": [], "train": []})
        mark = {m: "pass" if not f[m] else "FAIL" for m in ("eval", "train")}
        lines.append(
            f"| {r.family} | `{r.name}` | {_frac(r.blocks)} | {_frac(r.convs)} | "
            f"{_frac(r.norms)} | {mark['eval']} | {mark['train']} | {r.left} |"
        )
    return "\n".join(lines)


def doc_table() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="write the table into the docs")
    args = ap.parse_args()
    rows, passed = [], {}
    for family, name in MODELS:
        rows.append(row(family, name))
        passed[name] = parity(name)
        print(name, passed[name] or "pass", file=sys.stderr, flush=True)
    text = table(rows, passed)
    print(text)
    if args.write:
        doc = DOC.read_text()
        head, tail = doc[: doc.index(BEGIN) + len(BEGIN)], doc[doc.index(END):]
        DOC.write_text(f"{head}\n{text}\n{tail}")


if __name__ == "__main__":
    main()
