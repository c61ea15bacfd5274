"""The timm ResNet-family table of docs/integrations.md (tests/timm_table.py makes it): every
model of it converts with nothing left, passes its parity checks, and the table in the docs is
the one the code makes today."""

from __future__ import annotations

import pytest

pytest.importorskip("timm", reason="timm is not installed (scripts/setup_env.sh)")

import timm_table  # noqa: E402


@pytest.mark.parametrize("name", [name for _, name in timm_table.MODELS])
def test_timm_model_parity(name):
    """Eval output, a training step's output and running statistics (float32), and the whole
    training step in float64, by the tolerance rule (timm_table's docstring says why gradients
    of whole networks are judged in float64)."""
    fails = timm_table.parity(name)
    assert not fails["eval"] and not fails["train"], fails


def test_timm_table_in_docs():
    """What convert fuses in each model is what docs/integrations.md says (the parity columns
    read "pass": test_timm_model_parity asserts it)."""
    rows = [timm_table.row(family, name) for family, name in timm_table.MODELS]
    want = timm_table.table(rows)
    assert timm_table.doc_table() == want, (
        "docs/integrations.md's timm table is out of date: run python tests/timm_table.py --write"
        f"\n{want}"
    )
