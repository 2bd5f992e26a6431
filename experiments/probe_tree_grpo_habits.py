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
over seeds per arm and every seed's value. Not a test: nothing is asserted.
--split train asks as many training questions (about people RL trained on, 6 kinds each) instead of the held-out:
a habit unlearned there but not held-out was learned per person (remembered), not as a way to search.
--demo_trust X probes only a warm start whose demos go on with a namesake who does not fit with chance X (trained
and cached on first use, about 10 minutes), everything else as the runs' warm start.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tree_grpo as T  # noqa: E402
from common import autocast, load_model  # noqa: E402
from experiments.tree_vs_chain import ARMS  # noqa: E402
from plumbing import UsageError  # noqa: E402
from tasks import namesakes  # noqa: E402

KEYS = ("found_person", "answered_early", "check_after_fit", "check_after_misfit", "em_multihop", "tool_calls")
UNSET = {"num_minibatches": 1, "expand_rounds": 1, "keep_leaves": 3}  # what the arms that do not set these have


def arm_of(args: dict) -> str:
    """The arm of experiments/tree_vs_chain.py a run's arguments belong to."""
    return next(arm for arm, sets in ARMS.items() if all(args[k] == v for k, v in (UNSET | sets).items()))


def run_args(run: Path):
    """A run's tree_grpo.Args from its args.json (fields of an older version, such as --compare's, are left out)."""
    saved = json.loads((run / "args.json").read_text())
    return T.Args(**{f.name: saved[f.name] for f in fields(T.Args) if f.name in saved})


def main(folder: str, samples: int = 0, split: str = "eval", demo_trust: float | None = None):
    runs = sorted(p.parent for p in Path(folder).glob("tree_grpo-*/results.json"))
    if not runs:
        sys.exit(f"probe: no run folders with results.json under {folder}: run experiments/tree_vs_chain.py first")
    first = run_args(runs[0])
    if demo_trust is not None:  # another warm start, and no runs
        first, runs = replace(first, demo_trust=demo_trust), []
    train_items, eval_items, demos, corpus = namesakes.load_task(
        first.dataset, first.dataset_path, first.num_train, first.num_eval, first.data_seed, first.demo_stop,
        first.demo_trust,
    )  # fmt: skip
    if split == "train":  # as many training questions, in the order the task lists them (6 kinds per person)
        eval_items = train_items[: len(eval_items)]
    search = namesakes.BM25(corpus)
    warm = load_model("tiny", demos=demos, sft_steps=first.sft_steps, sft_batch_size=first.sft_batch_size,
                      extra_tags=namesakes.TAGS)  # fmt: skip
    candidates = [("warm start", first, warm)]
    seen = set()
    for run in runs:  # one run per arm and seed (a second comparison over the same arm and seed repeats it)
        args = run_args(run)
        if (arm_of(vars(args)), args.seed) not in seen:
            seen.add((arm_of(vars(args)), args.seed))
            candidates.append((arm_of(vars(args)), args, load_model(str(run / "model"))))
    table = defaultdict(list)
    keys = KEYS + tuple(f"sampled_{k}" for k in KEYS if samples)
    for arm, args, (model, tokenizer) in candidates:
        evaluate = partial(T.held_out, model, tokenizer, eval_items, partial(namesakes.encode_question, tokenizer),
                           search, args)  # fmt: skip
        with autocast(model.device, args.dtype):
            table[arm].append(evaluate() | (evaluate(samples) if samples else {}))
    print("| arm | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for arm, results in table.items():
        cells = [[r[k] for r in results] for k in keys]
        spread = lambda v: f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""  # noqa: E731
        print(f"| {arm} | " + " | ".join(f"{statistics.mean(v):.3f}{spread(v)}" for v in cells) + " |")
    for arm, results in table.items():
        print(f"{arm}: " + "; ".join(f"{k} " + ", ".join(f"{r[k]:.2f}" for r in results) for k in keys))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Which habits each arm of tree_vs_chain.py unlearned.")
    parser.add_argument("folder", nargs="?", default="runs", help="the comparison's --output_dir")
    parser.add_argument("--samples", type=int, default=0, help="also N chains a question sampled at the temperature")
    parser.add_argument("--split", choices=("eval", "train"), default="eval", help="held-out or training questions")
    parser.add_argument("--demo_trust", type=float, default=None, help="probe only a warm start with this demo_trust")
    cli = parser.parse_args()
    if cli.samples < 0:
        parser.error(f"--samples must be at least 0, got {cli.samples}")
    try:
        main(cli.folder, cli.samples, cli.split, cli.demo_trust)
    except UsageError as error:  # --demo_trust outside tree_grpo.Args' declared range
        parser.error(str(error))
