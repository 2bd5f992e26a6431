r"""GRPO: Group Relative Policy Optimization, in one file.

Paper: DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models (Shao et al., 2024),
https://arxiv.org/abs/2402.03300. Reference implementation for every formula below: TRL's GRPOTrainer.

The idea. PPO needs a value network to tell a good action from a lucky one. GRPO drops it: for each prompt q it
samples a *group* of G completions o_1..o_G, scores each with a verifiable reward r_i, and uses the group itself
as the baseline. A completion's advantage is how much better it did than its siblings, and every token of that
completion shares it. The update is PPO's clipped surrogate on those advantages, optionally with a KL penalty
towards a frozen reference model.

Equations (i indexes completions in the batch, t their tokens, M_it = 1 on real completion tokens):

    A_i    = (r_i - mean(r_group)) / (std(r_group) + eps)          scale="group" (std unbiased, as TRL)
             (r_i - mean(r_group)) / (std(r_batch) + eps)          scale="batch" (Lite PPO)
              r_i - mean(r_group)                                  scale="none"  (Dr. GRPO)
    w_it   = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)  importance ratio (== 1 when on-policy)
    l_it   = -min(w_it A_i, clip(w_it, 1 - eps_low, 1 + eps_high) A_i) + beta * D_it
    D_it   = exp(x) - x - 1 = expm1(x) - x,  x = log pi_ref - log pi_theta       (k3 estimator of KL)
    loss   = grpo:    mean_i( sum_t M_it l_it / sum_t M_it )       (DeepSeekMath; biased towards short answers)
             bnpo:    sum_it M_it l_it / sum_it M_it               (token mean of the micro-batch)
             dr_grpo: sum_it M_it l_it / (B * L_max)               (constant normaliser, Dr. GRPO)
             dapo:    sum_it M_it l_it / (tokens in the whole batch)   (TRL's default)

What we kept, simplified or chose:
- The loss types, clipping, k3 KL and advantage scalings follow TRL (trl/trainer/grpo_trainer.py) and are tested
  against an independent transcription of its formulas (tests/test_grpo.py). We compute k3 with expm1, which is
  exact near x = 0 where exp(x) - x - 1 loses all its digits.
- On-policy by default (num_iterations=1): pi_old = pi_theta.detach(), so the loss *value* is ~0 while its
  gradient is not. With num_iterations > 1 the old log-probs are computed once, before the updates.
- Log-probs are taken from logits divided by the sampling temperature, so the ratio compares the distribution
  we actually sampled from. One optimiser step per pass over the batch, split into micro-batches.
- No vLLM, no distributed training: generation is `model.generate`. See README.md, "Scaling up".
- Samples are what the loss scores: every rollout and greedy evaluation calls `generate` with our settings only
  (common.generate), never with what a checkpoint's generation_config.json sets (a repetition penalty there
  would make training silently off-policy). --top_p < 1 samples from a truncated distribution while the loss
  scores the full one: keep it at 1 for on-policy training.

The task. Offline default: two-digit addition, e.g. prompt "47+38=", answered with a digit-by-digit trace and
the result, "<think>7+8=15 4+3+1=8</think><answer>85</answer>". The tiny model is warm-started on demonstrations
that forget the carry most of the time (--demo_noise), so it starts knowing the format but making a systematic
mistake; the reward (1 for the right number, +0.1 for the format) is what teaches it to carry. `--dataset gsm8k`
trains on GSM8K (hub id or local folder) with the same reward.
A pretrained chat model gets no warm start: `--num_shots K` shows it K solved training problems as earlier chat
turns, which is how it learns the format. `--small_addend` (47+8=, answered "<think>47+8=55</think><answer>55
</answer>") is the task SmolLM2-135M-Instruct partly solves with 3 shots, unlike two-digit sums
(tests/probe_smollm2_arithmetic.py measures both), and GRPO needs some right answers in a group to learn.

Reading order: `group_advantages` (what GRPO adds to a policy gradient), then GRPO's shared machinery
(`generate_completions`, `completion_logprobs`, `policy_loss`), then `train`, whose numbered steps 1-5 every
algorithm file repeats; the task (arithmetic, GSM8K, the reward, the evaluation) comes last.

Run:
    python grpo.py                                   # the tiny model on a CPU, no download
    python grpo.py --model smollm2-135m --small_addend --num_shots 3 --num_train 600 --prompts_per_step 4 \
        --learning_rate 2e-5 --num_steps 80 --eval_every 20 --prefix_grouper   # SmolLM2-135M, offline
    python grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset gsm8k --num_shots 2 --max_new_tokens 384 \
        --learning_rate 1e-6 --gradient_accumulation_steps 16 --gradient_checkpointing   # one GPU (RESULTS.md)
On a GPU the weights and AdamW stay float32 and the forwards run under bf16 autocast (--dtype auto); the script
prints its estimated peak memory before training.

Results (accuracy over seeds, wall times, curves, the comparison with TRL) are in RESULTS.md.
"""

import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from common import (
    MetricsLogger,
    UsageError,
    autocast,
    check_args_shared,
    estimate_memory,
    format_prompt,
    frozen_copy,
    generate,
    load_data,
    load_model,
    make_run_dir,
    run_cli,
    seed_everything,
)
from prefix_grouper import logprobs_from_logits, shared_prefix_logprobs


@dataclass
class Args:
    # experiment
    seed: int = field(default=0, metadata={"help": "random seed (python, numpy, torch)"})
    model: str = field(default="tiny", metadata={"help": "tiny | smollm2-135m | a local folder | a hub id"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu) | cpu | cuda | mps"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "forwards: auto (bf16 autocast on GPUs with bf16, fp32 elsewhere) | ..."}
    )
    output_dir: str = field(default="runs", metadata={"help": "run folders go under this folder"})
    # task
    dataset: Literal["arithmetic", "gsm8k"] = field(default="arithmetic", metadata={"help": "the task"})
    dataset_path: str = field(default="openai/gsm8k", metadata={"help": "gsm8k: a hub id or a local folder"})
    num_train: int = field(default=2000, metadata={"help": "training problems (gsm8k: at most)"})
    num_eval: int = field(default=200, metadata={"help": "held-out problems for evaluation"})
    small_addend: bool = field(default=False, metadata={"help": "arithmetic: 47+8= instead of 47+38= (810 problems)"})
    num_shots: int = field(default=0, metadata={"help": "chat models: solved training problems as earlier turns"})
    demo_noise: float = field(default=0.7, metadata={"help": "tiny warm start: share of demos that drop the carry"})
    sft_steps: int = field(default=600, metadata={"help": "tiny warm start: SFT steps (cached after the first run)"})
    # rollout
    num_steps: int = field(default=60, metadata={"help": "training steps (one batch of rollouts each)"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per step; the batch is this x group_size"})
    group_size: int = field(default=8, metadata={"help": "G, completions sampled per prompt (at least 2)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest completion, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use it too)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; < 1 is off-policy (the loss scores all)"})
    # advantages and loss
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={"help": "std for A"})
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = field(default="dapo", metadata={"help": "aggregation"})
    eps_low: float = field(default=0.2, metadata={"help": "clip ratio below at 1 - eps_low"})
    eps_high: float = field(default=0.2, metadata={"help": "clip ratio above at 1 + eps_high (DAPO: 0.28)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; > 0 loads a frozen reference model"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "no loss on completions with no EOS"})
    # optimisation
    learning_rate: float = field(default=3e-5, metadata={"help": "AdamW learning rate (real models: ~1e-6)"})
    num_iterations: int = field(default=1, metadata={"help": "mu, optimisation passes over each batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward: less memory, more compute"}
    )
    prefix_grouper: bool = field(
        default=False, metadata={"help": "each group's prompt once: one prefill, one encoding (prefix_grouper.py)"}
    )
    # evaluation
    eval_every: int = field(default=10, metadata={"help": "evaluate on the held-out split every N steps"})

    def __post_init__(self):
        check_args(self)  # bad values fail here, before any model is loaded


def check_args(args: Args):
    """Bad arguments are one clear error before anything loads (Args.__post_init__ calls this)."""
    check_args_shared(args)  # counts >= 1, group_size >= 2, temperature, top_p, clipping, beta, output_dir
    if (args.prompts_per_step * args.group_size) % args.gradient_accumulation_steps:
        raise UsageError("--gradient_accumulation_steps must divide prompts_per_step * group_size")
    if not 0 <= args.num_shots < args.num_train:
        raise UsageError(f"--num_shots must be at least 0 and below --num_train, got {args.num_shots}")


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: what GRPO adds to a policy gradient, group-relative advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std + eps); rewards is (num_groups * group_size,), grouped contiguously.

    std is unbiased (n - 1, as TRL) over the group (scale="group") or the whole batch ("batch"); "none" does not
    divide (Dr. GRPO). A group whose rewards are all equal gets advantage 0: it carries no learning signal.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (GRPO compares completions of one prompt), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} values, got {rewards.shape}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(
            f"rewards at positions {bad} are NaN or infinite; a reward function must return a finite number "
            f"for every completion (return 0.0 for one it cannot score)."
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    # A_i = r_i - mean_group(r)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (num_groups * G,)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)  # (num_groups * G,)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return advantages
    # A_i = (r_i - mean) / (std + eps)
    return advantages / (std + eps)


# ----------------------------------------------------------------------------------------------------------------
# GRPO's shared machinery: rollout, log-probs, loss (the same text in every algorithm file where it is unchanged)


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts, group_size, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False,
    prefix_grouper=False,
):  # fmt: skip
    """Sample `group_size` completions per prompt. Rows are grouped: [p0 x G, p1 x G, ...]. With prefix_grouper,
    each prompt is prefilled once and its KV cache shared by its G samples (common.generate), the same tokens.

    Prompts are left-padded; `generate` gets their attention mask (and derives position ids from it). A completion
    ends at its first EOS, which is kept in the completion mask; whatever follows (padding) is masked out. pad and
    eos may be the same token, so the mask is built from the first EOS position, never from the pad id.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0)  # (B*G, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0)  # (B*G, P)
    # exactly our sampling settings, whatever the checkpoint's generation_config.json asks for (common.generate)
    output = generate(
        model, tokenizer, {"input_ids": prompt_ids, "attention_mask": prompt_mask}, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, greedy=greedy, copies=group_size if prefix_grouper else 1,
    )  # fmt: skip
    completion_ids = output[:, prompt_ids.size(1) :]  # (B*G, C)
    is_eos = completion_ids == tokenizer.eos_token_id  # (B*G, C)
    has_eos = is_eos.any(dim=1)  # (B*G,)
    length = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, completion_ids.size(1))  # tokens incl. EOS
    completion_mask = (torch.arange(completion_ids.size(1), device=model.device)[None] < length[:, None]).long()
    texts = tokenizer.batch_decode(  # each completion up to its EOS: what follows is padding, not text
        [ids[:n] for ids, n in zip(completion_ids.tolist(), length.tolist())], skip_special_tokens=True
    )
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,  # (B*G, C)
        "is_truncated": ~has_eos,  # (B*G,)
        "texts": texts,
    }


def completion_logprobs(model, batch, temperature=1.0, prefix_grouper=False):
    """Per-token log pi(o_t | q, o_<t) of the completion tokens, and the entropy of each token's distribution.

    batch: generate_completions' tensors (or some of their rows): prompt_ids, prompt_mask, completion_ids and
    completion_mask, each (B, ·). Position ids count real tokens only, so a left-padded prompt gets the same RoPE
    positions as an unpadded one. With prefix_grouper, consecutive rows that share a prompt (a group) encode it
    once instead of G times (prefix_grouper.py); the result is the same up to floating-point rounding.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]  # (B, P)
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]  # (B, C)
    if prefix_grouper:
        _, group_sizes = torch.unique_consecutive(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_counts=True)
        firsts = group_sizes.cumsum(0) - group_sizes  # the first row of each group
        prompts = [ids[mask.bool()] for ids, mask in zip(prompt_ids[firsts], prompt_mask[firsts])]
        completions = [ids[mask.bool()] for ids, mask in zip(completion_ids, completion_mask)]
        groups = [completions[first : first + n] for first, n in zip(firsts.tolist(), group_sizes.tolist())]
        logps, entropy = shared_prefix_logprobs(model, prompts, groups, temperature, return_entropy=True)
        # back to (B, C): the flat per-token values fill the mask's ones in row-major order
        to_padded = lambda nested: torch.zeros(completion_ids.shape, device=model.device).masked_scatter(
            completion_mask.bool(), torch.cat([x for group in nested for x in group])
        )  # fmt: skip
        return to_padded(logps), to_padded(entropy)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+C)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P+C)
    num_completion = completion_ids.size(1)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=num_completion + 1,  # the last prompt position predicts the first completion token
    ).logits[:, :-1]  # (B, C, V)
    # log pi(o_t | q, o_<t) = z[o_t] - logsumexp(z), z = logits / temperature in float32 (a chunk at a time)
    return logprobs_from_logits(logits, completion_ids, temperature)  # (B, C), (B, C)


def policy_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    eps_low=0.2,
    eps_high=0.2,
    beta=0.0,
    loss_type="dapo",
    max_completion_length=None,
    num_items_in_batch=None,
    grad_accum_steps=1,
    dual_clip=None,
):
    """The clipped GRPO surrogate with an optional k3 KL penalty, aggregated as TRL's `loss_type`.

    logps, old_logps, ref_logps, mask: (B, T) per completion token; advantages: (B,). ref_logps may be None when
    beta == 0. For one micro-batch out of `grad_accum_steps` (TRL's semantics): dr_grpo divides by
    B * max_completion_length (default T); dapo by `num_items_in_batch`, the real tokens of the *whole* batch
    (default: this micro-batch's). The micro-batch losses then add up to the loss of the whole batch.
    dual_clip = c > 1 (off when None) caps a token's loss at -c A where A < 0 (veRL's clip_ratio_c): off-policy, a
    bad token whose ratio has grown large cannot dominate the batch. On-policy (ratio 1) it never acts.
    Returns (loss, metrics) with metrics detached floats: kl, clip_ratio/low_mean, high_mean, region_mean.
    """
    if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1)  # (B, 1): every token of a completion shares its advantage
    # w_it = pi_theta / pi_old
    ratio = torch.exp(logps - old_logps)  # (B, T)
    # l_it = -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # (B, T)
    if dual_clip is not None:
        # dual clip: where A < 0, l_it = min(l_it, -c A)
        per_token_loss = torch.where(
            advantages < 0, torch.minimum(per_token_loss, -dual_clip * advantages), per_token_loss
        )
    metrics = {}
    if beta != 0.0:
        # D_it = exp(x) - x - 1 with x = log pi_ref - log pi_theta; expm1 keeps the digits near x = 0
        log_ratio_ref = ref_logps - logps
        per_token_kl = torch.expm1(log_ratio_ref) - log_ratio_ref  # (B, T)
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl, mask).item()

    if loss_type == "grpo":  # mean over completions of each completion's token mean
        loss = ((per_token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean() / grad_accum_steps
    elif loss_type == "bnpo":  # token mean of this micro-batch
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / grad_accum_steps
    elif loss_type == "dr_grpo":  # constant normaliser B * L_max
        max_len = max_completion_length or mask.size(1)
        loss = (per_token_loss * mask).sum() / (mask.size(0) * max_len) / grad_accum_steps
    else:  # dapo: token mean over the whole batch
        num_items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = (per_token_loss * mask).sum() / num_items.clamp(min=1.0)

    # share of tokens where clipping removed the gradient (TRL's clip_ratio/*)
    is_low_clipped = (ratio < 1 - eps_low) & (advantages < 0)
    is_high_clipped = (ratio > 1 + eps_high) & (advantages > 0)
    metrics["clip_ratio/low_mean"] = masked_mean(is_low_clipped.float(), mask).item()
    metrics["clip_ratio/high_mean"] = masked_mean(is_high_clipped.float(), mask).item()
    metrics["clip_ratio/region_mean"] = masked_mean((is_low_clipped | is_high_clipped).float(), mask).item()
    return loss, metrics


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Training loop


def train(args: Args):
    check_args(args)
    seed_everything(args.seed)
    train_items, eval_items, demos, shots = load_task(args)
    model, tokenizer = load_model(args.model, demos=demos, device=args.device, sft_steps=args.sft_steps)
    ref_model = frozen_copy(model, args.dtype) if args.beta > 0 else None
    if args.gradient_checkpointing:  # recompute each layer in the backward instead of keeping its activations
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)  # float32 states
    run_dir = make_run_dir("grpo", args, root=args.output_dir)
    print(f"[grpo] run folder: {run_dir}")
    print(
        "[grpo] note: with num_iterations=1 the policy is on-policy (ratio == 1) and advantages are zero-mean, so the\n"
        "       logged loss stays near 0 while its gradient is not 0. Watch reward and eval/accuracy, not loss."
    )
    to_prompt = lambda item: format_prompt(tokenizer, item["question"], SYSTEM_PROMPT, shots)  # noqa: E731
    if model.device.type == "cuda":  # does this run fit? (how it is estimated: common.estimate_memory)
        memory = estimate_memory(
            model, rows=args.prompts_per_step * args.group_size // args.gradient_accumulation_steps,
            prompt_tokens=max(len(tokenizer(to_prompt(x))["input_ids"]) for x in train_items[:256]),
            completion_tokens=args.max_new_tokens, rollout_rows=args.prompts_per_step * args.group_size,
            dtype=args.dtype, reference=ref_model is not None, gradient_checkpointing=args.gradient_checkpointing,
        )  # fmt: skip
        print(f"[grpo] estimated peak GPU memory (GiB): {', '.join(f'{k} {v:.1f}' for k, v in memory.items())}")
    rng = random.Random(args.seed)
    start = time.time()

    with MetricsLogger(run_dir, plot_keys=PLOT_KEYS, model=(model, tokenizer)) as logger:
        with autocast(model.device, args.dtype):
            before = evaluate(model, tokenizer, eval_items, to_prompt, args.max_new_tokens)
        logger.log(0, {f"eval/{k}": v for k, v in before.items()})
        print(f"[grpo] held-out before training: accuracy {before['accuracy']:.3f}, format {before['format']:.3f}")
        bar = tqdm(range(1, args.num_steps + 1), desc="grpo")
        for step in bar:
            step_start = time.time()
            batch_items = rng.choices(train_items, k=args.prompts_per_step)
            # 1. rollout: G completions for each prompt
            model.eval()
            with autocast(model.device, args.dtype):
                rollout = generate_completions(
                    model, tokenizer, [to_prompt(x) for x in batch_items], group_size=args.group_size,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    prefix_grouper=args.prefix_grouper,
                )  # fmt: skip
            group_items = [x for x in batch_items for _ in range(args.group_size)]  # the item of each row
            # 2. rewards and group-relative advantages
            rewards = reward_function(rollout["texts"], [x["answer"] for x in group_items])
            advantages = group_advantages(rewards["total"], args.group_size, scale=args.scale_rewards)  # (B*G,)
            advantages = advantages.to(model.device)
            completion_mask = rollout["completion_mask"]  # (B*G, C)
            if args.mask_truncated_completions:
                completion_mask = completion_mask * (~rollout["is_truncated"]).unsqueeze(1)
            batch = {k: v for k, v in rollout.items() if torch.is_tensor(v)}  # prompt and completion ids and masks
            row_chunks = torch.arange(len(group_items)).chunk(args.gradient_accumulation_steps)
            micro_batches = [{k: v[rows] for k, v in batch.items()} for rows in row_chunks]
            # 3. log-probs of the sampling policy (only needed off-policy) and of the reference (only if beta > 0),
            #    in the training pass's micro-batches, so that no forward holds the whole batch
            old_logps = ref_logps = None
            with torch.no_grad(), autocast(model.device, args.dtype):
                if args.num_iterations > 1:
                    old_logps = torch.cat([completion_logprobs(model, mb, args.temperature, args.prefix_grouper)[0]
                                           for mb in micro_batches])  # (B*G, C)  # fmt: skip
                if ref_model is not None:
                    ref_logps = torch.cat([completion_logprobs(ref_model, mb, args.temperature, args.prefix_grouper)[0]
                                           for mb in micro_batches])  # (B*G, C)  # fmt: skip
            # 4. num_iterations passes of one optimiser step each, over micro-batches
            model.train()
            num_items = completion_mask.sum()  # real tokens in the whole batch (dapo's normaliser)
            step_metrics, loss_sum = [], 0.0
            for _ in range(args.num_iterations):
                for rows, micro_batch in zip(row_chunks, micro_batches):
                    with autocast(model.device, args.dtype):
                        logps, entropy = completion_logprobs(model, micro_batch, args.temperature, args.prefix_grouper)
                    loss, metrics = policy_loss(
                        logps,
                        logps.detach() if old_logps is None else old_logps[rows],
                        None if ref_logps is None else ref_logps[rows],
                        advantages[rows],
                        completion_mask[rows],
                        eps_low=args.eps_low,
                        eps_high=args.eps_high,
                        beta=args.beta,
                        loss_type=args.loss_type,
                        max_completion_length=args.max_new_tokens,
                        num_items_in_batch=num_items,
                        grad_accum_steps=args.gradient_accumulation_steps,
                    )
                    loss.backward()
                    metrics["entropy"] = masked_mean(entropy, completion_mask[rows]).item()
                    step_metrics.append(metrics)
                    loss_sum += loss.item() / args.num_iterations  # micro-batch losses add up to the batch's
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            # 5. log TRL's metric names
            group_std = rewards["total"].view(-1, args.group_size).std(dim=1)
            lengths = rollout["completion_mask"].sum(1).float()
            record = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}
            record |= {
                "loss": loss_sum,
                "reward": rewards["total"].mean().item(),
                "reward_std": rewards["total"].std().item(),
                "frac_reward_zero_std": (group_std == 0).float().mean().item(),
                **{f"rewards/{name}/mean": r.mean().item() for name, r in rewards.items() if name != "total"},
                "completions/mean_length": lengths.mean().item(),
                "completions/clipped_ratio": rollout["is_truncated"].float().mean().item(),
                "grad_norm": grad_norm.item(),
                "step_time": time.time() - step_start,
            }
            if model.device.type == "cuda":  # measured, beside what estimate_memory printed
                record["memory/peak_gib"] = torch.cuda.max_memory_allocated(model.device) / 2**30
            if step % args.eval_every == 0 or step == args.num_steps:
                with autocast(model.device, args.dtype):
                    held_out = evaluate(model, tokenizer, eval_items, to_prompt, args.max_new_tokens)
                record |= {f"eval/{k}": v for k, v in held_out.items()}
            logger.log(step, record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['rewards/correct/mean']:.2f}")

    after = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
    results = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "wall_time_s": time.time() - start,
        "run_dir": str(run_dir),
    }
    print(
        f"[grpo] held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
        f"in {results['wall_time_s']:.0f}s (evaluations and training, after loading the model)"
    )
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


PLOT_KEYS = ["reward", "eval/accuracy", "rewards/format/mean", "completions/mean_length", "entropy", "grad_norm"]


# ----------------------------------------------------------------------------------------------------------------
# The task: data, reward, evaluation (not the algorithm: the part to replace with your own task)


SYSTEM_PROMPT = (
    "Solve the problem. Think step by step inside <think> </think>, then give only the final number "
    "inside <answer> </answer>."
)


def addition_trace(a: int, b: int, drop_carry: bool = False) -> str:
    """The digit-by-digit demonstration, e.g. 47+38 -> '<think>7+8=15 4+3+1=8</think><answer>85</answer>'.

    With drop_carry the tens step forgets the carry (4+3=7 -> 75): a consistent trace with a wrong answer.
    A one-digit b gets the sum in one step, 47+8 -> '<think>47+8=55</think><answer>55</answer>' (drop_carry: 45):
    SmolLM2-135M copies the digit trace badly (0% right vs 41% in tests/probe_smollm2_arithmetic.py).
    """
    if b < 10:
        total = a + b - (10 if drop_carry and a % 10 + b >= 10 else 0)
        return f"<think>{a}+{b}={total}</think><answer>{total}</answer>"
    ones = a % 10 + b % 10
    carry = ones // 10 if not drop_carry else 0
    tens = a // 10 + b // 10 + carry
    tens_step = f"{a // 10}+{b // 10}+1={tens}" if carry else f"{a // 10}+{b // 10}={tens}"
    return f"<think>{a % 10}+{b % 10}={ones} {tens_step}</think><answer>{tens}{ones % 10}</answer>"


def make_arithmetic_task(num_train: int, num_eval: int, seed: int, demo_noise: float, small_addend: bool = False):
    """Two-digit additions (small_addend: a two-digit plus a one-digit number), split into disjoint train and
    held-out sets. Each item has its question, answer and a correct solution. Returns (train, eval, demos)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in (range(1, 10) if small_addend else range(10, 100))]
    rng.shuffle(pairs)  # 8100 problems (small_addend: 810)
    if num_eval + num_train > len(pairs):
        raise UsageError(
            f"--num_train + --num_eval must be at most {len(pairs)} (the task's problems), got {num_train} + {num_eval}"
        )
    to_item = lambda a, b: {"question": f"{a}+{b}=", "answer": str(a + b), "solution": addition_trace(a, b)}  # noqa: E731
    eval_items = [to_item(a, b) for a, b in pairs[:num_eval]]
    train_pairs = pairs[num_eval : num_eval + num_train]
    train_items = [to_item(a, b) for a, b in train_pairs]
    demos = [(f"{a}+{b}=", addition_trace(a, b, drop_carry=rng.random() < demo_noise)) for a, b in train_pairs]
    return train_items, eval_items, demos


def load_gsm8k(path: str, num_train: int, num_eval: int):
    """GSM8K from the hub ('openai/gsm8k') or a local folder with train/test files in its format
    (fields 'question' and 'answer', the answer ending in '#### <number>'). Returns (train, eval, demos)."""
    data = load_data(path, "GSM8K", {"train": ("train",), "eval": ("test",)}, ("question", "answer"),
                     "--dataset arithmetic", config_name="main")  # fmt: skip

    def to_items(split, limit):
        items = []
        for i, row in enumerate(split.select(range(min(limit, len(split))))):
            if "####" not in row["answer"]:
                raise UsageError(
                    f"GSM8K at {path!r}: answer {i} does not end in '#### <number>' ({row['answer'][-60:]!r}); "
                    f"GSM8K's format puts the final number after '####'."
                )
            reasoning, _, answer = row["answer"].rpartition("####")
            reasoning = re.sub(r"<<.*?>>", "", reasoning).strip()  # drop the calculator annotations
            answer = answer.strip().replace(",", "")
            solution = f"<think>{reasoning}</think><answer>{answer}</answer>"
            items.append({"question": row["question"], "answer": answer, "solution": solution})
        return items

    train_items, eval_items = to_items(data["train"], num_train), to_items(data["eval"], num_eval)
    return train_items, eval_items, [(x["question"], x["solution"]) for x in train_items]


def load_task(args: Args):
    """(train items, held-out items, the tiny model's demos, the --num_shots worked examples for a chat model)."""
    if args.dataset == "arithmetic":
        train_items, eval_items, demos = make_arithmetic_task(
            args.num_train, args.num_eval, args.seed, args.demo_noise, args.small_addend
        )
    else:
        train_items, eval_items, demos = load_gsm8k(args.dataset_path, args.num_train, args.num_eval)
    # --num_shots: the first training problems, solved, shown to a chat model as earlier turns (not trained on)
    shots = [(x["question"], x["solution"]) for x in train_items[: args.num_shots]]
    train_items = train_items[args.num_shots :]
    if not train_items or not eval_items:
        raise UsageError(
            f"The {args.dataset} task has {len(train_items)} training (after {args.num_shots} worked examples) and "
            f"{len(eval_items)} held-out problems; both must be non-empty (check --num_train, --num_eval, "
            f"--num_shots and the data files)."
        )
    return train_items, eval_items, demos, shots


def extract_answer(completion: str) -> str | None:
    match = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    return match.group(1).strip() if match else None


def correctness_reward(completion: str, answer: str) -> float:
    """1 if the number in <answer> equals the reference (commas and a trailing '.0' ignored), else 0."""
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    normalise = lambda s: s.replace(",", "").replace("$", "").strip().removesuffix(".0")  # noqa: E731
    return float(normalise(predicted) == normalise(answer))


def format_reward(completion: str) -> float:
    """1 if the completion is exactly <think>...</think><answer>...</answer>, else 0."""
    return float(re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", completion, re.DOTALL) is not None)


def reward_function(completions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Per-completion rewards by name; the training reward is their weighted sum (correct + 0.1 format)."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers: pass one answer per completion")
    correct = torch.tensor([correctness_reward(c, a) for c, a in zip(completions, answers)])
    formatted = torch.tensor([format_reward(c) for c in completions])
    return {"correct": correct, "format": formatted, "total": correct + 0.1 * formatted}


@torch.no_grad()
def evaluate(model, tokenizer, items, to_prompt, max_new_tokens, batch_size=256):
    """Greedy decoding on held-out problems: accuracy, share well formatted, mean completion length."""
    model.eval()
    correct, formatted, length = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [to_prompt(x) for x in chunk]
        rollout = generate_completions(
            model, tokenizer, prompts, group_size=1, max_new_tokens=max_new_tokens, greedy=True
        )
        rewards = reward_function(rollout["texts"], [x["answer"] for x in chunk])
        correct += rewards["correct"].tolist()
        formatted += rewards["format"].tolist()
        length += rollout["completion_mask"].sum(1).tolist()
    n = len(items)
    return {"accuracy": sum(correct) / n, "format": sum(formatted) / n, "mean_length": sum(length) / n}


if __name__ == "__main__":
    run_cli(Args, train)
