"""Probe: which of the search task's two habits each arm of experiments/tree_vs_chain.py unlearned.

    python experiments/tree_vs_chain.py --prefix_grouper --output_dir runs   # first: the runs to probe
    python experiments/probe_tree_grpo_habits.py runs                        # a table (about a minute on 2 cores)
    python experiments/probe_tree_grpo_habits.py runs_280k 8                 # and 8 sampled chains a question

Loads the warm-started model and every run's final model (saved in its run folder under the given folder) and
evaluates each greedily (and, given a number of samples, sampled at the run's temperature) on the held-out
questions with tree_grpo.held_out, which scores the habits with namesakes.evaluate: found_person
(of the questions that give only a first name, the share where the last namesake searched is the one meant: 1 -
the wrong turns kept) and answered_early (of the multi-hop questions, the share answered with an entity from the
middle of the path). Prints mean ± std over seeds per arm and every seed's value. Not a test: nothing is asserted.
"""

import json
import statistics
import sys
from collections import defaultdict
from dataclasses import fields
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tree_grpo as T  # noqa: E402
from common import autocast, load_model  # noqa: E402
from experiments.tree_vs_chain import ARMS  # noqa: E402
from tasks import namesakes  # noqa: E402

KEYS = ("found_person", "answered_early", "em_multihop", "tool_calls")
UNSET = {"num_minibatches": 1, "expand_rounds": 1, "keep_leaves": 3}  # what the arms that do not set these have


def arm_of(args: dict) -> str:
    """The arm of experiments/tree_vs_chain.py a run's arguments belong to."""
    return next(arm for arm, sets in ARMS.items() if all(args[k] == v for k, v in (UNSET | sets).items()))


def run_args(run: Path):
    """A run's tree_grpo.Args from its args.json (fields of an older version, such as --compare's, are left out)."""
    saved = json.loads((run / "args.json").read_text())
    return T.Args(**{f.name: saved[f.name] for f in fields(T.Args) if f.name in saved})


def main(folder: str, samples: int = 0):
    runs = sorted(p.parent for p in Path(folder).glob("tree_grpo-*/results.json"))
    if not runs:
        sys.exit(f"probe: no run folders with results.json under {folder}: run experiments/tree_vs_chain.py first")
    first = run_args(runs[0])
    _, eval_items, demos, corpus = namesakes.load_task(
        first.dataset, first.dataset_path, first.num_train, first.num_eval, first.data_seed, first.demo_stop,
        first.demo_trust,
    )  # fmt: skip
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
    main(sys.argv[1] if len(sys.argv) > 1 else "runs", int(sys.argv[2]) if len(sys.argv) > 2 else 0)
