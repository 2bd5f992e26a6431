"""Bad input is one clear message: argparse's `error: ...` and exit code 2 for the command line, found before any
model loads wherever the arguments alone show it; a clear UsageError for data and model folders; Ctrl-C keeps the
run and ends without a traceback."""

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, main_runner

import common
import crpo
import grpo
import grpo_pp
import plumbing
import prefix_grouper as pg
import tree_grpo
from experiments.grpo_pp_stability import with_method
from tasks import arithmetic, clinic, lesions, namesakes

SCRIPTS = {"grpo.py": grpo, "crpo.py": crpo, "tree_grpo.py": tree_grpo, "grpo_pp.py": grpo_pp}

# (argv, what the error says): every script takes each of these flags
SHARED = [
    (["--num_steps", "0"], "--num_steps must be at least 1, got 0"),
    (["--eval_every", "0"], "--eval_every must be at least 1"),
    (["--prompts_per_step", "0"], "--prompts_per_step must be at least 1"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be > 0"),
    (["--beta", "-1"], "--beta must be at least 0"),
    (["--eps_low", "1"], "--eps_low must be in [0, 1)"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--output_dir", __file__], "is a file, not a folder"),
    (["--no_such_flag", "3"], "unrecognized arguments: --no_such_flag 3"),
    (["--group_size", "1"], "--group_size must be at least 2"),
]
# flags some scripts have
OWN = {
    "grpo.py": [
        (["--num_train", "0"], "--num_train must be at least 1"),  # not blamed on --num_shots
        (["--num_eval", "0"], "--num_eval must be at least 1"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
        (["--num_iterations", "0"], "--num_iterations must be at least 1"),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    ],
    "crpo.py": [
        (["--weights", "accuracy"], "is not objective=<finite number>"),
        (["--weights", "accuracy=nan"], "is not objective=<finite number>"),
        (["--num_iterations", "0"], "--num_iterations must be at least 1"),
    ],
    "tree_grpo.py": [
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--keep_leaves", "4"], "more than the 1 + N*L = 3 leaves"),
        (["--num_minibatches", "9"], "--num_minibatches must be between 1 and --prompts_per_step (8)"),
        (["--dual_clip", "1"], "--dual_clip must be > 1"),
        (["--rollout", "chain", "--advantage", "intra"], "gives every advantage 0"),
    ],
    "grpo_pp.py": [
        (["--stage", "3"], "--stage 3 alone needs --init"),
        (["--images_per_class", "0"], "--images_per_class must be at least 1"),
        (["--num_iterations", "0"], "--num_iterations must be at least 1"),
    ],
}
CASES = [(script, argv, message) for script in SCRIPTS for argv, message in SHARED + OWN[script]]


@pytest.mark.parametrize("script, argv, message", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_arguments_are_argparse_errors(script, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        plumbing.parse_args(SCRIPTS[script].Args, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage:"), err
    assert message in err.splitlines()[-1] and "Traceback" not in err, err


def declared(script):
    """(field, what it accepts, its type) for every field of a script's Args that declares a range or device."""
    fields = dataclasses.fields(SCRIPTS[script].Args)
    return [(f.name, plumbing.accepted(plumbing.ACCEPTS[f]), f.type) for f in fields if f in plumbing.ACCEPTS]


def outside_and_edges(accepts, kind):
    """Values just outside what a field accepts, and its edges inside, as command-line strings."""
    if isinstance(accepts, plumbing.Devices):
        return ["cuda:99", "tpu"], ["cpu", "auto"]
    step = 1 if kind is int else 1e-3
    outside, edges = (["nan", "inf"] if kind is not int else []), []
    if accepts.low is not None:
        outside.append(accepts.low if accepts.low_open else accepts.low - 1)
        edges.append(accepts.low + step if accepts.low_open else accepts.low)
    if accepts.high is not None:
        outside.append(accepts.high if accepts.high_open else accepts.high + 1)
        edges.append(accepts.high - step if accepts.high_open else accepts.high)
    return [str(v) for v in outside], [str(v) for v in edges]


# a value at an edge that a combination check refuses with the defaults gets these companions
COMPANIONS = {
    ("tree_grpo.py", "expand_nodes"): ["--keep_leaves", "1"],
    ("tree_grpo.py", "expand_rounds"): ["--keep_leaves", "1"],
    ("tree_grpo.py", "group_size"): ["--rollout", "chain"],  # options of one mode alone are given in that mode
    ("tree_grpo.py", "num_train"): ["--dataset", "hotpotqa"],
}
FIELDS = [(script, name) for script in SCRIPTS for name, _, _ in declared(script)]


@pytest.mark.parametrize("script, name", FIELDS, ids=[f"{s}:{n}" for s, n in FIELDS])
def test_every_declared_range_is_checked_at_the_door(script, name, capsys):
    """Every field of every script's Args: each value just outside its declared range is argparse's error naming it,
    each edge inside parses; --help shows the range."""
    accepts, kind = next((a, t) for n, a, t in declared(script) if n == name)
    kind = {int: int, str: str}.get(kind, float)
    outside, edges = outside_and_edges(accepts, kind)
    for value in outside:
        with pytest.raises(SystemExit) as stop:
            plumbing.parse_args(SCRIPTS[script].Args, [f"--{name}", value])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"--{name} must be {accepts}, got" in err.splitlines()[-1], (value, err)
    for value in edges:
        args = plumbing.parse_args(SCRIPTS[script].Args, [f"--{name}", value, *COMPANIONS.get((script, name), [])])
        assert getattr(args, name) == kind(value)
    with pytest.raises(SystemExit):
        plumbing.parse_args(SCRIPTS[script].Args, ["--help"])
    assert f"[{accepts}]" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_number_declares_what_it_accepts(script):
    """A numeric option without a declared range would take any value: each one has one."""
    ranged = {name for name, _, _ in declared(script)}
    numeric = {f.name for f in dataclasses.fields(SCRIPTS[script].Args) if f.type in (int, float, float | None)}
    assert numeric <= ranged, numeric - ranged


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_command_line_says_error_and_exits_2_without_a_traceback(script, tmp_path, capsys):
    """Arguments alone: exit 2 before anything loads. An error found later (a missing data folder): the same."""
    later = {"grpo.py": ["--dataset", "gsm8k", "--dataset_path"], "crpo.py": ["--dataset", "medqa", "--dataset_path"],
             "tree_grpo.py": ["--dataset", "hotpotqa", "--dataset_path"], "grpo_pp.py": ["--dataset_path"]}  # fmt: skip
    for argv in (["--num_steps", "0"], [*later[script], str(tmp_path / "missing")]):
        code, err = main_runner(script)(*argv, "--output_dir", str(tmp_path), capsys=capsys)
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert err.splitlines()[-1].startswith(f"{script}: error: "), err[-2000:]


def test_ctrl_c_keeps_metrics_plot_and_model_without_a_traceback(tmp_path):
    command = [sys.executable, str(ROOT / "grpo.py"), "--sft_steps", "20", "--num_steps", "500", "--num_eval", "8",
               "--prompts_per_step", "2", "--group_size", "2", "--output_dir", str(tmp_path)]  # fmt: skip
    # SIGINT at its default in the child: a shell that starts jobs in the background (nohup, `&` without job
    # control) makes them ignore SIGINT, and Python then installs no KeyboardInterrupt handler
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.read_text().count("\n") >= 2 for p in tmp_path.glob("*/metrics.jsonl")):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "metrics.png").exists() and (run_dir / "metrics.csv").exists()
    assert (run_dir / "model" / "config.json").exists()
    assert re.search(r"interrupted: metrics and plot up to step [1-9]\d* and the model as it was saved in", err), err


# ---------------------------------------------------------------------------------------------------------------
# data files and folders


def write_jsonl(folder, split, rows):
    folder.mkdir(exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_gsm8k_with_a_missing_field_split_or_marker(tmp_path):
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    write_jsonl(tmp_path / "no_split", "train", [good])
    with pytest.raises(plumbing.UsageError, match="has the splits \\['train'\\], but needs 'test'"):
        arithmetic.load_gsm8k(str(tmp_path / "no_split"), 10, 10)
    for split in ("train", "test"):
        write_jsonl(tmp_path / "no_field", split, [{"question": "1+1?", "solution": "2"}])
    with pytest.raises(plumbing.UsageError, match="the 'train' split has no field 'answer'"):
        arithmetic.load_gsm8k(str(tmp_path / "no_field"), 10, 10)
    write_jsonl(tmp_path / "no_marker", "train", [good, {"question": "2+2?", "answer": "2+2 is 4"}])
    write_jsonl(tmp_path / "no_marker", "test", [good])
    with pytest.raises(
        plumbing.UsageError, match="no_marker \\(train\\) row 1: answer must be text ending in '#### <number>'"
    ):
        arithmetic.load_gsm8k(str(tmp_path / "no_marker"), 10, 10)


def test_medqa_and_hotpotqa_with_a_missing_field_or_split(tmp_path):
    row = {"question": "q", "options": {"A": "a", "B": "b"}}  # no answer_idx
    write_jsonl(tmp_path / "medqa", "train", [row])
    write_jsonl(tmp_path / "medqa", "test", [row])
    with pytest.raises(plumbing.UsageError, match="MedQA at .* has no field 'answer_idx'"):
        clinic.load_medqa(str(tmp_path / "medqa"), 10, 10)
    hotpot = json.loads((ROOT / "tests/fixtures/hotpotqa/train.jsonl").read_text().splitlines()[0])
    write_jsonl(tmp_path / "hotpotqa", "train", [hotpot])  # no validation or test split
    with pytest.raises(plumbing.UsageError, match="needs 'validation' or 'test'"):
        namesakes.load_hotpotqa(str(tmp_path / "hotpotqa"), 10, 10)


def test_image_folder_without_a_test_split(tmp_path):
    import shutil

    shutil.copytree(ROOT / "tests/fixtures/lesions/train", tmp_path / "train")
    with pytest.raises(plumbing.UsageError, match="needs 'test' or 'validation'"):
        lesions.load_image_dataset(str(tmp_path), 2, 2, seed=0)


def fixture_rows(name, split):
    return [json.loads(line) for line in (ROOT / f"tests/fixtures/{name}/{split}.jsonl").read_text().splitlines()]


def with_bad_row(tmp_path, name, splits, change):
    """A copy of a fixture whose train split's row 1 is changed by `change(row)`; returns its folder."""
    folder = tmp_path / name
    for split in splits:
        rows = fixture_rows(name, split)
        if split == "train":
            change(rows[1])
        write_jsonl(folder, split, rows)
    return str(folder)


# (data set, what is wrong with row 1 of its train split, what the error says): one schema per data set
MALFORMED = [
    ("gsm8k", lambda row: row.update(question=""), "question must be non-empty text"),
    ("gsm8k", lambda row: row.update(answer="the answer is 4 #### "), "answer must be text ending in '#### <number>'"),
    (
        "medqa",
        lambda row: row.update(answer_idx="E"),
        "answer_idx must be one of the options ['A', 'B', 'C', 'D'], got 'E'",
    ),
    ("medqa", lambda row: row["options"].update(C=""), "options must be a dict of at least 2 option letters"),
    ("medqa", lambda row: row.update(question=" "), "question must be non-empty text"),
    (
        "hotpotqa",
        lambda row: row["supporting_facts"].update(title=["Nowhere"]),
        "supporting_facts must be {'title': [...]} naming paragraphs of the row's context",
    ),
    (
        "hotpotqa",
        lambda row: row["context"]["sentences"].pop(),
        "context must be {'title': [...], 'sentences': [[...], ...]}, one list",
    ),
    ("hotpotqa", lambda row: row.update(question=""), "question must be non-empty text"),
]
LOADERS = {
    "gsm8k": (("train", "test"), lambda path: arithmetic.load_gsm8k(path, 10, 10)),
    "medqa": (("train", "test"), lambda path: clinic.load_medqa(path, 10, 10)),
    "hotpotqa": (("train", "validation"), lambda path: namesakes.load_hotpotqa(path, 10, 10)),
}


@pytest.mark.parametrize("name, change, message", MALFORMED, ids=[f"{n}:{m[:30]}" for n, _, m in MALFORMED])
def test_a_malformed_row_names_the_file_the_row_and_the_field(tmp_path, name, change, message):
    splits, load = LOADERS[name]
    path = with_bad_row(tmp_path, name, splits, change)
    with pytest.raises(plumbing.UsageError, match=re.escape(f"{path} (train) row 1: {message}")):
        load(path)


@pytest.mark.parametrize("problem", ["does not decode", "is not a class of the graph"])
def test_an_image_folder_with_a_bad_image_or_class(tmp_path, problem):
    import shutil

    shutil.copytree(ROOT / "tests/fixtures/lesions", tmp_path / "images")
    if problem == "does not decode":
        (next((tmp_path / "images/train").glob("*/*.png"))).write_bytes(b"not a png")
        match = "row \\d+ could not be read"
    else:  # a class folder the knowledge graph does not know
        shutil.copytree(tmp_path / "images/train/nevus", tmp_path / "images/train/acne")
        shutil.copytree(tmp_path / "images/test/nevus", tmp_path / "images/test/acne")
        match = "label must be the index of a class the knowledge graph has"
    with pytest.raises(plumbing.UsageError, match=match):
        lesions.load_image_dataset(str(tmp_path / "images"), 2, 2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# grpo_pp.py: what the user sets is what runs


def test_grpo_pp_keeps_the_stabilisers_the_user_sets(tmp_path):
    args = plumbing.parse_args(grpo_pp.Args, ["--beta", "0", "--eps_high", "0.2", "--output_dir", str(tmp_path)])
    assert (args.grpo_pp, args.beta, args.eps_high, args.advantage, args.loss_type) == (
        True,
        0.0,
        0.2,
        "binary",
        "dapo",
    )
    minus_one = plumbing.parse_args(grpo_pp.Args, ["--skip_zero_variance", "false"])  # GRPO++ minus one stabiliser
    assert not minus_one.skip_zero_variance and minus_one.beta == 0.04
    plain = with_method(args, method=False)  # the stability comparison's switch keeps them too
    assert (plain.beta, plain.eps_high, plain.advantage, plain.loss_type) == (0.0, 0.2, "group", "grpo")
    assert with_method(plain, method=True) == args
    run_dir = plumbing.make_run_dir("grpo_pp", args, root=tmp_path)  # args.json records what runs
    recorded = json.loads((run_dir / "args.json").read_text())
    assert (recorded["beta"], recorded["eps_high"], recorded["advantage"]) == (0.0, 0.2, "binary")
    assert recorded["set_by_user"] == ["eps_high", "beta"]


def test_grpo_pp_equal_rewards_within_rounding_get_advantage_zero():
    for rewards in (torch.full((8,), 1.5) + 0.3 / 3, torch.full((7,), 0.1), torch.tensor([1.5 + 0.1] * 6 + [1.6] * 2)):
        group = len(rewards)
        assert torch.equal(grpo_pp.binary_advantages(rewards, group), torch.zeros(group))
        assert not grpo_pp.nonzero_variance_groups(rewards, group).any()
    real = torch.tensor([1.6, 1.6, 1.6, 0.6])
    assert grpo_pp.binary_advantages(real, 4).tolist() == [1, 1, 1, -1]
    assert grpo_pp.nonzero_variance_groups(real, 4).all()


# ---------------------------------------------------------------------------------------------------------------
# prefix_grouper.py


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        ([], [], "prompts must be a non-empty list"),
        (
            [torch.tensor([1, 2])],
            [torch.tensor([[3, 4], [5, 6]])],
            "the group of prompt 0 must be a non-empty list of 1-D tensors",
        ),
        ([torch.tensor([1, 2])], [[torch.tensor([], dtype=torch.long)]], "every completion is empty"),
        ([torch.tensor([1, 2])], [[torch.tensor([3, 10_000])]], "outside the model's vocabulary"),
        ([torch.tensor([-1, 2])], [[torch.tensor([3])]], "outside the model's vocabulary"),
    ],
)
def test_prefix_grouper_bad_input_is_a_clear_error(prompts, completions, message):
    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_model(tokenizer)
    for fn in (pg.shared_prefix_logprobs, pg.repeated_prefix_logprobs):
        with pytest.raises(ValueError, match=message):
            fn(model, prompts, completions)


P, C = [torch.tensor([1, 2])], [[torch.tensor([3])]]  # a good prompt and completion
# (call, what the error says): prefix_grouper's public functions check token ids, shapes and the temperature
API = [
    (
        lambda m: pg.shared_prefix_logprobs(m, [torch.tensor([1.0, 2.0])], C),
        "prompt 0 must be a non-empty 1-D tensor of integer token ids, got torch.float32",
    ),
    (
        lambda m: pg.repeated_prefix_logprobs(m, P, [[torch.tensor([[3]])]]),
        "completion 0 of prompt 0 must be a 1-D tensor of integer",
    ),
    (
        lambda m: pg.shared_prefix_logprobs(m, P, [torch.tensor([[3, 4]])]),
        "the group of prompt 0 must be a non-empty list",
    ),
    (
        lambda m: pg.shared_prefix_logprobs(m, P, C, temperature=0),
        "temperature must be a finite number > 0 (the sampling temperature), got 0",
    ),
    (
        lambda m: pg.repeated_prefix_logprobs(m, P, C, temperature=float("nan")),
        "temperature must be a finite number > 0",
    ),
    (lambda m: pg.trie_logprobs(m, [torch.tensor([1, 2])], [1], temperature=-1.0), "temperature must be a finite"),
    (
        lambda m: pg.trie_logprobs(m, [torch.tensor([1.5, 2.5])], [1]),
        "sequence 0 must be a 1-D tensor of integer token ids",
    ),
    (lambda m: pg.trie_logprobs(m, [torch.tensor([1, 10_000])], [1]), "outside the model's vocabulary"),
    (
        lambda m: pg.logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
        "targets must be integer ids of shape",
    ),
    (lambda m: pg.logprobs_from_logits(torch.zeros(2, 5), torch.zeros(2)), "targets must be integer ids"),
    (
        lambda m: pg.logprobs_from_logits(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), 0.0),
        "temperature must be",
    ),
]


@pytest.mark.parametrize("call, message", API, ids=[m[:40] for _, m in API])
def test_prefix_grouper_api_checks_ids_shapes_and_temperature(call, message):
    model = common.build_tiny_model(common.build_tiny_tokenizer())
    with pytest.raises(ValueError, match=re.escape(message)):
        call(model)


def test_a_damaged_cache_entry_says_how_to_rebuild_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    entry = tmp_path / "tiny-vlm-0123"
    entry.mkdir()
    (entry / "config.json").write_text("{}")  # the rest of the model gone
    with pytest.raises(plumbing.UsageError, match="It is a cache entry: delete that folder and run again"):
        common.load_vlm(str(entry))
