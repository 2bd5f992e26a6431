"""PrefixGrouperGRPOTrainer against TRL's own GRPOTrainer: the same steps, side by side (needs requirements-bench.txt).

Each case trains both trainers from the same saved model with the same seed: the rollouts must be the same tokens,
and every per-token log-prob and entropy TRL asks for (policy, old policy, reference), every loss and every
gradient must be equal to float rounding, with every pass scored by prefix_grouper (counted), not by a fallback,
and the rollouts generated with each prompt prefilled once (counted). Also with LoRA (TRL's peft_config), in two
DDP processes (torchrun), and with the two files copied into another project (slow tier).
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    TrainerCallback,
)

import experiments.trl_prefix_grouper as trl_pg  # noqa: E402
from common import build_tiny_model, build_tiny_tokenizer  # noqa: E402

TOKENIZER = build_tiny_tokenizer()
PROMPTS = ["1+2=", "12+34=", "7+85=", "5+5="]  # 4 to 6 tokens: the shorter prompts are left-padded


def random_model(kind):
    """The tiny model (Qwen2, GQA) and random models of the other kinds the trainer must handle."""
    torch.manual_seed(1)
    size = dict(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)  # fmt: skip
    if kind == "tiny":
        return build_tiny_model(TOKENIZER)
    if kind == "sliding":  # GQA, one full layer, then sliding-window layers (window 5, rows of up to 14 tokens)
        config = Qwen2Config(**size, use_sliding_window=True, sliding_window=5, max_window_layers=1)
        return Qwen2ForCausalLM(config)
    if kind == "linear":  # linear-attention layers (Gated DeltaNet) around a full one: prefix_grouper cannot
        layers = ["linear_attention", "full_attention", "linear_attention"]
        config = Qwen3NextConfig(**size, head_dim=16, layer_types=layers, linear_num_value_heads=2,
                                 linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                 mlp_only_layers=[0, 1, 2], router_aux_loss_coef=0.0)  # fmt: skip
        return Qwen3NextForCausalLM(config)
    if kind == "softcap":  # Gemma2: soft-capped attention logits, which sdpa cannot apply
        return Gemma2ForCausalLM(Gemma2Config(**size, head_dim=16, sliding_window=5, attn_logit_softcapping=5.0))
    if kind == "sinks":  # GPT-OSS: attention sinks, which sdpa drops (drawn large enough to matter); experts
        layers = ["sliding_attention", "full_attention", "sliding_attention"]
        experts = dict(num_local_experts=2, num_experts_per_tok=1, router_aux_loss_coef=0.0)
        model = GptOssForCausalLM(GptOssConfig(**size, **experts, head_dim=16, sliding_window=5, layer_types=layers))
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
        return model
    config = GPT2Config(vocab_size=len(TOKENIZER), n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config)  # "absolute": learned positions, no rotary embeddings


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> a folder with that model and the tiny tokenizer (TRL loads its reference model from the path)."""

    def save(kind):
        path = tmp_path_factory.mktemp(kind)
        random_model(kind).save_pretrained(path)
        TOKENIZER.save_pretrained(path)
        return str(path)

    return save


def train(trainer_class, path, tmp_path, peft_config=None, **options):
    """Trains with `trainer_class` (GRPOConfig `options`, TRL's `peft_config`) and records what TRL scored, each
    loss, the gradients before each step and the trained parameters at the end."""
    record = {"calls": [], "losses": [], "grads": []}

    class Recording(trainer_class):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kw):
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kw
            )
            scored = attention_mask[:, -logits_to_keep:].bool()
            scored_entropies = None if entropies is None else entropies.detach()[scored]
            record["calls"].append((input_ids.clone(), attention_mask.clone(), logps.detach()[scored],
                                    scored_entropies))  # fmt: skip
            record["prompt_width"] = input_ids.shape[1] - logits_to_keep
            return logps, entropies, aux

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            record["losses"].append(loss.detach())
            return loss

    class Gradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    config = trl.GRPOConfig(
        output_dir=str(tmp_path), num_generations=4, max_completion_length=8, temperature=0.8, top_k=0, top_p=1.0,
        # EOS made likelier in sampling only (the scored model is unchanged): completions of different lengths
        generation_kwargs={"sequence_bias": [[[TOKENIZER.eos_token_id], 2.0]]},
        optim="sgd", learning_rate=0.1,  # SGD: a rounding-level difference in a gradient stays one in the weights
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0, logging_steps=1, **options,
    )  # fmt: skip
    reward = lambda completions, **kwargs: [c.count("1") + len(c) / 10 for c in completions]  # noqa: E731
    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = Recording(model=path, reward_funcs=reward, args=config, train_dataset=dataset,
                        processing_class=TOKENIZER, callbacks=[Gradients()], peft_config=peft_config)  # fmt: skip
    trainer.train()
    record["trained"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return record


def side_by_side(path, tmp_path, monkeypatch, **options):
    """Both trainers on the same model and options: (TRL's record, ours, prefix_grouper calls, our warnings)."""
    calls = []
    original = trl_pg.shared_prefix_logprobs
    monkeypatch.setattr(trl_pg, "shared_prefix_logprobs", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = train(trl_pg.PrefixGrouperGRPOTrainer, path, tmp_path / "ours", **options)
    theirs = train(trl.GRPOTrainer, path, tmp_path / "trl", **options)
    ours_warnings = [str(w.message) for w in caught if "PrefixGrouperGRPOTrainer" in str(w.message)]
    return theirs, ours, calls, ours_warnings


def assert_same(theirs, ours):
    assert len(ours["calls"]) == len(theirs["calls"]) and len(ours["grads"]) == len(theirs["grads"]) > 0
    for (ids, mask, logps, entropies), (ids_2, mask_2, logps_2, entropies_2) in zip(theirs["calls"], ours["calls"]):
        assert torch.equal(ids, ids_2) and torch.equal(mask, mask_2)  # the same rollouts
        torch.testing.assert_close(logps_2, logps, rtol=0, atol=1e-5)
        if entropies is not None:
            torch.testing.assert_close(entropies_2, entropies, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(ours["losses"]), torch.stack(theirs["losses"]), rtol=0, atol=1e-6)
    for grads, grads_2 in zip(theirs["grads"], ours["grads"]):
        assert grads.keys() == grads_2.keys()
        for name in grads:
            torch.testing.assert_close(grads_2[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


CASES = {  # name: (model, GRPOConfig options)
    "tiny": ("tiny", dict(per_device_train_batch_size=8, max_steps=1, gradient_checkpointing=False)),
    "tiny, 2 iterations, beta > 0": (
        "tiny", dict(per_device_train_batch_size=8, max_steps=2, num_iterations=2, beta=0.04)),
    # micro-batches of 2 rows cut TRL's shuffled groups of 4; TRL's default gradient checkpointing recomputes
    "sliding window, groups cut by micro-batches": (
        "sliding", dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2, num_iterations=2,
                        beta=0.04, gradient_checkpointing=True)),
}  # fmt: skip


def count_prefills(monkeypatch):
    """A list that gets, for each shared prefill, (rows generated, rows that share each prompt's cache)."""
    prefills, original = [], trl_pg.shared_prompt_cache

    def counting(model, inputs, copies):
        cache = original(model, inputs, copies)
        assert cache is not None and cache.get_seq_length() == inputs["input_ids"].size(1) - 1
        prefills.append((len(inputs["input_ids"]), copies))
        return cache

    monkeypatch.setattr(trl_pg, "shared_prompt_cache", counting)
    return prefills


@pytest.mark.parametrize("case", CASES)
def test_same_step_as_trl(case, saved, tmp_path, monkeypatch):
    """Also TRL's generation with each prompt prefilled once: the same rollouts, token for token (assert_same)."""
    kind, options = CASES[case]
    prefills = count_prefills(monkeypatch)
    theirs, ours, calls, caught = side_by_side(saved(kind), tmp_path, monkeypatch, **options)
    assert_same(theirs, ours)
    rows = options["per_device_train_batch_size"] * options.get("gradient_accumulation_steps", 1)
    assert prefills and all(prefill == (rows, 4) for prefill in prefills)  # 4 = num_generations
    assert caught == [] and len(calls) >= len(ours["calls"])  # no pass fell back (each fallback warns)
    mask, width = ours["calls"][0][1], ours["prompt_width"]
    assert not mask[:, :width].all(), "no prompt was left-padded"
    assert len(set(mask[:, width:].sum(1).tolist())) > 1, "every completion has the same length"
    if case.startswith("sliding"):  # groups were cut: a micro-batch held some of a prompt's completions only
        assert any(len(group) < 4 for completions in calls for group in completions)


def count_forwarded_tokens(monkeypatch):
    """A list that gets, for each prefix_grouper pass, the tokens it forwards: each prompt once, each completion."""
    forwarded, original = [], trl_pg.shared_prefix_logprobs

    def counting(model, prompts, completions, *args, **kwargs):
        forwarded.append(sum(map(len, prompts)) + sum(len(c) for group in completions for c in group))
        return original(model, prompts, completions, *args, **kwargs)

    monkeypatch.setattr(trl_pg, "shared_prefix_logprobs", counting)
    return forwarded


def grouped_tokens(input_ids, attention_mask, prompt_width):
    """The tokens of a batch with each distinct prompt once, and the tokens of its padded rows (TRL's forward)."""
    prompt_rows = zip(input_ids[:, :prompt_width], attention_mask[:, :prompt_width].bool())
    prompts = {tuple(ids[mask].tolist()) for ids, mask in prompt_rows}
    return sum(map(len, prompts)) + int(attention_mask[:, prompt_width:].sum()), input_ids.numel()


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_lora_step_as_trl(checkpointing, saved, tmp_path, monkeypatch):
    """TRL's peft_config: the LoRA adapters' gradients and updates equal TRL's PEFT run's, the reference (beta > 0)
    is the base model with the adapters disabled, and every pass is prefix_grouper's, each prompt forwarded once."""
    peft = pytest.importorskip("peft")
    forwarded, prefills = count_forwarded_tokens(monkeypatch), count_prefills(monkeypatch)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    options = dict(per_device_train_batch_size=8, max_steps=2, num_iterations=2, beta=0.04, peft_config=lora)
    theirs, ours, calls, caught = side_by_side(
        saved("tiny"), tmp_path, monkeypatch, **options, gradient_checkpointing=checkpointing
    )
    assert_same(theirs, ours)  # the same rollouts too, each prompt prefilled once through the PEFT model
    assert prefills and all(prefill == (8, 4) for prefill in prefills)
    assert caught == [] and len(calls) == len(ours["calls"])  # no pass fell back (each fallback warns)
    assert ours["grads"][0].keys() == ours["trained"].keys() and all("lora_" in name for name in ours["trained"])
    for name, weight in theirs["trained"].items():
        torch.testing.assert_close(ours["trained"][name], weight, rtol=1e-4, atol=1e-7, msg=name)
    assert any(weight.abs().sum() > 0 for name, weight in ours["trained"].items() if "lora_B" in name)  # it moved
    expected = [grouped_tokens(ids, mask, ours["prompt_width"]) for ids, mask, _, _ in ours["calls"]]
    assert forwarded == [ours_tokens for ours_tokens, _ in expected]
    assert sum(forwarded) < sum(trl_tokens for _, trl_tokens in expected)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("kind", ["softcap", "sinks"])
def test_same_step_as_trl_with_soft_capping_or_attention_sinks(kind, checkpointing, saved, tmp_path, monkeypatch):
    """What sdpa would drop: our passes run eager, the kernel the model was loaded with, and so do generation and
    TRL's own passes, with the model on prefix_grouper (gradient checkpointing) or back on eager after each pass."""
    eager = {"attn_implementation": "eager"}
    options = dict(per_device_train_batch_size=8, max_steps=2, num_iterations=2, beta=0.04, model_init_kwargs=eager)
    theirs, ours, calls, caught = side_by_side(
        saved(kind), tmp_path, monkeypatch, **options, gradient_checkpointing=checkpointing
    )
    assert_same(theirs, ours)
    assert caught == [] and len(calls) >= len(ours["calls"])  # no pass fell back (each fallback warns)


def test_a_model_loaded_with_flash_attention_is_scored_by_trl():
    """A kernel that takes no explicit mask: TRL's own passes, on the model's own kernel throughout, with a warning."""
    model = random_model("tiny")
    model.config._attn_implementation = "flash_attention_2"
    trainer = SimpleNamespace(args=SimpleNamespace(cast_lm_head_to_fp32=False))
    assert "flash_attention_2 attention" in trl_pg.PrefixGrouperGRPOTrainer.model_unsupported(trainer, model)


def test_a_deepspeed_engine_is_left_to_trl_for_generation_and_passes(monkeypatch):
    """A wrapper the trainer does not unwrap (DeepSpeed's engine; no CPU run is possible here): TRL's generation
    and passes, said once, also where accelerate wraps the model after the trainer was built."""

    class DeepSpeedEngine(torch.nn.Module):  # what TRL hands over under DeepSpeed: the model as its `module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    trainer = object.__new__(trl_pg.PrefixGrouperGRPOTrainer)  # its methods on this state, without TRL's set-up
    trainer.args, trainer.warned, trainer.kernels = SimpleNamespace(cast_lm_head_to_fp32=False), set(), {}
    trainer.model = trainer.model_wrapped = DeepSpeedEngine(random_model("tiny"))
    generated = []
    monkeypatch.setattr(trl.GRPOTrainer, "_generate_single_turn", lambda self, *a: generated.append(a) or "TRL's")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert trainer._generate_single_turn([[5, 6]] * 4, None, {}, 4) == "TRL's"
    assert len(generated) == 2 and [str(w.message) for w in caught] == [
        "PrefixGrouperGRPOTrainer: DeepSpeedEngine is not a transformers model (FSDP and DeepSpeed are untested "
        "here); TRL's own generation and forward run it"
    ]


def test_peft_prompt_tuning_is_scored_by_trl_and_lora_by_prefix_grouper():
    """Prompt tuning adds virtual tokens our packed rows would not have: TRL's passes. LoRA lives in the layers."""
    peft = pytest.importorskip("peft")
    trainer = SimpleNamespace(args=SimpleNamespace(cast_lm_head_to_fp32=False))
    unsupported = lambda model: trl_pg.PrefixGrouperGRPOTrainer.model_unsupported(trainer, model)  # noqa: E731
    tuning = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    assert "prompt-learning" in unsupported(peft.get_peft_model(random_model("tiny"), tuning))
    lora = peft.get_peft_model(random_model("tiny"), peft.LoraConfig(target_modules=["q_proj"]))
    assert unsupported(lora) is None and trl_pg.inner_model(lora) is lora.base_model.model


def test_generation_falls_back_where_rows_cannot_share_a_prefill():
    """TRL's own generation for rows without a run of equal prompts, images, vLLM or continuous batching, and padded
    prompts on a model with learned positions: why, in the one warning. Runs shorter than G (a group split between
    processes) share a prefill among as many rows as divide every run."""
    trainer = SimpleNamespace(use_vllm=False, use_transformers_continuous_batching=False,
                              model=SimpleNamespace(config=Qwen2Config()))  # fmt: skip
    unsupported = lambda *args: trl_pg.PrefixGrouperGRPOTrainer.generation_unsupported(trainer, *args)  # noqa: E731
    assert unsupported([[5, 6]] * 2 + [[7]] * 2, None, {}) is None
    assert "without a run of equal prompts" in unsupported([[5, 6], [7], [5, 6], [7]], None, {})
    sharing_rows = trl_pg.sharing_rows
    assert sharing_rows([[5, 6]] * 4 + [[7]] * 2) == 2 and sharing_rows([[5, 6]] * 3 + [[7]] * 6) == 3
    assert "images" in unsupported([[5, 6]] * 2, [["an image"], ["an image"]], {})
    assert "images" in unsupported([[5, 6]] * 2, None, {"pixel_values": torch.zeros(2, 3)})
    trainer.model.config = GPT2Config()
    assert "rotary" in unsupported([[5, 6]] * 2 + [[7]] * 2, None, {})
    trainer.use_vllm = True
    assert "vLLM" in unsupported([[5, 6]] * 2, None, {})


@pytest.mark.parametrize("kind, reason", [("linear", "linear_attention"), ("absolute", "rotary")])
def test_falls_back_to_trl_with_one_warning(kind, reason, saved, tmp_path, monkeypatch):
    options = dict(per_device_train_batch_size=8, max_steps=1, gradient_checkpointing=False)
    theirs, ours, calls, caught = side_by_side(saved(kind), tmp_path, monkeypatch, **options)
    assert_same(theirs, ours)
    assert calls == [] and len(caught) == 1 and reason in caught[0], caught


@pytest.mark.parametrize("bf16", [False, True])
def test_groups_found_from_tokens_in_any_order(bf16, saved, tmp_path, monkeypatch):
    """Rows of two prompts interleaved and shuffled are scored as TRL scores them, in two groups (in chunks of at
    most `batch_size` rows of whole groups). Under TRL's bf16 autocast too, to bf16 rounding: a prefix and its
    suffixes are summed in another order than whole rows (on some CPUs that alone moves a log-prob by 2e-3, as far
    as TRL's own bf16 pass is from its float32 one), and TRL counts a left-padded row's positions from the pads."""
    config = trl.GRPOConfig(output_dir=str(tmp_path), num_generations=4, use_cpu=True, report_to="none",
                            per_device_train_batch_size=8, bf16=bf16)  # fmt: skip
    trainer = trl_pg.PrefixGrouperGRPOTrainer(model=saved("tiny"), reward_funcs=lambda completions, **k: [0.0] * 8,
                                              args=config, train_dataset=Dataset.from_list([{"prompt": "1+2="}] * 8),
                                              processing_class=TOKENIZER)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]] * 3)  # 0 is padding: the first prompt is padded
    order = torch.randperm(6, generator=g)
    lengths = torch.tensor([4, 2, 3, 1, 4, 2])
    attention_mask = torch.cat([prompts > 0, torch.arange(4) < lengths[:, None]], dim=1)[order].long()  # (6, 9)
    input_ids = torch.cat([prompts, torch.randint(3, 40, (6, 4), generator=g)], dim=1)[order] * attention_mask
    calls = []
    original = trl_pg.shared_prefix_logprobs
    monkeypatch.setattr(trl_pg, "shared_prefix_logprobs", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    for batch_size in (None, 3):
        calls.clear()
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, 4, batch_size=batch_size, compute_entropy=True
        )
        expected, expected_entropies, _ = trl.GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, input_ids, attention_mask, 4, batch_size=batch_size, compute_entropy=True
        )
        atol = 1e-2 if bf16 else 1e-5
        torch.testing.assert_close(logps, expected, rtol=0, atol=atol)
        torch.testing.assert_close(entropies, expected_entropies, rtol=0, atol=atol)
        groups = [[len(group) for group in completions] for completions in calls]
        assert groups == ([[3, 3]] if batch_size is None else [[3], [3]])


@pytest.mark.parametrize("version", ["1.17.0", "1.17.0.dev0", "1.17.0rc1", "1.16.0rc1", "1.15.2"])
def test_refuses_a_trl_it_was_not_tested_with(version, monkeypatch):
    """Releases 1.16.x only: a pre-release of 1.17 is not one."""
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=f"tested with those only; this is TRL {version}"):
        trl_pg.PrefixGrouperGRPOTrainer(model=None, args=None)


ELSEWHERE = """import sys
import trl
from datasets import Dataset
import rl.trl_prefix_grouper as trl_prefix_grouper
from rl.trl_prefix_grouper import PrefixGrouperGRPOTrainer

forwarded, original = [], trl_prefix_grouper.shared_prefix_logprobs
trl_prefix_grouper.shared_prefix_logprobs = lambda *a, **k: forwarded.append(1) or original(*a, **k)
config = trl.GRPOConfig(output_dir="out", num_generations=2, per_device_train_batch_size=2, max_completion_length=4,
                        max_steps=1, use_cpu=True, report_to="none", save_strategy="no")
trainer = PrefixGrouperGRPOTrainer(model=sys.argv[1], reward_funcs=lambda completions, **k: [0.0] * len(completions),
                                   args=config, train_dataset=Dataset.from_list([{"prompt": "1+2="}] * 2))
trainer.train()
print(sys.modules["prefix_grouper"].__file__, len(forwarded), "common" in sys.modules)
"""


@pytest.mark.slow
def test_the_two_files_work_copied_into_another_project(saved, tmp_path):
    """prefix_grouper.py and trl_prefix_grouper.py copied into an empty folder of another project, rl/: its script
    imports rl.trl_prefix_grouper, which finds prefix_grouper.py beside it (not this repository's), and trains a step
    with prefix_grouper."""
    root, project = Path(__file__).resolve().parents[1], tmp_path / "project"
    (project / "rl").mkdir(parents=True)
    for name in ("prefix_grouper.py", "experiments/trl_prefix_grouper.py"):
        shutil.copy(root / name, project / "rl")
    (project / "train.py").write_text(ELSEWHERE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "train.py", saved("tiny")], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    module, passes, repository_imported = done.stdout.split()[-3:]
    assert Path(module) == project / "rl" / "prefix_grouper.py" and int(passes) > 0 and repository_imported == "False"


PROCESS = """import sys
import warnings

import torch
import trl
from datasets import Dataset

import experiments.trl_prefix_grouper as trl_pg
from common import build_tiny_tokenizer

path, trainer_name, lora, out = sys.argv[1:5]
tokenizer = build_tiny_tokenizer()
calls, original = [], trl_pg.shared_prefix_logprobs
trl_pg.shared_prefix_logprobs = lambda *a, **k: calls.append(1) or original(*a, **k)
prefills, prefill = [], trl_pg.shared_prompt_cache
trl_pg.shared_prompt_cache = lambda model, inputs, copies: prefills.append(copies) or prefill(model, inputs, copies)
config = trl.GRPOConfig(
    output_dir=out, num_generations=4, max_completion_length=8, temperature=0.8, top_k=0, top_p=1.0,
    generation_kwargs={"sequence_bias": [[[tokenizer.eos_token_id], 2.0]]}, optim="sgd", learning_rate=0.1,
    use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0, per_device_train_batch_size=2,
    max_steps=2, num_iterations=2, beta=0.04, ddp_backend="gloo",
)
reward = lambda completions, **kwargs: [c.count("1") + len(c) / 10 for c in completions]
dataset = Dataset.from_list([{"prompt": p} for p in ["1+2=", "12+34=", "7+85=", "5+5="]])
trainer_class = trl_pg.PrefixGrouperGRPOTrainer if trainer_name == "ours" else trl.GRPOTrainer
peft_config = None
if lora == "lora":
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = trainer_class(model=path, reward_funcs=reward, args=config, train_dataset=dataset,
                            processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
torch.save({"params": {n: p.detach() for n, p in trainer.model.named_parameters()}, "passes": len(calls),
            "prefills": prefills,
            "warnings": [str(w.message) for w in caught if "PrefixGrouperGRPOTrainer" in str(w.message)],
            "wrapper": type(trainer.model_wrapped).__name__}, f"{out}/rank{trainer.accelerator.process_index}.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["full", "lora"])
def test_two_ddp_processes_train_as_trls_two(lora, saved, tmp_path):
    """Two CPU processes (torchrun, DDP over gloo), all weights or LoRA's: each process's passes are prefix_grouper's,
    through the DDP wrapper's forward (which prepares the gradient all-reduce: calling the inner model instead moved
    the weights 7e-3 from TRL's), and the trained weights equal TRL's own two-process run's, in both processes. Each
    step's group of 4 is split between the processes: each prefills its prompt once for its 2 rows."""
    if lora == "lora":
        pytest.importorskip("peft")
    root, path = Path(__file__).resolve().parents[1], saved("tiny")
    (tmp_path / "process.py").write_text(PROCESS)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(root)}
    runs = {}
    for name in ("ours", "trl"):
        (tmp_path / name).mkdir()
        command = [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "process.py"),
            path,
            name,
            lora,
        ]
        done = subprocess.run([*command, str(tmp_path / name)], cwd=root, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [torch.load(tmp_path / name / f"rank{rank}.pt") for rank in range(2)]
    for ours, theirs in zip(runs["ours"], runs["trl"]):
        assert ours["wrapper"] == theirs["wrapper"] == "DistributedDataParallel"
        assert ours["passes"] > 0 and ours["warnings"] == []  # every pass prefix_grouper's, none fell back
        assert ours["prefills"] and set(ours["prefills"]) == {2}
        for name, weight in theirs["params"].items():
            torch.testing.assert_close(ours["params"][name], weight, rtol=1e-4, atol=1e-7, msg=name)
    initial = Qwen2ForCausalLM.from_pretrained(path).state_dict()
    trained = runs["ours"][0]["params"]
    if lora == "lora":  # the adapters trained: LoRA's B moved from 0
        assert any(weight.abs().max() > 1e-3 for name, weight in trained.items() if "lora_B" in name)
    else:
        assert max((weight - initial[name]).abs().max() for name, weight in trained.items()) > 1e-3
