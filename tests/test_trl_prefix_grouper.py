"""PrefixGrouperGRPOTrainer against TRL's own GRPOTrainer: the same steps, side by side (needs requirements-bench.txt).

Each case trains both trainers from the same saved model with the same seed: the rollouts must be the same tokens,
and every per-token log-prob and entropy TRL asks for (policy, old policy, reference), every loss and every
gradient must be equal to float rounding, with every pass scored by prefix_grouper (counted), not by a fallback.
"""

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
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


def train(trainer_class, path, tmp_path, **options):
    """Trains with `trainer_class` and records what TRL scored, each loss and the gradients before each step."""
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
                        processing_class=TOKENIZER, callbacks=[Gradients()])  # fmt: skip
    trainer.train()
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


@pytest.mark.parametrize("case", CASES)
def test_same_step_as_trl(case, saved, tmp_path, monkeypatch):
    kind, options = CASES[case]
    theirs, ours, calls, caught = side_by_side(saved(kind), tmp_path, monkeypatch, **options)
    assert_same(theirs, ours)
    assert caught == [] and len(calls) >= len(ours["calls"])  # no pass fell back (each fallback warns)
    mask, width = ours["calls"][0][1], ours["prompt_width"]
    assert not mask[:, :width].all(), "no prompt was left-padded"
    assert len(set(mask[:, width:].sum(1).tolist())) > 1, "every completion has the same length"
    if case.startswith("sliding"):  # groups were cut: a micro-batch held some of a prompt's completions only
        assert any(len(group) < 4 for completions in calls for group in completions)


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


def test_refuses_a_trl_it_was_not_tested_with(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match="tested with those only; this is TRL 1.17.0"):
        trl_pg.PrefixGrouperGRPOTrainer(model=None, args=None)
