"""bench/gpu_timing.py on the CPU (its stand-ins): the table names every kind in its headers,
the GPU-only compile modes are rows with their reason, a wrong provider fails its check and is
not timed, and a spent budget turns the remaining cases into rows that say so."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fastres.harness import timer

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def G():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_timing", BENCH / "gpu_timing.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_timing"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_timing", None)
    sys.path.remove(str(BENCH))


def test_table_names_every_kind_and_skips_gpu_modes_with_reasons(G, tmp_path):
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    rc = G.main(["--device", "cpu", "--blocks", "first", "--image-size", "64", "--batch", "1",
                 "--providers", "torchvision,fastres-cpu,compile-max-autotune,"
                 "compile-reduce-overhead", "--repeats", "2", "--json", str(out),
                 "--markdown", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = {(r["mode"], r["provider"]): r for r in doc["rows"]}
    assert len(rows) == 8
    for mode in ("eval", "train"):
        for p in ("torchvision", "fastres-cpu"):
            r = rows[(mode, p)]
            assert r["status"] == "ok" and set(r["times"]) == set(timer.KINDS), r
            assert "[ok]" in r["check"]
        assert "needs a GPU" in rows[(mode, "compile-reduce-overhead")]["reason"]
        assert "needs a GPU" in rows[(mode, "compile-max-autotune")]["reason"]
    text = md.read_text()
    cpu = torch.device("cpu")
    for k in timer.KINDS:
        assert timer.column(k, cpu) in text and timer.kind_label(k, cpu) in text


def test_a_wrong_provider_fails_its_check_and_is_not_timed(G, monkeypatch):
    real = G.build

    def wrong(p, tv):
        m = real(p, tv)
        if p.backend is None:
            return m

        class Off(torch.nn.Module):  # the planted bug: every output off by 1e-3
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(x) + 1e-3
        return Off()

    monkeypatch.setattr(G, "build", wrong)
    case = G.distinct_blocks("resnet50", 64)[0]
    provs = [p for p in G.providers(torch.device("cpu"))
             if p.name in ("torchvision", "fastres-cpu")]
    rows = G.run_case(case, 1, "eval", torch.float32, torch.device("cpu"), provs, 2, 1,
                      lambda r: None)
    assert [r["status"] for r in rows] == ["ok", "FAIL"], rows
    assert rows[1]["times"] == {} and "output: err" in rows[1]["reason"]


def test_a_spent_budget_skips_the_rest_with_the_reason(G, tmp_path):
    out = tmp_path / "t.json"
    rc = G.main(["--device", "cpu", "--blocks", "first", "--image-size", "64", "--batch", "1",
                 "--providers", "torchvision,fastres-cpu", "--budget-s", "0", "--json",
                 str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and len(rows) == 4  # 2 modes x 2 providers, none timed
    assert all(r["status"] == "skipped" and "time budget" in r["reason"] for r in rows), rows
