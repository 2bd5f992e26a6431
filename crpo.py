"""CRPO: Clinical-objective Relative Policy Optimization (Clinical-R1), in one file.

Paper: Clinical-R1: Empowering Large Language Models for Faithful and Comprehensive Reasoning with Clinical
Objective Relative Policy Optimization (Gu, Zhou et al., 2025), https://arxiv.org/abs/2512.00601.
Read it against grpo.py. What CRPO changes is the section "The algorithm": a reward per objective
(`reward_function` and the rules it applies) and `objective_advantages`, which replaces `group_advantages`; step 2
of the training loop calls them. Rollout, log-probs and loss are GRPO's, line for line (tests/test_skeleton.py
checks it); the task (a clinical knowledge graph, MedQA) and its evaluation come last.

The idea. GRPO with a correctness reward learns to answer right, but nothing stops it from reasoning lazily,
citing findings the patient does not have, or never saying why the other options are wrong. CRPO keeps GRPO and
adds rule-based, verifiable rewards for two more clinical objectives, with no human labels and no reward model:
faithfulness (the reasoning cites findings that are in the case and invents none, and the conclusion follows from
it) and comprehensiveness (the reasoning covers the case's findings and rejects each distractor for a reason).
The response is split into a diagnostic analysis <dx>...</dx> and a final <conclusion>...</conclusion>.

Equations (k = 10, so accuracy dominates and the other terms add at most 2, the paper's k + 2 = 12):

    R_i   = k * R_acc + R_faith + R_comp                                   CRPO   (--method crpo)
    R_i   = k * R_acc + R_format                                           GRPO baseline (--method grpo)
    A_i   = (R_i - mean(R_group)) / (std(R_group) + eps)                   mode sum_then_normalize (default)
    A_i   = z_batch( sum_j w_j * z_group(R_ij) )                           mode normalize_then_sum (ablation, GDPO)
    loss  = GRPO's clipped surrogate with TRL's aggregation and the k3 KL (see grpo.py)
            - c_H * sum_it M_it H_it / sum_it M_it                         entropy bonus (verl's entropy_coeff)

    R_acc    = 1 if the option letter in <conclusion> is the gold one
    R_faith  = 0.5 * precision(findings cited in <dx> that the case has)  + 0.5 * [the <dx> says the concluded
               option fits and does not reject it]                          (0 if the format is wrong)
    R_comp   = 0.5 * (stem findings cited / stem findings) + 0.5 * (distractors rejected for a stem finding that
               the graph says the distractor lacks / distractors)          (0 if the format is wrong)
    R_format = 1 if the response is exactly <dx>...</dx><conclusion>X</conclusion>

"B no cough" earns R_comp only if cough is in the case and the graph does not give disease B a cough: a rejection
for a finding the distractor has would teach a wrong reason (an earlier version paid for it).

Why it works without hurting accuracy: in a group where every answer is right (or every one is wrong) the
accuracy term has no variance, so the whole advantage comes from faithfulness and comprehensiveness; in mixed
groups the k = 10 accuracy term dominates. `frac_accuracy_zero_std` logs the share of such groups.

What is the paper's and what is ours (Clinical-R1, https://arxiv.org/abs/2512.00601):
- The paper's: the three objectives, rule-based rewards, <dx>/<conclusion>, k = 10 and the k + 2 bound, GRPO
  with correctness + format as the baseline, evaluation of faithfulness, evidence citation and distractor
  rejection. Its exact reward rules, weights of the auxiliary terms and data pipeline are not public.
- The paper's settings, our defaults: G = 5, a k3 KL to the warm start with beta = 0.001 and an entropy bonus of
  0.001 (its verl scripts), for both --method crpo and the GRPO baseline. Not the paper's: the learning rate
  (1e-4 for our 0.8M-parameter model; its 1e-6 is for 3B) and the sampling temperature (1.0, which the loss
  scores; its cold-start run samples at 0.6).
- Ours (interpretation): the formulas of R_faith and R_comp above; summing before normalising (the k + 2 bound
  points to one summed reward); a synthetic clinical task whose findings are exact words, so "cites a finding"
  is a string match (real MedQA would need clinical NER: on the MedQA path we use MedQA's metamap phrases).
- On MedQA there is no knowledge graph. What stands in (`load_medqa`): the findings are the case's metamap
  phrases; the vocabulary a response may cite from is every phrase of the training split, so a cited phrase the
  case does not mention counts as invented; and a graph mined from the training split, option text -> the
  phrases of the training cases whose answer it is, refutes a rejection whose reason was seen with that option.
  It is weaker than a curated graph: an option never seen as an answer refutes nothing.
- Simplified: a 0.8M-parameter model warm-started on templated traces instead of Qwen2.5-3B with R1 traces.
- Samples are what the loss scores: every rollout and greedy evaluation calls `generate` with our settings only
  (common.generate), never with what a checkpoint's generation_config.json sets (a repetition penalty there
  would make training silently off-policy). --top_p < 1 samples from a truncated distribution while the loss
  scores the full one: keep it at 1 for on-policy training.

The task. A knowledge graph of 12 diseases and their findings, with deliberate overlaps. A vignette lists 3
findings of the gold disease and 4 options whose distractors share findings with it, e.g.
    prompt:  "anosmia, fever, cough? A covid B strep C flu D mono"
    full:    "<dx>anosmia, fever, cough; A fits; B no cough; C no anosmia; D no fever</dx><conclusion>A</conclusion>"
    lazy:    "<dx>A fits</dx><conclusion>A</conclusion>"
The stem always holds the gold disease's key finding. The tiny model is warm-started on a mix of lazy (50%),
partial (30%), full (10%) and wrong or hallucinated (10%) demonstrations, so most of what it samples reasons
lazily or partly; GRPO, indifferent among right answers, has no reason to prefer the full ones; CRPO does.
No held-out question appears in training. `--dataset medqa` reads MedQA (4 options) from the hub or a folder.

Run:
    python crpo.py                          # CRPO on the tiny model, CPU
    python crpo.py --method grpo            # the GRPO baseline: same loop, accuracy + format reward
    python crpo.py --compare                # GRPO vs CRPO, 5 seeds each: table and plot
    python crpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset medqa ...   # one GPU: the recipe in RESULTS.md

Results (GRPO vs CRPO over seeds, the advantage-mode ablation) are in RESULTS.md.
"""

import json
import random
import re
import time
from dataclasses import dataclass, field, replace
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
    int_list,
    load_data,
    load_model,
    make_run_dir,
    run_cli,
    seed_everything,
    seed_sweep,
)
from prefix_grouper import logprobs_from_logits, shared_prefix_logprobs


@dataclass
class Args:
    # experiment
    seed: int = field(default=0, metadata={"help": "random seed of training (python, numpy, torch)"})
    model: str = field(default="tiny", metadata={"help": "tiny | smollm2-135m | a local folder | a hub id"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu) | cpu | cuda | mps"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "forwards: auto (bf16 autocast on GPUs with bf16, fp32 elsewhere) | ..."}
    )
    output_dir: str = field(default="runs", metadata={"help": "run folders go under this folder"})
    # task
    dataset: Literal["clinic", "medqa"] = field(default="clinic", metadata={"help": "the task"})
    dataset_path: str = field(default="GBaker/MedQA-USMLE-4-options", metadata={"help": "medqa: hub id or folder"})
    data_seed: int = field(default=0, metadata={"help": "seed of the generated items (seeds share one warm start)"})
    num_train: int = field(default=2000, metadata={"help": "training items (medqa: at most)"})
    num_eval: int = field(default=120, metadata={"help": "held-out items for evaluation"})
    sft_steps: int = field(
        default=800, metadata={"help": "tiny warm start: SFT steps of 32 (cached after the first run)"}
    )
    # CRPO
    method: Literal["crpo", "grpo"] = field(default="crpo", metadata={"help": "crpo objectives, or the grpo baseline"})
    weights: str = field(default="", metadata={"help": "override the objective weights, e.g. 'accuracy=10,format=1'"})
    advantage_mode: Literal["sum_then_normalize", "normalize_then_sum"] = field(
        default="sum_then_normalize", metadata={"help": "combine objectives before or after normalising"}
    )
    compare: bool = field(default=False, metadata={"help": "run grpo and crpo for every seed in --seeds, then plot"})
    seeds: str = field(default="0,1,2,3,4", metadata={"help": "--compare: comma-separated seeds"})
    # rollout
    num_steps: int = field(default=60, metadata={"help": "training steps (one batch of rollouts each)"})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step; the batch is this x group_size"})
    group_size: int = field(default=5, metadata={"help": "G, completions per prompt (at least 2; paper: 5)"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest completion, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use it too)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; < 1 is off-policy (the loss scores all)"})
    # advantages and loss
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = field(default="dapo", metadata={"help": "aggregation"})
    eps_low: float = field(default=0.2, metadata={"help": "clip ratio below at 1 - eps_low"})
    eps_high: float = field(default=0.2, metadata={"help": "clip ratio above at 1 + eps_high (DAPO: 0.28)"})
    beta: float = field(default=0.001, metadata={"help": "k3 KL coefficient (paper: 0.001); > 0 loads a reference"})
    entropy_coef: float = field(default=0.001, metadata={"help": "entropy bonus c_H (paper: 0.001); 0 = off"})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "no loss on completions with no EOS"})
    # optimisation
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (real models: ~1e-6)"})
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
    parse_weights(args.weights)  # fails early on an unknown objective name
    int_list(args.seeds, "--seeds")


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: what CRPO changes against GRPO, a verifiable reward per clinical objective and their advantages


def parse_response(completion: str, item) -> dict:
    """Split a response into what the rewards look at: format, conclusion letter, cited findings, the options the
    <dx> says fit, and the (option, reason) rejections."""
    match = re.fullmatch(r"\s*<dx>(.*?)</dx>\s*<conclusion>\s*(.*?)\s*</conclusion>\s*", completion, re.DOTALL)
    if match is None:
        return {"formatted": False, "conclusion": None, "cited": [], "fits": set(), "rejections": []}
    dx, conclusion = match.group(1), match.group(2)
    letters = "".join(item["options"])
    return {
        "formatted": conclusion in item["options"],
        "conclusion": conclusion,
        # findings named anywhere in the reasoning: the case's own, and any other the task knows of
        "cited": [f for f in dict.fromkeys([*item["findings"], *item["vocabulary"]]) if f in dx],
        "fits": set(re.findall(rf"\b([{letters}]) fits\b", dx)),
        "rejections": [(L, reason.strip()) for L, reason in re.findall(rf"\b([{letters}]) no ([^;]+)", dx)],
    }


def accuracy_reward(parsed, item) -> float:
    return float(parsed["conclusion"] == item["answer"])


def in_case(finding, item) -> bool:
    """The case has this finding: one of its findings, or words its question text contains."""
    return finding in item["findings"] or finding in item["question"].lower()


def valid_rejection(letter, reason, item) -> bool:
    """A valid rejection ("B no cough") of distractor B: the case has cough and the graph gives B no cough."""
    return reason in item["findings"] and reason not in item["option_findings"][letter]


def faithfulness_reward(parsed, item) -> float:
    """0.5 * share of cited findings that the case has (none cited: 0) + 0.5 * conclusion grounded in the <dx>."""
    if not parsed["formatted"]:
        return 0.0
    cited = parsed["cited"]
    precision = sum(in_case(f, item) for f in cited) / len(cited) if cited else 0.0
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
    rejected = sum(valid_rejection(L, reasons.get(L), item) for L in distractors) / len(distractors)
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
    """'accuracy=10,format=1' -> {'accuracy': 10.0, 'format': 1.0}; unknown objectives are an error."""
    weights = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in OBJECTIVES:
            raise UsageError(f"unknown objective {name.strip()!r} in --weights; known: {', '.join(OBJECTIVES)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--weights: {part!r} is not objective=number, e.g. 'accuracy=10,format=1'") from None
    return weights


def reward_function(completions: list[str], items: list[dict]) -> dict[str, torch.Tensor]:
    """Every objective's reward for every completion, by name: {objective: (B*G,)}."""
    if len(completions) != len(items):
        raise ValueError(f"{len(completions)} completions but {len(items)} items: pass one item per completion")
    parsed = [parse_response(c, x) for c, x in zip(completions, items)]
    return {name: torch.tensor([fn(p, x) for p, x in zip(parsed, items)]) for name, fn in OBJECTIVES.items()}


def objective_advantages(rewards_by_objective, weights, group_size, mode="sum_then_normalize", eps=1e-4):
    """Advantages from several objectives; rewards_by_objective: {name: (num_groups * group_size,)}, grouped rows.

    sum_then_normalize (CRPO): R_i = sum_j w_j R_ij, then A_i = (R_i - mean_group) / (std_group + eps), std unbiased.
    normalize_then_sum (ablation, GDPO/TRL): z-score each objective in its group, take the weighted sum, then
    z-score that sum over the whole batch. A group with no variance in any weighted objective gets advantage 0.
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
    train_items, eval_items, demos = load_task(args)
    model, tokenizer = load_model(
        args.model, demos=demos, device=args.device, sft_steps=args.sft_steps, sft_batch_size=32
    )
    ref_model = frozen_copy(model, args.dtype) if args.beta > 0 else None
    if args.gradient_checkpointing:  # recompute each layer in the backward instead of keeping its activations
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)  # float32 states
    weights = parse_weights(args.weights) or METHOD_WEIGHTS[args.method]
    run_dir = make_run_dir("crpo" if args.method == "crpo" else "crpo-baseline-grpo", args, root=args.output_dir)
    print(f"[crpo] run folder: {run_dir}; objective weights {weights}")
    print(
        "[crpo] note: with num_iterations=1 the policy is on-policy (ratio == 1) and advantages are zero-mean, so the\n"
        "       logged loss stays near 0 while its gradient is not 0. Watch reward and eval/accuracy, not loss."
    )
    to_prompt = lambda item: format_prompt(tokenizer, item["question"], SYSTEM_PROMPT)  # noqa: E731
    if model.device.type == "cuda":  # does this run fit? (how it is estimated: common.estimate_memory)
        memory = estimate_memory(
            model, rows=args.prompts_per_step * args.group_size // args.gradient_accumulation_steps,
            prompt_tokens=max(len(tokenizer(to_prompt(x))["input_ids"]) for x in train_items[:256]),
            completion_tokens=args.max_new_tokens, rollout_rows=args.prompts_per_step * args.group_size,
            dtype=args.dtype, reference=ref_model is not None, gradient_checkpointing=args.gradient_checkpointing,
        )  # fmt: skip
        print(f"[crpo] estimated peak GPU memory (GiB): {', '.join(f'{k} {v:.1f}' for k, v in memory.items())}")
    rng = random.Random(args.seed)
    start = time.time()

    with MetricsLogger(run_dir, plot_keys=PLOT_KEYS, model=(model, tokenizer)) as logger:
        with autocast(model.device, args.dtype):
            before = evaluate(model, tokenizer, eval_items, to_prompt, args.max_new_tokens)
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
                    model, tokenizer, [to_prompt(x) for x in batch_items], group_size=args.group_size,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    prefix_grouper=args.prefix_grouper,
                )  # fmt: skip
            group_items = [x for x in batch_items for _ in range(args.group_size)]  # the item of each row
            # 2. rewards and group-relative advantages
            rewards = reward_function(rollout["texts"], group_items)  # {objective: (B*G,)}
            advantages = objective_advantages(rewards, weights, args.group_size, mode=args.advantage_mode)  # (B*G,)
            rewards["total"] = sum(w * rewards[name] for name, w in weights.items())
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
                    # entropy bonus: - c_H * token mean of H over the whole batch (micro-batches add up to it)
                    loss = loss - args.entropy_coef * (entropy * completion_mask[rows]).sum() / num_items.clamp(min=1)
                    loss.backward()
                    metrics["entropy"] = masked_mean(entropy, completion_mask[rows]).item()
                    step_metrics.append(metrics)
                    loss_sum += loss.item() / args.num_iterations  # micro-batch losses add up to the batch's
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
                    held_out = evaluate(model, tokenizer, eval_items, to_prompt, args.max_new_tokens)
                record |= {f"eval/{k}": v for k, v in held_out.items()}
            logger.log(step, record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['rewards/accuracy/mean']:.2f}")

    after = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
    results = {"before": before, "after": after, "wall_time_s": time.time() - start, "run_dir": str(run_dir)}
    for key in ("accuracy", "faithfulness", "valid_rejections"):
        print(f"[crpo] held-out {key} {before[key]:.3f} -> {after[key]:.3f}")
    print(f"[crpo] {results['wall_time_s']:.0f}s (evaluations and training, after loading the model)")
    model.save_pretrained(run_dir / "model")
    tokenizer.save_pretrained(run_dir / "model")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
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


COMPARE_KEYS = [
    "accuracy",
    "faithfulness",
    "hallucination",
    "citations",
    "rejections",
    "valid_rejections",
    "mean_length",
]


def compare(args: Args):
    """Train --method grpo and crpo for every seed (same warm start per seed), then a table and a plot."""
    seeds = int_list(args.seeds, "--seeds")
    runs = {
        method: [replace(args, method=method, seed=seed, compare=False) for seed in seeds]
        for method in ("grpo", "crpo")
    }
    summarize = lambda run: {key: run["after"][key] for key in COMPARE_KEYS}  # noqa: E731
    out = f"{args.output_dir}/crpo_compare/crpo_compare"
    return seed_sweep(train, runs, summarize, out, args, title="GRPO vs CRPO (tiny model)")


# ----------------------------------------------------------------------------------------------------------------
# The task: data, reward, evaluation (not the algorithm: the part to replace with your own task)


SYSTEM_PROMPT = (
    "Diagnose the case. Inside <dx> </dx> cite the case's findings, say which option fits and reject each other "
    "option with a finding it lacks (e.g. 'B no cough'); then give only the option letter inside "
    "<conclusion> </conclusion>."
)


# The knowledge graph: disease -> findings, the first one its key finding (no other disease has it). The others
# are shared across diseases on purpose, so each distractor matches part of the case. Names are the usual
# clinical abbreviations (appy = appendicitis, chole = cholecystitis, pna = pneumonia, ...) to keep prompts short.
KNOWLEDGE_GRAPH = {
    "flu": ["myalgia", "fever", "cough", "headache"],
    "covid": ["anosmia", "fever", "cough", "dyspnea"],
    "strep": ["exudate", "fever", "pharyngitis", "adenopathy"],
    "mono": ["splenomegaly", "fatigue", "pharyngitis", "adenopathy"],
    "hepatitis": ["jaundice", "fatigue", "nausea", "fever"],
    "chole": ["murphy-sign", "fever", "ruq-pain", "nausea"],
    "appy": ["rlq-pain", "fever", "nausea", "anorexia"],
    "pna": ["crackles", "fever", "cough", "dyspnea"],
    "asthma": ["wheeze", "dyspnea", "cough", "nausea"],
    "migraine": ["aura", "headache", "nausea", "photophobia"],
    "meningitis": ["neck-stiffness", "fever", "headache", "photophobia"],
    "anemia": ["pallor", "fatigue", "dyspnea", "headache"],
}


FINDINGS = sorted({f for findings in KNOWLEDGE_GRAPH.values() for f in findings})


LETTERS = "ABCD"


def make_item(gold, stem, rng):
    """A vignette: the stem's findings, and 4 options: the gold disease and 3 distractors, each lacking a stem
    finding (so it can be rejected for a reason). Distractors that share a stem finding are preferred; a few
    stems have fewer than 3 of those, and get the rest from the other diseases."""
    others = [d for d in KNOWLEDGE_GRAPH if d != gold and set(stem) - set(KNOWLEDGE_GRAPH[d])]
    sharing = [d for d in others if set(stem) & set(KNOWLEDGE_GRAPH[d])]
    distractors = rng.sample(sharing, min(3, len(sharing)))
    distractors += rng.sample([d for d in others if d not in sharing], 3 - len(distractors))
    options = distractors + [gold]
    rng.shuffle(options)
    return {
        "question": f"{', '.join(stem)}? " + " ".join(f"{L} {d}" for L, d in zip(LETTERS, options)),
        "options": dict(zip(LETTERS, options)),
        "answer": LETTERS[options.index(gold)],
        "findings": list(stem),  # the stem's findings
        "vocabulary": FINDINGS,  # the words that count as findings when the reasoning is parsed
        "option_findings": {L: KNOWLEDGE_GRAPH[d] for L, d in zip(LETTERS, options)},  # what the graph gives each
    }


def clinical_trace(item, style, rng):
    """A demonstration in one of four styles: lazy, partial, full, or wrong (a wrong answer or an invented finding)."""
    gold, findings = item["answer"], item["findings"]
    distractors = [L for L in item["options"] if L != gold]

    def rejection(letter):  # "B no cough": a stem finding the distractor lacks
        missing = [f for f in findings if f not in KNOWLEDGE_GRAPH[item["options"][letter]]]
        return f"{letter} no {rng.choice(missing)}"

    if style == "lazy":
        clauses = [f"{gold} fits"]
    elif style == "partial":
        clauses = [rng.choice(findings), f"{gold} fits", rejection(rng.choice(distractors))]
    elif style == "full":
        clauses = [", ".join(findings), f"{gold} fits"] + [rejection(L) for L in distractors]
    else:  # wrong: half a wrong conclusion, half an invented finding
        if rng.random() < 0.5:
            gold = rng.choice(distractors)
            clauses = [", ".join(findings), f"{gold} fits"]
        else:
            invented = rng.choice([f for f in FINDINGS if f not in findings])
            clauses = [", ".join(findings[:2] + [invented]), f"{gold} fits"]
    return f"<dx>{'; '.join(clauses)}</dx><conclusion>{gold}</conclusion>"


DEMO_STYLES = {"lazy": 0.5, "partial": 0.3, "full": 0.1, "wrong": 0.1}


def make_clinic_task(num_train: int, num_eval: int, seed: int):
    """Vignettes from the knowledge graph; no held-out question appears in training. Returns (train, eval, demos)."""
    rng = random.Random(seed)
    combos = [(d, stem) for d, fs in KNOWLEDGE_GRAPH.items() for stem in _key_and_two(fs)]  # 12 diseases x 3
    eval_items = [make_item(*rng.choice(combos), rng) for _ in range(num_eval)]
    held_out = {x["question"] for x in eval_items}
    train_items = []
    while len(train_items) < num_train:
        item = make_item(*rng.choice(combos), rng)
        if item["question"] not in held_out:
            train_items.append(item)
    styles = rng.choices(list(DEMO_STYLES), weights=list(DEMO_STYLES.values()), k=num_train)
    demos = [(x["question"], clinical_trace(x, style, rng)) for x, style in zip(train_items, styles)]
    return train_items, eval_items, demos


def _key_and_two(findings):
    """The stems of a disease: its key finding and two of its other three findings."""
    return [[f for f in findings if f != left_out] for left_out in findings[1:]]


def load_medqa(path: str, num_train: int, num_eval: int):
    """MedQA 4-option (GBaker/MedQA-USMLE-4-options format: question, options {A..D}, answer_idx, and
    metamap_phrases, which stand in for the findings). No knowledge graph: the warm-start demos are lazy, and the
    training split stands in for the graph (see the module docstring): its phrases are the vocabulary, and each
    option text gets the phrases of the training cases whose answer it is."""
    columns = ("question", "options", "answer_idx")
    data = load_data(path, "MedQA", {"train": ("train",), "eval": ("test",)}, columns, "--dataset clinic")
    train_rows = data["train"].select(range(min(num_train, len(data["train"]))))
    phrases = lambda row: [p.lower() for p in row.get("metamap_phrases") or []]  # noqa: E731
    vocabulary = tuple(sorted({p for row in train_rows for p in phrases(row)}))  # one tuple, shared by every item
    mined_graph = {}  # option text -> phrases of the training cases it answers
    for row in train_rows:
        mined_graph.setdefault(row["options"][row["answer_idx"]].lower().strip(), set()).update(phrases(row))

    def to_items(rows):
        items = []
        for row in rows:
            options = {L: row["options"][L] for L in sorted(row["options"])}
            question = row["question"] + " " + " ".join(f"{L} {text}" for L, text in options.items())
            graph = {L: sorted(mined_graph.get(text.lower().strip(), ())) for L, text in options.items()}
            item = {"question": question, "options": options, "answer": row["answer_idx"],
                    "findings": phrases(row), "vocabulary": vocabulary, "option_findings": graph}  # fmt: skip
            items.append(check_item(item))
        return items

    train_items = to_items(train_rows)
    eval_items = to_items(data["eval"].select(range(min(num_eval, len(data["eval"])))))
    demos = [(x["question"], f"<dx>{x['answer']} fits</dx><conclusion>{x['answer']}</conclusion>") for x in train_items]
    return train_items, eval_items, demos


def check_item(item):
    """One clear error for a malformed item, naming what is wrong."""
    for key in ("question", "options", "answer", "findings", "vocabulary", "option_findings"):
        if key not in item:
            raise UsageError(
                f"item is missing {key!r}: each item needs question, options, answer, findings, vocabulary and "
                f"option_findings (what the knowledge graph gives each option)"
            )
    if not isinstance(item["options"], dict) or len(item["options"]) < 2:
        raise UsageError(f"item needs at least 2 options as a dict letter -> text, got {item['options']!r}")
    if item["answer"] not in item["options"]:
        raise UsageError(f"item's answer {item['answer']!r} is not one of its options {sorted(item['options'])}")
    return item


def load_task(args: Args):
    if args.dataset == "clinic":
        train_items, eval_items, demos = make_clinic_task(args.num_train, args.num_eval, args.data_seed)
    else:
        train_items, eval_items, demos = load_medqa(args.dataset_path, args.num_train, args.num_eval)
    if not train_items or not eval_items:
        raise UsageError(
            f"The {args.dataset} task has {len(train_items)} training and {len(eval_items)} held-out items; "
            f"both must be non-empty (check --num_train, --num_eval and the data files)."
        )
    return train_items, eval_items, demos


def strict_metrics(completion: str, item) -> dict:
    """One answer checked against the knowledge graph.

    faithful: the <dx> cites at least one finding of the case, invents none, and says the concluded option fits;
    hallucinated: it cites a finding the case does not have; citations: stem findings cited; rejections: share
    of distractors rejected with a stem finding as the reason, right or wrong; valid_rejections: those whose
    reason the graph confirms, the distractor really lacks it (what the training reward counts).
    """
    parsed = parse_response(completion, item)
    invented = [f for f in parsed["cited"] if not in_case(f, item)]
    reasons = dict(parsed["rejections"])
    distractors = [letter for letter in item["options"] if letter != item["answer"]]
    rejected = [letter for letter in distractors if reasons.get(letter) in item["findings"]]
    valid = [letter for letter in rejected if valid_rejection(letter, reasons[letter], item)]
    return {
        "accuracy": accuracy_reward(parsed, item),
        "faithfulness": float(bool(parsed["cited"]) and not invented and parsed["conclusion"] in parsed["fits"]),
        "hallucination": float(bool(invented)),
        "citations": float(sum(f in parsed["cited"] for f in item["findings"])),
        "rejections": len(rejected) / len(distractors),
        "valid_rejections": len(valid) / len(distractors),
    }


@torch.no_grad()
def evaluate(model, tokenizer, items, to_prompt, max_new_tokens, batch_size=256):
    """Greedy decoding on held-out items: the mean of `strict_metrics` over answers, and the mean length."""
    model.eval()
    per_answer, lengths = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [to_prompt(x) for x in chunk]
        rollout = generate_completions(
            model, tokenizer, prompts, group_size=1, max_new_tokens=max_new_tokens, greedy=True
        )
        per_answer += [strict_metrics(text, item) for text, item in zip(rollout["texts"], chunk)]
        lengths += rollout["completion_mask"].sum(1).tolist()
    metrics = {key: sum(m[key] for m in per_answer) / len(per_answer) for key in per_answer[0]}
    metrics["mean_length"] = sum(lengths) / len(lengths)
    return metrics


if __name__ == "__main__":
    run_cli(Args, lambda args: compare(args) if args.compare else train(args))
