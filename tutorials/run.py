"""Run every tutorial notebook top to bottom and save it with its outputs (plots, printed numbers), in place.

    python tutorials/run.py                  # all five, as a learner gets them (the exercises not done yet)
    python tutorials/run.py 01_grpo 03_crpo  # some of them
    python tutorials/run.py --solutions      # with tutorials/solutions/ in the exercise cells, not saved

The committed notebooks are this command's output, so GitHub shows their plots. Progress bars are switched off
(TQDM_DISABLE) so that the saved outputs hold results, not thousands of bar updates. tests/test_tutorials.py runs
`execute` with the solutions (every check passes) and as given (every check fails with its message).
"""

import argparse
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
EXERCISE = re.compile(r"^# Exercise (\S+):")  # the first line of a cell the learner fills in


def exercise_cells(notebook) -> dict:
    """{exercise number: cell} for every cell that starts with '# Exercise N:'."""
    cells = [cell for cell in notebook.cells if cell.cell_type == "code" and EXERCISE.match(cell.source)]
    return {EXERCISE.match(cell.source).group(1): cell for cell in cells}


def solutions(path: Path) -> dict:
    """{exercise number: code} from tutorials/solutions/<notebook>.py, whose blocks start '# %% Exercise N'."""
    text = (HERE / "solutions" / f"{path.stem}.py").read_text()
    blocks = re.split(r"^# %% Exercise (\S+)\n", text, flags=re.M)[1:]
    return {number: code.strip() + "\n" for number, code in zip(blocks[::2], blocks[1::2])}


def execute(path: Path, timeout: int = 900, with_solutions=False, skip_heavy=False):
    """Run the notebook at `path` in a fresh kernel, in its own folder; returns it with its outputs.

    with_solutions: each exercise cell's code is replaced by its solution first. skip_heavy: the cells tagged
    "heavy" (warm starts, training runs, timings) are left out, for a quick run of the exercises alone."""
    notebook = nbformat.read(path, as_version=4)
    if with_solutions:
        for number, code in solutions(path).items():
            exercise_cells(notebook)[number].source = code
    if skip_heavy:
        notebook.cells = [cell for cell in notebook.cells if "heavy" not in cell.metadata.get("tags", [])]
    os.environ["TQDM_DISABLE"] = "1"  # the kernel inherits it
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    for cell in notebook.cells:  # progress bars (as widgets, or tqdm.auto's note that there are none) are not results
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_progress_bar(o)]
    return notebook


def printed(notebook) -> str:
    """Everything the notebook's cells printed, in order (the checks' lines among it)."""
    return "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))


WIDGET = "application/vnd.jupyter.widget-view+json"


def is_progress_bar(output) -> bool:
    return "IProgress not found" in output.get("text", "") or WIDGET in output.get("data", {})


def main(argv):
    notebooks = sorted(path.stem for path in HERE.glob("*.ipynb"))
    parser = argparse.ArgumentParser(description="Run the tutorial notebooks and save them with their outputs.")
    parser.add_argument("names", nargs="*", metavar="NOTEBOOK", help=f"some of {', '.join(notebooks)} (default: all)")
    parser.add_argument("--solutions", action="store_true", help="with the solutions in the exercise cells, not saved")
    cli = parser.parse_args(argv)
    names = [Path(name).name.removesuffix(".ipynb") for name in cli.names]  # 01_grpo, or tutorials/01_grpo.ipynb
    if unknown := [name for name in names if name not in notebooks]:
        parser.error(f"no notebook {unknown[0]!r} in tutorials/; there are {', '.join(notebooks)}")
    if len(set(names)) != len(names):
        parser.error(f"a notebook is named twice ({' '.join(cli.names)}): each runs once")
    for path in [HERE / f"{name}.ipynb" for name in names or notebooks]:
        print(f"running {path.name}{' with the solutions' if cli.solutions else ''} ...", flush=True)
        notebook = execute(path, with_solutions=cli.solutions)
        if not cli.solutions:
            nbformat.write(notebook, path)
        lines = printed(notebook).splitlines(keepends=True)
        print("".join(line for line in lines if line.startswith(("✓", "✗", "exercises"))))


if __name__ == "__main__":
    main(sys.argv[1:])
