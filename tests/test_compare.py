"""The comparisons in experiments/: every arm for every seed, one table, one plot, one JSON (sweep.seed_sweep), on
settings small enough for a smoke run. The numbers in RESULTS.md come from these scripts at full size."""

import importlib
import json

import pytest
from conftest import script_runner

import grpo_pp as G
import plumbing

COMPARISONS = {
    "experiments/crpo_vs_grpo.py": (
        ["--num_steps", "1", "--sft_steps", "20", "--num_train", "100", "--num_eval", "4", "--prompts_per_step", "2",
         "--group_size", "2", "--max_new_tokens", "16"],
        "crpo_compare", ["grpo", "crpo"],
    ),
    "experiments/tree_vs_chain.py": (
        ["--num_steps", "20", "--sft_steps", "20", "--num_eval", "4", "--prompts_per_step", "1", "--max_step_tokens",
         "8", "--max_turns", "1", "--tokens", "48"],
        "tree_grpo_compare", ["chain", "tree", "tree_inter", "tree_intra"],
    ),
    "experiments/grpo_pp_stability.py": (
        ["--num_steps", "1", "--eval_every", "1", "--warm_start_steps", "3", "--sizes", "2", "--eval_per_class", "1",
         "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8"],
        "grpo_pp_compare", ["grpo (2/class)", "grpo_pp (2/class)"],
    ),
}  # fmt: skip


# the slowest of the three: in the slower tier, beside tree_vs_chain's sampled readings, to keep the quick tier quick
SLOW = {"experiments/tree_vs_chain.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in COMPARISONS])
def test_comparison_runs_every_arm_and_seed(tmp_path, script):
    argv, name, arms = COMPARISONS[script]
    result = script_runner(script)(*argv, "--seeds", "0,1", "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / name / f"{name}.json").read_text())
    assert list(saved["results"]) == arms and all(len(runs) == 2 for runs in saved["results"].values())
    num_steps = int(argv[argv.index("--num_steps") + 1])
    assert saved["args"]["seeds"] == "0,1" and saved["args"]["num_steps"] == num_steps  # the sweep's and the script's
    assert all(f"| {key} |" in saved["table"] for key in saved["results"][arms[0]][0])
    assert (tmp_path / name / f"{name}.png").stat().st_size > 0


def test_grpo_pp_ablation_switches_one_stabiliser_off_per_arm(tmp_path):
    argv, _, _ = COMPARISONS["experiments/grpo_pp_stability.py"]
    arms = "no_advantage,no_skip_zero_variance,no_eps_high,no_loss_type,no_beta"
    result = script_runner("experiments/grpo_pp_stability.py")(
        *argv, "--arms", arms, "--seeds", "0", "--output_dir", str(tmp_path), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "grpo_pp_compare" / "grpo_pp_ablation.json").read_text())
    assert list(saved["results"]) == [f"{arm} (2/class)" for arm in arms.split(",")]
    # each arm's run folder records GRPO++ with exactly that stabiliser at GRPO's value
    ran = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("grpo_pp-stage1*/args.json"))]
    off = [{name for name, value in G.STABILISERS["grpo"].items() if run[name] == value} for run in ran]
    assert sorted(map(sorted, off)) == sorted([[name] for name in G.STABILISERS["grpo"]])


@pytest.mark.slow  # two short runs in a subprocess: the slower tier
def test_tree_vs_chain_reads_the_sampled_policy_at_each_quarter(tmp_path):
    argv = ["--arms", "chain,tree_l2", "--eval_samples", "2", "--tokens", "60", "--num_steps", "30", "--seeds", "0",
            "--sft_steps", "20", "--num_eval", "4", "--prompts_per_step", "1", "--max_step_tokens", "6",
            "--max_turns", "1", "--output_dir", str(tmp_path)]  # fmt: skip
    result = script_runner("experiments/tree_vs_chain.py")(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "tree_grpo_compare" / "tree_grpo_chain_vs_tree_l2.json").read_text())
    for arm in ("chain", "tree_l2"):
        (run,) = saved["results"][arm]
        sampled = [key for key in run if key.startswith("sampled_em_multihop_at_")]
        assert len(sampled) == 4 and {"found_person", "sampled_found_person"} <= set(run)
        ((tokens, ems),) = saved["curves"][arm]  # the sampled EM against thousands of tokens
        for f, key in zip((1, 2, 3, 4), sampled):  # each quarter read at the first evaluation at or past it
            assert run[key] == ems[next(i for i, x in enumerate(tokens) if x >= 60 * f / 4000)]
        assert 60 / 4000 <= tokens[0] and len(tokens) <= 4 and tokens[-1] >= 60 / 1000
    # the tree_l2 arm keeps every leaf of two expansion rounds, and the habits probe knows its runs by that
    probe = importlib.import_module("experiments.probe_tree_grpo_habits")
    ran = {probe.arm_of(json.loads(p.read_text())): json.loads(p.read_text()) for p in tmp_path.glob("*/args.json")}
    assert set(ran) == {"chain", "tree_l2"} and [ran["tree_l2"][k] for k in ("expand_rounds", "keep_leaves")] == [2, 5]


# (comparison, argv, what the error says): the comparisons' own flags, checked before anything loads
BAD = [
    ("crpo_vs_grpo", ["--seeds", "0,x"], "--seeds must be comma-separated whole numbers"),
    ("crpo_vs_grpo", ["--seeds", "0,0"], "--seeds repeats a seed"),
    ("tree_vs_chain", ["--arms", "chain,forest"], "--arms: unknown arm 'forest'"),
    ("tree_vs_chain", ["--tokens", "0"], "--tokens must be at least 1"),
    ("grpo_pp_stability", ["--sizes", "8;16"], "--sizes must be comma-separated whole numbers"),
    ("grpo_pp_stability", ["--arms", "grpo,no_kl"], "--arms: unknown arm 'no_kl'; known: grpo"),
    ("grpo_pp_stability", ["--group_size", "1"], "--group_size must be at least 2"),  # the script's own
]


@pytest.mark.parametrize("name, argv, message", BAD, ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_bad_comparison_arguments_are_argparse_errors(name, argv, message, capsys):
    experiment = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as stop:
        plumbing.parse_args(experiment.ARGS, argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
