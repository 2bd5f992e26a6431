"""CRPO: Clinical-objective Relative Policy Optimization (Clinical-R1), in one file.

Paper: Clinical-R1 (Gu, Zhou et al., 2025), https://arxiv.org/abs/2512.00601. This is grpo.py with a reward per
clinical objective and their advantage (the section "The algorithm", used in step 2 of the loop) and an entropy
bonus; rollout, log-probs and loss are grpo.py's, line for line. The task is tasks/clinic.py.

A correctness reward alone lets a model answer right with lazy or invented reasoning. CRPO adds rule-based,
verifiable rewards for faithfulness (cite only findings the case has; conclude what the reasoning supports) and
comprehensiveness (cover the findings; reject each distractor for a reason), for responses written as
<dx>...</dx><conclusion>X</conclusion>. A group whose answers are all right (or all wrong) still gets an advantage.

    R_i  = k R_acc + R_faith + R_comp,  k = 10             (--method grpo: k R_acc + R_format, the baseline)
    A_i  = (R_i - mean(R_group)) / (std(R_group) + 1e-4)    (the ablation, --advantage_mode normalize_then_sum:
                                                              z-score each objective, then their weighted sum)
    loss = grpo.py's loss - c_H * mean entropy of the completion tokens,  c_H = --entropy_coef

The paper's: the three objectives and their tags, rule-based rewards, k = 10, GRPO on correctness + format as the
baseline, G = 5, a k3 KL to the warm start (beta 0.001), an entropy bonus of 0.001. Its rules and data are not
public. Ours:
1. The rules of R_faith and R_comp (`faithfulness_reward`, `comprehensiveness_reward`).
2. Summing before normalising (the paper bounds the reward by k + 2, a bound of one summed reward).
3. A 0.8M-parameter model warm-started on templated traces, learning rate 1e-4, temperature 1.0 (the paper:
   Qwen2.5-3B with R1 traces, 1e-6, 0.6).

Run (the results are in RESULTS.md):
    python crpo.py                          # CRPO on the tiny model, CPU
    python crpo.py --method grpo            # the GRPO baseline: same loop, accuracy + format reward
    python experiments/crpo_vs_grpo.py      # both over seeds 0-4: a table and a plot
"""

import math
import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from common import autocast, estimate_memory, frozen_copy, generate, load_model, seed_everything
from plumbing import MetricsLogger, UsageError, arg, check_args_shared, make_run_dir, on_policy_note, run_cli, save_run
from prefix_grouper import grouped_batch_logprobs, logprobs_from_logits, shared_prompt_cache
from tasks import clinic, format_prompt


@dataclass
class Args:
    # experiment
    seed: int = arg(0, "random seed of training (python, numpy, torch)", ">= 0")
    model: str = arg("tiny", "tiny | smollm2-135m | a local folder | a hub id")
    device: str = arg("auto", "auto picks cuda, then mps, then cpu", "device")
    dtype: Literal["auto", "float32", "bfloat16"] = arg(
        "auto", "forwards: auto (bf16 autocast on GPUs with bf16, fp32 elsewhere) | ..."
    )
    output_dir: str = arg("runs", "run folders go under this folder")
    # task
    dataset: Literal["clinic", "medqa"] = arg("clinic", "the task")
    dataset_path: str = arg("GBaker/MedQA-USMLE-4-options", "medqa: hub id or folder")
    data_seed: int = arg(0, "seed of the generated items (seeds share one warm start)", ">= 0")
    num_train: int = arg(2000, "training items (medqa: at most)", ">= 1")
    num_eval: int = arg(120, "held-out items for evaluation", ">= 1")
    sft_steps: int = arg(800, "tiny warm start: SFT steps of 32 (cached after the first run)", ">= 1")
    # CRPO
    method: Literal["crpo", "grpo"] = arg("crpo", "crpo objectives, or the grpo baseline")
    weights: str = arg("", "override the objective weights, e.g. 'accuracy=10,format=1'")
    advantage_mode: Literal["sum_then_normalize", "normalize_then_sum"] = arg(
        "sum_then_normalize", "combine objectives before or after normalising"
    )
    # rollout
    num_steps: int = arg(60, "training steps (one batch of rollouts each)", ">= 1")
    prompts_per_step: int = arg(8, "prompts per step; the batch is this x group_size", ">= 1")
    group_size: int = arg(5, "G, completions per prompt (at least 2; paper: 5)", ">= 2")
    max_new_tokens: int = arg(128, "longest completion, in tokens", ">= 1")
    temperature: float = arg(1.0, "sampling temperature (log-probs use it too)", "> 0")
    top_p: float = arg(1.0, "nucleus sampling; < 1 is off-policy (the loss scores all)", "(0, 1]")
    # advantages and loss
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = arg("dapo", "aggregation")
    eps_low: float = arg(0.2, "clip ratio below at 1 - eps_low", "[0, 1)")
    eps_high: float = arg(0.2, "clip ratio above at 1 + eps_high (DAPO: 0.28)", ">= 0")
    beta: float = arg(0.001, "k3 KL coefficient (paper: 0.001); > 0 loads a reference", ">= 0")
    entropy_coef: float = arg(0.001, "entropy bonus c_H (paper: 0.001); 0 = off", ">= 0")
    mask_truncated_completions: bool = arg(False, "no loss on completions with no EOS")
    # optimisation
    learning_rate: float = arg(1e-4, "AdamW learning rate (real models: ~1e-6)", "> 0")
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
    parse_weights(args.weights)  # fails early on an unknown objective name


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: what CRPO changes against GRPO, a verifiable reward per clinical objective and their advantages


def accuracy_reward(parsed, item) -> float:
    return float(parsed["conclusion"] == item["answer"])


def faithfulness_reward(parsed, item) -> float:
    """0.5 * share of cited findings that the case has (none cited: 0) + 0.5 * conclusion grounded in the <dx>."""
    if not parsed["formatted"]:
        return 0.0
    cited = parsed["cited"]
    precision = sum(clinic.in_case(f, item) for f in cited) / len(cited) if cited else 0.0
    rejected = {L for L, _ in parsed["rejections"]}
    grounded = parsed["conclusion"] in parsed["fits"] and parsed["conclusion"] not in rejected
    return 0.5 * precision + 0.5 * float(grounded)


def comprehensiveness_reward(parsed, item) -> float:
    """0.5 * share of stem findings cited + 0.5 * share of distractors validly rejected (valid_rejection)."""
    if not parsed["formatted"] or not item["findings"]:
        return 0.0
    coverage = sum(f in parsed["cited"] for f in item["findings"]) / len(item["findings"])
    distractors = [L for L in item["options"] if L != item["answer"]]
    reasons = {L: reason for L, reason in parsed["rejections"]}
    rejected = sum(clinic.valid_rejection(L, reasons.get(L), item) for L in distractors) / len(distractors)
    return 0.5 * coverage + 0.5 * rejected


def format_reward(parsed, item) -> float:
    return float(parsed["formatted"])


OBJECTIVES = {
    "accuracy": accuracy_reward,
    "faithfulness": faithfulness_reward,
    "comprehensiveness": comprehensiveness_reward,
    "format": format_reward,
}


METHOD_WEIGHTS = {
    "crpo": {"accuracy": 10.0, "faithfulness": 1.0, "comprehensiveness": 1.0},
    "grpo": {"accuracy": 10.0, "format": 1.0},
}


def parse_weights(text: str) -> dict[str, float]:
    """'accuracy=10,format=1' -> {'accuracy': 10.0, 'format': 1.0}; an unknown objective or a value that is not a
    finite number is an error."""
    weights = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in OBJECTIVES:
            raise UsageError(f"unknown objective {name.strip()!r} in --weights; known: {', '.join(OBJECTIVES)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            weights[name.strip()] = math.nan
        if not math.isfinite(weights[name.strip()]):
            raise UsageError(f"--weights: {part!r} is not objective=<finite number>, e.g. 'accuracy=10,format=1'")
    return weights


def reward_function(completions: list[str], items: list[dict]) -> dict[str, torch.Tensor]:
    """Every objective's reward for every completion, by name: {objective: (B*G,)}."""
    if len(completions) != len(items):
        raise ValueError(f"{len(completions)} completions but {len(items)} items: pass one item per completion")
    parsed = [clinic.parse_response(c, x) for c, x in zip(completions, items)]
    return {name: torch.tensor([fn(p, x) for p, x in zip(parsed, items)]) for name, fn in OBJECTIVES.items()}


def objective_advantages(rewards_by_objective, weights, group_size, mode="sum_then_normalize", eps=1e-4):
    """Advantages from several objectives; rewards_by_objective: {name: (num_groups * group_size,)}, grouped rows.

    sum_then_normalize (CRPO): R_i = sum_j w_j R_ij, then A_i = (R_i - mean_group) / (std_group + eps), std unbiased.
    normalize_then_sum (ablation, GDPO/TRL): z-score each objective in its group, take the weighted sum, then
    z-score that sum over the whole batch. A group with no variance in any weighted objective gets advantage 0,
    up to the float32 rounding of its mean (a small uniform value, as in TRL).
    """
    unknown = [name for name in weights if name not in rewards_by_objective]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r}; rewards exist for: {', '.join(rewards_by_objective)}")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (GRPO compares completions of one prompt), got {group_size}")
    for name in weights:
        rewards = rewards_by_objective[name]
        if rewards.dim() != 1 or rewards.numel() % group_size != 0:
            raise ValueError(f"rewards of {name!r} must be 1-D with a multiple of group_size={group_size} values")
        if not torch.isfinite(rewards).all():
            raise ValueError(f"rewards of {name!r} are NaN or infinite; every objective must return a finite number")
    if mode == "sum_then_normalize":
        # R_i = sum_j w_j R_ij
        total = sum(w * rewards_by_objective[name].float() for name, w in weights.items())
        grouped = total.view(-1, group_size)  # (num_groups, G)
        # A_i = (R_i - mean_group) / (std_group + eps)
        return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)).view(-1)
    if mode == "normalize_then_sum":
        # z_ij = (R_ij - mean_group) / (std_group + eps), for each objective j
        z_scores = []
        for name, w in weights.items():
            grouped = rewards_by_objective[name].float().view(-1, group_size)
            z_scores.append(w * (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps))
        # A_i = z_batch(sum_j w_j z_ij)
        combined = sum(z_scores).view(-1)
        return (combined - combined.mean()) / (combined.std() + eps)
    raise ValueError(f"mode must be 'sum_then_normalize' or 'normalize_then_sum', got {mode!r}")


def entropy_bonus(entropy, mask, num_items, coef):
    """The paper's entropy bonus, added to the loss: - c_H * the token mean of H over the whole batch (`num_items`
    real tokens), so that the micro-batches' terms add up to it. entropy, mask: (B, C)."""
    return -coef * (entropy * mask).sum() / num_items.clamp(min=1)


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
    train_items, eval_items, demos = clinic.load_task(
        args.dataset, args.dataset_path, args.num_train, args.num_eval, args.data_seed
    )
    model, tokenizer = load_model(
        args.model, demos=demos, device=args.device, sft_steps=args.sft_steps, sft_batch_size=32
    )
    ref_model = frozen_copy(model, args.dtype) if args.beta > 0 else None
    if args.gradient_checkpointing:  # recompute each layer in the backward instead of keeping its activations
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)  # float32 states
    weights = parse_weights(args.weights) or METHOD_WEIGHTS[args.method]
    run_dir = make_run_dir("crpo" if args.method == "crpo" else "crpo-baseline-grpo", args, root=args.output_dir)
    print(f"[crpo] objective weights {weights}")
    on_policy_note("crpo")
    to_prompt = lambda item: format_prompt(tokenizer, item["question"], clinic.SYSTEM_PROMPT)  # noqa: E731
    # held-out: greedy answers from generate_completions, checked against the graph by the task
    evaluate = lambda: clinic.evaluate(  # noqa: E731
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
        print(f"[crpo] held-out before: accuracy {before['accuracy']:.3f}, faithfulness {before['faithfulness']:.3f}")
        bar = tqdm(range(1, args.num_steps + 1), desc=f"crpo ({args.method})")
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
            rewards = reward_function(rollout["texts"], group_items)  # {objective: (B*G,)}
            advantages = objective_advantages(rewards, weights, args.group_size, mode=args.advantage_mode)  # (B*G,)
            rewards["total"] = sum(w * rewards[name] for name, w in weights.items())
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
                    loss = loss + entropy_bonus(entropy, completion_mask[rows], num_items, args.entropy_coef)
                    loss.backward()
                    metrics["entropy"] = masked_mean(entropy, completion_mask[rows]).item()
                    step_metrics.append(metrics)
                    loss_sum += loss.item() / args.num_iterations  # micro-batches add up, passes average
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            # 5. log TRL's metric names
            group_std = rewards["total"].view(-1, args.group_size).std(dim=1)
            accuracy_std = rewards["accuracy"].view(-1, args.group_size).std(dim=1)
            lengths = rollout["completion_mask"].sum(1).float()
            record = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}
            record |= {
                "loss": loss_sum,
                "reward": rewards["total"].mean().item(),
                "reward_std": rewards["total"].std().item(),
                "frac_reward_zero_std": (group_std == 0).float().mean().item(),
                # groups whose answers are all right (or all wrong): only the other objectives give them a signal
                "frac_accuracy_zero_std": (accuracy_std == 0).float().mean().item(),
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
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['rewards/accuracy/mean']:.2f}")

    after = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
    results = {"before": before, "after": after, "wall_time_s": time.time() - start, "run_dir": str(run_dir)}
    for key in ("accuracy", "faithfulness", "valid_rejections"):
        print(f"[crpo] held-out {key} {before[key]:.3f} -> {after[key]:.3f}")
    print(f"[crpo] {results['wall_time_s']:.0f}s (evaluations and training, after loading the model)")
    save_run(run_dir, results, model, tokenizer)
    return results


PLOT_KEYS = [
    "reward",
    "eval/accuracy",
    "eval/faithfulness",
    "eval/valid_rejections",
    "eval/citations",
    "rewards/faithfulness/mean",
    "rewards/comprehensiveness/mean",
    "completions/mean_length",
    "entropy",
]


if __name__ == "__main__":
    run_cli(Args, train)
