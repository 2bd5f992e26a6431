"""CRPO against its GRPO baseline (RESULTS.md, "CRPO vs GRPO"): both methods for every seed, then a table and a plot.

    python experiments/crpo_vs_grpo.py                                        # seeds 0-4, the defaults of crpo.py
    python experiments/crpo_vs_grpo.py --advantage_mode normalize_then_sum    # the ablation
Every option of crpo.py applies to both methods but --method, --weights (each method's own weights are what tells
them apart) and --seed (--seeds); each seed's pair of runs shares one warm start.
"""

import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the algorithm files

import crpo  # noqa: E402
from experiments.sweep import Sweep, int_list, refuse_set_for_every_run, seed_sweep  # noqa: E402
from plumbing import UsageError, run_cli  # noqa: E402

# the held-out metrics of the table (crpo's strict evaluation, tasks/clinic.py)
KEYS = ["accuracy", "faithfulness", "hallucination", "citations", "rejections", "valid_rejections", "mean_length"]


def plan(args: crpo.Args, sweep: Sweep) -> dict:
    """{method: [crpo.Args, one per seed]}, or a UsageError for options that would make both methods one run."""
    if args.weights:
        raise UsageError(
            f"--weights {args.weights} would give grpo and crpo the same weights, so the same run; leave it out (each "
            f"method has its own), or run crpo.py --weights ... alone"
        )
    refuse_set_for_every_run(args, {"method": "both methods run", "seed": "from --seeds"})
    seeds = int_list(sweep.seeds, "--seeds", name="seed")
    return {method: [replace(args, method=method, seed=seed) for seed in seeds] for method in ("grpo", "crpo")}


def main(args: crpo.Args, sweep: Sweep):
    runs = plan(args, sweep)
    summarize = lambda run: {key: run["after"][key] for key in KEYS}
    out = f"{args.output_dir}/crpo_compare/crpo_compare"
    settings = asdict(args) | asdict(sweep)
    return seed_sweep(crpo.train, runs, summarize, out, settings, title="GRPO vs CRPO (tiny model)")


ARGS = (crpo.Args, Sweep)  # the script's options and the comparison's

if __name__ == "__main__":
    run_cli(ARGS, main)
