"""`--compare` in each script: every method for every seed, one table, one plot, one JSON (common.seed_sweep), on
settings small enough for a smoke run. The numbers in RESULTS.md come from these paths at full size."""

import json

import pytest
from conftest import script_runner

import grpo_pp as G

COMPARISONS = {
    "crpo.py": (["--num_steps", "1", "--sft_steps", "20", "--num_train", "100", "--num_eval", "4",
                 "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "16"], ["grpo", "crpo"]),
    "tree_grpo.py": (["--num_steps", "1", "--sft_steps", "20", "--num_eval", "4", "--prompts_per_step", "1",
                      "--max_step_tokens", "8", "--max_turns", "1", "--compare_tokens", "1"],
                     ["chain", "tree", "tree_inter", "tree_intra"]),
    "grpo_pp.py": (["--num_steps", "1", "--eval_every", "1", "--warm_start_steps", "3", "--sizes", "2",
                    "--eval_per_class", "1", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8"],
                   ["grpo (2/class)", "grpo_pp (2/class)"]),
}  # fmt: skip


@pytest.mark.parametrize("script", list(COMPARISONS))
def test_compare_runs_every_method_and_seed(tmp_path, script):
    argv, methods = COMPARISONS[script]
    result = script_runner(script)(*argv, "--compare", "--seeds", "0,1", "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    name = script.removesuffix(".py") + "_compare"
    saved = json.loads((tmp_path / name / f"{name}.json").read_text())
    assert list(saved["results"]) == methods and all(len(runs) == 2 for runs in saved["results"].values())
    assert saved["args"]["compare"] and saved["args"]["seeds"] == "0,1"
    assert all(f"| {key} |" in saved["table"] for key in saved["results"][methods[0]][0])
    assert (tmp_path / name / f"{name}.png").stat().st_size > 0


def test_grpo_pp_ablation_switches_one_stabiliser_off_per_arm(tmp_path):
    argv, _ = COMPARISONS["grpo_pp.py"]
    arms = "no_advantage,no_skip_zero_variance,no_eps_high,no_loss_type,no_beta"
    result = script_runner("grpo_pp.py")(*argv, "--compare", "--arms", arms, "--seeds", "0", "--output_dir",
                                         str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "grpo_pp_compare" / "grpo_pp_ablation.json").read_text())
    assert list(saved["results"]) == [f"{arm} (2/class)" for arm in arms.split(",")]
    # each arm's run folder records GRPO++ with exactly that stabiliser at GRPO's value
    ran = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("grpo_pp-stage1*/args.json"))]
    off = [{name for name, value in G.STABILISERS["grpo"].items() if run[name] == value} for run in ran]
    assert sorted(map(sorted, off)) == sorted([[name] for name in G.STABILISERS["grpo"]])
