"""Test set-up: offline, a private model cache, and the repository root on sys.path."""

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Nothing in the tests may reach a hub: the offline flags make a hub look-up fail at once instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A cache of warm-started tiny models shared by this test session (and its subprocesses), not the user's. The
# workers of one `pytest -n` run share one, named by the run's id: a model one worker is building, the others wait
# for (the cache's lock) instead of building it again.
if run_id := os.environ.get("PYTEST_XDIST_TESTRUNUID"):
    os.environ["GRPO_FAMILY_CACHE"] = str(Path(tempfile.gettempdir()) / f"grpo-family-test-cache-{run_id}")
else:
    os.environ["GRPO_FAMILY_CACHE"] = tempfile.mkdtemp(prefix="grpo-family-test-cache-")
# pytest-xdist's workers (pyproject.toml runs one per core) share the cores out: torch in each worker, and in the
# processes it starts, takes its share of threads, since torch jobs that each take every core slow each other down.
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    threads = max(1, len(os.sched_getaffinity(0)) // workers if hasattr(os, "sched_getaffinity") else 1)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


# A test that needs a CUDA GPU: `pytest -m cuda` selects these (experiments/gpu_check.py runs them); skipped
# without one.
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def script_runner(script: str):
    """run(*argv, cwd) runs `python <script> *argv` from the repository root in a fresh process, output captured."""
    return lambda *argv, cwd: subprocess.run(
        [sys.executable, str(ROOT / script), *argv], cwd=cwd, capture_output=True, text=True
    )


def main_runner(script: str):
    """run(*argv, capsys=capsys) runs `python <script> *argv` in this process (no interpreter start-up, for the
    quick error cases): returns (exit code, stderr)."""

    def run(*argv, capsys):
        saved, sys.argv = sys.argv, [str(ROOT / script), *argv]
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            sys.argv = saved
        return code, capsys.readouterr().err

    return run


def pytest_collection_modifyitems(items):
    """The longest tests first (the notebooks run with their solutions, the longest, 05, first: minutes each), so
    that no worker of `pytest -n` starts one of them after the others have run out of work."""
    notebooks = sorted((item for item in items if "test_with_solutions" in item.nodeid), key=lambda item: item.nodeid)
    items[:] = notebooks[::-1] + [item for item in items if item not in notebooks]
