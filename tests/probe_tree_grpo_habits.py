"""Probe: which of the search task's two habits each arm of `tree_grpo.py --compare` unlearned.

    python tree_grpo.py --compare --prefix_grouper --output_dir runs     # first: the runs to probe
    python tests/probe_tree_grpo_habits.py runs                          # a table (about a minute on 2 CPU cores)

Loads the warm-started model and every run's final model (saved in its run folder under the given folder) and
evaluates each greedily on the held-out questions with tree_grpo.evaluate, which scores the habits: found_person
(of the questions that give only a first name, the share where the last namesake searched is the one meant: 1 -
the wrong turns kept) and answered_early (of the multi-hop questions, the share answered with an entity from the
middle of the path). Prints mean ± std over seeds per arm and every seed's value. Not a test: nothing is asserted.
"""

import json
import statistics
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tree_grpo as T  # noqa: E402
from common import autocast, load_model  # noqa: E402

KEYS = ("found_person", "answered_early", "em_multihop", "tool_calls")


def arm_of(args: dict) -> str:
    """The --compare arm a run's arguments belong to."""
    return next(
        arm for arm, sets in T.ARMS.items() if all(args[k] == v for k, v in ({"num_minibatches": 1} | sets).items())
    )


def main(folder: str):
    runs = sorted(p.parent for p in Path(folder).glob("tree_grpo-*/results.json"))
    if not runs:
        sys.exit(f"probe: no run folders with results.json under {folder}: run tree_grpo.py --compare first")
    first = T.Args(**json.loads((runs[0] / "args.json").read_text()))
    _, eval_items, demos, corpus = T.load_task(first)
    search = T.BM25(corpus)
    warm = load_model("tiny", demos=demos, sft_steps=first.sft_steps, sft_batch_size=first.sft_batch_size,
                      extra_tags=T.TAGS)  # fmt: skip
    candidates = [("warm start", first, warm)]
    seen = set()
    for run in runs:  # one run per arm and seed (a second --compare over the same arm and seed repeats it)
        args = T.Args(**json.loads((run / "args.json").read_text()))
        if (arm_of(vars(args)), args.seed) not in seen:
            seen.add((arm_of(vars(args)), args.seed))
            candidates.append((arm_of(vars(args)), args, load_model(str(run / "model"))))
    table = defaultdict(list)
    for arm, args, (model, tokenizer) in candidates:
        encode = partial(T.encode_question, tokenizer)
        with autocast(model.device, args.dtype):
            table[arm].append(T.evaluate(model, tokenizer, eval_items, encode, search, args))
    print("| arm | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    for arm, results in table.items():
        cells = [[r[k] for r in results] for k in KEYS]
        spread = lambda v: f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else ""  # noqa: E731
        print(f"| {arm} | " + " | ".join(f"{statistics.mean(v):.3f}{spread(v)}" for v in cells) + " |")
    for arm, results in table.items():
        print(f"{arm}: " + "; ".join(f"{k} " + ", ".join(f"{r[k]:.2f}" for r in results) for k in KEYS))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
