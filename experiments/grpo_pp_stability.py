"""Stage 1 of GRPO++ against plain GRPO, and the ablation (RESULTS.md, "GRPO++ vs GRPO").

    python experiments/grpo_pp_stability.py                       # seeds 0-4 x (8, 16) images per class
    python experiments/grpo_pp_stability.py --sizes 4 --learning_rate 1e-3 --seeds 0,1,2,3,4,5,6,7,8,9   # unstable
    python experiments/grpo_pp_stability.py --sizes 4 --learning_rate 1e-3 --seeds ... --arms no_beta,no_eps_high
Each arm (grpo, grpo_pp, or grpo_pp with one stabiliser at GRPO's value: no_<stabiliser>) trains stage 1 for
every seed and training size (one warm start and one held-out split), then a table of held-out macro-F1 (after,
best, majority vote of sampled answers) and collapses, and the F1 curves. Every option of grpo_pp.py applies but
--seed, --images_per_class and --grpo_pp, which --seeds, --sizes and --arms set; an image folder (--dataset_path)
must hold the largest size of every class.
"""

import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the algorithm files

import grpo_pp  # noqa: E402
from experiments.sweep import (  # noqa: E402
    Sweep,
    int_list,
    name_list,
    refuse_same_runs,
    refuse_set_for_every_run,
    seed_sweep,
)
from plumbing import UsageError, arg, run_cli  # noqa: E402

# each arm: (GRPO++ or GRPO, the stabiliser set to GRPO's value)
ARMS = {"grpo": (False, {}), "grpo_pp": (True, {})}
ARMS |= {f"no_{name}": (True, {name: value}) for name, value in grpo_pp.STABILISERS["grpo"].items()}


@dataclass
class Comparison(Sweep):
    sizes: str = arg("8,16", "comma-separated training images per class")
    arms: str = arg("grpo,grpo_pp", "some of " + ", ".join(ARMS))

    def __post_init__(self):
        super().__post_init__()
        int_list(self.sizes, "--sizes", least=1, name="size")
        name_list(self.arms, ARMS)


def with_method(args: grpo_pp.Args, method: bool, **changes) -> grpo_pp.Args:
    """A copy of args with stage 1 as GRPO++ (True) or GRPO: the stabilisers the user did not set take the method's
    value (grpo_pp.STABILISERS), the ones set keep theirs."""
    unset = {name: None for name in grpo_pp.STABILISERS["grpo"] if name not in args.set_by_user}
    return replace(args, grpo_pp=method, **(unset | changes))  # replace() runs __post_init__


def plan(args: grpo_pp.Args, comparison: Comparison) -> dict:
    """{"arm (size/class)": [grpo_pp.Args, one per seed]}, or a UsageError: an option the comparison sets, two arms
    that would be the same runs, an image folder with fewer images of a class than a size claims."""
    refuse_set_for_every_run(
        args, {"seed": "from --seeds", "images_per_class": "from --sizes", "grpo_pp": "from each arm in --arms"}
    )
    sizes, seeds = int_list(comparison.sizes, "--sizes", least=1), int_list(comparison.seeds, "--seeds")
    runs = {
        f"{arm} ({size}/class)": [
            with_method(args, ARMS[arm][0], **ARMS[arm][1], seed=seed, images_per_class=size) for seed in seeds
        ]
        for size in sizes
        for arm in name_list(comparison.arms, ARMS)
    }
    # the method's name alone is not a difference; the stabilisers given keep their value in every arm
    refuse_same_runs(runs, label_fields=("grpo_pp", "set_by_user"), given=args.set_by_user)
    if args.dataset_path:  # a folder may hold fewer images of a class than the arm's label says it trains on
        train_items, _ = grpo_pp.load_task(replace(args, images_per_class=max(sizes)))
        label, count = min(Counter(item["label"] for item in train_items).items(), key=lambda pair: pair[1])
        if count < max(sizes):
            raise UsageError(
                f"--sizes {comparison.sizes}: {args.dataset_path} has {count} training images of {label!r}, fewer "
                f"than {max(sizes)}/class; give sizes of at most {count}"
            )
    return runs


def main(args: grpo_pp.Args, comparison: Comparison):
    runs = plan(args, comparison)
    summarize = lambda run: {key: run[key] for key in ("f1_after", "f1_best", "f1_vote", "collapses")}
    # held-out macro-F1 at step 0, then every eval_every steps and at the last step
    curve = lambda run: ([min(k * args.eval_every, args.num_steps) for k in range(len(run["curve"]))], run["curve"])
    name = "grpo_pp_compare" if comparison.arms == "grpo,grpo_pp" else "grpo_pp_ablation"
    out = f"{args.output_dir}/grpo_pp_compare/{name}"
    settings = asdict(args) | asdict(comparison)
    labels = ("step", "held-out macro-F1")
    title = "stage 1, GRPO vs GRPO++ (tiny VLM)"
    return seed_sweep(grpo_pp.train_grpo, runs, summarize, out, settings, curve=curve, curve_labels=labels, title=title)


ARGS = (grpo_pp.Args, Comparison)  # the script's options and the comparison's

if __name__ == "__main__":
    run_cli(ARGS, main)
