"""The one-GPU path, checked on the CPU: bf16 autocast over float32 weights learns as float32 training does,
log-probs come from float32 logits a chunk at a time, micro-batches bound every forward, and the memory estimate
matches the tensors autograd keeps. (tests/gpu_check.py runs the same code on a GPU.)"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DEVICES, script_runner
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import common
import grpo
import plumbing
from prefix_grouper import logprobs_from_logits


def random_batch(vocab_size, rows=4, prompt=6, completion=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "prompt_ids": torch.randint(3, vocab_size, (rows, prompt), generator=g),
        "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab_size, (rows, completion), generator=g),
        "completion_mask": torch.ones(rows, completion, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()}


def weight_updates(model, dtype, steps=5, lr=1e-6):
    """Weight changes after `steps` AdamW steps of a policy-gradient loss on one fixed batch, with forwards in
    `dtype` (common.autocast) over whatever dtype the model's weights have."""
    before = [p.detach().clone().float() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batch = random_batch(model.config.vocab_size, device=model.device)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], device=model.device)[:, None]
    model.train()
    for _ in range(steps):
        with common.autocast(model.device, dtype):
            logps, _ = grpo.completion_logprobs(model, batch)
        (-(logps * advantages).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().float() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_over_float32_weights_learns_like_float32(device):
    """At lr 1e-6 (the usual learning rate of a real model) bf16 weights lose most updates to rounding; float32
    weights with bf16 forwards move as float32 training does: every weight changes, and the update differs from
    float32's by less than 10% (relative norm), the gradient's own bf16 noise."""
    model = common.build_tiny_model(common.build_tiny_tokenizer(), seed=0).to(device)
    fp32 = torch.cat([d.flatten() for d in weight_updates(copy.deepcopy(model), "float32")])
    mixed = torch.cat([d.flatten() for d in weight_updates(copy.deepcopy(model), "bfloat16")])
    bf16_weights = torch.cat([d.flatten() for d in weight_updates(copy.deepcopy(model).bfloat16(), "bfloat16")])
    changed = lambda d: (d != 0).float().mean().item()  # noqa: E731
    difference = ((mixed - fp32).norm() / fp32.norm()).item()  # `pytest -s` shows the measured values
    print(
        f"\n{device}: weights changed: float32 {changed(fp32):.3f}, bf16 autocast {changed(mixed):.3f}, bf16 weights "
        f"{changed(bf16_weights):.3f}; update against float32's: autocast differs by {difference:.3f}, bf16 "
        f"weights' norm is {(bf16_weights.norm() / fp32.norm()).item():.2f} of it"
    )  # fmt: skip
    assert changed(fp32) > 0.99 and changed(mixed) > 0.99
    assert ((mixed - fp32).norm() / fp32.norm()).item() < 0.10
    assert changed(bf16_weights) < 0.5  # what the float32 master weights prevent


def test_pick_dtype_auto_is_float32_off_gpu_and_float16_is_refused():
    cpu = torch.device("cpu")
    assert common.pick_dtype("auto", cpu) == torch.float32 and not common.has_native_bf16(cpu)
    assert not common.autocast(cpu, "auto")._enabled and common.autocast(cpu, "bfloat16")._enabled
    with pytest.raises(plumbing.UsageError, match="GradScaler"):
        common.pick_dtype("float16", cpu)


def test_reference_model_is_frozen_in_the_compute_dtype():
    model = common.build_tiny_model(common.build_tiny_tokenizer())
    reference = common.frozen_copy(model, "bfloat16")
    assert reference.dtype == torch.bfloat16 and not any(p.requires_grad for p in reference.parameters())
    assert model.dtype == torch.float32 and common.frozen_copy(model, "auto").dtype == torch.float32  # on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_and_gradients_equal_the_plain_computation(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(50, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)
    z = logits.float() / 0.7
    plain = z.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    plain_entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), logits, retain_graph=True)
    (plain_entropy_grad,) = torch.autograd.grad((plain_entropy * weights).sum(), logits)  # an entropy bonus's
    for chunk_bytes in (4 * 50 * 2, 2**28):  # two rows per chunk, and everything in one
        logps, entropy = logprobs_from_logits(logits, targets, 0.7, chunk_bytes=chunk_bytes)
        (grad,) = torch.autograd.grad((logps * weights).sum(), logits, retain_graph=True)
        (entropy_grad,) = torch.autograd.grad((entropy * weights).sum(), logits)
        torch.testing.assert_close(logps, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, plain_entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, plain_grad, atol=1e-6, rtol=1e-3)
        torch.testing.assert_close(entropy_grad, plain_entropy_grad, atol=1e-6, rtol=1e-3)


def test_entropy_gradient_is_finite_with_a_suppressed_token():
    """A -inf logit (a token generation never samples, e.g. <image>) adds nothing to the entropy, and its backward
    stays finite with an upstream gradient above 1 (an entropy bonus weighted 1.5); the other entries' gradients
    equal those of the same logits without the suppressed column."""
    g = torch.Generator().manual_seed(1)
    kept = torch.randn(4, 9, generator=g)
    logits = torch.cat([kept, torch.full((4, 1), float("-inf"))], dim=1).requires_grad_()  # (4, 10), last suppressed
    targets = torch.randint(9, (4,), generator=g)
    _, entropy = logprobs_from_logits(logits, targets)
    (grad,) = torch.autograd.grad((1.5 * entropy).sum(), logits)
    assert torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    reference = kept.clone().requires_grad_()
    _, reference_entropy = logprobs_from_logits(reference, targets)
    (reference_grad,) = torch.autograd.grad((1.5 * reference_entropy).sum(), reference)
    torch.testing.assert_close(entropy, reference_entropy)
    torch.testing.assert_close(grad[:, :9], reference_grad)
    assert (grad[:, 9] == 0).all()


def saved_bytes(fn, exclude=()):
    """Bytes of the distinct tensors autograd keeps for the backward while fn() runs (storages in `exclude` aside)."""
    skip, seen = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in skip:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


def test_chunked_logprobs_keep_no_float32_copy_of_the_logits():
    logits = torch.randn(64, 1000, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(1000, (64,))
    plain = lambda: logits.float().log_softmax(-1).gather(-1, targets[:, None])  # noqa: E731
    chunked = lambda: logprobs_from_logits(logits, targets, chunk_bytes=4 * 1000 * 8)  # noqa: E731
    assert saved_bytes(plain, exclude=[logits]) >= 4 * logits.numel()  # a float32 copy (B, V) at least
    assert saved_bytes(chunked, exclude=[logits]) < 0.01 * logits.numel()  # only the logits themselves


FAMILIES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


CASES = [("qwen2", torch.bfloat16), ("qwen2", torch.float32), ("llama", torch.bfloat16)]


@pytest.mark.parametrize("family, dtype", CASES)
def test_memory_estimate_matches_the_activations_autograd_keeps(family, dtype):
    """estimate_memory's activation term (its formula per token and layer) against the tensors a forward keeps
    for its backward, counted on the CPU (weights and their bf16 copies aside); within 5%."""
    config_class, model_class = FAMILIES[family]
    config = config_class(vocab_size=1000, hidden_size=256, intermediate_size=640, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    model = model_class(config).train()
    rows, tokens = 2, 80
    input_ids = torch.randint(1000, (rows, tokens))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(input_ids=input_ids, logits_to_keep=1)

    measured = saved_bytes(forward, exclude=list(model.parameters()))
    # autocast's bf16 copies of the linear layers' weights (counted in estimate_memory's fixed part, not here)
    linear = [p for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name]
    weight_casts = sum(2 * p.numel() for p in linear) if dtype == torch.bfloat16 else 0
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    estimate = common.estimate_memory(model, rows, tokens, 0, rollout_rows=rows, dtype=name)["activations_gib"]
    assert estimate * 2**30 == pytest.approx(measured - weight_casts, rel=0.05)


def test_old_and_reference_logprobs_in_micro_batches_equal_the_whole_batch():
    model = common.build_tiny_model(common.build_tiny_tokenizer())
    batch = random_batch(model.config.vocab_size, rows=6)
    with torch.no_grad():
        whole, _ = grpo.completion_logprobs(model, batch)
        parts = [grpo.completion_logprobs(model, {k: v[rows] for k, v in batch.items()})[0]
                 for rows in torch.arange(6).chunk(3)]  # fmt: skip
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=1e-6)


FIXTURES = Path(__file__).parent / "fixtures"
GPU_PATH = ["--dtype", "bfloat16", "--gradient_checkpointing", "--beta", "0.04", "--output_dir"]
SMALL_RUNS = {  # each script's smallest run, on its data set's fixture
    "grpo.py": ["--dataset", "gsm8k", "--dataset_path", str(FIXTURES / "gsm8k"), "--num_steps", "2", "--sft_steps",
                "5", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8", "--num_iterations", "2",
                "--gradient_accumulation_steps", "2"],
    "crpo.py": ["--dataset", "medqa", "--dataset_path", str(FIXTURES / "medqa"), "--num_steps", "2", "--sft_steps",
                "5", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8", "--num_iterations", "2",
                "--gradient_accumulation_steps", "2"],
    "tree_grpo.py": ["--dataset", "hotpotqa", "--dataset_path", str(FIXTURES / "hotpotqa"), "--num_steps", "2",
                     "--sft_steps", "5", "--prompts_per_step", "2", "--max_step_tokens", "8", "--max_turns", "2",
                     "--gradient_accumulation_steps", "2"],
    "grpo_pp.py": ["--no_grpo_pp", "--stage", "1", "--num_steps", "2", "--warm_start_steps", "3",
                   "--images_per_class", "2", "--eval_per_class", "2", "--prompts_per_step", "2", "--group_size", "3",
                   "--max_new_tokens", "8", "--num_iterations", "2"],
}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("script", SMALL_RUNS)
def test_every_script_trains_with_the_gpu_options(script, device, tmp_path):
    """bf16 autocast, gradient checkpointing, a bf16 reference model, micro-batches and several iterations at
    once: the run finishes and logs finite rewards, losses and KL."""
    run = script_runner(script)(*SMALL_RUNS[script], "--device", device, *GPU_PATH, str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert trained and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in trained)
    if device == "cuda":  # the memory estimate is printed before training, the measured peak logged every step
        assert "estimated peak GPU memory" in run.stdout and all("memory/peak_gib" in r for r in trained)
