"""Every tutorial notebook runs top to bottom on the tiny model; a failing cell fails the test. Slower tier."""

import pytest
from conftest import ROOT

from tutorials.run import execute

NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
pytestmark = pytest.mark.slow  # about 9 minutes on 2 CPU cores: in the slower tier


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    notebook = execute(path)  # not saved: `python tutorials/run.py` writes the committed outputs
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
