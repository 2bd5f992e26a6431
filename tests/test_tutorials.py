"""The tutorial notebooks are lessons: each has exercises whose checks pass with the solutions and fail, each with
its message, as given; each runs top to bottom on the tiny model; the committed outputs are clean; the setup cell
finds the repository. The runs are in the slower tier, the reading of the committed files in the quick one."""

import os
import re
import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT

from tutorials import lab
from tutorials.run import execute, exercise_cells, printed, solutions

NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
CHECK = re.compile(r"^([✓✗]) Exercise (\S+): (.+)$", re.M)


def checks(notebook) -> dict:
    """{exercise: (mark, message)} from what the check cells printed (the last line for each exercise)."""
    return {number: (mark, message) for mark, number, message in CHECK.findall(printed(notebook))}


def errors(notebook) -> list:
    return [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_exercise_has_a_solution(path):
    notebook = nbformat.read(path, as_version=4)
    exercises = exercise_cells(notebook)
    assert len(exercises) >= 3, f"{path.name} has {len(exercises)} exercises; a lesson has at least three"
    assert set(solutions(path)) == set(exercises)
    sources = "\n".join(cell.source for cell in notebook.cells)
    for number in exercises:  # every exercise is checked in the notebook itself
        assert re.search(rf"lab\.check_\w+\(\s*\"{re.escape(number)}\"", sources), f"no check for exercise {number}"
    assert "lab.score()" in sources


def test_every_notebook_opens_with_the_same_setup_cell():
    first_cells = [next(c.source for c in nbformat.read(p, 4).cells if c.cell_type == "code") for p in NOTEBOOKS]
    assert all(cell == first_cells[0] for cell in first_cells) and "lab.setup()" in first_cells[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_outputs_are_clean(path):
    """No machine's paths, no warnings, no errors, and the checks as a learner first sees them: not done yet."""
    notebook = nbformat.read(path, as_version=4)
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    for machine_path in ("/tmp/", "/root/", "/home/", "/Users/", str(ROOT)):
        assert machine_path not in text, f"{path.name} prints a machine's path ({machine_path})"
    assert "Warning" not in text and "warning" not in text.lower().replace("warning_once", "")
    assert not errors(notebook)
    assert all(c.execution_count for c in notebook.cells if c.cell_type == "code"), "a code cell was not run"
    assert {mark for mark, _ in checks(notebook).values()} == {"✗"}


def setup_cell_function():
    """find_repository from the setup cell, defined on its own."""
    source = next(c.source for c in nbformat.read(NOTEBOOKS[0], 4).cells if c.cell_type == "code")
    namespace = {}
    exec(source.split("\n\nROOT = ")[0], namespace)
    return namespace["find_repository"]


def test_setup_cell_finds_the_repository_or_says_how(tmp_path, monkeypatch):
    find_repository = setup_cell_function()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRPO_FAMILY_REPO", raising=False)
    with pytest.raises(RuntimeError, match="set GRPO_FAMILY_REPO to a clone's folder"):
        find_repository()
    monkeypatch.setenv("GRPO_FAMILY_REPO", str(ROOT))
    assert find_repository() == ROOT
    monkeypatch.chdir(ROOT / "tutorials")
    monkeypatch.delenv("GRPO_FAMILY_REPO")
    assert find_repository() == ROOT


def test_check_messages_are_one_readable_line(capsys):
    import torch

    reference = lambda x: x * 2
    lab.check_function("t1", lambda x: (_ for _ in ()).throw(NotImplementedError), reference, [{"x": 1}])
    lab.check_function("t2", lambda x: x * 3, reference, [{"x": torch.tensor([1.0, 2.0])}])
    lab.check_function("t3", lambda x: x[None], reference, [{"x": torch.tensor([1.0])}])
    lab.check_value("t4", None, 1.0)
    lab.check_prediction("t5", "b", "a", ["a", "b"], "because")
    lab.check_function("t6", lambda x: x + x, reference, [{"x": torch.tensor([1.0, 2.0])}])
    lab.check_function("t7", lambda x: x, lambda x: x.view(3), [{"x": torch.ones(2)}])  # a stale input
    long_repr = type("Leaf", (), {"__repr__": lambda self: "Leaf(" + "parent=..., " * 20 + ")"})()
    lab.check_function("t8", lambda x: 0.0, lambda x: 1.0, [{"x": long_repr}])  # a tree node, say
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "✗ Exercise t1: not written yet: replace `raise NotImplementedError` with your code",
        "✗ Exercise t2: on {x=[1.0, 2.0]}: at index 0 you have 3, expected 2",
        "✗ Exercise t3: on {x=[1.0]}: shape (1, 1), expected (1,)",
        "✗ Exercise t4: no answer yet: set the value in the cell above and run it again",
        "✗ Exercise t5: you predicted 'b', the cell shows 'a': because",
        "✓ Exercise t6: agrees with the reference on 1 inputs",
        "✗ Exercise t7: the check could not run the reference (RuntimeError: shape '[3]' is invalid for input of "
        "size 2): run the cells above it again",
        "✗ Exercise t8: on {x=<a Leaf>}: you have 0, expected 1",
    ]
    assert {k: lab.RESULTS[k] for k in ("t1", "t6")} == {"t1": False, "t6": True}


def prepare(path, tmp_path):
    """`python tutorials/lab.py prepare <notebook>` into this test session's model cache: the notebook then finds
    every warm start it loads already built (test_with_solutions checks it), as on a teacher's machines."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "tutorials" / "lab.py"), "prepare", path.stem],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=os.environ | {"TQDM_DISABLE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["prepare", "99_nope"], "'99_nope' is no notebook; of 01_grpo"),
        (["prepare", "01_grpo", "01_grpo"], "'01_grpo' is named twice"),
    ],
)
def test_lab_prepare_refuses_what_it_cannot_build(argv, message):
    run = subprocess.run([sys.executable, str(ROOT / "tutorials/lab.py"), *argv], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr.splitlines()[-1], run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_with_solutions_every_check_passes(path, tmp_path):
    prepare(path, tmp_path)
    notebook = execute(path, with_solutions=True)
    assert not errors(notebook), errors(notebook)[0].get("evalue")
    found = checks(notebook)
    assert set(found) == set(exercise_cells(nbformat.read(path, 4)))
    assert all(mark == "✓" for mark, _ in found.values()), found
    missing = "a warm start the notebook loads is not one `lab.py prepare` builds"
    assert "warm-starting" not in printed(notebook), missing


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_as_given_every_check_fails_with_its_message(path):
    notebook = execute(path, skip_heavy=True)  # the exercises and their checks, without the training runs
    assert not errors(notebook), errors(notebook)[0].get("evalue")
    found = checks(notebook)
    assert set(found) == set(exercise_cells(nbformat.read(path, 4)))
    assert all(mark == "✗" and len(message) > 10 for mark, message in found.values()), found
