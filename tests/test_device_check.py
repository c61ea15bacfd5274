"""bench/device_check.sh keeps its budget: with no time left every step is skipped with its
reason (none counted as failed, exit status 0), and what it writes is named <gpu>_<commit>_* and
at most 8 files. The full dry run on the CPU is recorded in bench/results
(epyc-2cpu_<commit>_device-check-dryrun.txt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_a_spent_budget_skips_every_step_with_its_reason(tmp_path):
    env = {**os.environ, "SKIP_BUILD": "1", "DEVICE_CHECK_BUDGET": "5",
           "FASTRES_COMMIT": "0123456789abcdef0123", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert 0 < len(files) <= 8, files
    assert all(f.split("_")[1] == "0123456789ab" for f in files), files
    summary = next(tmp_path.glob("*_summary.txt")).read_text()
    for name in ("info", "parity", "graphs", "selftest", "timing", "resnet50", "profile"):
        line = next((ln for ln in summary.splitlines() if ln.startswith(name + " ")), "")
        assert ("no time" in line or "skipped" in line) and "s " in line, (name, summary)
    assert "0 step(s) failed" in summary
