"""GRPO++ (DermIQ-VLM): a stabilised GRPO on a vision-language model, then SFT, then knowledge-graph DPO.

Paper: DermIQ-VLM (Swapnil, Saha, Khan, Haque, 2025), https://arxiv.org/abs/2510.01236. Read grpo.py first: stage 1
is grpo.py with an image in the prompt and the stabilisers below. What GRPO++ changes is the section "The
algorithm": `binary_advantages`, `nonzero_variance_groups`, the stabilisers' values (STABILISERS), and stage 3's
`dpo_loss` with the graph as the judge (`kg_fact_score`, `preference_pairs`). The loss and the group advantage
are grpo.py's, line for line; rollout and log-probs are grpo.py's with the image passed along.

The idea. Three stages that mimic how a dermatologist is trained: (1) GRPO++, a GRPO made stable enough for
reasoning-based disease recognition from few images; (2) SFT for conversation; (3) DPO whose preference pairs are
scored against a knowledge graph instead of by experts.

What the paper leaves open, and our interpretation. The paper's text and code are not public: only the abstract,
and one secondary source saying GRPO++ uses "a binary advantage". Every stabiliser below is therefore our reading,
each behind its own flag so that GRPO vs GRPO++ is one switch, --no_grpo_pp (DermIQ-VLM, https://arxiv.org/abs/2510.01236):
    binary advantage   A_i = sign(r_i - mean(r_group))  in {-1, 0, +1}: no division by a near-zero std
                       (GRPO: A_i = (r_i - mean) / (std + eps))
    skip zero-variance groups: no loss on a group whose rewards are all equal
    clip-higher        eps_high = 0.28 (GRPO: 0.2)
    token-mean loss    sum_it M_it l_it / sum_it M_it  (GRPO: the mean over completions of each one's token mean)
    KL anchor          + beta * k3(pi_ref, pi), beta = 0.04, the reference being the warm start (GRPO: beta = 0)
Reward (VLM-R1 style): 1 for the right class + 0.5 for the <think>..</think><answer>..</answer> format
(+ --kg_weight x the share of the attributes named in <think> that the graph gives the predicted class).
Stage 1 is evaluated by greedy macro-F1 every --eval_every steps (a "collapse": an evaluation 10 points below the
run's best so far) and at the end also by the paper's protocol, a majority vote over --answer_samples answers
sampled at T=1 per held-out image.
Stage 2, SFT: conversations written from the graph (the recognition trace, then symptoms and care), a known
share (--sft_error_rate) with one fact swapped for another class's. Stage 3, DPO (Rafailov et al., 2023): sample
K answers per training image, score each against the graph (+1 per fact it confirms, -1 per fact it contradicts:
the attributes against the image's class, symptoms and care against the class the answer names), chosen y_w =
best, rejected y_l = worst, kept if the scores differ by at least --dpo_margin:
    loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]),  ref = stage 2
The factual error rate is measured on answers sampled at T=1 (8 per held-out image): greedy decoding shows the
most likely fact, which is right when 70% of the SFT data is, and so hides the errors SFT taught.
We simplified: no LoRA (the paper's "memory-efficient" variant; our models are small), full fine-tuning, and
offline DPO on one set of sampled pairs.
Samples are what the loss scores: generation uses our settings only (common.generate), never a checkpoint's
generation_config.json; it never samples the <image> token, and the log-probs give that token probability 0 too.
Under GRPO++ each stabiliser takes its GRPO++ value unless set on the command line, so each can be switched off
alone (e.g. --beta 0); args.json records the values that ran.

The task. 32x32 RGB "lesions" drawn in code: a blob on a skin-tone background whose colour, shape, border and
texture encode one of six classes; every class shares attributes with others, so recognising one takes a
combination. The knowledge graph gives each class's visual attributes, symptoms and care. The low-data training
split has --images_per_class images per class (8, 16 or 32); the held-out split is balanced. The tiny VLM (a
LLaVA-style model built from transformers classes, common.py) is warm-started on attribute captions whose class
name is a look-alike 60% of the time (it sees well but mixes classes up), cached after the first run.

Run:
    python grpo_pp.py                       # stages 1 -> 2 -> 3 with GRPO++ in stage 1, tiny VLM, CPU
    python grpo_pp.py --no_grpo_pp          # the same with plain GRPO in stage 1
    python grpo_pp.py --compare             # stage 1, GRPO vs GRPO++, 5 seeds x (8, 16) images per class
    python grpo_pp.py --compare --sizes 4 --learning_rate 1e-3 --seeds 0,1,2,3,4,5,6,7,8,9   # where GRPO is unstable
    python grpo_pp.py --compare ... --arms no_beta,no_eps_high   # ablation: GRPO++ with one stabiliser off each
    python grpo_pp.py --stage 3 --init runs/<stage 2 run>/model
    python grpo_pp.py --model <a local VLM folder> --dataset_path <an image folder with train/ and test/>
    python grpo_pp.py --model HuggingFaceTB/SmolVLM-256M-Instruct ...   # one GPU: the recipe in RESULTS.md

Results (stage 1 over seeds and training sizes, the factual error rate through stages 2 and 3) are in
RESULTS.md.
"""

import colorsys
import hashlib
import json
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common import (
    CACHE_DIR,
    MetricsLogger,
    UsageError,
    autocast,
    cached,
    check_args_shared,
    estimate_memory,
    frozen_copy,
    generate,
    int_list,
    load_data,
    load_vlm,
    make_run_dir,
    run_cli,
    seed_everything,
    seed_sweep,
)
from prefix_grouper import logprobs_from_logits, shared_prefix_logprobs


@dataclass
class Args:
    # experiment
    seed: int = field(default=0, metadata={"help": "random seed (python, numpy, torch)"})
    model: str = field(default="tiny-vlm", metadata={"help": "tiny-vlm | a local folder | a hub id (a VLM)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu) | cpu | cuda | mps"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "stage 1 forwards: auto (bf16 autocast on GPUs with bf16, else fp32) | ..."}
    )
    output_dir: str = field(default="runs", metadata={"help": "run folders go under this folder"})
    # task
    dataset_path: str = field(default="", metadata={"help": "an image data set (hub id or folder); '' = generated"})
    images_per_class: int = field(default=16, metadata={"help": "training images per class (low data: 8, 16, 32)"})
    eval_per_class: int = field(default=20, metadata={"help": "held-out images per class (balanced)"})
    data_seed: int = field(default=0, metadata={"help": "seed of the generated images (seeds share one split)"})
    warm_start_steps: int = field(default=600, metadata={"help": "tiny-vlm: SFT steps on attribute captions"})
    warm_start_noise: float = field(default=0.6, metadata={"help": "tiny-vlm: share of captions naming a look-alike"})
    # stage 1: GRPO++ (every stabiliser on) or GRPO (--no_grpo_pp, every one off). A stabiliser given on the command
    # line keeps its value under either, so each can be switched alone: "GRPO++ minus one" is --skip_zero_variance false
    grpo_pp: bool = field(default=True, metadata={"help": "GRPO++ (binary advantage, skip, clip-higher, dapo, KL)"})
    advantage: Literal["group", "binary"] | None = field(
        default=None, metadata={"help": "(r-mean)/std or sign(r-mean) [GRPO++: binary, GRPO: group]"}
    )
    skip_zero_variance: bool | None = field(
        default=None, metadata={"help": "true | false: no loss on equal-reward groups [GRPO++: true, GRPO: false]"}
    )
    eps_low: float = field(default=0.2, metadata={"help": "clip ratio below at 1 - eps_low"})
    eps_high: float | None = field(
        default=None, metadata={"help": "clip ratio above at 1 + eps_high [GRPO++: 0.28, GRPO: 0.2]"}
    )
    loss_type: Literal["grpo", "dapo"] | None = field(
        default=None, metadata={"help": "sequence mean | token mean [GRPO++: dapo, GRPO: grpo]"}
    )
    beta: float | None = field(
        default=None, metadata={"help": "k3 KL anchor to the warm start [GRPO++: 0.04, GRPO: 0]"}
    )
    kg_weight: float = field(default=0.0, metadata={"help": "reward weight of the attributes' graph agreement"})
    num_steps: int = field(default=60, metadata={"help": "training steps (one batch of rollouts each)"})
    prompts_per_step: int = field(default=12, metadata={"help": "images per step; the batch is this x group_size"})
    group_size: int = field(default=8, metadata={"help": "G, completions sampled per image (at least 2)"})
    max_new_tokens: int = field(default=48, metadata={"help": "longest completion, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use it too)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (real models: ~1e-6)"})
    num_iterations: int = field(default=2, metadata={"help": "mu, optimisation passes over each batch"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward: less memory, more compute"}
    )
    prefix_grouper: bool = field(
        default=False, metadata={"help": "a group's image and prompt encoded once in the log-probs (prefix_grouper)"}
    )
    eval_every: int = field(default=5, metadata={"help": "evaluate on the held-out split every N steps"})
    # stages 2 and 3
    stage: Literal["all", "1", "2", "3"] = field(default="all", metadata={"help": "run one stage, or 1 -> 2 -> 3"})
    init: str = field(default="", metadata={"help": "stage 2 or 3 alone: the model folder to start from"})
    sft_steps: int = field(default=400, metadata={"help": "stage 2: SFT steps on graph conversations"})
    sft_error_rate: float = field(default=0.3, metadata={"help": "stage 2: share of conversations with a wrong fact"})
    sft_learning_rate: float = field(default=1e-3, metadata={"help": "stage 2: AdamW learning rate"})
    dpo_samples: int = field(default=4, metadata={"help": "stage 3: answers sampled per image to build a pair"})
    dpo_margin: float = field(
        default=1.0, metadata={"help": "stage 3: keep a pair if its graph scores differ this much"}
    )
    dpo_beta: float = field(default=0.1, metadata={"help": "stage 3: DPO beta"})
    dpo_epochs: int = field(default=8, metadata={"help": "stage 3: passes over the preference pairs"})
    dpo_learning_rate: float = field(default=1e-5, metadata={"help": "stage 3: AdamW learning rate"})
    answer_tokens: int = field(default=112, metadata={"help": "stages 2-3: longest conversational answer, in tokens"})
    answer_samples: int = field(default=8, metadata={"help": "answers sampled per held-out image (all stages)"})
    compare: bool = field(default=False, metadata={"help": "stage 1 GRPO vs GRPO++ for --seeds x --sizes, then plot"})
    seeds: str = field(default="0,1,2,3,4", metadata={"help": "--compare: comma-separated seeds"})
    sizes: str = field(default="8,16", metadata={"help": "--compare: comma-separated training images per class"})
    arms: str = field(
        default="grpo,grpo_pp", metadata={"help": "--compare: grpo, grpo_pp, or grpo_pp with one off: no_<stabiliser>"}
    )

    # filled in by __post_init__: the stabilisers given explicitly, which a switch of method (with_method) keeps
    set_by_user: tuple = field(default=(), init=False)

    def __post_init__(self):
        self.set_by_user = tuple(name for name in STABILISERS["grpo_pp"] if getattr(self, name) is not None)
        for name, value in STABILISERS["grpo_pp" if self.grpo_pp else "grpo"].items():
            if getattr(self, name) is None:  # not given: the method's value (args.json records what runs)
                setattr(self, name, value)
        check_args(self)  # bad values fail here, before any model is loaded


def check_args(args: Args):
    """Bad arguments are one clear error before anything loads (Args.__post_init__ calls this)."""
    check_args_shared(args)  # counts >= 1, group_size >= 2, temperature, clipping, beta, output_dir
    if args.stage in ("2", "3") and not args.init:
        raise UsageError(f"--stage {args.stage} alone needs --init, the model folder of the previous stage")
    int_list(args.seeds, "--seeds"), int_list(args.sizes, "--sizes")
    arms = ["grpo", "grpo_pp", *(f"no_{name}" for name in STABILISERS["grpo"])]
    if unknown := [arm for arm in args.arms.split(",") if arm not in arms]:
        raise UsageError(f"--arms: unknown arm {unknown[0]!r}; known: {', '.join(arms)}")
    for name in ("images_per_class", "eval_per_class", "answer_tokens", "answer_samples", "dpo_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: what GRPO++ changes against GRPO, stage 1's stabilisers and stage 3's knowledge-graph DPO


# Each stabiliser's value under GRPO++ (our reading, module docstring) and under plain GRPO
STABILISERS = {
    "grpo_pp": {"advantage": "binary", "skip_zero_variance": True, "eps_high": 0.28, "loss_type": "dapo", "beta": 0.04},
    "grpo": {"advantage": "group", "skip_zero_variance": False, "eps_high": 0.2, "loss_type": "grpo", "beta": 0.0},
}


def with_method(args: Args, grpo_pp: bool, **changes) -> Args:
    """A copy of args with stage 1 switched to GRPO++ or to GRPO: every stabiliser the user did not set takes the
    method's value, the ones the user set keep theirs."""
    unset = {name: None for name in STABILISERS["grpo"] if name not in args.set_by_user}
    return replace(args, grpo_pp=grpo_pp, **(unset | changes))  # replace() runs __post_init__


def binary_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO++'s advantage (our reading): A_i = sign(r_i - mean of its group), in {-1, 0, +1}.

    rewards is (num_groups * group_size,), grouped contiguously. Unlike (r - mean) / std it never divides by a
    near-zero std, so one lucky sample in a low-variance group cannot get a huge advantage.
    """
    # r_i - mean_group(r): GRPO's advantage before any scaling (its checks of the rewards included)
    centred = group_advantages(rewards, group_size, scale="none").view(-1, group_size)  # (num_groups, G)
    # A_i = sign(r_i - mean_group(r)), and 0 where r_i and the mean differ only by float rounding (equal rewards)
    return torch.where(centred.abs() > rounding(rewards.view(-1, group_size)), torch.sign(centred), 0.0).view(-1)


def rounding(grouped: torch.Tensor) -> torch.Tensor:
    """(num_groups, 1): a difference this small is float rounding, not a difference in reward (1.5 + 0.3/3 summed
    eight times and divided by 8 is not exactly 1.6 in float32)."""
    return 1e-5 * grouped.abs().amax(dim=1, keepdim=True).clamp(min=1.0)


def nonzero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups * G,) bool: True for the completions of groups whose rewards are not all equal (GRPO++ trains
    only on those; a zero-variance group has advantage 0 anyway but still counts in a token-mean normaliser)."""
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    spread = grouped.amax(dim=1, keepdim=True) - grouped.amin(dim=1, keepdim=True)  # (num_groups, 1)
    return (spread > rounding(grouped)).flatten().repeat_interleave(group_size)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1):
    """Direct Preference Optimization on sequence log-probs (sums over answer tokens), one entry per pair.

        loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

    Returns (mean loss, metrics): the implicit rewards beta * (log pi - log ref) of chosen and rejected answers,
    their margin and the share of pairs where the chosen one is ahead (TRL's rewards/* names).
    """
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape (one entry per pair), got {sorted(shapes)}")
    chosen_reward = beta * (policy_chosen_logps - ref_chosen_logps)  # (num_pairs,)
    rejected_reward = beta * (policy_rejected_logps - ref_rejected_logps)  # (num_pairs,)
    # -log sigmoid(x) = softplus(-x), stable for large |x|
    loss = F.softplus(-(chosen_reward - rejected_reward)).mean()
    metrics = {
        "rewards/chosen": chosen_reward.mean().item(),
        "rewards/rejected": rejected_reward.mean().item(),
        "rewards/margins": (chosen_reward - rejected_reward).mean().item(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().mean().item(),
    }
    return loss, metrics


def kg_fact_score(answer: str, label: str, penalty: float = 1.0) -> float:
    """Score a conversational answer against the graph: +1 per right fact, -penalty per wrong one. The attributes
    named in <think> are checked against `label`, the class the image shows; the symptoms and care stated after
    the answer against the class the answer names (or `label` when it names none), so that an answer is scored on
    what it says about its own diagnosis, as `has_factual_error` checks it (whether the diagnosis is right is
    stage 1's job)."""
    truth = KNOWLEDGE_GRAPH[check_class(label)]
    seen = parse_answer(answer)["attributes"]
    right_attributes = len(seen & {truth[k] for k in ATTRIBUTES})
    named = KNOWLEDGE_GRAPH.get(parse_answer(answer)["answer"], truth)
    stated = stated_facts(answer)
    right_facts = len(stated & {*named["symptoms"], named["care"]})
    wrong = len(seen) - right_attributes + len(stated) - right_facts
    return right_attributes + right_facts - penalty * wrong


def sequence_logps(model, rollout, rows):
    """Sum of log pi over each completion's tokens (rows,)."""
    batch = {k: v[rows] for k, v in rollout.items() if torch.is_tensor(v)}
    return (completion_logprobs(model, batch) * batch["completion_mask"]).sum(1)


def preference_pairs(model, processor, train_items, args: Args):
    """Sample args.dpo_samples answers per training image and score each against the graph (kg_fact_score with
    the true class). chosen = best, rejected = worst, kept when the scores differ by at least args.dpo_margin.
    Returns the rollout of all samples and [(chosen row, rejected row)]."""
    k = args.dpo_samples
    rollout = generate_completions(model, processor, [x["image"] for x in train_items], group_size=k,
                                   max_new_tokens=args.answer_tokens)  # fmt: skip
    scores = torch.tensor([kg_fact_score(t, x["label"]) for t, x in zip(rollout["texts"], (x for x in train_items
                           for _ in range(k)))]).view(-1, k)  # fmt: skip
    pairs = []
    for i, row in enumerate(scores):
        if row.max() - row.min() >= args.dpo_margin:
            pairs.append((i * k + int(row.argmax()), i * k + int(row.argmin())))
    return rollout, pairs


# ----------------------------------------------------------------------------------------------------------------
# GRPO's shared machinery: rollout, log-probs, loss (the same text in every algorithm file where it is unchanged)


def encode_prompts(processor, images, device):
    """Left-padded prompt ids and mask (B, P) and pixel values (B, 3, H, W) for a list of images."""
    prompt = make_prompt(processor)
    enc = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), enc["pixel_values"].to(device)


@torch.no_grad()
def generate_completions(model, processor, images, group_size, max_new_tokens, temperature=1.0, greedy=False):
    """Sample `group_size` completions per image; rows grouped [img0 x G, img1 x G, ...] (see grpo.py)."""
    tokenizer = processor.tokenizer
    prompt_ids, prompt_mask, pixels = encode_prompts(processor, images, model.device)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0)
    pixels = pixels.repeat_interleave(group_size, 0).to(model.dtype)  # (B*G, 3, H, W)
    # exactly our sampling settings, whatever the checkpoint's generation_config.json asks for (common.generate).
    # An <image> token written by the policy would have no image behind it: it is never sampled, and
    # completion_logits gives it probability 0 too, so the loss scores the distribution we sample from.
    output = generate(
        model, tokenizer, {"input_ids": prompt_ids, "attention_mask": prompt_mask, "pixel_values": pixels},
        max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
        suppress_tokens=[model.config.image_token_id],
    )  # fmt: skip
    completion_ids = output[:, prompt_ids.size(1) :]  # (B*G, C)
    is_eos = completion_ids == tokenizer.eos_token_id
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion_ids.size(1))  # tokens incl. EOS
    completion_mask = (torch.arange(completion_ids.size(1), device=model.device)[None] < length[:, None]).long()
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(completion_ids, length.tolist())]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "pixel_values": pixels,
            "completion_ids": completion_ids, "completion_mask": completion_mask, "texts": texts}  # fmt: skip


def completion_logits(model, batch):
    """Logits (B, C, V) that predict each completion token from the image, the prompt and the tokens before it;
    batch: generate_completions' tensors (or some of their rows)."""
    prompt_ids, prompt_mask, pixel_values = batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]  # (B, C)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+C)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P+C)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        logits_to_keep=completion_ids.size(1) + 1,
    ).logits[:, :-1]  # (B, C, V): the last prompt position predicts the first completion token
    # generation never samples <image> (suppress_tokens): give it probability 0 here too
    return logits.index_fill(-1, torch.tensor([model.config.image_token_id], device=logits.device), float("-inf"))


def completion_logprobs(model, batch, temperature=1.0, prefix_grouper=False):
    """Per-token log pi(o_t | image, q, o_<t) (B, C), as grpo.py's, with the image's pixel values. With
    prefix_grouper a group's image and prompt are encoded once (the vision tower sees each image once)."""
    if prefix_grouper:  # as grpo.py's, with each group's pixel values and <image> given probability 0
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]  # (B, P)
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]  # (B, C)
        # a group: consecutive rows with the same prompt *and image* (every image has the same prompt tokens)
        rows = torch.cat([prompt_ids.float(), prompt_mask.float(), batch["pixel_values"].flatten(1).float()], 1)
        _, group_sizes = torch.unique_consecutive(rows, dim=0, return_counts=True)
        firsts = group_sizes.cumsum(0) - group_sizes  # the first row of each group
        prompts = [ids[mask.bool()] for ids, mask in zip(prompt_ids[firsts], prompt_mask[firsts])]
        completions = [ids[mask.bool()] for ids, mask in zip(completion_ids, completion_mask)]
        groups = [completions[first : first + n] for first, n in zip(firsts.tolist(), group_sizes.tolist())]
        pixel_values, image_token = batch["pixel_values"][firsts], model.config.image_token_id
        logps = shared_prefix_logprobs(model, prompts, groups, temperature, suppress_tokens=[image_token],
                                       prompt_inputs={"pixel_values": pixel_values})  # fmt: skip
        flat = torch.cat([x for group in logps for x in group])
        return torch.zeros(completion_ids.shape, device=model.device).masked_scatter(completion_mask.bool(), flat)
    # log pi(o_t | image, q, o_<t) = z[o_t] - logsumexp(z), z = logits / temperature in float32 (a chunk at a time)
    return logprobs_from_logits(completion_logits(model, batch), batch["completion_ids"], temperature)[0]  # (B, C)


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


def train_grpo(args: Args, task=None):
    """Stage 1 on `task` ((train items, held-out items); default load_task(args)). Returns the results dict
    (held-out macro-F1 before, after, best, and each evaluation)."""
    check_args(args)
    seed_everything(args.seed)
    train_items, eval_items = task or load_task(args)
    model, processor = load_policy(args)
    ref_model = frozen_copy(model, args.dtype) if args.beta > 0 else None
    if args.gradient_checkpointing:  # recompute each layer in the backward instead of keeping its activations
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)  # float32 states
    method = "grpo_pp" if args.grpo_pp else "grpo"
    run_dir = make_run_dir(f"{method}-stage1", args, root=args.output_dir)
    print(f"[grpo_pp] stage 1 ({method}), run folder: {run_dir}")
    if model.device.type == "cuda":  # does this run fit? (how it is estimated: common.estimate_memory)
        memory = estimate_memory(
            model, rows=args.prompts_per_step * args.group_size, completion_tokens=args.max_new_tokens,
            prompt_tokens=encode_prompts(processor, [train_items[0]["image"]], "cpu")[0].size(1),
            rollout_rows=args.prompts_per_step * args.group_size, dtype=args.dtype,
            reference=ref_model is not None, gradient_checkpointing=args.gradient_checkpointing,
        )  # fmt: skip
        print(f"[grpo_pp] estimated peak GPU memory (GiB): {', '.join(f'{k} {v:.1f}' for k, v in memory.items())}")
    rng = random.Random(args.seed)
    start = time.time()
    with MetricsLogger(run_dir, plot_keys=PLOT_KEYS, model=(model, processor)) as logger:
        with autocast(model.device, args.dtype):
            before = evaluate(model, processor, eval_items, args.max_new_tokens)
        logger.log(0, {f"eval/{k}": v for k, v in before.items()})
        curve = [before["macro_f1"]]
        bar = tqdm(range(1, args.num_steps + 1), desc=method)
        for step in bar:
            step_start = time.time()
            batch_items = rng.choices(train_items, k=args.prompts_per_step)
            # 1. rollout: G completions per image
            model.eval()
            with autocast(model.device, args.dtype):
                rollout = generate_completions(
                    model, processor, [x["image"] for x in batch_items], group_size=args.group_size,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                )  # fmt: skip
            labels = [x["label"] for x in batch_items for _ in range(args.group_size)]
            # 2. rewards and advantages: GRPO's z-score or GRPO++'s sign
            rewards = recognition_reward(rollout["texts"], labels, args.kg_weight)
            if args.advantage == "binary":
                advantages = binary_advantages(rewards["total"], args.group_size)
            else:
                advantages = group_advantages(rewards["total"], args.group_size)
            # GRPO++: drop groups whose rewards are all equal (they would only dilute a token-mean normaliser)
            keep = nonzero_variance_groups(rewards["total"], args.group_size)
            rows = torch.nonzero(keep if args.skip_zero_variance else torch.ones_like(keep)).flatten()
            advantages = advantages.to(model.device)
            record = {
                "reward": rewards["total"].mean().item(),
                "accuracy": rewards["correct"].mean().item(),
                "format": rewards["format"].mean().item(),
                "frac_reward_zero_std": 1 - keep.float().mean().item(),
            }
            batch = {k: v[rows] for k, v in rollout.items() if torch.is_tensor(v)}  # the rows trained on
            if len(rows):
                # 3. log-probs of the sampling policy and of the reference (only if beta > 0)
                with torch.no_grad(), autocast(model.device, args.dtype):
                    old_logps = completion_logprobs(model, batch, args.temperature, args.prefix_grouper)
                    ref_logps = None
                    if ref_model is not None:
                        ref_logps = completion_logprobs(ref_model, batch, args.temperature, args.prefix_grouper)
                # 4. num_iterations passes of one optimiser step each
                model.train()
                for _ in range(args.num_iterations):
                    with autocast(model.device, args.dtype):
                        logps = completion_logprobs(model, batch, args.temperature, args.prefix_grouper)
                    loss, metrics = policy_loss(
                        logps, old_logps, ref_logps, advantages[rows], batch["completion_mask"], eps_low=args.eps_low,
                        eps_high=args.eps_high, beta=args.beta, loss_type=args.loss_type,
                    )  # fmt: skip
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                record |= metrics | {"loss": loss.item(), "grad_norm": grad_norm.item()}
            # 5. log
            record["step_time"] = time.time() - step_start
            if model.device.type == "cuda":  # measured, beside what estimate_memory printed
                record["memory/peak_gib"] = torch.cuda.max_memory_allocated(model.device) / 2**30
            if step % args.eval_every == 0 or step == args.num_steps:
                with autocast(model.device, args.dtype):
                    held_out = evaluate(model, processor, eval_items, args.max_new_tokens)
                record |= {f"eval/{k}": v for k, v in held_out.items()}
                curve.append(held_out["macro_f1"])
            logger.log(step, record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
    # a collapse: held-out F1 falls 10 points below its own best so far
    collapses = sum(f < max(curve[: i + 1]) - 0.10 for i, f in enumerate(curve))
    with autocast(model.device, args.dtype):  # the paper's protocol: a majority vote over sampled answers
        f1_vote = vote_macro_f1(model, processor, eval_items, args.max_new_tokens, args.answer_samples)
    results = {"f1_before": before["macro_f1"], "f1_after": curve[-1], "f1_best": max(curve), "f1_vote": f1_vote,
               "collapses": collapses, "curve": curve, "wall_time_s": time.time() - start,
               "run_dir": str(run_dir)}  # fmt: skip
    print(f"[grpo_pp] held-out macro-F1 {curve[0]:.3f} -> {curve[-1]:.3f} (best {max(curve):.3f}; majority vote of "
          f"{args.answer_samples} samples {f1_vote:.3f}), {collapses} evaluations 10 points below the best so far, "
          f"{results['wall_time_s']:.0f}s")  # fmt: skip
    model.save_pretrained(run_dir / "model")
    processor.save_pretrained(run_dir / "model")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


PLOT_KEYS = ["reward", "eval/macro_f1", "eval/accuracy", "frac_reward_zero_std", "clip_ratio/region_mean", "grad_norm"]


def vlm_sft(model, processor, demos, steps, batch_size=32, lr=3e-3, seed=0, desc="SFT"):
    """Supervised fine-tuning on (image, completion) pairs after the recognition prompt; loss on the completion."""
    tokenizer = processor.tokenizer
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        demo_batch = [demos[i] for i in torch.randint(len(demos), (batch_size,), generator=generator).tolist()]
        prompt_ids, prompt_mask, pixels = encode_prompts(processor, [image for image, _ in demo_batch], model.device)
        completions = tokenizer([c + tokenizer.eos_token for _, c in demo_batch], return_tensors="pt", padding=True,
                                padding_side="right", add_special_tokens=False).to(model.device)  # fmt: skip
        labels = completions["input_ids"].masked_fill(completions["attention_mask"] == 0, -100)  # (B, C)
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "pixel_values": pixels.to(model.dtype),
                 "completion_ids": completions["input_ids"],
                 "completion_mask": completions["attention_mask"]}  # fmt: skip
        logits = completion_logits(model, batch)  # (B, C, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def train_sft(args: Args, model, processor, train_items):
    """Stage 2: SFT on (training image, graph conversation) pairs, args.sft_error_rate of them with a wrong fact."""
    rng = random.Random(args.seed)
    demos = [(x["image"], conversation(x["label"], rng, args.sft_error_rate)[0]) for x in train_items for _ in range(8)]
    vlm_sft(model, processor, demos, args.sft_steps, batch_size=16, lr=args.sft_learning_rate, seed=args.seed,
            desc="stage 2 SFT")  # fmt: skip
    return model


def train_dpo(args: Args, model, processor, train_items):
    """Stage 3: offline DPO on the graph-scored pairs; the reference is the frozen stage-2 model."""
    rollout, pairs = preference_pairs(model, processor, train_items, args)
    if not pairs:
        print("[grpo_pp] stage 3: no answer pair differs enough on the graph score; nothing to train")
        return model, {"pairs": 0}
    chosen, rejected = (torch.tensor(x, device=model.device) for x in zip(*pairs))
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(model, rollout, chosen), sequence_logps(model, rollout, rejected)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.dpo_learning_rate, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(args.dpo_epochs), desc="stage 3 DPO", leave=False):
        for batch in torch.randperm(len(pairs)).split(16):
            loss, metrics = dpo_loss(
                sequence_logps(model, rollout, chosen[batch]), sequence_logps(model, rollout, rejected[batch]),
                ref_chosen[batch], ref_rejected[batch], args.dpo_beta,
            )  # fmt: skip
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model, {"pairs": len(pairs), "dpo_loss": loss.item(), **metrics}


def pipeline(args: Args):
    """Stages 1 -> 2 -> 3 (or one of them from --init); each stage's model is saved in its run folder."""
    train_items, eval_items = load_task(args)
    init = args.init
    results = {}
    if args.stage in ("all", "1"):
        results["stage1"] = train_grpo(args, (train_items, eval_items))
        init = results["stage1"]["run_dir"] + "/model"
    for stage in ("2", "3"):
        if args.stage not in ("all", stage):
            continue
        if not init:
            raise UsageError(f"--stage {stage} alone needs --init, the model folder of the previous stage")
        seed_everything(args.seed)
        start = time.time()
        model, processor = load_vlm(init, args.device)
        run_dir = make_run_dir(f"{'sft' if stage == '2' else 'dpo'}-stage{stage}", args, root=args.output_dir)
        before = evaluate_answers(model, processor, eval_items, args.answer_tokens, args.answer_samples)
        try:
            if stage == "2":
                model, extra = train_sft(args, model, processor, train_items), {}
            else:
                model, extra = train_dpo(args, model, processor, train_items)
        except KeyboardInterrupt:  # keep the model as it is, as stage 1's MetricsLogger does
            model.save_pretrained(run_dir / "model"), processor.save_pretrained(run_dir / "model")
            print(f"\n[grpo_pp] interrupted: model saved in {run_dir / 'model'}", file=sys.stderr)
            raise
        after = evaluate_answers(model, processor, eval_items, args.answer_tokens, args.answer_samples)
        results[f"stage{stage}"] = {"before": before, "after": after, **extra, "wall_time_s": time.time() - start,
                                    "run_dir": str(run_dir)}  # fmt: skip
        print(f"[grpo_pp] stage {stage}: held-out macro-F1 {before['macro_f1']:.3f} -> {after['macro_f1']:.3f}, "
              f"factual error rate (sampled) {before['fact_error_rate']:.3f} -> {after['fact_error_rate']:.3f}, "
              f"(greedy) {before['fact_error_rate_greedy']:.3f} -> {after['fact_error_rate_greedy']:.3f}\n"
              f"          e.g. {after['example']!r}")  # fmt: skip
        model.save_pretrained(run_dir / "model")
        processor.save_pretrained(run_dir / "model")
        (run_dir / "results.json").write_text(json.dumps(results[f"stage{stage}"], indent=2))
        init = str(run_dir / "model")
    return results


def compare(args: Args):
    """Stage 1 with each arm (GRPO, GRPO++, GRPO++ with one stabiliser switched to GRPO's value) for every seed
    and training size (same warm start and splits), then a table of held-out macro-F1 (after, best, majority vote
    of sampled answers; mean, seed-to-seed spread) and collapses, and the F1 curves."""
    sizes, seeds = int_list(args.sizes, "--sizes"), int_list(args.seeds, "--seeds")
    arms = {"grpo": (False, {}), "grpo_pp": (True, {})}
    arms |= {f"no_{name}": (True, {name: value}) for name, value in STABILISERS["grpo"].items()}
    runs = {
        f"{arm} ({size}/class)": [
            with_method(args, arms[arm][0], **arms[arm][1], seed=seed, images_per_class=size, compare=False)
            for seed in seeds
        ]
        for size in sizes
        for arm in args.arms.split(",")
    }
    summarize = lambda run: {key: run[key] for key in ("f1_after", "f1_best", "f1_vote", "collapses")}  # noqa: E731
    # held-out macro-F1 at step 0, then every eval_every steps and at the last step
    curve = lambda run: ([min(k * args.eval_every, args.num_steps) for k in range(len(run["curve"]))], run["curve"])  # noqa: E731
    name = "grpo_pp_compare" if args.arms == "grpo,grpo_pp" else "grpo_pp_ablation"
    out = f"{args.output_dir}/grpo_pp_compare/{name}"
    return seed_sweep(
        train_grpo,
        runs,
        summarize,
        out,
        args,
        curve=curve,
        curve_labels=("step", "held-out macro-F1"),
        title="stage 1, GRPO vs GRPO++ (tiny VLM)",
    )


# ----------------------------------------------------------------------------------------------------------------
# The task: data, reward, evaluation (not the algorithm: the part to replace with your own task)


ATTRIBUTES = {
    "colour": ["brown", "black", "red", "pink"],
    "shape": ["round", "oval", "irregular"],
    "border": ["sharp", "blurry"],
    "texture": ["smooth", "scaly", "dotted"],
}


# class -> visual attributes (what the image shows), symptoms and care (what the conversation needs)
KNOWLEDGE_GRAPH = {
    "nevus": {"colour": "brown", "shape": "round", "border": "sharp", "texture": "smooth",
              "symptoms": ["no symptoms"], "care": "watch for change"},
    "melanoma": {"colour": "black", "shape": "irregular", "border": "blurry", "texture": "dotted",
                 "symptoms": ["growing", "bleeding"], "care": "urgent biopsy"},
    "psoriasis": {"colour": "red", "shape": "oval", "border": "sharp", "texture": "scaly",
                  "symptoms": ["itching", "silvery scale"], "care": "topical steroid"},
    "eczema": {"colour": "red", "shape": "irregular", "border": "blurry", "texture": "scaly",
               "symptoms": ["itching", "dry skin"], "care": "moisturiser"},
    "keratosis": {"colour": "brown", "shape": "oval", "border": "sharp", "texture": "scaly",
                  "symptoms": ["no symptoms"], "care": "no treatment"},
    "rosacea": {"colour": "pink", "shape": "round", "border": "blurry", "texture": "dotted",
                "symptoms": ["flushing", "burning"], "care": "avoid triggers"},
}  # fmt: skip


CLASSES = list(KNOWLEDGE_GRAPH)


IMAGE_SIZE = 32


# hue (0-1), saturation, value of each colour; each image jitters them
COLOURS = {"brown": (0.07, 0.65, 0.45), "black": (0.05, 0.35, 0.15), "red": (0.99, 0.75, 0.75),
           "pink": (0.95, 0.35, 0.95)}  # fmt: skip


def check_class(name: str) -> str:
    if name not in KNOWLEDGE_GRAPH:
        raise UsageError(f"unknown class {name!r}: the knowledge graph knows {', '.join(CLASSES)}")
    return name


def draw_lesion(label: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A (size, size, 3) uint8 image of one lesion of class `label`: a blob on skin whose colour, shape, border
    and texture are the class's attributes, with random skin tone, position, size, rotation and noise."""
    attrs = KNOWLEDGE_GRAPH[check_class(label)]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size  # (size, size) each, in [0, 1)
    skin = np.array(colorsys.hsv_to_rgb(0.08 + rng.uniform(-0.02, 0.02), rng.uniform(0.2, 0.4), rng.uniform(0.8, 1)))
    # the blob: an ellipse in a rotated frame; "irregular" modulates its radius with the angle
    cx, cy = 0.5 + rng.uniform(-0.08, 0.08, size=2)
    angle = rng.uniform(0, math.pi)
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
    v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
    radius = rng.uniform(0.26, 0.33)
    aspect = {"round": 1.0, "oval": 0.55, "irregular": 0.85}[attrs["shape"]]
    r = np.sqrt(u**2 + (v / aspect) ** 2) / radius  # (size, size): 1 on the border
    if attrs["shape"] == "irregular":
        theta = np.arctan2(v, u)
        phases = rng.uniform(0, 2 * math.pi, size=3)
        r = r / (1 + sum(0.15 * np.sin(k * theta + p) for k, p in zip((3, 5, 7), phases)))
    softness = {"sharp": 0.04, "blurry": 0.35}[attrs["border"]]
    alpha = np.clip((1 - r) / softness + 0.5, 0, 1)  # (size, size): 1 inside, 0 outside
    hue, sat, val = COLOURS[attrs["colour"]]
    colour = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.02, 0.02)) % 1, sat, val * rng.uniform(0.9, 1.1)))
    lesion = np.broadcast_to(colour, (size, size, 3)).copy()
    if attrs["texture"] == "scaly":  # pale stripes across the lesion
        stripes = 0.5 + 0.5 * np.sin(2 * math.pi * (u * rng.uniform(7, 9) + rng.uniform(0, 1)))
        lesion += 0.35 * (stripes > 0.6)[..., None] * (1 - lesion)
    elif attrs["texture"] == "dotted":  # dark dots
        dots = rng.random((size, size)) < 0.12
        lesion[dots] *= 0.35
    image = alpha[..., None] * lesion + (1 - alpha[..., None]) * skin
    image += rng.normal(0, 0.03, size=image.shape)  # sensor noise
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_lesion_task(images_per_class: int, eval_per_class: int, seed: int):
    """A low-data training split (images_per_class per class) and a balanced held-out split, as lists of
    {"image": PIL image, "label": class}. The held-out images depend only on `seed`, not on the training size."""
    from PIL import Image

    def split(count, stream):
        rng = np.random.default_rng([seed, stream])
        items = [{"image": Image.fromarray(draw_lesion(c, rng)), "label": c} for _ in range(count) for c in CLASSES]
        random.Random(seed + stream).shuffle(items)
        return items

    return split(images_per_class, 0), split(eval_per_class, 1)


def check_image(image, size: int | None = IMAGE_SIZE):
    """The tiny VLM sees size x size RGB images; anything else is one clear error. size=None (a real VLM, whose
    processor resizes) checks only the mode."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise UsageError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise UsageError(f"image mode is {image.mode!r}, the model needs 'RGB': convert it with image.convert('RGB')")
    if size is not None and image.size != (size, size):
        raise UsageError(
            f"image is {image.size[0]}x{image.size[1]}, the tiny VLM needs {size}x{size}: resize it with "
            f"image.resize(({size}, {size})), or use a real VLM (--model a folder or hub id), whose processor resizes"
        )
    return image


def load_image_dataset(path: str, images_per_class: int, eval_per_class: int, seed: int, size: int | None = IMAGE_SIZE):
    """An image classification data set through `datasets` (hub id or local folder, e.g. an `imagefolder` with
    train/ and test/ sub-folders of one folder per class). Its class names must be in the knowledge graph."""
    splits = {"train": ("train",), "eval": ("test", "validation")}
    data = load_data(path, "an image classification data set", splits, ("image", "label"), "(no --dataset_path)")
    names = data["train"].features["label"].names

    def take(split, per_class):
        rng, counts, items = random.Random(seed), {}, []
        for row in rng.sample(list(split), len(split)):
            label = check_class(names[row["label"]])
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                items.append({"image": check_image(row["image"], size), "label": label})
        return items

    return take(data["train"], images_per_class), take(data["eval"], eval_per_class)


def load_task(args: Args):
    if args.dataset_path:
        size = IMAGE_SIZE if args.model == "tiny-vlm" else None  # a real VLM's processor resizes
        return load_image_dataset(args.dataset_path, args.images_per_class, args.eval_per_class, args.data_seed, size)
    return make_lesion_task(args.images_per_class, args.eval_per_class, args.data_seed)


QUESTION = "What skin disease is this?"


def parse_answer(completion: str) -> dict:
    """The named attributes in <think> and the class in <answer>: {"answer", "attributes", "formatted"}."""
    think = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    answer = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    named = set(re.findall(r"[a-z]+", think.group(1).lower())) if think else set()
    values = {v for options in ATTRIBUTES.values() for v in options}
    return {
        "answer": answer.group(1).strip().lower() if answer else None,
        "attributes": named & values,
        "formatted": re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", completion, re.DOTALL)
        is not None,
    }


def recognition_reward(completions: list[str], labels: list[str], kg_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """R = correct class + 0.5 * format (+ kg_weight * share of the named attributes the graph lists for the
    predicted class; 0 when none is named)."""
    if len(completions) != len(labels):
        raise ValueError(f"{len(completions)} completions but {len(labels)} labels: pass one label per completion")
    correct, formatted, agreement = [], [], []
    for completion, label in zip(completions, labels):
        parsed = parse_answer(completion)
        correct.append(float(parsed["answer"] == check_class(label)))
        formatted.append(float(parsed["formatted"]))
        graph = KNOWLEDGE_GRAPH.get(parsed["answer"])
        named = parsed["attributes"]
        agreement.append(len(named & {graph[k] for k in ATTRIBUTES}) / len(named) if graph and named else 0.0)
    correct, formatted, agreement = map(torch.tensor, (correct, formatted, agreement))
    return {"correct": correct, "format": formatted, "kg": agreement,
            "total": correct + 0.5 * formatted + kg_weight * agreement}  # fmt: skip


def make_prompt(processor) -> str:
    """The question with the image placeholder: the model's chat template if it has one, else '<image>question'."""
    text = f"{QUESTION} Describe its colour, shape, border and texture inside <think> </think>, then name it inside " \
        "<answer> </answer>."  # fmt: skip
    if getattr(processor, "chat_template", None) is None:
        return "<image>" + QUESTION
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def caption(label: str, answer: str) -> str:
    """A recognition trace: the class's visual attributes, then a class name."""
    attrs = KNOWLEDGE_GRAPH[label]
    return f"<think>{' '.join(attrs[k] for k in ATTRIBUTES)}</think><answer>{answer}</answer>"


# the tiny VLM's warm start mixes up each class with one that shares attributes with it
CONFUSED_WITH = {"nevus": "keratosis", "keratosis": "psoriasis", "psoriasis": "eczema", "eczema": "melanoma",
                 "melanoma": "rosacea", "rosacea": "nevus"}  # fmt: skip


def warm_start_demos(seed: int, noise: float, per_class: int = 200):
    """The tiny VLM's stand-in for pretraining: images (a separate stream from the task's splits) captioned with
    their true attributes, and with the class a look-alike (CONFUSED_WITH) with probability `noise`: a model that
    sees well but has a systematic mix-up for RL to correct."""
    from PIL import Image

    rng, pick = np.random.default_rng([seed, 2]), random.Random(seed)
    demos = []
    for c in CLASSES:
        for _ in range(per_class):
            answer = CONFUSED_WITH[c] if pick.random() < noise else c
            demos.append((Image.fromarray(draw_lesion(c, rng)), caption(c, answer)))
    return demos


def load_policy(args: "Args"):
    """(model, processor): tiny-vlm warm-started on attribute captions (cached), or a real VLM as it is."""
    if args.model != "tiny-vlm":
        return load_vlm(args.model, args.device)
    recipe = {"version": 1, "steps": args.warm_start_steps, "data_seed": args.data_seed, "noise": args.warm_start_noise}
    path = CACHE_DIR / f"tiny-vlm-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]}"

    def build(folder):
        model, processor = load_vlm("tiny-vlm", "cpu")  # on the CPU in float32: the same cache on every machine
        print(f"[grpo_pp] warm-starting the tiny VLM on attribute captions (cached in {path})")
        vlm_sft(model, processor, warm_start_demos(args.data_seed, args.warm_start_noise), args.warm_start_steps,
                desc="warm start")  # fmt: skip
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return load_vlm(str(cached(path, build)), args.device)


def macro_f1(predictions: list, labels: list) -> float:
    """Mean over the classes present in `labels` of F1 = 2 TP / (2 TP + FP + FN); an unparsable answer is a miss."""
    scores = []
    for c in sorted(set(labels)):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(scores) / len(scores)


@torch.no_grad()
def evaluate(model, processor, items, max_new_tokens, batch_size=128):
    """Greedy recognition on held-out images: macro-F1, accuracy, share well formatted."""
    model.eval()
    predictions, formatted = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [x["image"] for x in chunk]
        rollout = generate_completions(
            model, processor, images, group_size=1, max_new_tokens=max_new_tokens, greedy=True
        )
        parsed = [parse_answer(t) for t in rollout["texts"]]
        predictions += [p["answer"] for p in parsed]
        formatted += [p["formatted"] for p in parsed]
    labels = [x["label"] for x in items]
    return {"macro_f1": macro_f1(predictions, labels),
            "accuracy": sum(p == y for p, y in zip(predictions, labels)) / len(items),
            "format": sum(formatted) / len(items)}  # fmt: skip


@torch.no_grad()
def vote_macro_f1(model, processor, items, max_new_tokens, samples):
    """Macro-F1 of the majority class over `samples` answers sampled at T=1 per held-out image (an unparsable
    answer is a vote for no class)."""
    model.eval()
    rollout = generate_completions(model, processor, [x["image"] for x in items], group_size=samples,
                                   max_new_tokens=max_new_tokens)  # fmt: skip
    return macro_f1(majority_vote([parse_answer(t)["answer"] for t in rollout["texts"]], samples),
                    [x["label"] for x in items])  # fmt: skip


def majority_vote(answers: list, samples: int) -> list:
    """The most common answer of each run of `samples` consecutive answers (a tie goes to the one named first)."""
    return [Counter(answers[i : i + samples]).most_common(1)[0][0] for i in range(0, len(answers), samples)]


FACTS = sorted({f for node in KNOWLEDGE_GRAPH.values() for f in [*node["symptoms"], node["care"]]})


def conversation(label: str, rng: random.Random, error_rate: float = 0.0) -> tuple[str, bool]:
    """A conversational answer from the graph: the recognition trace, then symptoms and care. With probability
    error_rate one of them is another class's (a factual error, as SFT data written in a hurry would have).
    Returns (text, has_error)."""
    node = dict(KNOWLEDGE_GRAPH[label])
    has_error = rng.random() < error_rate
    if has_error:
        key = rng.choice(["symptoms", "care"])
        node[key] = rng.choice([n[key] for n in KNOWLEDGE_GRAPH.values() if n[key] != node[key]])
    text = f"{caption(label, label)} Symptoms: {', '.join(node['symptoms'])}. Care: {node['care']}."
    return text, has_error


def stated_facts(completion: str) -> set[str]:
    """The graph's symptoms and care stated after the answer."""
    text = completion.split("</answer>", 1)[-1].lower()
    return {f for f in FACTS if re.search(rf"\b{re.escape(f)}\b", text)}


def has_factual_error(completion: str) -> bool:
    """True if the answer states a symptom or care that the graph does not give the class it names."""
    node = KNOWLEDGE_GRAPH.get(parse_answer(completion)["answer"])
    facts = stated_facts(completion)
    return bool(facts) and (node is None or not facts <= {*node["symptoms"], node["care"]})


@torch.no_grad()
def evaluate_answers(model, processor, items, max_new_tokens, samples):
    """Conversational answers on held-out images. Greedy: macro-F1 of the named class and the factual error rate
    (share of answers stating a symptom or care the graph does not give the class they name). Sampled at T=1,
    `samples` per image: the same error rate and the facts stated per answer. Greedy decoding hides a minority of
    wrong facts behind the most likely one; sampling shows how often the model says them."""
    model.eval()
    images, labels = [x["image"] for x in items], [x["label"] for x in items]
    greedy = generate_completions(model, processor, images, group_size=1, max_new_tokens=max_new_tokens, greedy=True)
    greedy = greedy["texts"]
    sampled = generate_completions(model, processor, images, group_size=samples, max_new_tokens=max_new_tokens)
    sampled = sampled["texts"]
    return {"macro_f1": macro_f1([parse_answer(t)["answer"] for t in greedy], labels),
            "fact_error_rate_greedy": sum(map(has_factual_error, greedy)) / len(greedy),
            "fact_error_rate": sum(map(has_factual_error, sampled)) / len(sampled),
            "facts_stated": sum(len(stated_facts(t)) for t in sampled) / len(sampled),
            "example": greedy[0]}  # fmt: skip


if __name__ == "__main__":
    run_cli(Args, lambda args: compare(args) if args.compare else pipeline(args))
