"""CRPO against its GRPO baseline (RESULTS.md, "CRPO vs GRPO"): both methods for every seed, then a table and a plot.

    python experiments/crpo_vs_grpo.py                                        # seeds 0-4, the defaults of crpo.py
    python experiments/crpo_vs_grpo.py --advantage_mode normalize_then_sum    # the ablation
Every option of crpo.py applies to both methods; each seed's pair of runs shares one warm start.
"""

import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the algorithm files

import crpo  # noqa: E402
from experiments.sweep import Sweep, int_list, seed_sweep  # noqa: E402
from plumbing import run_cli  # noqa: E402

# the held-out metrics of the table (crpo's strict evaluation, tasks/clinic.py)
KEYS = ["accuracy", "faithfulness", "hallucination", "citations", "rejections", "valid_rejections", "mean_length"]


def main(args: crpo.Args, sweep: Sweep):
    seeds = int_list(sweep.seeds, "--seeds")
    runs = {method: [replace(args, method=method, seed=seed) for seed in seeds] for method in ("grpo", "crpo")}
    summarize = lambda run: {key: run["after"][key] for key in KEYS}
    out = f"{args.output_dir}/crpo_compare/crpo_compare"
    settings = asdict(args) | asdict(sweep)
    return seed_sweep(crpo.train, runs, summarize, out, settings, title="GRPO vs CRPO (tiny model)")


ARGS = (crpo.Args, Sweep)  # the script's options and the comparison's

if __name__ == "__main__":
    run_cli(ARGS, main)
