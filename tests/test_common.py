"""common.py: the tiny model and tokenizer, the loader, the cache, arguments, and the metrics logger."""

import json
from dataclasses import dataclass, field

import pytest
import torch

import common
import plumbing
import tasks
from experiments import sweep
from tasks import arithmetic


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
    assert plumbing.parse_args(ToyArgs, ["--num-steps", "5", "--prefix-grouper"]) == ToyArgs(5, True)
    assert plumbing.parse_args(ToyArgs, ["--num_steps", "7"]) == ToyArgs(7, False)


def test_metrics_logger_keeps_curves_when_interrupted(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with plumbing.MetricsLogger(tmp_path) as logger:
            logger.log(1, {"reward": 0.5})
            logger.log(2, {"reward": 0.7, "eval/accuracy": 0.9})
            raise KeyboardInterrupt
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.7, "eval/accuracy": 0.9}]
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "step,reward,eval/accuracy"


def test_run_dir_saves_args(tmp_path):
    import grpo

    run_dir = plumbing.make_run_dir("grpo", grpo.Args(), root=tmp_path)
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
        plumbing.plot_metrics([{"step": 0, "reward": 1.0}, {"step": 1, "reward": 2.0}], tmp_path / "metrics.png")
        assert (tmp_path / "metrics.png").exists() and matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_format_prompt_puts_worked_examples_before_the_question():
    tokenizer = common.build_tiny_tokenizer()
    assert tasks.format_prompt(tokenizer, "1+2=", "Be brief.") == "1+2="  # no chat template: the raw question
    with pytest.raises(ValueError, match="need a chat model"):
        tasks.format_prompt(tokenizer, "1+2=", "Be brief.", examples=[("3+4=", "7")])
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    prompt = tasks.format_prompt(tokenizer, "1+2=", "Be brief.", examples=[("3+4=", "7"), ("5+1=", "6")])
    assert prompt == "[system]Be brief.[user]3+4=[assistant]7[user]5+1=[assistant]6[user]1+2=[assistant]"


@pytest.mark.parametrize("name", common.PRESETS)
def test_a_text_preset_is_a_clear_error_where_a_vlm_is_needed(name):
    with pytest.raises(ValueError, match="is a text-only model; this script trains a vision-language model"):
        common.load_vlm(name)


# ---------------------------------------------------------------------------------------------------------------
# sampling follows only our settings


def test_generate_ignores_the_checkpoints_generation_config():
    """A checkpoint's generation_config.json (repetition penalty, n-gram blocking, top_k, a minimum length, ...)
    changes what model.generate samples; our samplers sample from softmax(logits / T) whatever it says."""
    import grpo

    tokenizer = common.build_tiny_tokenizer()
    model = common.build_tiny_model(tokenizer, seed=3).eval()
    prompts = ["47+38=", "12+34="]

    def sample(greedy):
        torch.manual_seed(0)
        return grpo.generate_completions(model, tokenizer, prompts, 4, 12, 1.0, 1.0, greedy=greedy)["completion_ids"]

    clean = sample(False), sample(True)
    checkpoint = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "top_k": 3, "top_p": 0.5, "min_new_tokens": 12,
                  "temperature": 0.3, "do_sample": False, "suppress_tokens": list(range(10, 60))}  # fmt: skip
    for key, value in checkpoint.items():
        setattr(model.generation_config, key, value)
    torch.manual_seed(0)  # the same settings do change what plain model.generate samples
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    plain = model.generate(**enc, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(plain[:, enc["input_ids"].size(1) :], clean[1][::4])  # greedy, one row per prompt
    assert torch.equal(sample(False), clean[0]) and torch.equal(sample(True), clean[1])
    assert model.generation_config.repetition_penalty == 1.5  # and the model's own config is left as it was


@pytest.mark.parametrize("script", ["grpo.py", "crpo.py", "tree_grpo.py", "grpo_pp.py"])
def test_every_sampler_goes_through_common_generate(script):
    from conftest import ROOT

    source = (ROOT / script).read_text()
    assert "model.generate(" not in source and "= generate(" in source


# ---------------------------------------------------------------------------------------------------------------
# same seed, same run; a cache entry is complete or rebuilt


def test_building_the_tiny_models_leaves_the_random_streams_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    common.build_tiny_model(common.build_tiny_tokenizer(), seed=0)
    common.build_tiny_vlm(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_cached_build_leaves_the_random_streams_alone(tmp_path):
    import random

    import numpy as np

    def build(folder):  # draws from every stream, as a warm start does
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps([torch.rand(1).item(), random.random(), np.random.rand()]))

    common.seed_everything(5)
    expected = torch.rand(1), random.random(), np.random.rand()
    common.seed_everything(5)
    common.cached(tmp_path / "entry", build)
    assert (torch.rand(1), random.random(), np.random.rand()) == expected


def test_cold_and_warm_cache_give_the_same_run(tmp_path, monkeypatch):
    import grpo

    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "cache")
    args = dict(sft_steps=20, num_steps=2, eval_every=2, num_eval=8, prompts_per_step=2, group_size=4,
                max_new_tokens=12, learning_rate=1e-3)  # fmt: skip

    def metrics(name):
        run = grpo.train(grpo.Args(**args, output_dir=str(tmp_path / name)))
        records = [json.loads(line) for line in open(f"{run['run_dir']}/metrics.jsonl")]
        return [{k: v for k, v in r.items() if k != "step_time"} for r in records]

    cold = metrics("cold")  # builds the warm start
    assert metrics("warm") == cold  # loads it from the cache


def test_damaged_cache_entry_is_rebuilt(tmp_path, capsys):
    calls = []

    def build(folder):
        calls.append(folder)
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x" * 100)

    path = tmp_path / "entry"
    common.cached(path, build)
    (path / "model.safetensors").write_bytes(b"x" * 50)  # truncated
    common.cached(path, build)
    assert len(calls) == 2 and "incomplete or damaged: rebuilding it" in capsys.readouterr().err
    (path / "config.json").unlink()  # a file gone
    common.cached(path, build)
    (path / plumbing.CACHE_MARKER).unlink()  # an entry written before the marker, or cut off mid-write
    common.cached(path, build)
    assert len(calls) == 4 and (path / "model.safetensors").stat().st_size == 100


def test_cache_entry_damaged_in_place_names_itself(tmp_path):
    demos = [(f"{a}+{a}=", f"<answer>{2 * a}</answer>") for a in range(10, 20)]
    common.load_tiny(demos, sft_steps=5, cache_dir=tmp_path)
    (entry,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    weights = entry / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)  # same size, garbage
    with pytest.raises(plumbing.UsageError, match=f"cached tiny model {entry} could not be loaded.*Delete that folder"):
        common.load_tiny(demos, sft_steps=5, cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# run folders and interruptions


def test_run_dirs_of_one_second_differ_for_a_dotted_model_name(tmp_path):
    import grpo

    args = grpo.Args(model="Qwen/Qwen2.5-0.5B-Instruct")
    first, second = (plumbing.make_run_dir("grpo", args, root=tmp_path) for _ in range(2))
    assert first != second and second.name.startswith(first.name.split("__2")[0])
    assert "Qwen2.5-0.5B-Instruct" in second.name and (second / "args.json").exists()


@pytest.mark.parametrize("stop_at", [1, 3])  # the first evaluation, or the second training step
def test_interrupted_run_keeps_what_it_had_and_says_so(tmp_path, monkeypatch, capsys, stop_at):
    import grpo

    calls = []
    real_reward = arithmetic.reward_function

    def reward_then_ctrl_c(*args):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real_reward(*args)

    monkeypatch.setattr(arithmetic, "reward_function", reward_then_ctrl_c)  # the loop and the evaluation call it
    args = grpo.Args(sft_steps=20, num_steps=5, num_eval=8, prompts_per_step=2, group_size=2, max_new_tokens=8,
                     output_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        grpo.train(args)
    (run_dir,) = tmp_path.iterdir()
    said = capsys.readouterr().err
    common.load_model(str(run_dir / "model"), device="cpu")  # the model as it was when stopped
    if stop_at == 1:  # during the first evaluation: no step finished, so no metrics and no plot
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "metrics.png").exists()
        assert f"interrupted: the model as it was saved in {run_dir}" in said
    else:
        assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
        assert (run_dir / "metrics.png").exists() and (run_dir / "metrics.csv").exists()
        assert f"interrupted: metrics and plot up to step 1 and the model as it was saved in {run_dir}" in said


def test_a_model_folder_without_a_model_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(plumbing.UsageError, match="the folder holds no complete model"):
        common.load_model(str(tmp_path))
    with pytest.raises(plumbing.UsageError, match="the folder holds no complete model"):
        common.load_vlm(str(tmp_path))


def test_an_unreachable_hub_is_found_in_seconds(monkeypatch):
    """Offline, a hub id is looked up in the local cache only, instead of a minute of connection retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    assert common.hub_options("no-such-org/no-such-model") == {"local_files_only": True}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert common.hub_options("no-such-org/no-such-model") == {"local_files_only": True}
    assert common.hub_options(".") == {}  # a local folder never asks the hub


def test_seed_sweep_tables_plots_and_saves_every_run(tmp_path, capsys):
    """The comparisons' harness (experiments/sweep.py): each method's runs, a table of mean ± std (unbiased) by
    hand, the curves and the settings in the JSON, and the plot."""

    @dataclass
    class FakeArgs:
        method: str = "a"
        seed: int = 0

    def train(args):  # a stand-in for a script's train(): a result dict per run
        return {"score": {"a": 1.0, "b": 3.0}[args.method] + args.seed, "curve": [0.0, args.seed]}

    runs = {m: [FakeArgs(m, seed) for seed in (0, 1, 2)] for m in ("a", "b")}
    summarize, curve = lambda run: {"score": run["score"]}, lambda run: ([0, 1], run["curve"])
    results = sweep.seed_sweep(
        train, runs, summarize, tmp_path / "sweep" / "out", {"seeds": "0,1,2"}, curve=curve, title="x"
    )
    assert results == {"a": [{"score": 1.0}, {"score": 2.0}, {"score": 3.0}], "b": [{"score": 3.0}, {"score": 4.0},
                       {"score": 5.0}]}  # fmt: skip
    saved = json.loads((tmp_path / "sweep" / "out.json").read_text())
    assert "| score | 2.000 ± 1.000 | 4.000 ± 1.000 |" in saved["table"] and saved["table"] in capsys.readouterr().out
    assert saved["args"] == {"seeds": "0,1,2"} and saved["curves"]["b"][2] == [[0, 1], [0.0, 2]]
    assert (tmp_path / "sweep" / "out.png").stat().st_size > 0


def test_a_comparison_run_in_parts_merges_into_one_table(tmp_path, capsys):
    """sweep.merge_parts: the arms of parts run one command each (and seeds of one arm split over two) in one table
    by hand; parts run with other settings are refused with the setting named."""

    def part(name, arm, seeds, lr=0.1):
        saved = {"args": {"arms": arm, "seeds": seeds, "lr": lr}, "table": "",
                 "results": {arm: [{"score": float(s) + (arm == "b")} for s in seeds.split(",")]},
                 "curves": {arm: [[[0, 1], [0.0, float(s)]] for s in seeds.split(",")]}}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(saved))
        return tmp_path / f"{name}.json"

    parts = [part("a", "a", "0,1,2"), part("b1", "b", "0"), part("b2", "b", "1,2")]
    results = sweep.merge_parts(parts, tmp_path / "merged" / "all", title="x")
    assert results == {"a": [{"score": 0.0}, {"score": 1.0}, {"score": 2.0}], "b": [{"score": 1.0}, {"score": 2.0},
                       {"score": 3.0}]}  # fmt: skip
    merged = json.loads((tmp_path / "merged" / "all.json").read_text())
    assert "| score | 1.000 ± 1.000 | 2.000 ± 1.000 |" in merged["table"] and merged["table"] in capsys.readouterr().out
    assert len(merged["curves"]["b"]) == 3 and merged["parts"] == [str(p) for p in parts]
    assert (tmp_path / "merged" / "all.png").stat().st_size > 0
    with pytest.raises(plumbing.UsageError, match="other settings than .*a.json: lr"):
        sweep.merge_parts([parts[0], part("c", "c", "0", lr=0.2)], tmp_path / "bad")
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(plumbing.UsageError, match="d.json is not a comparison's JSON"):
        sweep.merge_parts([parts[0], tmp_path / "d.json"], tmp_path / "bad")
