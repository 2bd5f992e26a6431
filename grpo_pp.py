"""GRPO++ (DermIQ-VLM): a stabilised GRPO on a vision-language model, then SFT, then knowledge-graph DPO.

Paper: DermIQ-VLM (Swapnil, Saha, Khan, Haque, 2025), https://arxiv.org/abs/2510.01236. Three stages, as a
dermatologist is trained: (1) GRPO++, a GRPO stable enough to learn a diagnosis from few images; (2) SFT for
conversation; (3) DPO whose preferences come from a knowledge graph instead of experts. Stage 1 is grpo.py's step
with an image in the prompt, two passes per batch (--num_iterations 2) and the stabilisers below (the section "The
algorithm"); the task is tasks/lesions.py.

The paper's text and code are not public (its abstract, and a secondary source's "binary advantage"), so each
stabiliser is ours, behind its own flag; --no_grpo_pp gives plain GRPO, and a stabiliser set on the command line
keeps its value under either (M_it is 1 on completion tokens; k3 is grpo.py's KL estimate):

    binary advantage   A_i = sign(r_i - mean(r_group)), no division by a near-zero std      (GRPO: z-score)
    zero-variance skip no loss on a group whose rewards are all equal
    clip-higher        eps_high = 0.28                                                        (GRPO: 0.2)
    token-mean loss    sum_it M_it l_it / sum_it M_it                (GRPO: --loss_type grpo, a mean per completion)
    KL anchor          + 0.04 k3(pi_ref, pi_theta), the reference being the warm start       (GRPO: none)
    stage 3 (DPO)      -log sigmoid(b [(log pi - log ref)(y_w) - (log pi - log ref)(y_l)]), b --dpo_beta, ref stage 2;
                       y_w, y_l: the best and worst, by the graph's fact score, of --dpo_samples answers to an image

Ours besides: 1. the fact score (+1 a fact the graph confirms, -1 one it contradicts), a pair kept if its scores
differ by --dpo_margin or more; 2. full fine-tuning, no LoRA; offline DPO on one set of pairs; the <image> token
never sampled or scored; 3. stage 1 judged by greedy macro-F1 (a collapse: 10 points below the best so far), and
at the end by the paper's majority vote over --answer_samples answers at T = 1.

Run (the results, over seeds, with the ablation and stages 2-3, are in RESULTS.md):
    python grpo_pp.py                       # stages 1 -> 2 -> 3 with GRPO++ in stage 1, tiny VLM, CPU
    python grpo_pp.py --no_grpo_pp          # the same with plain GRPO in stage 1
    python experiments/grpo_pp_stability.py --sizes 4 --learning_rate 1e-3 --seeds 0,1,2,3,4,5,6,7,8,9
"""

import random
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common import autocast, cache_entry, cached, estimate_memory, frozen_copy, generate, load_vlm, seed_everything
from plumbing import MetricsLogger, UsageError, arg, check_args_shared, make_run_dir, run_cli, save_run, shown
from prefix_grouper import grouped_batch_logprobs, logprobs_from_logits
from tasks import lesions


@dataclass
class Args:
    # experiment
    seed: int = arg(0, "random seed (python, numpy, torch)", ">= 0")
    model: str = arg("tiny-vlm", "stage 1: tiny-vlm | a local folder | a hub id (a VLM); stages 2, 3 alone: --init")
    device: str = arg("auto", "auto picks cuda, then mps, then cpu", "device")
    dtype: Literal["auto", "float32", "bfloat16"] = arg(
        "auto", "stage 1: forwards in auto (bf16 autocast on GPUs with bf16, else fp32) | ..."
    )
    output_dir: str = arg("runs", "run folders go under this folder")
    # task
    dataset_path: str = arg("", "an image data set (hub id or folder); '' = generated")
    images_per_class: int = arg(16, "training images per class (low data: 8, 16, 32)", ">= 1")
    eval_per_class: int = arg(20, "held-out images per class (balanced)", ">= 1")
    data_seed: int = arg(0, "seed of the generated images (seeds share one split)", ">= 0")
    warm_start_steps: int = arg(600, "tiny-vlm: SFT steps on attribute captions", ">= 1")
    warm_start_noise: float = arg(0.6, "tiny-vlm: share of captions naming a look-alike", "[0, 1]")
    # stage 1: GRPO++ or GRPO (--no_grpo_pp); a stabiliser set on the command line keeps its value under either
    grpo_pp: bool = arg(True, "stage 1: GRPO++ (binary advantage, skip, clip-higher, dapo, KL)")
    advantage: Literal["group", "binary"] | None = arg(
        None, "stage 1: (r-mean)/std or sign(r-mean) [GRPO++: binary, GRPO: group]"
    )
    skip_zero_variance: bool | None = arg(
        None, "stage 1: true | false: no loss on equal-reward groups [GRPO++: true, GRPO: false]"
    )
    eps_low: float = arg(0.2, "stage 1: clip ratio below at 1 - eps_low", "[0, 1)")
    eps_high: float | None = arg(None, "stage 1: clip above at 1 + eps_high [GRPO++: 0.28, GRPO: 0.2]", ">= 0")
    loss_type: Literal["grpo", "dapo"] | None = arg(None, "stage 1: [GRPO++: dapo, GRPO: grpo]")
    beta: float | None = arg(None, "stage 1: k3 KL to the warm start [GRPO++: 0.04, GRPO: 0]", ">= 0")
    kg_weight: float = arg(0.0, "stage 1: reward weight of the attributes' graph agreement", ">= 0")
    num_steps: int = arg(60, "stage 1: training steps (one batch of rollouts each)", ">= 1")
    prompts_per_step: int = arg(12, "stage 1: images per step; the batch is this x group_size", ">= 1")
    group_size: int = arg(8, "stage 1: G, completions sampled per image (at least 2)", ">= 2")
    max_new_tokens: int = arg(48, "stage 1: longest completion, in tokens", ">= 1")
    temperature: float = arg(1.0, "stage 1: sampling temperature (log-probs use it too)", "> 0")
    learning_rate: float = arg(1e-4, "stage 1: AdamW learning rate (real models: ~1e-6)", "> 0")
    num_iterations: int = arg(2, "stage 1: mu, optimisation passes over each batch", ">= 1")
    max_grad_norm: float = arg(1.0, "gradient clipping", "> 0")
    gradient_checkpointing: bool = arg(
        False, "stage 1: recompute activations in the backward: less memory, more compute"
    )
    prefix_grouper: bool = arg(
        False, "stage 1: a group's image and prompt encoded once in the log-probs (prefix_grouper)"
    )
    eval_every: int = arg(5, "stage 1: evaluate on the held-out split every N steps", ">= 1")
    # stages 2 and 3
    stage: Literal["all", "1", "2", "3"] = arg("all", "run one stage, or 1 -> 2 -> 3")
    init: str = arg("", "stage 2 or 3 alone: the model folder to start from")
    sft_steps: int = arg(400, "stage 2: SFT steps on graph conversations", ">= 1")
    sft_error_rate: float = arg(0.3, "stage 2: share of conversations with a wrong fact", "[0, 1]")
    sft_learning_rate: float = arg(1e-3, "stage 2: AdamW learning rate", "> 0")
    dpo_samples: int = arg(4, "stage 3: answers sampled per image to build a pair", ">= 2")
    dpo_margin: float = arg(1.0, "stage 3: keep a pair if its graph scores differ this", ">= 0")
    dpo_beta: float = arg(0.1, "stage 3: DPO beta", "> 0")
    dpo_epochs: int = arg(8, "stage 3: passes over the preference pairs", ">= 1")
    dpo_learning_rate: float = arg(1e-5, "stage 3: AdamW learning rate", "> 0")
    answer_tokens: int = arg(112, "stages 2-3: longest conversational answer, in tokens", ">= 1")
    answer_samples: int = arg(8, "answers sampled per held-out image (all stages)", ">= 1")

    # filled in by __post_init__: the stabilisers given explicitly (a comparison's switch of method keeps them)
    set_by_user: tuple = field(default=(), init=False)

    def __post_init__(self):
        self.set_by_user = tuple(name for name in STABILISERS["grpo_pp"] if getattr(self, name) is not None)
        for name, value in STABILISERS["grpo_pp" if self.grpo_pp else "grpo"].items():
            if getattr(self, name) is None:  # not given: the method's value (args.json records what runs)
                setattr(self, name, value)
        check_args(self)  # bad values fail here, before any model is loaded


def check_args(args: Args):
    """Bad arguments are one clear error before anything loads (Args.__post_init__ calls this)."""
    check_args_shared(args)  # every field in its declared range, a writable output folder
    if args.stage in ("2", "3") and not args.init:
        raise UsageError(f"--stage {args.stage} alone needs --init, the model folder of the previous stage")


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: what GRPO++ changes against GRPO, stage 1's stabilisers and stage 3's knowledge-graph DPO


# GRPO's advantage first, grpo.py's word for word: --no_grpo_pp trains with it, and binary_advantages centres with it
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


# Each stabiliser's value under GRPO++ (our reading, module docstring) and under plain GRPO
STABILISERS = {
    "grpo_pp": {"advantage": "binary", "skip_zero_variance": True, "eps_high": 0.28, "loss_type": "dapo", "beta": 0.04},
    "grpo": {"advantage": "group", "skip_zero_variance": False, "eps_high": 0.2, "loss_type": "grpo", "beta": 0.0},
}


def binary_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO++'s advantage (our reading): A_i = sign(r_i - mean of its group), in {-1, 0, +1}; rewards (num_groups *
    group_size,), grouped. Unlike (r - mean) / std it never divides by a near-zero std, so one lucky sample in a
    low-variance group cannot get a huge advantage."""
    # r_i - mean_group(r): group_advantages (GRPO's, above) before any scaling
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
    """+1 per fact the graph confirms, -penalty per fact it contradicts: the attributes named in <think> against
    `label` (the image's class), the symptoms and care against the class the answer names (or `label`), so an answer
    is scored on what it says of its own diagnosis, as lesions.has_factual_error checks it (the diagnosis: stage 1)."""
    truth = lesions.KNOWLEDGE_GRAPH[lesions.check_class(label)]
    seen = lesions.parse_answer(answer)["attributes"]
    right_attributes = len(seen & {truth[k] for k in lesions.ATTRIBUTES})
    named = lesions.KNOWLEDGE_GRAPH.get(lesions.parse_answer(answer)["answer"], truth)
    stated = lesions.stated_facts(answer)
    right_facts = len(stated & {*named["symptoms"], named["care"]})
    wrong = len(seen) - right_attributes + len(stated) - right_facts
    return right_attributes + right_facts - penalty * wrong


def sequence_logps(model, rollout, rows):
    """Sum of log pi over each completion's tokens (rows,)."""
    batch = {k: v[rows] for k, v in rollout.items() if torch.is_tensor(v)}
    return (completion_logprobs(model, batch)[0] * batch["completion_mask"]).sum(1)


def preference_pairs(model, processor, train_items, args: Args):
    """Sample args.dpo_samples answers per training image and score each against the graph (kg_fact_score with
    the true class). chosen = best, rejected = worst, kept when the scores differ by at least args.dpo_margin.
    Returns the rollout of all samples and [(chosen row, rejected row)]."""
    k = args.dpo_samples
    images = [x["image"] for x in train_items]
    rollout = generate_completions(model, processor, images, group_size=k, max_new_tokens=args.answer_tokens)
    labels = [x["label"] for x in train_items for _ in range(k)]
    scores = torch.tensor([kg_fact_score(t, label) for t, label in zip(rollout["texts"], labels)]).view(-1, k)
    differ = [i for i, row in enumerate(scores) if row.max() - row.min() >= args.dpo_margin]  # images with a pair
    return rollout, [(i * k + int(scores[i].argmax()), i * k + int(scores[i].argmin())) for i in differ]


# ----------------------------------------------------------------------------------------------------------------
# GRPO's shared machinery: rollout, log-probs, loss (the same text in every algorithm file where it is unchanged)


def encode_prompts(processor, images, device):
    """Left-padded prompt ids and mask (B, P) and pixel values (B, 3, H, W) for a list of images."""
    prompt = lesions.make_prompt(processor)
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
    inputs = {"input_ids": prompt_ids, "attention_mask": prompt_mask, "pixel_values": pixels}
    suppress = [model.config.image_token_id]
    output = generate(model, tokenizer, inputs, max_new_tokens, temperature, greedy=greedy, suppress_tokens=suppress)
    completion_ids = output[:, prompt_ids.size(1) :]  # (B*G, C)
    is_eos = completion_ids == tokenizer.eos_token_id
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completion_ids.size(1))  # tokens incl. EOS
    completion_mask = (torch.arange(completion_ids.size(1), device=model.device)[None] < length[:, None]).long()
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(completion_ids, length.tolist())]
    prompts = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "pixel_values": pixels}  # (B*G, ...)
    return prompts | {"completion_ids": completion_ids, "completion_mask": completion_mask, "texts": texts}


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
    """Per-token log pi(o_t | image, q, o_<t) and entropies (B, C), as grpo.py's, with the image's pixel values.
    With prefix_grouper a group's image and prompt are encoded once (the vision tower sees each image once)."""
    if prefix_grouper:  # as grpo.py's; a group shares its image too, and <image> gets probability 0
        inputs, image_token = {"pixel_values": batch["pixel_values"]}, model.config.image_token_id
        return grouped_batch_logprobs(model, batch, temperature, prompt_inputs=inputs, suppress_ids=[image_token])
    # log pi(o_t | image, q, o_<t) = z[o_t] - logsumexp(z), z = logits / temperature in float32 (a chunk at a time)
    return logprobs_from_logits(completion_logits(model, batch), batch["completion_ids"], temperature)  # (B, C) x 2


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


def load_task(args: Args):
    """(train items, held-out items) of tasks/lesions.py; the tiny VLM needs 32x32 images, a real VLM resizes."""
    size = lesions.image_size_for(args.model if args.stage in ("all", "1") else args.init)  # 2, 3 alone: --init's
    return lesions.load_task(args.dataset_path, args.images_per_class, args.eval_per_class, args.data_seed, size)


def train_grpo(args: Args, task=None):
    """Stage 1 on `task` ((train items, held-out items); default: the task of args). Returns the results dict
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
    if model.device.type == "cuda":  # does this run fit? (common.estimate_memory prints its estimate)
        estimate_memory(
            model,
            rows=args.prompts_per_step * args.group_size,
            completion_tokens=args.max_new_tokens,
            prompt_tokens=encode_prompts(processor, [train_items[0]["image"]], "cpu")[0].size(1),
            rollout_rows=args.prompts_per_step * args.group_size,
            dtype=args.dtype,
            reference=ref_model is not None,
            checkpointing=args.gradient_checkpointing,
        )
    rng = random.Random(args.seed)
    start = time.time()
    with MetricsLogger(run_dir, plot_keys=PLOT_KEYS, model=(model, processor)) as logger:
        with autocast(model.device, args.dtype):
            before = lesions.evaluate(model, processor, eval_items, args.max_new_tokens, generate_completions)
        logger.log(0, {f"eval/{k}": v for k, v in before.items()})
        curve = [before["macro_f1"]]
        bar = tqdm(range(1, args.num_steps + 1), desc=method)
        for step in bar:
            step_start = time.time()
            batch_items = rng.choices(train_items, k=args.prompts_per_step)
            # 1. rollout: G completions for each image
            model.eval()
            with autocast(model.device, args.dtype):
                rollout = generate_completions(
                    model,
                    processor,
                    [x["image"] for x in batch_items],
                    group_size=args.group_size,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                )
            group_items = [x for x in batch_items for _ in range(args.group_size)]  # the item of each row
            # 2. rewards and advantages: GRPO's z-score or GRPO++'s sign
            rewards = lesions.recognition_reward(rollout["texts"], [x["label"] for x in group_items], args.kg_weight)
            if args.advantage == "binary":
                advantages = binary_advantages(rewards["total"], args.group_size)  # (B*G,)
            else:
                advantages = group_advantages(rewards["total"], args.group_size)  # (B*G,)
            advantages = advantages.to(model.device)
            # GRPO++: train only on the groups whose rewards differ (the others would dilute a token-mean normaliser)
            keep = nonzero_variance_groups(rewards["total"], args.group_size)
            rows = torch.nonzero(keep if args.skip_zero_variance else torch.ones_like(keep)).flatten()
            batch = {k: v[rows] for k, v in rollout.items() if torch.is_tensor(v)}  # the rows trained on
            completion_mask = batch["completion_mask"]  # (rows, C)
            record = {}
            if len(rows):  # (every group skipped: no step)
                # 3. log-probs of the sampling policy (only needed off-policy) and of the reference (only if beta > 0)
                old_logps = ref_logps = None
                with autocast(model.device, args.dtype):
                    if args.num_iterations > 1:
                        old_logps = batch_logprobs(model, [batch], args.temperature, args.prefix_grouper)
                    if ref_model is not None:
                        ref_logps = batch_logprobs(ref_model, [batch], args.temperature, args.prefix_grouper)
                # 4. num_iterations passes of one optimiser step each
                model.train()
                for _ in range(args.num_iterations):
                    with autocast(model.device, args.dtype):
                        logps, entropy = completion_logprobs(model, batch, args.temperature, args.prefix_grouper)
                    loss, metrics = policy_loss(
                        logps,
                        logps.detach() if old_logps is None else old_logps,
                        ref_logps,
                        advantages[rows],
                        completion_mask,
                        eps_low=args.eps_low,
                        eps_high=args.eps_high,
                        beta=args.beta,
                        loss_type=args.loss_type,
                    )
                    loss.backward()
                    metrics["entropy"] = masked_mean(entropy, completion_mask).item()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                record = metrics | {"loss": loss.item(), "grad_norm": grad_norm.item()}  # the last pass's
            # 5. log
            record |= {
                "reward": rewards["total"].mean().item(),
                "accuracy": rewards["correct"].mean().item(),
                "format": rewards["format"].mean().item(),
                "frac_reward_zero_std": 1 - keep.float().mean().item(),
                "step_time": time.time() - step_start,
            }
            if model.device.type == "cuda":  # measured, beside what estimate_memory printed
                record["memory/peak_gib"] = torch.cuda.max_memory_allocated(model.device) / 2**30
            if step % args.eval_every == 0 or step == args.num_steps:
                with autocast(model.device, args.dtype):
                    held_out = lesions.evaluate(model, processor, eval_items, args.max_new_tokens, generate_completions)
                record |= {f"eval/{k}": v for k, v in held_out.items()}
                curve.append(held_out["macro_f1"])
            logger.log(step, record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
    # a collapse: held-out F1 falls 10 points below its own best so far
    collapses = sum(f < max(curve[: i + 1]) - 0.10 for i, f in enumerate(curve))
    with autocast(model.device, args.dtype):  # the paper's protocol: a majority vote over sampled answers
        f1_vote = lesions.vote_macro_f1(
            model, processor, eval_items, args.max_new_tokens, args.answer_samples, generate_completions
        )
    results = {
        "f1_before": before["macro_f1"],
        "f1_after": curve[-1],
        "f1_best": max(curve),
        "f1_vote": f1_vote,
        "collapses": collapses,
        "curve": curve,
        "wall_time_s": time.time() - start,
        "run_dir": str(run_dir),
    }
    print(
        f"[grpo_pp] held-out macro-F1 {curve[0]:.3f} -> {curve[-1]:.3f} (best {max(curve):.3f}; majority vote of "
        f"{args.answer_samples} samples {f1_vote:.3f}), {collapses} evaluations 10 points below the best so far, "
        f"{results['wall_time_s']:.0f}s"
    )
    save_run(run_dir, results, model, processor)
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
        texts = [completion + tokenizer.eos_token for _, completion in demo_batch]
        right_padded = dict(padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
        completions = tokenizer(texts, **right_padded).to(model.device)
        completion_ids, completion_mask = completions["input_ids"], completions["attention_mask"]  # (B, C)
        labels = completion_ids.masked_fill(completion_mask == 0, -100)  # (B, C)
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "pixel_values": pixels.to(model.dtype)}
        batch |= {"completion_ids": completion_ids, "completion_mask": completion_mask}
        logits = completion_logits(model, batch)  # (B, C, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def load_policy(args: "Args"):
    """(model, processor): tiny-vlm warm-started on attribute captions (cached), or a real VLM as it is."""
    if args.model != "tiny-vlm":
        return load_vlm(args.model, args.device)
    recipe = {"version": 1, "steps": args.warm_start_steps, "data_seed": args.data_seed, "noise": args.warm_start_noise}
    path = cache_entry("tiny-vlm", recipe)

    def build(folder):
        model, processor = load_vlm("tiny-vlm", "cpu")  # on the CPU in float32: the same cache on every machine
        print(f"[grpo_pp] warm-starting the tiny VLM on attribute captions (cached in {shown(path)})")
        demos = lesions.warm_start_demos(args.data_seed, args.warm_start_noise)
        vlm_sft(model, processor, demos, args.warm_start_steps, desc="warm start")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return load_vlm(str(cached(path, build)), args.device)


def train_sft(args: Args, model, processor, train_items):
    """Stage 2: SFT on (training image, graph conversation) pairs, args.sft_error_rate of them with a wrong fact."""
    rng = random.Random(args.seed)
    conversation = lambda label: lesions.conversation(label, rng, args.sft_error_rate)[0]  # noqa: E731
    demos = [(x["image"], conversation(x["label"])) for x in train_items for _ in range(8)]
    settings = dict(batch_size=16, lr=args.sft_learning_rate, seed=args.seed, desc="stage 2 SFT")
    vlm_sft(model, processor, demos, args.sft_steps, **settings)
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
            policy_chosen = sequence_logps(model, rollout, chosen[batch])  # (pairs in the batch,)
            policy_rejected = sequence_logps(model, rollout, rejected[batch])
            loss, metrics = dpo_loss(
                policy_chosen, policy_rejected, ref_chosen[batch], ref_rejected[batch], args.dpo_beta
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model, {"pairs": len(pairs), "dpo_loss": loss.item(), **metrics}


def pipeline(args: Args):
    """Stages 1 -> 2 -> 3 (or one of them from --init); each stage's model is saved in its run folder."""
    train_items, eval_items = load_task(args)
    init, results = args.init, {}
    if args.stage in ("all", "1"):
        results["stage1"] = train_grpo(args, (train_items, eval_items))
        init = results["stage1"]["run_dir"] + "/model"
    # held-out conversational answers, greedy and sampled, checked against the graph by the task
    answers = lambda model, processor: lesions.evaluate_answers(  # noqa: E731
        model, processor, eval_items, args.answer_tokens, args.answer_samples, generate_completions
    )
    for stage in ("2", "3"):
        if args.stage not in ("all", stage):
            continue
        seed_everything(args.seed)
        start = time.time()
        model, processor = load_vlm(init, args.device)
        run_dir = make_run_dir(f"{'sft' if stage == '2' else 'dpo'}-stage{stage}", args, root=args.output_dir)
        before = answers(model, processor)
        with MetricsLogger(run_dir, model=(model, processor)):  # Ctrl-C keeps the model as it is
            if stage == "2":
                model, extra = train_sft(args, model, processor, train_items), {}
            else:
                model, extra = train_dpo(args, model, processor, train_items)
        after = answers(model, processor)
        results[f"stage{stage}"] = {"before": before, "after": after, **extra}
        results[f"stage{stage}"] |= {"wall_time_s": time.time() - start, "run_dir": str(run_dir)}
        print(
            f"[grpo_pp] stage {stage}: held-out macro-F1 {before['macro_f1']:.3f} -> {after['macro_f1']:.3f}, "
            f"factual error rate (sampled) {before['fact_error_rate']:.3f} -> {after['fact_error_rate']:.3f}, "
            f"(greedy) {before['fact_error_rate_greedy']:.3f} -> {after['fact_error_rate_greedy']:.3f}\n"
            f"          e.g. {after['example']!r}"
        )
        save_run(run_dir, results[f"stage{stage}"], model, processor)
        init = str(run_dir / "model")
    return results


if __name__ == "__main__":
    run_cli(Args, pipeline)
