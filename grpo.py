r"""GRPO: Group Relative Policy Optimization, in one file.

Paper: DeepSeekMath (Shao et al., 2024), https://arxiv.org/abs/2402.03300. Reference code: TRL's GRPOTrainer.

PPO without a value network: for each prompt q, sample a group of G completions, score each with a verifiable
reward r_i, and take the group's mean reward as the baseline. Every token of a completion shares its advantage;
the update is PPO's clipped surrogate, with an optional KL penalty towards a frozen reference model.

    A_i  = (r_i - mean(r_group)) / (std(r_group) + 1e-4)            --scale_rewards group (or batch, none)
    w_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)     the importance ratio, 1 on-policy
    l_it = -min(w_it A_i, clip(w_it, 1 - eps_low, 1 + eps_high) A_i) + beta k3,  k3 = e^x - x - 1, x = log pi_ref/pi
    loss = the l_it of real completion tokens, averaged as --loss_type says (dapo: over the batch; `policy_loss`)

The paper's: the group baseline, the clipped surrogate, the k3 estimate of the KL (--beta). TRL's: the loss types
and reward scalings (tests/test_grpo.py checks ours against them). Ours:
1. k3 computed with expm1, exact near x = 0, where e^x - x - 1 loses its digits.
2. Log-probs at the sampling temperature, so the ratio compares the distribution that was sampled.
3. On-policy by default (num_iterations 1: pi_old = pi_theta.detach(), w = 1: the loss's value says little, its
   gradient trains).
4. One optimiser step per pass over the batch, in micro-batches; one process, no vLLM (README, "Scaling up").

Run (the task, additions or GSM8K, is tasks/arithmetic.py; the results are in RESULTS.md):
    python grpo.py                                  # the tiny model on a CPU, no download
    python grpo.py --model smollm2-135m --small_addend --num_shots 3 --num_train 600 --prompts_per_step 4 \
        --learning_rate 2e-5 --num_steps 80 --eval_every 20 --prefix_grouper   # SmolLM2-135M, offline
"""

import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from common import autocast, estimate_memory, frozen_copy, generate, load_model, seed_everything
from plumbing import MetricsLogger, UsageError, arg, check_args_shared, make_run_dir, on_policy_note, run_cli, save_run
from prefix_grouper import grouped_batch_logprobs, logprobs_from_logits, shared_prompt_cache
from tasks import arithmetic, format_prompt


@dataclass
class Args:
    # experiment
    seed: int = arg(0, "random seed (python, numpy, torch)", ">= 0")
    model: str = arg("tiny", "tiny | smollm2-135m | a local folder | a hub id")
    device: str = arg("auto", "auto picks cuda, then mps, then cpu", "device")
    dtype: Literal["auto", "float32", "bfloat16"] = arg(
        "auto", "forwards: auto (bf16 autocast on GPUs with bf16, fp32 elsewhere) | ..."
    )
    output_dir: str = arg("runs", "run folders go under this folder")
    # task
    dataset: Literal["arithmetic", "gsm8k"] = arg("arithmetic", "the task")
    dataset_path: str = arg("openai/gsm8k", "gsm8k: a hub id or a local folder")
    num_train: int = arg(2000, "training problems (gsm8k: at most)", ">= 1")
    num_eval: int = arg(200, "held-out problems for evaluation", ">= 1")
    small_addend: bool = arg(False, "arithmetic: 47+8= instead of 47+38= (810 problems)")
    num_shots: int = arg(0, "chat models: solved training problems as earlier turns", ">= 0")
    demo_noise: float = arg(0.7, "tiny warm start: share of demos that drop the carry", "[0, 1]")
    sft_steps: int = arg(600, "tiny warm start: SFT steps (cached after the first run)", ">= 1")
    # rollout
    num_steps: int = arg(60, "training steps (one batch of rollouts each)", ">= 1")
    prompts_per_step: int = arg(16, "prompts per step; the batch is this x group_size", ">= 1")
    group_size: int = arg(8, "G, completions sampled per prompt (at least 2)", ">= 2")
    max_new_tokens: int = arg(32, "longest completion, in tokens", ">= 1")
    temperature: float = arg(1.0, "sampling temperature (log-probs use it too)", "> 0")
    top_p: float = arg(1.0, "nucleus sampling; < 1 is off-policy (the loss scores all)", "(0, 1]")
    # advantages and loss
    scale_rewards: Literal["group", "batch", "none"] = arg("group", "std for A")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = arg("dapo", "aggregation")
    eps_low: float = arg(0.2, "clip ratio below at 1 - eps_low", "[0, 1)")
    eps_high: float = arg(0.2, "clip ratio above at 1 + eps_high (DAPO: 0.28)", ">= 0")
    beta: float = arg(0.0, "KL coefficient; > 0 loads a frozen reference model", ">= 0")
    mask_truncated_completions: bool = arg(False, "no loss on completions with no EOS")
    # optimisation
    learning_rate: float = arg(3e-5, "AdamW learning rate (real models: ~1e-6)", "> 0")
    num_iterations: int = arg(1, "mu, optimisation passes over each batch", ">= 1")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimiser step", ">= 1")
    max_grad_norm: float = arg(1.0, "gradient clipping", "> 0")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward: less memory, more compute")
    prefix_grouper: bool = arg(False, "each group's prompt once: one prefill, one encoding (prefix_grouper.py)")
    # evaluation
    eval_every: int = arg(10, "evaluate on the held-out split every N steps", ">= 1")

    def __post_init__(self):
        check_args(self)  # bad values fail here, before any model is loaded


def check_args(args: Args):
    """Bad arguments are one clear error before anything loads (Args.__post_init__ calls this)."""
    check_args_shared(args)  # every field in its declared range, a writable output folder
    if (args.prompts_per_step * args.group_size) % args.gradient_accumulation_steps:
        raise UsageError("--gradient_accumulation_steps must divide prompts_per_step * group_size")
    if args.num_shots >= args.num_train:
        raise UsageError(f"--num_shots must be below --num_train ({args.num_train}), got {args.num_shots}")
    if args.num_shots and args.model == "tiny":
        raise UsageError(
            "--num_shots needs a chat model (e.g. --model smollm2-135m); the tiny model has no chat template"
        )


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: what GRPO adds to a policy gradient, group-relative advantages


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """A_i = (r_i - mean of its group) / (std + eps); rewards is (num_groups * group_size,), grouped contiguously.

    std is unbiased (n - 1, as TRL) over the group (scale="group") or the whole batch ("batch"); "none" does not
    divide (Dr. GRPO). A group whose rewards are all equal carries no learning signal: its advantage is 0 up to the
    float32 rounding of its mean (a small uniform value, as in TRL).
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
    model,
    tokenizer,
    prompts,
    group_size,
    max_new_tokens,
    temperature=1.0,
    top_p=1.0,
    greedy=False,
    prefix_grouper=False,
):
    """Sample `group_size` completions per prompt. Rows are grouped: [p0 x G, p1 x G, ...]. With prefix_grouper,
    each prompt is prefilled once and its KV cache shared by its G samples (prefix_grouper.shared_prompt_cache).

    Prompts are left-padded; `generate` gets their attention mask (and derives position ids from it). A completion
    ends at its first EOS, which is kept in the completion mask; whatever follows (padding) is masked out. pad and
    eos may be the same token, so the mask is built from the first EOS position, never from the pad id.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0)  # (B*G, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0)  # (B*G, P)
    inputs = {"input_ids": prompt_ids, "attention_mask": prompt_mask}
    if prefix_grouper:  # each prompt prefilled once, its KV cache repeated for its G rows: the same samples
        inputs["past_key_values"] = shared_prompt_cache(model, inputs, copies=group_size)
    # exactly our sampling settings, whatever the checkpoint's generation_config.json asks for (common.generate)
    output = generate(
        model, tokenizer, inputs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy
    )
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
    completion_mask, each (B, ·) for B rows. Position ids count real tokens only, so a left-padded prompt gets the
    same RoPE positions as an unpadded one. With prefix_grouper, consecutive rows that share a prompt (a group, or
    the part of one a micro-batch holds) encode it once (prefix_grouper.py): the same up to floating-point rounding.
    """
    if prefix_grouper:
        return grouped_batch_logprobs(model, batch, temperature)  # (B, C), (B, C)
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]  # (B, P)
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]  # (B, C)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+C)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P+C)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_ids.size(1) + 1,  # the last prompt position predicts the first completion token
    ).logits[:, :-1]  # (B, C, V): the last position would predict past the completion
    if logits.numel() > 2**26:  # over 256 MiB in float32: the same two tensors, a chunk at a time (less memory)
        return logprobs_from_logits(logits, completion_ids, temperature)
    z = logits.float() / temperature  # (B, C, V), float32 as TRL
    # log pi(o_t | q, o_<t) = z[o_t] - logsumexp(z)
    log_normaliser = z.logsumexp(dim=-1)  # (B, C)
    logps = z.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - log_normaliser  # (B, C)
    # entropy H_t = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, a -inf logit (p_v = 0) counted as 0
    entropy = log_normaliser - (z.softmax(dim=-1) * z.masked_fill(z == -torch.inf, 0.0)).sum(dim=-1)  # (B, C)
    return logps, entropy


@torch.no_grad()
def batch_logprobs(model, micro_batches, temperature=1.0, prefix_grouper=False):
    """completion_logprobs of a batch, a micro-batch at a time (no forward holds the whole batch): (B, C)."""
    return torch.cat([completion_logprobs(model, mb, temperature, prefix_grouper)[0] for mb in micro_batches])


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
):
    """The clipped GRPO surrogate with an optional k3 KL penalty, aggregated as TRL's `loss_type`.

    logps, old_logps, ref_logps, mask: (B, T) per completion token; advantages: (B,). ref_logps may be None when
    beta == 0. For one micro-batch out of `grad_accum_steps` (TRL's semantics): dr_grpo divides by
    B * max_completion_length (default T); dapo by `num_items_in_batch`, the real tokens of the *whole* batch
    (default: this micro-batch's). The micro-batch losses then add up to the loss of the whole batch.
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
    metrics = {}
    if beta != 0.0:
        # k3_it = exp(x) - x - 1 with x = log pi_ref - log pi_theta; expm1 keeps the digits near x = 0
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
    train_items, eval_items, demos, shots = arithmetic.load_task(
        args.dataset,
        args.dataset_path,
        args.num_train,
        args.num_eval,
        args.seed,
        args.demo_noise,
        small_addend=args.small_addend,
        num_shots=args.num_shots,
    )
    model, tokenizer = load_model(args.model, demos=demos, device=args.device, sft_steps=args.sft_steps)
    ref_model = frozen_copy(model, args.dtype) if args.beta > 0 else None
    if args.gradient_checkpointing:  # recompute each layer in the backward instead of keeping its activations
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)  # float32 states
    run_dir = make_run_dir("grpo", args, root=args.output_dir)
    on_policy_note("grpo")
    to_prompt = lambda item: format_prompt(tokenizer, item["question"], arithmetic.SYSTEM_PROMPT, shots)  # noqa: E731
    # held-out: greedy answers from generate_completions, scored by the task
    evaluate = lambda: arithmetic.evaluate(  # noqa: E731
        model, tokenizer, eval_items, to_prompt, args.max_new_tokens, generate_completions
    )
    if model.device.type == "cuda":  # does this run fit? (common.estimate_memory prints its estimate)
        estimate_memory(
            model,
            rows=args.prompts_per_step * args.group_size // args.gradient_accumulation_steps,
            prompt_tokens=max(len(tokenizer(to_prompt(x))["input_ids"]) for x in train_items[:256]),
            completion_tokens=args.max_new_tokens,
            rollout_rows=args.prompts_per_step * args.group_size,
            dtype=args.dtype,
            reference=ref_model is not None,
            checkpointing=args.gradient_checkpointing,
        )
    rng = random.Random(args.seed)
    start = time.time()

    with MetricsLogger(run_dir, plot_keys=PLOT_KEYS, model=(model, tokenizer)) as logger:
        with autocast(model.device, args.dtype):
            before = evaluate()
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
                    model,
                    tokenizer,
                    [to_prompt(x) for x in batch_items],
                    group_size=args.group_size,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    prefix_grouper=args.prefix_grouper,
                )
            group_items = [x for x in batch_items for _ in range(args.group_size)]  # the item of each row
            # 2. rewards and group-relative advantages
            rewards = arithmetic.reward_function(rollout["texts"], [x["answer"] for x in group_items])
            advantages = group_advantages(rewards["total"], args.group_size, scale=args.scale_rewards)  # (B*G,)
            advantages = advantages.to(model.device)
            completion_mask = rollout["completion_mask"]  # (B*G, C)
            if args.mask_truncated_completions:
                completion_mask = completion_mask * (~rollout["is_truncated"]).unsqueeze(1)
            batch = {k: v for k, v in rollout.items() if torch.is_tensor(v)}  # ids and masks (and is_truncated)
            row_chunks = torch.arange(len(group_items)).chunk(args.gradient_accumulation_steps)
            micro_batches = [{k: v[rows] for k, v in batch.items()} for rows in row_chunks]
            # 3. log-probs of the sampling policy (only needed off-policy) and of the reference (only if beta > 0),
            #    in the training pass's micro-batches, so that no forward holds the whole batch
            old_logps = ref_logps = None
            with autocast(model.device, args.dtype):
                if args.num_iterations > 1:
                    old_logps = batch_logprobs(model, micro_batches, args.temperature, args.prefix_grouper)  # (B*G, C)
                if ref_model is not None:
                    ref_logps = batch_logprobs(ref_model, micro_batches, args.temperature, args.prefix_grouper)
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
                    loss_sum += loss.item() / args.num_iterations  # micro-batches add up, passes average
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
                    held_out = evaluate()
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
    save_run(run_dir, results, model, tokenizer)
    return results


PLOT_KEYS = ["reward", "eval/accuracy", "rewards/format/mean", "completions/mean_length", "entropy", "grad_norm"]


if __name__ == "__main__":
    run_cli(Args, train)
