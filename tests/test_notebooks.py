"""Every notebook source (jupytext py:percent) executes top to bottom."""

from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, data_root, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(data_root))
    monkeypatch.setenv("LMC_NOTEBOOK_EPOCHS", "3")
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "weight_matching: test loss barrier" in outputs
