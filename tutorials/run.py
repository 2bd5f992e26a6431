"""Run every tutorial notebook top to bottom and save it with its outputs (plots, printed numbers), in place.

    python tutorials/run.py                  # all five (the first run also warm-starts and caches the tiny models)
    python tutorials/run.py 01_grpo 03_crpo  # some of them

The committed notebooks are this command's output, so GitHub shows their plots. Progress bars are switched off
(TQDM_DISABLE) so that the saved outputs hold results, not thousands of bar updates. tests/test_tutorials.py runs
the same function without saving.
"""

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path, timeout: int = 600):
    """Run the notebook at `path` in a fresh kernel, in its own folder; returns it with its outputs."""
    notebook = nbformat.read(path, as_version=4)
    os.environ["TQDM_DISABLE"] = "1"  # the kernel inherits it
    NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    for cell in notebook.cells:  # tqdm.auto's note that ipywidgets is not installed says nothing about the lesson
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if "IProgress not found" not in o.get("text", "")]
    return notebook


def main(names):
    paths = [HERE / f"{name}.ipynb" for name in names] or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        if not path.exists():
            sys.exit(f"run.py: error: no notebook {path.name} in {HERE}")
        print(f"running {path.name} ...", flush=True)
        nbformat.write(execute(path), path)


if __name__ == "__main__":
    main(sys.argv[1:])
