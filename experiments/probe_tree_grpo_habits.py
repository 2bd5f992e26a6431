"""Probe: which of the search task's two habits each arm of experiments/tree_vs_chain.py unlearned.

    python experiments/tree_vs_chain.py --prefix_grouper --output_dir runs   # first: the runs to probe
    python experiments/probe_tree_grpo_habits.py runs                        # a table (about a minute on 2 cores)
    python experiments/probe_tree_grpo_habits.py runs/280k --samples 8       # and 8 sampled chains a question
    python experiments/probe_tree_grpo_habits.py runs/280k --split train     # on training questions instead
    python experiments/probe_tree_grpo_habits.py runs/280k --samples 8 --demo_trust 0   # another warm start alone

Loads the warm-started model and every run's final model (saved in its run folder under the given folder) and
evaluates each greedily (and, given a number of samples, sampled at the run's temperature) on the held-out
questions with tree_grpo.held_out, which scores the habits with namesakes.evaluate: found_person
(of the questions that give only a first name, the share where the last namesake searched is the one meant: 1 -
the wrong turns kept) and answered_early (of the multi-hop questions, the share answered with an entity from the
middle of the path), and whether it reads a namesake's document (check_after_fit, check_after_misfit: how often a
namesake searched is followed by a search of another, when it is the one meant and when not). Prints mean ± std
over seeds per arm, then every run's values with its run folder. One run per arm and seed: a later one with the
same settings is left out with a note, one with other settings is an error. Not a test: nothing is asserted.
--split train asks as many training questions (about people RL trained on, 6 kinds each) instead of the held-out:
a habit unlearned there but not held-out was learned per person (remembered), not as a way to search.
--demo_trust X probes only a warm start whose demos go on with a namesake who does not fit with chance X (trained
and cached on first use, about 10 minutes), everything else as the runs' warm start.
"""

import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tree_grpo as T  # noqa: E402
from common import autocast, load_model  # noqa: E402
from experiments.tree_vs_chain import ARMS  # noqa: E402
from plumbing import UsageError, arg, check_args_shared, run_cli  # noqa: E402
from tasks import namesakes  # noqa: E402

KEYS = ("found_person", "answered_early", "check_after_fit", "check_after_misfit", "em_multihop", "tool_calls")
UNSET = {"num_minibatches": 1, "expand_rounds": 1, "keep_leaves": 3}  # what the arms that do not set these have
# the settings that make the task and the warm start: every run probed must share them (the warm start is probed once)
TASK = ("model", "dataset", "dataset_path", "num_train", "num_eval", "data_seed", "demo_stop", "demo_trust",
        "sft_steps", "sft_batch_size")  # fmt: skip


@dataclass
class Args:
    samples: int = arg(0, "also N chains a question sampled at the run's temperature", ">= 0")
    split: Literal["eval", "train"] = arg("eval", "held-out or training questions")
    demo_trust: float | None = arg(None, "probe only a warm start with this demo_trust", "[0, 1]")

    def __post_init__(self):
        check_args_shared(self)  # every field in its declared range


FOLDER = {"folder": dict(nargs="?", default="runs", help="the comparison's --output_dir, where its run folders are")}


def arm_of(args: dict) -> str | None:
    """The arm of experiments/tree_vs_chain.py a run's arguments belong to (None: none of them)."""
    sets = lambda arm: UNSET | ARMS[arm]
    return next((arm for arm in ARMS if all(args.get(k, UNSET.get(k)) == v for k, v in sets(arm).items())), None)


def saved_args(run: Path) -> dict:
    """A run folder's args.json, or a UsageError naming it."""
    try:
        saved = json.loads((run / "args.json").read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{run}/args.json cannot be read ({error}): is {run} a run folder of tree_grpo.py?") from None
    if not isinstance(saved, dict) or "seed" not in saved:
        raise UsageError(f"{run}/args.json is not a tree_grpo.py run's arguments")
    return saved


def run_args(run: Path):
    """A run's tree_grpo.Args from its args.json (fields of an older version, such as --compare's, are left out)."""
    saved = saved_args(run)
    return T.Args(**{f.name: saved[f.name] for f in fields(T.Args) if f.name in saved})


def find_runs(folder: str) -> dict:
    """{(arm, seed): run folder} of the finished runs under `folder`. A later run of an arm and seed with the same
    settings repeats the earliest and is left out, with a note; other settings, a run of no arm, or another task or
    warm start than the first run's are a UsageError naming the run folders."""
    if not Path(folder).is_dir():
        raise UsageError(f"FOLDER {folder}: no such folder; give the --output_dir of experiments/tree_vs_chain.py")
    runs = sorted(p.parent for p in Path(folder).glob("tree_grpo-*/results.json"))  # the earliest of a kind first
    if not runs:
        raise UsageError(f"no run folders with results.json under {folder}: run experiments/tree_vs_chain.py first")
    found, settings, base = {}, {}, saved_args(runs[0])
    if base.get("model") != "tiny":
        raise UsageError(f"{runs[0]} trained --model {base.get('model')}: the probe knows the tiny model's warm start")
    for run in runs:
        saved = saved_args(run)
        key = (arm_of(saved), saved["seed"])
        if key[0] is None:
            raise UsageError(f"{run} is a run of none of tree_vs_chain.py's arms ({', '.join(ARMS)}): move it out")
        if differ := [k for k in TASK if saved.get(k) != base.get(k)]:
            raise UsageError(f"{run} has another task or warm start than {runs[0]} ({', '.join(differ)})")
        if key in found:
            other = settings[key]
            ignored = ("output_dir", "eval_samples")  # where it was written; what older runs of tree_grpo.py recorded
            if differ := sorted(k for k in saved | other if k not in ignored and saved.get(k) != other.get(k)):
                raise UsageError(
                    f"{found[key]} and {run} are both arm {key[0]}, seed {key[1]}, with other settings "
                    f"({', '.join(differ)}): give a folder with one of them"
                )
            print(f"[probe] {run} repeats {found[key]} (arm {key[0]}, seed {key[1]}, same settings): left out")
            continue
        found[key], settings[key] = run, saved
    return found


def main(options: Args, folder: str = "runs"):
    runs = find_runs(folder)
    first = run_args(next(iter(runs.values())))
    if options.demo_trust is not None:  # another warm start, and no runs
        first, runs = replace(first, demo_trust=options.demo_trust), {}
    train_items, eval_items, demos, corpus = namesakes.load_task(
        first.dataset, first.dataset_path, first.num_train, first.num_eval, first.data_seed, first.demo_stop,
        first.demo_trust,
    )  # fmt: skip
    if options.split == "train":  # as many training questions, in the order the task lists them (6 kinds per person)
        eval_items = train_items[: len(eval_items)]
    search = namesakes.BM25(corpus)
    warm = load_model("tiny", demos=demos, sft_steps=first.sft_steps, sft_batch_size=first.sft_batch_size,
                      extra_tags=namesakes.TAGS)  # fmt: skip
    candidates = [("warm start", "-", "the warm start (cached)", first, warm)]
    for (arm, seed), run in runs.items():
        candidates.append((arm, seed, run, run_args(run), load_model(str(run / "model"))))
    table, rows = defaultdict(list), defaultdict(list)
    keys = KEYS + tuple(f"sampled_{k}" for k in KEYS if options.samples)
    for arm, seed, run, args, (model, tokenizer) in candidates:
        evaluate = partial(T.held_out, model, tokenizer, eval_items, partial(namesakes.encode_question, tokenizer),
                           search, args)  # fmt: skip
        with autocast(model.device, args.dtype):
            result = evaluate() | (evaluate(options.samples) if options.samples else {})
        table[arm].append(result)
        rows[arm].append(f"| {arm} | {seed} | {run} | " + " | ".join(f"{result[k]:.3f}" for k in keys) + " |")
    print("| arm | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for arm, results in table.items():
        cells = [[r[k] for r in results] for k in keys]
        spread = lambda v: f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""  # noqa: E731
        print(f"| {arm} | " + " | ".join(f"{statistics.mean(v):.3f}{spread(v)}" for v in cells) + " |")
    print("\nevery run:\n\n| arm | seed | run folder | " + " | ".join(keys) + " |\n|---|---|---|" + "---|" * len(keys))
    print("\n".join(row for arm in table for row in rows[arm]))


if __name__ == "__main__":
    run_cli(Args, main, FOLDER)
