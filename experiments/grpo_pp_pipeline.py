"""GRPO++'s three stages for several seeds (RESULTS.md, "Stages 2 and 3"): each stage's held-out macro-F1 and
factual error rate, in one JSON file.

    python experiments/grpo_pp_pipeline.py                  # seeds 0, 1, 2: stages 1 -> 2 -> 3, tiny VLM, CPU
Every option of grpo_pp.py applies to each seed's pipeline.
"""

import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the algorithm files

import grpo_pp  # noqa: E402
from experiments.sweep import Sweep, int_list  # noqa: E402
from plumbing import arg, run_cli  # noqa: E402


@dataclass
class Seeds(Sweep):
    seeds: str = arg("0,1,2", "comma-separated seeds, one pipeline each")


def main(args: grpo_pp.Args, sweep: Seeds):
    runs = {}
    for seed in int_list(sweep.seeds, "--seeds"):
        results = grpo_pp.pipeline(replace(args, seed=seed))
        results["stage1"] = {k: results["stage1"][k] for k in ("f1_before", "f1_after", "f1_best", "collapses")}
        runs[f"seed{seed}"] = results
    out = Path(args.output_dir) / "grpo_pp_pipeline.json"
    out.write_text(json.dumps({"args": asdict(args) | asdict(sweep), "runs": runs}, indent=2))
    print(f"[grpo_pp_pipeline] every stage's numbers in {out}")
    return runs


ARGS = (grpo_pp.Args, Seeds)  # the script's options and the pipeline's seeds

if __name__ == "__main__":
    run_cli(ARGS, main)
