"""Stage 1 of GRPO++ against plain GRPO, and the ablation (RESULTS.md, "GRPO++ vs GRPO").

    python experiments/grpo_pp_stability.py                       # seeds 0-4 x (8, 16) images per class
    python experiments/grpo_pp_stability.py --sizes 4 --learning_rate 1e-3 --seeds 0,1,2,3,4,5,6,7,8,9   # unstable
    python experiments/grpo_pp_stability.py --sizes 4 --learning_rate 1e-3 --seeds ... --arms no_beta,no_eps_high
Each arm (grpo, grpo_pp, or grpo_pp with one stabiliser at GRPO's value: no_<stabiliser>) trains stage 1 for
every seed and training size (one warm start and one held-out split), then a table of held-out macro-F1 (after,
best, majority vote of sampled answers) and collapses, and the F1 curves. Every option of grpo_pp.py applies.
"""

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the algorithm files

import grpo_pp  # noqa: E402
from experiments.sweep import Sweep, int_list, seed_sweep  # noqa: E402
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
        int_list(self.sizes, "--sizes")
        if unknown := [arm for arm in self.arms.split(",") if arm not in ARMS]:
            raise UsageError(f"--arms: unknown arm {unknown[0]!r}; known: {', '.join(ARMS)}")


def main(args: grpo_pp.Args, comparison: Comparison):
    sizes, seeds = int_list(comparison.sizes, "--sizes"), int_list(comparison.seeds, "--seeds")
    runs = {
        f"{arm} ({size}/class)": [
            grpo_pp.with_method(args, ARMS[arm][0], **ARMS[arm][1], seed=seed, images_per_class=size) for seed in seeds
        ]
        for size in sizes
        for arm in comparison.arms.split(",")
    }
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
