"""The device check's pytest plugin prints a failure's report as soon as the test fails, before
pytest's end-of-session summary (which a timed-out step never reaches)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_failure_printed_before_the_summary(tmp_path):
    (tmp_path / "test_planted.py").write_text(
        "def test_ok():\n    pass\n\n"
        "def test_planted():\n    assert 1 == 2, 'planted failure'\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "_instafail", str(tmp_path / "test_planted.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    out = r.stdout
    assert r.returncode == 1, out
    early = out.index("FAILED test_planted.py::test_planted (call)")
    assert "planted failure" in out[early:]
    assert early < out.index("= FAILURES ="), out
