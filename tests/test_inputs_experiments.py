"""The experiments' command lines (and tutorials/run.py's): `--help` works, and bad input is argparse's
`error: ...` naming the option or the file, exit code 2, before any model loads. A comparison refuses arms that
would be the same runs, a seed twice, a budget below one step and data too small for what an arm claims; its
tables name the run folder of every run. Each script runs in this process (as conftest.main_runner runs them): no
model is loaded on any path tested here."""

import json
import runpy
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT

import crpo  # noqa: F401  (the scripts' imports, once at collection: no test pays for them)
import grpo_pp  # noqa: F401
import plumbing
import tree_grpo
from experiments import probe_tree_grpo_habits as probe
from experiments import tree_vs_chain
from tutorials import run as tutorials_run

LESIONS = str(ROOT / "tests" / "fixtures" / "lesions")  # 3 training images of each class
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine with a GPU this starts the work")


def cli(script: str, *argv, capsys):
    """`python experiments/<script>.py *argv` in this process: (exit code, stdout, stderr)."""
    saved, sys.argv = sys.argv, [str(ROOT / "experiments" / f"{script}.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


# (script, argv, what the error says): each case exits with code 2 and that message, before any model loads
BAD = [
    # crpo_vs_grpo.py: what tells the methods apart, and the seeds
    ("crpo_vs_grpo", ["--weights", "accuracy=10,format=1"], "--weights accuracy=10,format=1 would give grpo and crpo"),
    ("crpo_vs_grpo", ["--method", "grpo"], "--method: the comparison sets it for every run"),
    ("crpo_vs_grpo", ["--seed", "3"], "--seed: the comparison sets it for every run (from --seeds)"),
    ("crpo_vs_grpo", ["--seeds", "0,1,0"], "--seeds repeats a seed (0,1,0)"),
    ("crpo_vs_grpo", ["--seeds", "-1"], "--seeds must be whole numbers of at least 0, got -1"),
    (
        "crpo_vs_grpo",
        ["--seeds", "0,4294967296"],
        "--seeds must be below 2**32 = 4294967296 (numpy's seeds), got 4294967296",
    ),
    ("tree_credit", ["--seeds", "4294967296"], "--seeds must be below 2**32"),
    ("crpo_vs_grpo", ["--num_steps", "0"], "--num_steps must be at least 1, got 0"),
    ("crpo_vs_grpo", ["--bogus_flag", "3"], "unrecognized arguments: --bogus_flag 3"),
    # grpo_pp_stability.py: sizes, arms, and an image folder smaller than a size claims
    ("grpo_pp_stability", ["--sizes", "8,16", "--dataset_path", LESIONS], "has 3 training images of"),
    ("grpo_pp_stability", ["--sizes", "3,4", "--dataset_path", LESIONS], "fewer than 4/class; give sizes of at most 3"),
    ("grpo_pp_stability", ["--sizes", "8,8"], "--sizes repeats a size (8,8)"),
    ("grpo_pp_stability", ["--sizes", "0"], "--sizes must be whole numbers of at least 1, got 0"),
    ("grpo_pp_stability", ["--arms", "grpo,grpo"], "--arms repeats an arm (grpo,grpo)"),
    (
        "grpo_pp_stability",
        ["--arms", "grpo_pp,no_beta", "--beta", "0"],
        "the arms 'grpo_pp (8/class)' and 'no_beta (8/class)' would be the same runs: what tells them apart is set for "
        "both by --beta",
    ),
    (
        "grpo_pp_stability",
        [
            "--advantage",
            "group",
            "--skip_zero_variance",
            "false",
            "--eps_high",
            "0.2",
            "--loss_type",
            "grpo",
            "--beta",
            "0",
        ],
        "the arms 'grpo (8/class)' and 'grpo_pp (8/class)' would be the same",
    ),
    ("grpo_pp_stability", ["--images_per_class", "4"], "--images_per_class: the comparison sets it for every run"),
    ("grpo_pp_stability", ["--no_grpo_pp"], "--grpo_pp: the comparison sets it for every run"),
    # grpo_pp_pipeline.py
    ("grpo_pp_pipeline", ["--stage", "1"], "--stage: the comparison sets it for every run"),
    ("grpo_pp_pipeline", ["--seed", "2"], "--seed: the comparison sets it"),
    ("grpo_pp_pipeline", ["--seeds", "0,0"], "--seeds repeats a seed"),
    # tree_vs_chain.py: a budget below one step, or beyond the steps; arms made equal; what the arms set
    (
        "tree_vs_chain",
        ["--tokens", "100"],
        "--tokens 100 is below one step of the arm chain: --prompts_per_step 8 x 4 "
        "trajectories x --max_turns 7 x --max_step_tokens 32 = up to 7168 tokens",
    ),
    (
        "tree_vs_chain",
        ["--arms", "tree_l2", "--tokens", "10000"],
        "--tokens 10000 is below one step of the arm tree_l2",
    ),
    ("tree_vs_chain", ["--num_steps", "2"], "--num_steps 2 steps of the arm chain generate at most 14336 tokens"),
    (
        "tree_vs_chain",
        ["--arms", "tree,tree_off_policy", "--num_minibatches", "4"],
        "the arms 'tree' and 'tree_off_policy' would be the same runs: what tells them apart is set for both by "
        "--num_minibatches",
    ),
    (
        "tree_vs_chain",
        ["--arms", "tree,tree_l2", "--expand_rounds", "2", "--keep_leaves", "5"],
        "set for both by --expand_rounds, --keep_leaves",
    ),
    ("tree_vs_chain", ["--rollout", "chain"], "--rollout: the comparison sets it for every run (from each arm"),
    (
        "tree_vs_chain",
        ["--token_budget", "5000"],
        "--token_budget: the comparison sets it for every run (from --tokens)",
    ),
    ("tree_vs_chain", ["--arms", "chain,chain"], "--arms repeats an arm (chain,chain)"),
    ("tree_vs_chain", ["--arms", "chain,forest"], "--arms: unknown arm 'forest'"),
    # tree_credit.py
    ("tree_credit", ["--budget", "100"], "--budget 100 is below one batch (144 actions at most)"),
    ("tree_credit", ["--arms", "tree,tree"], "--arms repeats an arm"),
    ("tree_credit", ["--expand_nodes", "0"], "--expand_nodes 0 x --expand_rounds 1 leaves each tree one chain"),
    ("tree_credit", ["--signal_batches", "1"], "--signal_batches must be 0 (skip it) or at least 2"),
    ("tree_credit", ["--seeds", "-1"], "--seeds must be whole numbers of at least 0"),
    ("tree_credit", ["--decisive", "0"], "--decisive must be whole numbers of at least 1"),
    ("tree_credit", ["--luck", "0,nan"], "--luck must be at least 0"),
    ("tree_credit", ["--out", f"{__file__}/x"], f"--out {__file__}/x: cannot write in"),
    # the benchmarks and probes
    (
        "bench_tree_budget",
        ["--model", "smollm2-135m", "--bogus_flag", "3"],
        "unrecognized arguments: --model smollm2-135m --bogus_flag 3",
    ),
    ("bench_grpo_pp_prefix_grouper", ["--group_size", "4"], "unrecognized arguments: --group_size 4"),
    ("probe_smollm2_arithmetic", ["extra"], "unrecognized arguments: extra"),
    ("probe_shared_prefill_smollm2", ["--batches", "0"], "--batches must be at least 1, got 0"),
    ("bench_prefix_grouper", ["--model", "smal"], "argument --model: invalid choice: 'smal'"),
    ("bench_prefix_grouper", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("bench_prefix_grouper", ["--group_sizes", "0"], "--group_sizes must be whole numbers of at least 1, got 0"),
    ("bench_prefix_grouper", ["--group_sizes", "4,4"], "--group_sizes repeats a size"),
    ("bench_prefix_grouper", ["--prompt_lengths", "256,x"], "--prompt_lengths must be comma-separated whole numbers"),
    ("bench_prefix_grouper", ["--device", "cuda:99"], "--device must be auto, cpu, or a cuda or mps device"),
    ("bench_prefix_grouper", ["--kernel", "flash_attention_2"], "argument --kernel: invalid choice"),
    ("bench_prefix_grouper", ["--dtype", "float16"], "argument --dtype: invalid choice"),
    ("bench_grpo_vs_trl", ["--warmup", "30"], "--warmup 30 leaves none of --steps 22 to time"),
    ("bench_grpo_vs_trl", ["--steps", "3", "--warmup", "3"], "--warmup 3 leaves none of --steps 3 to time"),
    ("bench_grpo_vs_trl", ["--pass_shape", "1024,64"], "--pass_shape must be P,S,G (three whole numbers"),
    ("bench_grpo_vs_trl", ["--pass_shape", "1024,0,8"], "--pass_shape must be three numbers of at least 1"),
    ("bench_grpo_vs_trl", ["--output", str(ROOT)], f"--output {ROOT}: give a JSON file's path"),
    ("bench_grpo_vs_trl", ["--setting", "big"], "argument --setting: invalid choice: 'big'"),
    ("bench_grpo_vs_trl", ["--pass_repeats", "0"], "--pass_repeats must be at least 1"),
    ("gpu_check", ["--report", str(ROOT)], f"--report {ROOT}: give a file's path"),
    ("probe_tree_grpo_habits", ["no/such/folder"], "FOLDER no/such/folder: no such folder"),
    ("probe_tree_grpo_habits", ["--samples", "-1"], "--samples must be at least 0, got -1"),
    ("probe_tree_grpo_habits", ["--demo_trust", "2"], "--demo_trust must be in [0, 1], got 2.0"),
    ("probe_tree_grpo_habits", ["--split", "test"], "argument --split: invalid choice: 'test'"),
    ("ab_prefix_grouper", [], "the following arguments are required: PREVIOUS.py, MODEL, ROUNDS"),
    ("ab_prefix_grouper", ["no_such.py", "tiny", "5"], "PREVIOUS.py no_such.py: no such file"),
    ("ab_prefix_grouper", [str(ROOT / "prefix_grouper.py"), "tiny", "5"], "is this prefix_grouper.py: both sides"),
    ("ab_prefix_grouper", [str(ROOT / "grpo.py"), "tiny", "5"], "grpo.py is not a prefix_grouper.py: it has no"),
    ("ab_prefix_grouper", [str(ROOT / "README.md"), "tiny", "5"], "README.md does not load as Python"),
    ("ab_prefix_grouper", ["x.py", "smal", "5"], "argument MODEL: invalid choice: 'smal'"),
    ("ab_prefix_grouper", ["x.py", "tiny", "0"], "ROUNDS must be at least 1, got 0"),
    ("ab_prefix_grouper", ["x.py", "tiny", "five"], "argument ROUNDS: invalid int value: 'five'"),
    ("sweep", [], "the following arguments are required: OUT, PART.json"),
    ("sweep", ["OUT", "no_such.json"], "no_such.json: no such file"),
    ("sweep", ["OUT", __file__], "test_inputs_experiments.py is not JSON"),
    ("sweep", ["OUT", "x.json", "--curve_labels", "step"], "--curve_labels takes two labels, x then y; got 1"),
    ("sweep", ["OUT", "x.json", "--bogus_flag"], "unrecognized arguments: --bogus_flag"),
]


@pytest.mark.parametrize("script, argv, message", BAD, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD])
def test_bad_input_is_an_argparse_error(script, argv, message, capsys):
    code, _, err = cli(script, *argv, capsys=capsys)
    assert code == 2 and message in err, err
    assert f"{script}.py: error: " in err and "Traceback" not in err


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("bench_prefix_grouper", ["--device", "cuda"], "--device must be auto, cpu, or a cuda or mps device"),
        ("gpu_check", [], "no CUDA GPU here: run this on a machine with one (or pass --estimates)"),
    ],
)
@NO_GPU
def test_a_gpu_asked_for_where_there_is_none(script, argv, message, capsys):
    code, _, err = cli(script, *argv, capsys=capsys)
    assert code == 2 and message in err, err


SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "trl_prefix_grouper")  # a library


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script, capsys):
    code, out, _ = cli(script, "--help", capsys=capsys)
    assert code == 0 and out.startswith(f"usage: {script}.py [-h]"), out


def test_trl_missing_is_said_before_anything_runs(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    code, _, err = cli("bench_grpo_vs_trl", capsys=capsys)
    assert code == 2 and "this benchmark needs TRL: pip install -r requirements-bench.txt" in err


# ----------------------------------------------------------------------------------------------------------------
# sweep.py: parts merged into one table


def part(path, arm, seeds, runs=True):
    """A comparison's JSON as seed_sweep writes it: one arm, a score per seed (and, unless runs=False, where each
    run's folder is, as parts written before run folders were recorded lack)."""
    seeds = [int(s) for s in seeds.split(",")]
    saved = {
        "args": {"arms": arm, "seeds": ",".join(map(str, seeds)), "lr": 0.1},
        "results": {arm: [{"score": float(s)} for s in seeds]},
        "curves": {arm: [[[0, 1], [0, s]] for s in seeds]},
    }
    if runs:
        saved["runs"] = {arm: [{"seed": s, "run_dir": f"runs/{arm}{s}"} for s in seeds]}
    path.write_text(json.dumps(saved))
    return str(path)


def test_merging_refuses_a_seed_twice_and_names_every_run_folder(tmp_path, capsys):
    a, b = part(tmp_path / "a.json", "a", "0,1"), part(tmp_path / "b.json", "b", "0,1", runs=False)
    for argv, message in [
        ([str(tmp_path / "m"), a, a], "a part is given twice"),  # every run would count twice
        ([str(tmp_path / "m"), a, part(tmp_path / "a2.json", "a", "1,2")], "a2.json: arm 'a' ran seed 1 in an earlier"),
        ([a, b], f"OUT {a}: give the merged files' path without .json"),  # OUT forgotten: a.json would be overwritten
        ([str(tmp_path / "a"), a], "would overwrite a part"),
        ([str(tmp_path / "m"), str(tmp_path)], f"{tmp_path}: no such file"),  # a folder
    ]:
        code, _, err = cli("sweep", *argv, capsys=capsys)
        assert code == 2 and message in err, (argv, err)
    assert json.loads((tmp_path / "a.json").read_text())["results"] == {"a": [{"score": 0.0}, {"score": 1.0}]}
    code, out, _ = cli("sweep", str(tmp_path / "merged"), a, b, part(tmp_path / "b2.json", "b", "2"), capsys=capsys)
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert code == 0 and [run["seed"] for run in merged["runs"]["b"]] == [0, 1, 2]
    assert (
        merged["runs"]["a"][1] == {"seed": 1, "run_dir": "runs/a1"} and merged["runs"]["b"][2]["run_dir"] == "runs/b2"
    )
    assert "| a | 1 | runs/a1 |" in out and "| b | 0 | not recorded |" in out
    code, _, err = cli("sweep", str(tmp_path / "again"), str(tmp_path / "merged.json"), capsys=capsys)
    assert code == 2 and "merged.json is not a comparison's JSON" in err  # a merged table is not a part


# ----------------------------------------------------------------------------------------------------------------
# tree_vs_chain.py: one key per quarter of the budget, whatever the budget


@pytest.mark.parametrize("tokens, keys", [(100, ["0.025k", "0.05k", "0.075k"]), (70000, ["17.5k", "35k", "52.5k"])])
def test_each_quarter_of_the_budget_has_its_own_reading(tokens, keys, monkeypatch, tmp_path):
    small = ["--prompts_per_step", "1", "--max_turns", "1", "--max_step_tokens", "8", "--num_steps", "10000"]
    args, comparison = plumbing.parse_args(tree_vs_chain.ARGS, [*small, "--tokens", str(tokens), "--seeds", "0"])
    evaluation = lambda step, generated, em: {
        "step": step,
        "budget/generated_tokens": generated,
        "eval/em_multihop": em,
        "reward": 0.0,
    }
    curve = [evaluation(0, 0, 0.0), evaluation(9, tokens, 0.4)]  # EM read between them: linear in the tokens
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in curve))
    after = {"em_multihop": 0.4, "em_1hop": 0.5, "tool_calls": 2.0}
    run = {"budget": {"generated_tokens": tokens, "trajectories": 10}, "after": after, "run_dir": str(tmp_path)}
    monkeypatch.setattr(tree_vs_chain, "seed_sweep", lambda train, runs, summarize, *a, **k: summarize(run))
    read = tree_vs_chain.main(args, comparison)
    assert [read[f"em_multihop_at_{key}"] for key in keys] == pytest.approx([0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------------------------------------------
# probe_tree_grpo_habits.py: one run per arm and seed, each named


def fake_run(folder, name, **changes):
    """A finished run folder of tree_vs_chain.py's: args.json (tree_grpo.py's defaults, changed) and results.json."""
    run = folder / f"tree_grpo-{changes.get('rollout', 'tree')}__tiny__seed{changes.get('seed', 0)}__{name}"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(asdict(tree_grpo.Args(output_dir=str(folder))) | changes))
    (run / "results.json").write_text("{}")
    return run


def test_the_probe_reads_one_run_per_arm_and_seed(tmp_path, capsys):
    chain = fake_run(tmp_path, "1", rollout="chain")
    fake_run(tmp_path, "2", rollout="chain")  # the same run again (a second comparison with this arm): left out
    tree = fake_run(tmp_path, "3", seed=1)
    assert probe.find_runs(str(tmp_path)) == {("chain", 0): chain, ("tree", 1): tree}
    assert (
        f"tree_grpo-chain__tiny__seed0__2 repeats {chain} (arm chain, seed 0, same settings)" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rollout="chain", learning_rate=1e-3), "are both arm chain, seed 0, with other settings (learning_rate)"),
        (dict(keep_leaves=2), "is a run of none of tree_vs_chain.py's arms"),
        (dict(seed=1, num_eval=10), "has another task or warm start than"),
    ],
)
def test_the_probe_refuses_runs_it_cannot_tell_apart(changes, message, tmp_path, capsys):
    fake_run(tmp_path, "1", rollout="chain")
    fake_run(tmp_path, "2", **changes)
    code, _, err = cli("probe_tree_grpo_habits", str(tmp_path), capsys=capsys)
    assert code == 2 and message in err, err


def test_the_probe_names_a_folder_without_runs_or_with_a_broken_one(tmp_path, capsys):
    code, _, err = cli("probe_tree_grpo_habits", str(tmp_path), capsys=capsys)
    assert code == 2 and f"no run folders with results.json under {tmp_path}" in err
    (fake_run(tmp_path, "1") / "args.json").write_text("{")
    code, _, err = cli("probe_tree_grpo_habits", str(tmp_path), capsys=capsys)
    assert code == 2 and "args.json cannot be read" in err


# ----------------------------------------------------------------------------------------------------------------
# tutorials/run.py


@pytest.mark.parametrize(
    "argv, message",
    [
        (["99_nope"], "no notebook '99_nope' in tutorials/; there are 01_grpo, 02_prefix_grouper"),
        (["01_grpo", "tutorials/01_grpo.ipynb"], "a notebook is named twice"),
        (["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    ],
)
def test_tutorials_run_names_a_notebook_that_is_not_there(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        tutorials_run.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_tutorials_run_has_help(capsys):
    with pytest.raises(SystemExit) as stop:
        tutorials_run.main(["--help"])
    assert stop.value.code == 0 and "--solutions" in capsys.readouterr().out
