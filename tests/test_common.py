"""common.py: the tiny model and tokenizer, the loader, the cache, arguments, and the metrics logger."""

import json
from dataclasses import dataclass, field

import pytest
import torch

import common


def test_tiny_tokenizer_round_trips_and_keeps_tags_whole():
    tokenizer = common.build_tiny_tokenizer()
    text = "47+38=<think>7+8=15 4+3+1=8</think><answer>85</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) == len("47+38=") + 1 + len("7+8=15 4+3+1=8") + 1 + 1 + 2 + 1  # each tag is one token
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == text


def test_tiny_model_is_a_small_gqa_qwen2():
    model = common.build_tiny_model(common.build_tiny_tokenizer())
    assert model.config.model_type == "qwen2"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6


def test_warm_start_is_cached_and_learns(tmp_path):
    demos = [(f"{a}+{a}=", f"<answer>{2 * a}</answer>") for a in range(10, 40)]
    model, tokenizer = common.load_tiny(demos, sft_steps=60, cache_dir=tmp_path)
    (cached,) = [path for path in tmp_path.iterdir() if path.is_dir()]  # and its lock file, beside it
    assert (cached / "config.json").exists() and cached.with_name(f"{cached.name}.lock").exists()
    again, cached_tokenizer = common.load_tiny(demos, sft_steps=60, cache_dir=tmp_path)  # from the cache
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    text = "a b, c? <dx>A fits; B no cough</dx>"  # spaces and tags tokenize as before saving
    assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    untrained = common.build_tiny_model(tokenizer)
    enc = tokenizer([p + c + tokenizer.eos_token for p, c in demos], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[:, : len("10+10=")] = -100  # SFT trains the completion only; every prompt here is 6 characters
    assert model(**enc, labels=labels).loss < 0.5 * untrained(**enc, labels=labels).loss


def test_load_model_from_a_local_folder(tmp_path):
    tokenizer = common.build_tiny_tokenizer()
    common.build_tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = common.load_model(str(tmp_path), device="cpu")
    assert model.config.model_type == "qwen2" and loaded.padding_side == "left"
    assert loaded("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_unknown_model_offline_is_one_clear_error():
    with pytest.raises(ValueError, match="Could not load model 'no-such-model'.*--model tiny"):
        common.load_model("no-such-model")


def test_smollm2_preset_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="requirements-smollm2.txt"):
        common.load_model("smollm2-135m")


def test_pick_device_and_dtype():
    assert common.pick_device("cpu").type == "cpu"
    assert common.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert common.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@dataclass
class ToyArgs:
    num_steps: int = field(default=3, metadata={"help": "steps"})
    prefix_grouper: bool = field(default=False, metadata={"help": "flag"})


def test_parse_args_takes_underscores_and_dashes():
    assert common.parse_args(ToyArgs, ["--num-steps", "5", "--prefix-grouper"]) == ToyArgs(5, True)
    assert common.parse_args(ToyArgs, ["--num_steps", "7"]) == ToyArgs(7, False)


def test_metrics_logger_keeps_curves_when_interrupted(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with common.MetricsLogger(tmp_path) as logger:
            logger.log(1, {"reward": 0.5})
            logger.log(2, {"reward": 0.7, "eval/accuracy": 0.9})
            raise KeyboardInterrupt
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.7, "eval/accuracy": 0.9}]
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "step,reward,eval/accuracy"


def test_run_dir_saves_args(tmp_path):
    import grpo

    run_dir = common.make_run_dir("grpo", grpo.Args(), root=tmp_path)
    assert run_dir.name.startswith("grpo__tiny__seed0__")
    assert json.loads((run_dir / "args.json").read_text())["group_size"] == 8


def test_cached_builds_once_and_renames_into_place(tmp_path):
    calls = []

    def build(folder):  # writes a model folder under a temporary name
        calls.append(folder)
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    path = tmp_path / "entry"
    assert common.cached(path, build) == path and common.cached(path, build) == path
    assert len(calls) == 1 and calls[0] != path and (path / "config.json").exists() and not calls[0].exists()


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend: a plot after training must still show
    try:
        common.plot_metrics([{"step": 0, "reward": 1.0}, {"step": 1, "reward": 2.0}], tmp_path / "metrics.png")
        assert (tmp_path / "metrics.png").exists() and matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_format_prompt_puts_worked_examples_before_the_question():
    tokenizer = common.build_tiny_tokenizer()
    assert common.format_prompt(tokenizer, "1+2=", "Be brief.") == "1+2="  # no chat template: the raw question
    with pytest.raises(ValueError, match="need a chat model"):
        common.format_prompt(tokenizer, "1+2=", "Be brief.", examples=[("3+4=", "7")])
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    prompt = common.format_prompt(tokenizer, "1+2=", "Be brief.", examples=[("3+4=", "7"), ("5+1=", "6")])
    assert prompt == "[system]Be brief.[user]3+4=[assistant]7[user]5+1=[assistant]6[user]1+2=[assistant]"


@pytest.mark.parametrize("name", common.PRESETS)
def test_a_text_preset_is_a_clear_error_where_a_vlm_is_needed(name):
    with pytest.raises(ValueError, match="is a text-only model; this script trains a vision-language model"):
        common.load_vlm(name)
