"""What the tutorial notebooks share: the setup cell's installs, the exercise checks, and the warm starts.

A notebook's first cell finds the repository and calls `setup()`, which installs what is missing (the CPU build of
torch where there is no torch) and prints the versions. An exercise is a cell the learner fills in; the check
after it compares the learner's answer with the script's own function and prints one line, "✓ Exercise N: ..."
or "✗ Exercise N: what is wrong". A check never raises, so "Run all" goes on to the end; the cells after an
exercise use the script's functions, not the learner's. `score()` sums the checks up at the end of a notebook.

A teacher builds every notebook's warm-started model before class, so no learner waits for it:

    python tutorials/lab.py prepare            # all five notebooks' warm starts (README says how long)
    python tutorials/lab.py prepare 05_tree_grpo   # one notebook's; the cache is ~/.cache/grpo-family
"""

import copy
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSED, FAILED = "✓", "✗"
RESULTS = {}  # exercise -> passed, this kernel's checks so far (a rerun replaces its line)


# ----------------------------------------------------------------------------------------------------------------
# Setup


def setup():
    """Install what the notebooks need and is missing, then print the versions the lesson runs with."""
    if importlib.util.find_spec("torch") is None:  # the CPU build: the default wheel pulls GBs of CUDA packages
        pip("torch", "--index-url", "https://download.pytorch.org/whl/cpu")
    needed = ["transformers", "datasets", "tqdm", "matplotlib", "numpy"]
    if any(importlib.util.find_spec(name) is None for name in needed):
        pip("-r", str(ROOT / "requirements.txt"))
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"python {sys.version.split()[0]} · torch {torch.__version__} · transformers {transformers.__version__} · "
        f"{device} · {torch.get_num_threads()} threads"
    )


def pip(*args):
    print("installing:", " ".join(args))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)


# ----------------------------------------------------------------------------------------------------------------
# Exercise checks


def check_function(exercise, yours, reference, cases, atol=1e-5, rtol=1e-4):
    """Call `yours` and `reference` on each case (a dict of keyword arguments) and say whether they agree."""
    name, module = getattr(reference, "__name__", "<lambda>"), getattr(reference, "__module__", None)
    name = "the reference" if name == "<lambda>" else name if module in (None, "__main__") else f"{module}.{name}"
    for case in cases:
        try:
            expected = reference(**copy.deepcopy(case))
        except Exception as error:  # the check's inputs came from a cell that has changed since: not the learner's
            why = f"{type(error).__name__}: {error}"
            return report(exercise, False, f"the check could not run {name} ({why}): run the cells above it again")
        try:
            got = yours(**copy.deepcopy(case))
        except NotImplementedError:
            return report(exercise, False, "not written yet: replace `raise NotImplementedError` with your code")
        except Exception as error:  # the learner's code: any error is a finding to report, not to raise
            return report(exercise, False, f"{type(error).__name__}: {error}, on {show(case)}")
        problem = difference(got, expected, atol, rtol)
        if problem:
            return report(exercise, False, f"on {show(case)}: {problem}")
    return report(exercise, True, f"agrees with {name} on {len(cases)} inputs")


def check_value(exercise, yours, expected, unit="", atol=1e-6, rtol=1e-3, why=""):
    """The learner's number (a knob they set, or a value they worked out) against the one the lesson computed."""
    if yours is None:
        return report(exercise, False, "no answer yet: set the value in the cell above and run it again")
    problem = difference(yours, expected, atol, rtol)
    if problem:
        return report(exercise, False, f"{problem}{unit}" + (f"; hint: {why}" if why else ""))
    return report(exercise, True, f"{show(yours)}{unit}" + (f": {why}" if why else ""))


def check_prediction(exercise, prediction, actual, choices, why, name="prediction"):
    """A prediction recorded before the cell that shows the answer ran, against what that cell measured."""
    if prediction is None:
        return report(exercise, False, f"no prediction recorded: set `{name}` to one of {choices}, then run on")
    if prediction not in choices:
        return report(exercise, False, f"{prediction!r} is not one of {choices}")
    if prediction != actual:
        return report(exercise, False, f"you predicted {prediction!r}, the cell shows {actual!r}: {why}")
    return report(exercise, True, f"{actual!r}, as you predicted: {why}")


def report(exercise, passed, message):
    RESULTS[exercise] = passed
    print(f"{PASSED if passed else FAILED} Exercise {exercise}: {message}")


def score():
    """One line: how many of this notebook's exercises passed, and which are still open."""
    done = [e for e, passed in RESULTS.items() if passed]
    open_ = [e for e, passed in RESULTS.items() if not passed]
    print(f"exercises passed: {len(done)} of {len(RESULTS)}" + (f"; still open: {', '.join(open_)}" if open_ else ""))


def difference(got, expected, atol, rtol):
    """'' when `got` equals `expected` within tolerance, else one readable sentence on the first difference."""
    import torch

    if isinstance(expected, (tuple, list)) and not isinstance(got, str):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"expected {len(expected)} values, got {show(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            if problem := difference(g, e, atol, rtol):
                return f"value {i}: {problem}"
        return ""
    if isinstance(expected, str) or isinstance(got, str):
        return "" if got == expected else f"you have {show(got)}, expected {show(expected)}"
    if got is None:
        return "your code returns None: did you forget `return`?"
    if not torch.is_tensor(expected):
        expected = torch.tensor(float(expected))
    if not torch.is_tensor(got):
        try:
            got = torch.tensor(float(got))
        except (TypeError, ValueError):
            return f"expected a number or a tensor, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    wrong = ~torch.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=False)
    if not wrong.any():
        return ""
    if got.dim() == 0:
        return f"you have {show(got)}, expected {show(expected)}"
    index = tuple(i.item() for i in wrong.nonzero()[0])
    where = index[0] if len(index) == 1 else index
    return f"at index {where} you have {show(got[index])}, expected {show(expected[index])}"


def show(value):
    """A short readable form of a number, a tensor or a dict of them."""
    import torch

    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={show(v)}" for k, v in value.items()) + "}"
    if torch.is_tensor(value):
        return show(value.item()) if value.dim() == 0 else str([round(float(x), 4) for x in value.flatten()][:12])
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return str([show(v) for v in value][:12]).replace("'", "")
    text = repr(value)
    return text if len(text) <= 60 else f"<a {type(value).__name__}>"  # a tree node's repr runs to pages


# ----------------------------------------------------------------------------------------------------------------
# Warm starts built ahead of a lab


NOTEBOOKS = ("01_grpo", "02_prefix_grouper", "03_crpo", "04_grpo_pp", "05_tree_grpo")


def prepare(names=NOTEBOOKS, output_dir="runs/prepare"):
    """Build the warm-started models the notebooks `names` load (the same settings), so their cells find them cached.
    tests/test_tutorials.py checks that a notebook run after this one warm-starts nothing."""
    sys.path.insert(0, str(ROOT))
    quick = {"num_steps": 1, "eval_every": 1, "output_dir": output_dir}
    if {"01_grpo", "02_prefix_grouper"} & set(names):
        import grpo

        print("01, 02: the tiny model on additions", flush=True)
        grpo.train(grpo.Args(**quick))
    if "03_crpo" in names:
        import crpo

        print("03: the tiny model on clinical vignettes (300 SFT steps)", flush=True)
        crpo.train(crpo.Args(**quick, num_eval=8, sft_steps=300))
    if "04_grpo_pp" in names:
        import grpo_pp

        print("04: the tiny VLM on lesion captions (300 steps)", flush=True)
        grpo_pp.train_grpo(grpo_pp.Args(**quick, images_per_class=8, warm_start_steps=300))
    if "05_tree_grpo" in names:
        import tree_grpo
        from common import load_model
        from tasks import namesakes

        print("05: the tiny agent on search trajectories (600 SFT steps)", flush=True)
        defaults = tree_grpo.Args()
        task = dict(seed=0, demo_stop=defaults.demo_stop, demo_trust=defaults.demo_trust, num_eval=defaults.num_eval)
        demos = namesakes.make_kb_task(**task)[2]
        load_model(
            "tiny", demos=demos, sft_steps=600, sft_batch_size=defaults.sft_batch_size, extra_tags=namesakes.TAGS
        )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The tutorials' lab: `prepare` builds the notebooks' warm starts.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("prepare", help="build the warm-started models the notebooks load (all by default)")
    build.add_argument("notebooks", nargs="*", help=f"the notebooks to prepare, of {', '.join(NOTEBOOKS)}")
    chosen = parser.parse_args().notebooks
    for name in chosen:
        if name not in NOTEBOOKS or chosen.count(name) > 1:
            build.error(
                f"{name!r} is {'named twice' if name in NOTEBOOKS else 'no notebook'}; of {', '.join(NOTEBOOKS)}"
            )
    prepare(chosen or NOTEBOOKS)
