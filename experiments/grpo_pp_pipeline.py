"""GRPO++'s three stages for several seeds (RESULTS.md, "Stages 2 and 3"): each stage's held-out macro-F1 and
factual error rate, in one JSON file.

    python experiments/grpo_pp_pipeline.py                  # seeds 0, 1, 2: stages 1 -> 2 -> 3, tiny VLM, CPU
Every option of grpo_pp.py applies to each seed's pipeline but --seed (--seeds), --stage and --init (every pipeline
runs all three stages from its own stage 1).
"""

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the algorithm files

import grpo_pp  # noqa: E402
from experiments.sweep import Sweep, int_list, refuse_set_for_every_run  # noqa: E402
from plumbing import arg, run_cli  # noqa: E402


@dataclass
class Seeds(Sweep):
    seeds: str = arg("0,1,2", "comma-separated seeds, one pipeline each")


def plan(args: grpo_pp.Args, sweep: Seeds) -> list[grpo_pp.Args]:
    """One grpo_pp.Args per seed, or a UsageError for an option the pipeline sets itself."""
    refuse_set_for_every_run(args, {"seed": "from --seeds", "stage": "all three", "init": "from its stage 1"})
    return [replace(args, seed=seed) for seed in int_list(sweep.seeds, "--seeds")]


def main(args: grpo_pp.Args, sweep: Seeds):
    runs = {}
    for seed_args in plan(args, sweep):
        results = grpo_pp.pipeline(seed_args)
        keep = ("f1_before", "f1_after", "f1_best", "collapses", "run_dir")
        results["stage1"] = {k: results["stage1"][k] for k in keep}
        runs[f"seed{seed_args.seed}"] = results
    out = Path(args.output_dir) / "grpo_pp_pipeline.json"
    out.write_text(json.dumps({"args": asdict(args) | asdict(sweep), "runs": runs}, indent=2))
    folders = "\n".join(
        f"| {seed} | {stage} | {r['run_dir']} |" for seed, run in runs.items() for stage, r in run.items()
    )
    print(f"\nthe runs:\n\n| seed | stage | run folder |\n|---|---|---|\n{folders}\n")
    print(f"[grpo_pp_pipeline] every stage's numbers in {out}")
    return runs


ARGS = (grpo_pp.Args, Seeds)  # the script's options and the pipeline's seeds

if __name__ == "__main__":
    run_cli(ARGS, main)
