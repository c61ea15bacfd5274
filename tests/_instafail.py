"""A pytest plugin that prints each failure's report the moment the test fails.

pytest prints failure details only at the end of a session; a device-check step that runs out of
its time box is killed before that, and its log then holds a row of ``F`` and nothing else (the
first H200 run lost every failure that way). tests/conftest.py enables it when FASTRES_INSTAFAIL=1
(bench/device_check.sh sets it); ``-p _instafail`` with tests/ on the path enables it elsewhere.
"""

from __future__ import annotations

import sys

_MAX = 4000  # characters of each report: the assertion and the end of the traceback


def pytest_runtest_logreport(report):
    if report.failed:
        text = report.longreprtext or ""
        if len(text) > _MAX:
            text = "...\n" + text[-_MAX:]
        sys.stdout.write(f"\n_____ FAILED {report.nodeid} ({report.when}) _____\n{text}\n")
        sys.stdout.flush()
