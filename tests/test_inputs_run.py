"""What a run is given, checked before it trains: the model (its positions, its embedding against its tokenizer,
its kind, its weights), options that the chosen mode would not use, the output folder against the file system's
limits, the model cache (read-only, full), seeds and devices; and SIGTERM keeps what Ctrl-C keeps."""

import dataclasses
import errno
import os
import re
import signal
import subprocess
import sys
import time
import typing

import filelock
import pytest
import torch
from conftest import ROOT, main_runner
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel

import common
import crpo
import grpo
import grpo_pp
import plumbing
import tree_grpo
from tasks import lesions

SCRIPTS = {"grpo.py": grpo, "crpo.py": crpo, "tree_grpo.py": tree_grpo, "grpo_pp.py": grpo_pp}


def parse_error(script, argv, capsys) -> str:
    """The last line argparse prints for `argv`, after checking that it exits with code 2."""
    with pytest.raises(SystemExit) as stop:
        plumbing.parse_args(SCRIPTS[script].Args, argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def saved(folder, model, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------
# the model a run is given


def gpt2(tokenizer, positions=32):
    """A GPT-2 of learned positions: it has no row for a position past its last."""
    size = {"n_embd": 16, "n_layer": 1, "n_head": 2}
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, eos_token_id=tokenizer.eos_token_id, **size)
    return GPT2LMHeadModel(config).eval()


def test_learned_positions_must_cover_the_prompt_and_the_completion():
    tokenizer = common.build_tiny_tokenizer()
    prompt = dict(tokenizer(["12+34=", "1+2+3+4+5+6+7+8+9=1"], return_tensors="pt", padding=True))  # 19 wide
    model = gpt2(tokenizer)
    no_eos = {"greedy": True, "suppress_tokens": [tokenizer.eos_token_id]}  # every row runs to its last new token
    assert common.generate(model, tokenizer, prompt, max_new_tokens=13, **no_eos).shape == (2, 32)  # 19 + 13
    message = "A prompt of 19 tokens and 14 new ones need 33 positions, and the model has 32 (max_position_embeddings)"
    with pytest.raises(plumbing.UsageError, match=re.escape(message) + ".*lower the completion length"):
        common.generate(model, tokenizer, prompt, max_new_tokens=14)
    # rotary positions are computed, not looked up: a model made for 32 runs on past them, as transformers lets it
    rotary = common.build_tiny_model(tokenizer)
    rotary.config.max_position_embeddings = 32
    assert common.generate(rotary, tokenizer, prompt, max_new_tokens=14, **no_eos).shape == (2, 33)


def test_a_run_on_too_few_positions_stops_at_its_first_evaluation_with_no_run_folder(tmp_path, capsys):
    tokenizer = common.build_tiny_tokenizer()
    folder = saved(tmp_path / "gpt2", gpt2(tokenizer), tokenizer)
    output = tmp_path / "runs"
    code, err = main_runner("grpo.py")("--model", folder, "--num_eval", "2", "--output_dir", str(output), capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(
        r"grpo\.py: error: A prompt of \d+ tokens and 32 new ones need \d+ positions.*", err.splitlines()[-1]
    )
    assert list(output.iterdir()) == []  # its run folder held only args.json: gone with the error


def test_the_warm_start_refuses_a_demonstration_longer_than_the_tiny_models_positions(tmp_path, monkeypatch):
    question = "What is " + "1+" * 10_000 + "1?"  # a 20,000-character question in a data file
    demos = [("1+1=", "<answer>2</answer>"), (question, "<answer>10001</answer>")]
    with pytest.raises(plumbing.UsageError, match=r"A warm-start demonstration is 20018 tokens \('What is 1\+1\+"):
        common.load_tiny(demos, sft_steps=2, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before the cache: nothing built, nothing locked
    with pytest.raises(plumbing.UsageError, match="is 1025 tokens"):  # 1024 characters and the EOS
        common.load_tiny([("x" * 1000, "y" * 24)], cache_dir=tmp_path)
    monkeypatch.setattr(common, "cached", lambda path, build: pytest.fail("passed the check"))
    with pytest.raises(pytest.fail.Exception, match="passed the check"):  # 1023 characters and the EOS: they fit
        common.load_tiny([("x" * 1000, [("y" * 13, True), ("z" * 10, False)])], cache_dir=tmp_path)


@pytest.mark.parametrize("vlm", [False, True], ids=["text", "vision-language"])
def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, vlm):
    if vlm:
        model, processor = common.build_tiny_vlm()
        model.resize_token_embeddings(60)
    else:
        processor = common.build_tiny_tokenizer()
        model = common.build_tiny_model(processor)
        model.resize_token_embeddings(60)
    folder = saved(tmp_path, model, processor)
    load = common.load_vlm if vlm else common.load_model
    tokens = len(processor.tokenizer if vlm else processor)
    with pytest.raises(plumbing.UsageError, match=f"its tokenizer has {tokens} tokens and its embedding 60 rows"):
        load(folder)


@pytest.mark.parametrize("vlm", [False, True], ids=["text", "vision-language"])
def test_weights_cut_short_are_one_clear_error(tmp_path, vlm):
    tokenizer = common.build_tiny_tokenizer()
    folder = saved(tmp_path, *(common.build_tiny_vlm() if vlm else (common.build_tiny_model(tokenizer), tokenizer)))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped halfway
    with pytest.raises(plumbing.UsageError, match=f"Could not load model '{folder}': its weights do not read .*again"):
        (common.load_vlm if vlm else common.load_model)(folder)


def test_a_model_of_the_other_kind_is_named_as_such(tmp_path):
    tokenizer = common.build_tiny_tokenizer()
    text = saved(tmp_path / "text", common.build_tiny_model(tokenizer), tokenizer)
    vlm = saved(tmp_path / "vlm", *common.build_tiny_vlm())
    with pytest.raises(plumbing.UsageError, match="is a text-only model; this script trains a vision-language model"):
        common.load_vlm(text)
    for name in (vlm, "tiny-vlm"):
        with pytest.raises(plumbing.UsageError, match=r"is a vision-language model \(llava; grpo_pp.py trains VLMs\)"):
            common.load_model(name)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    encoder = saved(tmp_path / "encoder", DistilBertModel(config), tokenizer)  # reads text, generates none
    with pytest.raises(plumbing.UsageError, match=r"is not a text model \(distilbert; .*this script trains a text"):
        common.load_model(encoder)


def test_an_encoder_saved_without_a_causal_head_is_not_trained_as_one(tmp_path):
    """BERT is in transformers' causal-LM table (as BertLMHeadModel, a decoder): one saved as a masked LM is not."""
    tokenizer = common.build_tiny_tokenizer()
    size = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    config = BertConfig(vocab_size=len(tokenizer), **size)
    encoder = saved(tmp_path, BertForMaskedLM(config), tokenizer)
    with pytest.raises(plumbing.UsageError, match=r"is not a text model \(bert saved as BertForMaskedLM; "):
        common.load_model(encoder)


def test_a_folder_without_its_tokenizer_is_refused_at_load(tmp_path):
    tokenizer = common.build_tiny_tokenizer()
    common.build_tiny_model(tokenizer).save_pretrained(tmp_path)  # the tokenizer's files not saved
    with pytest.raises(plumbing.UsageError, match="its tokenizer turns text into no tokens; save its own there"):
        common.load_model(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_that_cannot_be_made_is_refused_before_anything_loads(capsys):
    err = parse_error("grpo.py", ["--output_dir", "/proc/runs"], capsys)
    assert "--output_dir '/proc/runs': /proc is not writable" in err


def test_grpo_pp_stage_3_from_a_text_models_folder_says_so(tmp_path, capsys):
    tokenizer = common.build_tiny_tokenizer()
    text = saved(tmp_path / "text", common.build_tiny_model(tokenizer), tokenizer)
    argv = ["--stage", "3", "--init", text, "--images_per_class", "1", "--eval_per_class", "1"]
    code, err = main_runner("grpo_pp.py")(*argv, "--output_dir", str(tmp_path / "runs"), capsys=capsys)
    assert code == 2 and f"grpo_pp.py: error: '{text}' is a text-only model" in err.splitlines()[-1]


def test_grpo_pp_stages_2_and_3_alone_see_the_images_at_the_size_of_inits_model(tmp_path, monkeypatch):
    """--model is stage 1's; a stage alone takes the images' size from the model it starts from (--init)."""
    tiny = saved(tmp_path / "tiny", *common.build_tiny_vlm())
    text_tokenizer = common.build_tiny_tokenizer()
    other = saved(tmp_path / "other", common.build_tiny_model(text_tokenizer), text_tokenizer)
    monkeypatch.setattr(lesions, "load_task", lambda *task: task[-1])  # the size it is asked for
    sizes = {init: grpo_pp.load_task(grpo_pp.Args(stage="3", init=init)) for init in (tiny, other)}
    assert sizes == {tiny: lesions.IMAGE_SIZE, other: None}
    assert grpo_pp.load_task(grpo_pp.Args()) == lesions.IMAGE_SIZE


# ---------------------------------------------------------------------------------------------------------------
# options that the chosen mode would not use


# grpo_pp.py's options that stage 1 alone uses (GRPO on the images): given with --stage 2 or 3, they would do nothing
STAGE_1 = """dtype grpo_pp advantage skip_zero_variance eps_low eps_high loss_type beta kg_weight num_steps
prompts_per_step group_size max_new_tokens temperature learning_rate num_iterations gradient_checkpointing
prefix_grouper eval_every""".split()
# a value for each stabiliser whose default (None) the method fills in
UNSET_STABILISERS = {
    "advantage": "group",
    "skip_zero_variance": "true",
    "eps_high": 0.2,
    "loss_type": "grpo",
    "beta": 0,
}
# the options one mode alone uses, by the prefix of their help ("gsm8k: ..."): the option choosing the mode
MODE_BOUND = {
    "grpo.py": {"dataset": ["dataset_path", "small_addend"], "model": ["demo_noise", "sft_steps"]},
    "crpo.py": {"dataset": ["dataset_path"], "model": ["sft_steps"]},
    "tree_grpo.py": {
        "dataset": ["dataset_path", "num_train", "data_seed"],
        "rollout": ["num_trees", "expand_nodes", "expand_rounds", "keep_leaves", "group_size", "advantage"],
        "model": ["demo_stop", "demo_trust", "sft_steps", "sft_batch_size"],
    },
    "grpo_pp.py": {
        "model": ["warm_start_steps", "warm_start_noise"],
        "stage": [
            "init",
            "model",
            "sft_steps",
            "sft_error_rate",
            "sft_learning_rate",
            "dpo_samples",
            "dpo_margin",
            "dpo_beta",
            "dpo_epochs",
            "dpo_learning_rate",
            "answer_tokens",
            *STAGE_1,
        ],
    },
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_options_bound_to_a_mode_are_the_ones_their_help_names(script):
    found = {}
    for field in dataclasses.fields(SCRIPTS[script].Args):
        if mode := plumbing.mode_of(SCRIPTS[script].Args, field.name):
            found.setdefault(mode[0], []).append(field.name)
    assert {option: sorted(names) for option, names in found.items()} == {
        option: sorted(names) for option, names in MODE_BOUND[script].items()
    }


MODE_CASES = [(script, name) for script, modes in MODE_BOUND.items() for names in modes.values() for name in names]


@pytest.mark.parametrize("script, name", MODE_CASES, ids=[f"{s}:{n}" for s, n in MODE_CASES])
def test_an_option_given_in_a_mode_that_does_not_use_it_is_an_error(script, name, capsys):
    """Each mode-bound option, given on the command line in a mode that does not use it: argparse's error names the
    mode that uses it; given in that mode, it parses."""
    fields = {field.name: field for field in dataclasses.fields(SCRIPTS[script].Args)}
    option, values = plumbing.mode_of(SCRIPTS[script].Args, name)
    other = next(c for c in typing.get_args(fields[option].type) or ["some-model-folder"] if c not in values)
    default = fields[name].default
    value = {"": "x", None: UNSET_STABILISERS.get(name)}.get(default, default)
    given = [f"--{name}"] if fields[name].type is bool else [f"--{name}", str(value)]
    alone = ["--init", "x"] if option == "stage" and other in ("2", "3") else []  # a stage alone starts from --init
    err = parse_error(script, [f"--{option}", other, *alone, *given], capsys)
    assert err.endswith(
        f"error: --{name} is used only with --{option} {' or '.join(values)}, and this run has --{option} {other}: "
        f"leave --{name} out, or set --{option} {' or '.join(values)}"
    )
    assert plumbing.parse_args(SCRIPTS[script].Args, [f"--{option}", values[0], *given]) is not None


def test_the_options_of_each_mode_the_probe_found(capsys):
    """The cases that trained in silence before: --init with stage 1 or all, --dataset_path without its --dataset."""
    for stage in ("1", "all"):
        err = parse_error("grpo_pp.py", ["--stage", stage, "--init", "/does/not/exist"], capsys)
        assert f"--init is used only with --stage 2 or 3, and this run has --stage {stage}: leave --init out" in err
    for script, dataset in (("grpo.py", "gsm8k"), ("crpo.py", "medqa"), ("tree_grpo.py", "hotpotqa")):
        err = parse_error(script, ["--dataset_path", str(ROOT / f"tests/fixtures/{dataset}")], capsys)
        assert err.endswith(f"leave --dataset_path out, or set --dataset {dataset}")
        assert plumbing.parse_args(SCRIPTS[script].Args, ["--dataset", dataset, "--dataset_path", "x"])
    assert plumbing.parse_args(grpo_pp.Args, ["--stage", "3", "--init", "x", "--dpo-beta", "0.2"]).dpo_beta == 0.2
    # an option of a mode whose chooser is itself unused: the warm start of --model tiny-vlm, which stage 3 never loads
    err = parse_error("grpo_pp.py", ["--stage", "3", "--init", "x", "--warm_start_steps", "5"], capsys)
    assert "error: --warm_start_steps is used only with --stage all or 1, and this run has --stage 3" in err
    assert plumbing.parse_args(tree_grpo.Args, ["--rollout", "chain", "--group_size", "3"]).group_size == 3


@dataclasses.dataclass
class NoOptions:
    pass


def test_an_experiment_may_switch_the_mode_per_arm():
    """tree_vs_chain takes tree_grpo's options with its own, then runs a chain arm and tree arms."""
    args, _ = plumbing.parse_args((tree_grpo.Args, NoOptions), ["--group_size", "6"])
    assert args.rollout == "tree" and args.group_size == 6


# ---------------------------------------------------------------------------------------------------------------
# the run folder and the model cache


def test_an_output_folder_the_file_system_cannot_hold_is_refused_before_anything_loads(tmp_path, capsys):
    name_max, path_max = (os.pathconf(tmp_path, f"PC_{limit}_MAX") for limit in ("NAME", "PATH"))
    err = parse_error("grpo.py", ["--output_dir", str(tmp_path / ("a" * (name_max + 1)))], capsys)
    assert f"is {name_max + 1} bytes, and this file system takes at most {name_max}: pass a shorter name" in err
    deep = tmp_path / "/".join(["b" * 200] * (path_max // 201))
    deep = deep / ("c" * (path_max - len(str(deep)) - 40))  # the folder fits, the files a run writes in it would not
    assert len(str(deep)) < path_max - 1
    err = parse_error("grpo.py", ["--output_dir", str(deep)], capsys)
    assert f"it would pass the {path_max} this file system takes: pass a shorter path" in err
    roomy = tmp_path / "/".join(["b" * 200] * ((path_max - plumbing.RUN_FOLDER_ROOM) // 201 - 1))
    assert plumbing.parse_args(grpo.Args, ["--output_dir", str(roomy)]).output_dir == str(roomy)


def test_the_run_folder_keeps_a_long_model_name_within_its_room(tmp_path):
    run_dir = plumbing.make_run_dir("crpo-baseline-grpo", grpo.Args(model="m" * 250, seed=2**32 - 1), root=tmp_path)
    assert len(run_dir.name) < plumbing.RUN_FOLDER_ROOM - len("model/model-00001-of-00002.safetensors") - 2


def complete_entry(path):
    def build(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    return plumbing.cached(path, build)


def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


def test_a_read_only_cache_serves_a_complete_entry_and_names_the_variable_when_it_must_build(tmp_path, monkeypatch):
    entry = complete_entry(tmp_path / "tiny-0123")
    monkeypatch.setattr(filelock, "FileLock", read_only)  # no lock file can be made, as on a read-only disk
    assert plumbing.cached(entry, build=lambda folder: pytest.fail("built again")) == entry
    with pytest.raises(plumbing.UsageError, match="Read-only file system.*set GRPO_FAMILY_CACHE to a folder you can"):
        complete_entry(tmp_path / "tiny-4567")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-0123", "tiny-0123.lock"]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    stale = tmp_path / "tiny-0123.tmp99999999"  # a build killed midway, by another process
    stale.mkdir()

    def full_disk(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(plumbing.UsageError, match="No space left on device.*GRPO_FAMILY_CACHE.*with room for it"):
        plumbing.cached(tmp_path / "tiny-0123", full_disk)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-0123.lock"]

    def ctrl_c(folder):
        folder.mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped during the build: the same
        plumbing.cached(tmp_path / "tiny-0123", ctrl_c)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-0123.lock"]


def test_seeds_stay_within_numpys(capsys):
    assert parse_error("grpo.py", ["--seed", str(2**32)], capsys).endswith(
        "--seed must be below 2**32 = 4294967296 (numpy's seeds), got 4294967296"
    )
    assert "--data_seed must be below 2**32" in parse_error("tree_grpo.py", ["--data_seed", str(2**32)], capsys)
    assert plumbing.parse_args(grpo.Args, ["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_mps_0_is_mps_where_there_is_one(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "--device must be auto, cpu, or a cuda or mps" in parse_error("grpo.py", ["--device", "mps:0"], capsys)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for device in ("mps", "mps:0"):
        assert plumbing.parse_args(grpo.Args, ["--device", device]).device == device
    assert "--device must be" in parse_error("grpo.py", ["--device", "mps:1"], capsys)


def test_bad_input_before_the_first_record_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(plumbing, "plot_metrics", lambda *args, **kwargs: None)  # (the plot is not what is tested)
    for records, other_files in ((0, []), (1, []), (0, ["notes.txt"])):
        run_dir = plumbing.make_run_dir("grpo", grpo.Args(), root=tmp_path / f"{records}{other_files}")
        for name in other_files:
            (run_dir / name).write_text("written by the run")
        with pytest.raises(plumbing.UsageError), plumbing.MetricsLogger(run_dir) as logger:
            for step in range(records):
                logger.log(step, {"reward": 1.0})
            raise plumbing.UsageError("found in the first evaluation")
        assert run_dir.exists() == bool(records or other_files)


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_keeps_what_ctrl_c_keeps_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plumbing, "plot_metrics", lambda records, path, keys=None: path.write_text("a plot"))
    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_model(tokenizer)

    def main(args):
        with plumbing.MetricsLogger(tmp_path, model=(model, tokenizer)) as logger:
            logger.log(1, {"reward": 0.5})
            os.kill(os.getpid(), signal.SIGTERM)  # what `timeout`, `docker stop` and Slurm send
            time.sleep(5)  # the signal arrives here

    monkeypatch.setattr(sys, "argv", ["train.py"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        plumbing.run_cli(NoOptions, main)
    err = capsys.readouterr().err
    assert stop.value.code == 143 and err.splitlines()[-1] == "train.py: terminated (SIGTERM)"
    assert f"terminated (SIGTERM): metrics and plot up to step 1 and the model as it was saved in {tmp_path}" in err
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "metrics.png").exists()
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # run_cli leaves the handler as it found it


@pytest.mark.slow
def test_a_training_run_stopped_by_sigterm_keeps_its_curves_and_model(tmp_path):
    options = ["--sft_steps", "20", "--num_steps", "500", "--num_eval", "8", "--prompts_per_step", "2"]
    command = [sys.executable, str(ROOT / "grpo.py"), *options, "--group_size", "2", "--output_dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.read_text().count("\n") >= 2 for p in tmp_path.glob("*/metrics.jsonl")):
        time.sleep(0.2)
    process.terminate()  # SIGTERM
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.splitlines()[-1] == "grpo.py: terminated (SIGTERM)"
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "metrics.png").exists() and (run_dir / "metrics.csv").exists()
    assert (run_dir / "model" / "config.json").exists()
    assert re.search(r"terminated \(SIGTERM\): metrics and plot up to step [1-9]\d* and the model as it was", err)
