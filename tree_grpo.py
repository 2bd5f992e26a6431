"""Tree-GRPO: tree-search rollouts for a tool-using agent, in one file.

Paper: Tree Search for LLM Agent Reinforcement Learning (Ji et al., 2025), https://arxiv.org/abs/2509.21240;
official code https://github.com/AMAP-ML/Tree-GRPO. This is grpo.py with the rollout replaced by tree search and
the advantage by a two-level group baseline (the section "The algorithm"); log-probs and loss are grpo.py's. The
agent thinks, searches (<search>query</search>, answered in <information>), answers in <answer>: tasks/namesakes.py.

Chain GRPO samples G whole trajectories per question; Tree-GRPO grows them as trees of agent steps, whose branches
share their prefix: one budget of tokens and tool calls buys more trajectories, and siblings show which step mattered.

    rollout: M trees per question, each starting as one chain; L times, expand N nodes per tree (uniformly with
             replacement among the root and inner nodes) into new branches; keep K leaves per tree (1 + N L grown)
    A(l)   = z(R_l; the question's M K leaves) + z(R_l; its tree's K leaves),  z(x; S) = (x - mean S) / (std S + eps),
             R_l the leaf's reward (`namesakes.em_format_reward`)
Each kept leaf is one sequence with A(l) on every token the policy generated (observations masked): a step shared
by several leaves gets their summed advantage, a credit per step without a value network (--rollout chain: G trees
of one leaf, A = GRPO's z-score).

The paper's (and official code's): steps as nodes, the expansion and its sampling, K random leaves, eps 1e-6,
off-policy updates (official: 8 minibatches, old log-probs once; the dual clip c = 3, ours too). Ours:
1. One optimiser step per batch by default (on-policy; --num_minibatches 8 is the official; RESULTS.md compares).
2. A tree with one kept leaf gets 0 from its own z-score (official: the raw reward).
3. A branch open after --max_turns steps is a leaf without an answer (official: one more step without search).
4. No KL and no entropy bonus by default (official: 0.001 each; --beta sets the KL).

Run (the results are in RESULTS.md):
    python tree_grpo.py                           # Tree-GRPO, tiny model, CPU
    python tree_grpo.py --rollout chain           # chain GRPO with G = 4, the baseline
    python experiments/tree_vs_chain.py --prefix_grouper   # chain, tree and the ablation at one token budget
"""

import copy
import random
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from common import autocast, estimate_memory, frozen_copy, generate, load_model, seed_everything
from plumbing import MetricsLogger, UsageError, arg, check_args_shared, make_run_dir, run_cli, save_run
from prefix_grouper import grouped_batch_logprobs, logprobs_from_logits, trie_logprobs
from tasks import namesakes


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
    dataset: Literal["kb", "hotpotqa"] = arg("kb", "the task")
    dataset_path: str = arg("hotpot_qa", "hotpotqa: a hub id or a local folder")
    num_train: int = arg(2000, "hotpotqa: training questions (at most)", ">= 1")
    num_eval: int = arg(100, "held-out questions for evaluation (at most)", ">= 1")
    data_seed: int = arg(0, "kb: seed of the knowledge base (seeds share one warm start)", ">= 0")
    top_k_docs: int = arg(1, "documents the search tool returns", ">= 1")
    max_doc_chars: int = arg(200, "each returned document is cut to this many characters", ">= 1")
    demo_stop: float = arg(0.6, "tiny warm start: chance a demo answers too early per hop", "[0, 1]")
    demo_trust: float = arg(0.5, "tiny warm start: chance a demo goes on with a namesake who does not fit", "[0, 1]")
    sft_steps: int = arg(1500, "tiny warm start: SFT steps (cached after the first run)", ">= 1")
    sft_batch_size: int = arg(16, "tiny warm start: trajectories per SFT step", ">= 1")
    # rollout
    num_steps: int = arg(60, "training steps (one batch of rollouts each)", ">= 1")
    token_budget: int = arg(0, "stop once this many tokens are generated (0: num_steps)", ">= 0")
    prompts_per_step: int = arg(8, "questions per step", ">= 1")
    rollout: Literal["tree", "chain"] = arg("tree", "tree search, or chain GRPO")
    group_size: int = arg(4, "chain: G, trajectories per question", ">= 2")
    num_trees: int = arg(2, "tree: M, trees per question", ">= 1")
    expand_nodes: int = arg(2, "tree: N, nodes expanded per tree and round", ">= 0")
    expand_rounds: int = arg(1, "tree: L, expansion rounds", ">= 0")
    keep_leaves: int = arg(3, "tree: K, leaves kept per tree (at most 1 + N*L)", ">= 1")
    max_turns: int = arg(7, "most agent steps per trajectory", ">= 1")
    max_step_tokens: int = arg(32, "most tokens generated in one step", ">= 1")
    temperature: float = arg(1.0, "sampling temperature (log-probs use it too)", "> 0")
    top_p: float = arg(1.0, "nucleus sampling; < 1 is off-policy (the loss scores all)", "(0, 1]")
    # advantages and loss
    advantage: Literal["both", "inter", "intra"] = arg(
        "both", "tree: A_inter + A_intra, or one of them alone (the ablation)"
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = arg("dapo", "aggregation")
    eps_low: float = arg(0.2, "clip ratio below at 1 - eps_low", "[0, 1)")
    eps_high: float = arg(0.2, "clip ratio above at 1 + eps_high", ">= 0")
    beta: float = arg(0.0, "KL coefficient (official: 0.001); > 0 loads a reference", ">= 0")
    dual_clip: float = arg(3.0, "A < 0: a token's loss is at most -c*A (official: 3)", "> 1")
    # optimisation
    learning_rate: float = arg(1e-4, "AdamW learning rate (real models: ~1e-6)", "> 0")
    num_minibatches: int = arg(1, "optimiser steps per rollout batch, each on a share of its questions", ">= 1")
    num_iterations: int = arg(1, "passes over each rollout batch (veRL's ppo_epochs)", ">= 1")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimiser step", ">= 1")
    max_grad_norm: float = arg(1.0, "gradient clipping", "> 0")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward: less memory, more compute")
    prefix_grouper: bool = arg(False, "encode what leaves share (prompt, steps before a branch) once: a trie")
    # evaluation
    eval_every: int = arg(10, "evaluate on the held-out split every N steps", ">= 1")

    def __post_init__(self):
        check_args(self)  # bad values fail here, before any model is loaded


# ----------------------------------------------------------------------------------------------------------------
# The algorithm: what Tree-GRPO changes against GRPO, tree-search rollouts and tree advantages


@dataclass(eq=False)
class Node:
    """One agent step: what the policy generated (in the loss) and what the tool returned (masked out)."""

    parent: "Node | None" = None
    step_ids: list[int] = field(default_factory=list)  # thought + action, generated by the policy
    obs_ids: list[int] = field(default_factory=list)  # <information>..</information>, from the tool
    text: str = ""  # step + observation, decoded
    action: str = ""  # search | answer | invalid; "" at the root
    depth: int = 0  # steps from the root
    is_leaf: bool = False
    children: list["Node"] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)  # root only

    def path(self) -> list["Node"]:
        """The steps from the root (excluded) to this node, in order."""
        return [] if self.parent is None else self.parent.path() + [self]

    def root(self) -> "Node":
        return self if self.parent is None else self.parent.root()

    def context_ids(self) -> list[int]:
        """The prompt and every step and observation so far: what the policy sees before its next step."""
        return self.root().prompt_ids + [t for n in self.path() for t in n.step_ids + n.obs_ids]

    def descendants(self) -> list["Node"]:
        return [d for child in self.children for d in [child] + child.descendants()]


@dataclass
class Budget:
    """What the rollouts cost: tokens the policy generated, tool calls made, and trajectories (leaves) obtained."""

    generated_tokens: int = 0
    tool_calls: int = 0
    trajectories: int = 0


@torch.no_grad()
def generate_steps(model, tokenizer, contexts, max_step_tokens, temperature, top_p, greedy=False):
    """One agent step for each context (a list of token ids): sample until </search>, </answer>, EOS or
    max_step_tokens. Returns [(step token ids, step text)]; the ids end right after the closing tag."""
    input_ids, attention_mask = pad_batch(contexts, tokenizer.pad_token_id, left=True, device=model.device)  # (B, W)
    width = input_ids.size(1)
    # exactly our sampling settings, whatever the checkpoint's generation_config.json asks for (common.generate);
    # stopping at a closing tag ends the step without changing which tokens are sampled
    inputs, stop = {"input_ids": input_ids, "attention_mask": attention_mask}, ["</search>", "</answer>"]
    output = generate(model, tokenizer, inputs, max_step_tokens, temperature, top_p, greedy, stop_strings=stop)
    steps = []
    for row in output[:, width:].tolist():
        end = len(row)
        for i in range(len(row)):  # cut after the first closing tag or EOS (a finished row is padded after it)
            if row[i] == tokenizer.eos_token_id or re.search(r"</(search|answer)>", tokenizer.decode(row[: i + 1])):
                end = i + 1
                break
        steps.append((row[:end], tokenizer.decode(row[:end], skip_special_tokens=True)))
    return steps


def continue_to_leaf(model, tokenizer, starts, search, args, budget, greedy=False):
    """Grow a new branch from each start node, one batched step at a time, until each branch answers or has
    max_turns steps. Each start gets exactly one new leaf. Returns the new leaves."""
    active, leaves = list(starts), []
    while active:
        contexts = [node.context_ids() for node in active]
        steps = generate_steps(model, tokenizer, contexts, args.max_step_tokens, args.temperature, args.top_p, greedy)
        still_active = []
        for node, (step_ids, step_text) in zip(active, steps):
            action, argument = namesakes.parse_step(step_text)
            observation = namesakes.run_tool(action, argument, search, args.top_k_docs, args.max_doc_chars)
            obs_ids = tokenizer(observation, add_special_tokens=False)["input_ids"] if observation else []
            child = Node(node, step_ids, obs_ids, step_text + observation, action, node.depth + 1)
            node.children.append(child)
            budget.generated_tokens += len(step_ids)
            budget.tool_calls += action == "search" and bool(argument)
            if action == "answer" or child.depth >= args.max_turns:
                child.is_leaf = True
                leaves.append(child)
            else:
                still_active.append(child)
        active = still_active
    budget.trajectories += len(leaves)
    return leaves


def tree_rollout(model, tokenizer, prompts, search, args, rng, budget, greedy=False):
    """M trees per question: init M chains, then L rounds of expanding N sampled nodes per tree, then keep K
    leaves per tree. Returns the kept leaves as [(question index, tree index, leaf)], and the roots."""
    num_trees, num_nodes, num_rounds, keep = rollout_shape(args)
    roots = [Node(prompt_ids=p) for p in prompts for _ in range(num_trees)]
    continue_to_leaf(model, tokenizer, roots, search, args, budget, greedy=greedy)  # init: one chain per tree
    for _ in range(num_rounds):
        # sample N nodes per tree, uniformly with replacement, among the root and the non-leaf nodes
        picks = [rng.choices([r] + [n for n in r.descendants() if not n.is_leaf], k=num_nodes) for r in roots]
        continue_to_leaf(model, tokenizer, [n for p in picks for n in p], search, args, budget, greedy=greedy)
    kept = []
    for t, root in enumerate(roots):
        leaves = [n for n in root.descendants() if n.is_leaf]  # 1 + N*L per tree
        kept += [(t // num_trees, t, leaf) for leaf in rng.sample(leaves, keep)]
    return kept, roots


def rollout_shape(args: Args):
    """(M, N, L, K): chain GRPO is M = G trees that are never expanded, one leaf each."""
    if args.rollout == "chain":
        return args.group_size, 0, 0, 1
    return args.num_trees, args.expand_nodes, args.expand_rounds, args.keep_leaves


def leaf_sequence(leaf: Node) -> tuple[list[int], list[int]]:
    """A leaf's response: every step and observation on its path, in order, and the loss mask (1 = generated)."""
    ids, mask = [], []
    for node in leaf.path():
        ids += node.step_ids + node.obs_ids
        mask += [1] * len(node.step_ids) + [0] * len(node.obs_ids)
    return ids, mask


def pad_batch(sequences, pad_id, left: bool, device):
    """Token-id lists -> (ids, mask) tensors (B, T), padded on the left (prompts) or the right (responses)."""
    width = max(map(len, sequences))
    ids, mask = [], []
    for s in sequences:
        padding = [pad_id] * (width - len(s))
        ids.append(padding + s if left else s + padding)
        mask.append([0] * len(padding) + [1] * len(s) if left else [1] * len(s) + [0] * len(padding))
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def leaf_logprobs(model, batch, temperature=1.0, prefix_grouper=False):
    """Per-token log-probs and entropies (leaves, T) of each leaf's response, as completion_logprobs gives them.
    With prefix_grouper the leaves go through prefix_grouper.trie_logprobs: what they share (their question's
    prompt, and every step and observation before they branch) is encoded once instead of once per leaf."""
    if not prefix_grouper:
        return completion_logprobs(model, batch, temperature)
    prompt_mask = batch["prompt_mask"].bool()  # (leaves, P)
    response_mask = batch["completion_mask"].bool()  # (leaves, T)
    rows = zip(batch["prompt_ids"], prompt_mask, batch["completion_ids"], response_mask)
    sequences = [torch.cat([prompt[p_mask], response[r_mask]]) for prompt, p_mask, response, r_mask in rows]
    starts = prompt_mask.sum(1).tolist()
    logps, entropy = (torch.cat(x) for x in trie_logprobs(model, sequences, starts, temperature, return_entropy=True))
    zeros = torch.zeros(response_mask.shape, device=model.device)
    # back to (leaves, T): each leaf's values fill its mask's ones, in order
    return zeros.masked_scatter(response_mask, logps), zeros.masked_scatter(response_mask, entropy)


def tree_advantages(rewards, prompt_ids, tree_ids, eps: float = 1e-6, terms: str = "both"):
    """A(l) = A_inter(l) + A_intra(l): the leaf's z-score among all leaves of its question plus its z-score among
    the leaves of its own tree. rewards, prompt_ids, tree_ids: one entry per kept leaf, in any order.
    terms = "inter" or "intra" keeps that term alone (the ablation; "inter" is GRPO over all of a question's leaves).

    std is unbiased (n - 1, torch.std); a group of one leaf contributes 0, and so does a group of equal rewards up
    to the float32 rounding of its mean (a small uniform value, as in the official code).
    A tree is identified by (prompt id, tree id), so tree ids may restart at 0 for every question.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    prompt_ids, tree_ids = torch.as_tensor(prompt_ids), torch.as_tensor(tree_ids)
    if not (rewards.dim() == 1 and rewards.shape == prompt_ids.shape == tree_ids.shape):
        raise ValueError(
            f"rewards, prompt_ids and tree_ids must be 1-D and of one length (one entry per leaf), got "
            f"{tuple(rewards.shape)}, {tuple(prompt_ids.shape)}, {tuple(tree_ids.shape)}"
        )
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards at positions {bad} are NaN or infinite; return 0.0 for a leaf you cannot score")

    def z_scores(keys):  # (r - mean of its group) / (std of its group + eps), 0 for a group of one
        out = torch.zeros_like(rewards)
        for key in keys.unique(dim=0):
            members = (keys == key).all(dim=-1) if keys.dim() > 1 else keys == key
            if members.sum() > 1:
                group = rewards[members]
                out[members] = (group - group.mean()) / (group.std() + eps)
        return out

    if terms not in ("both", "inter", "intra"):
        raise ValueError(f"terms must be both, inter or intra, got {terms!r}")
    # A_inter: the question's M*K leaves are the group
    inter = z_scores(prompt_ids) if terms != "intra" else 0
    # A_intra: the K leaves of one tree are the group
    intra = z_scores(torch.stack([prompt_ids, tree_ids], dim=1)) if terms != "inter" else 0
    return inter + intra


# ----------------------------------------------------------------------------------------------------------------
# GRPO's shared machinery: rollout, log-probs, loss (the same text in every algorithm file where it is unchanged)


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
    """leaf_logprobs of a batch, a micro-batch at a time (no forward holds the whole batch): (leaves, T)."""
    return torch.cat([leaf_logprobs(model, mb, temperature, prefix_grouper)[0] for mb in micro_batches])


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


def check_args(args: Args):
    """Bad arguments are one clear error before anything loads (Args.__post_init__ calls this)."""
    check_args_shared(args)  # every field in its declared range, a writable output folder
    num_trees, num_nodes, num_rounds, keep = rollout_shape(args)
    if keep > 1 + num_nodes * num_rounds:
        raise UsageError(
            f"--keep_leaves {keep} is more than the 1 + N*L = {1 + num_nodes * num_rounds} leaves a tree has; "
            f"lower it or raise --expand_nodes / --expand_rounds"
        )
    if num_trees * keep < 2:
        raise UsageError("one tree with one kept leaf gives every advantage 0: raise --num_trees or --keep_leaves")
    if args.num_minibatches > args.prompts_per_step:
        raise UsageError(
            f"--num_minibatches must be between 1 and --prompts_per_step ({args.prompts_per_step}): each optimiser "
            f"step takes whole questions, got {args.num_minibatches}"
        )
    # an optimiser step's leaves split evenly into micro-batches (as in grpo.py: uneven ones would misscale the loss)
    leaves = {len(q) * num_trees * keep for q in torch.arange(args.prompts_per_step).tensor_split(args.num_minibatches)}
    if any(n % args.gradient_accumulation_steps for n in leaves):
        raise UsageError(
            f"--gradient_accumulation_steps must divide the leaves of each optimiser step ({sorted(leaves)}), got "
            f"{args.gradient_accumulation_steps}"
        )
    if args.rollout == "chain" and args.advantage == "intra":
        raise UsageError("--advantage intra with --rollout chain gives every advantage 0 (a chain has one leaf)")


def held_out(model, tokenizer, items, encode, search, args, samples=0):
    """namesakes.evaluate over one greedy chain per question (as the paper evaluates), or over `samples` chains per
    question sampled at the training temperature (keys sampled_*) from their own seed: training goes on unchanged."""
    chain = copy.copy(args)  # an evaluation setting (one tree, no expansion), not checked as a training one
    chain.rollout, chain.num_trees, chain.expand_rounds, chain.keep_leaves = "tree", 1, 0, 1

    def play(chunk):  # each item's steps as (text with its observation, action)
        prompts = [encode(x) for x in chunk]
        kept, _ = tree_rollout(
            model, tokenizer, prompts, search, chain, random.Random(0), Budget(), greedy=samples == 0
        )
        return [[(node.text, node.action) for node in leaf.path()] for _, _, leaf in kept]

    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(args.seed)
        metrics = namesakes.evaluate([x for x in items for _ in range(max(samples, 1))], play, args.dataset == "kb")
    return {f"sampled_{k}" if samples else k: v for k, v in metrics.items()}


def train(args: Args, sampled_evals=None):
    """sampled_evals(tokens generated before this step, after it, last step?) -> N is experiments/tree_vs_chain.py's
    hook: N > 0 adds N sampled chains a held-out question (eval/sampled_*) to a greedy evaluation at this step."""
    check_args(args)
    seed_everything(args.seed)
    train_items, eval_items, demos, corpus = namesakes.load_task(
        args.dataset, args.dataset_path, args.num_train, args.num_eval, args.data_seed, args.demo_stop, args.demo_trust
    )
    warm_start = dict(sft_steps=args.sft_steps, sft_batch_size=args.sft_batch_size, extra_tags=namesakes.TAGS)
    model, tokenizer = load_model(args.model, demos=demos, device=args.device, **warm_start)
    ref_model = frozen_copy(model, args.dtype) if args.beta > 0 else None
    if args.gradient_checkpointing:  # recompute each layer in the backward instead of keeping its activations
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)  # float32 states
    run_dir = make_run_dir(f"tree_grpo-{args.rollout}", args, root=args.output_dir)
    search = namesakes.BM25(corpus)
    encode = lambda item: namesakes.encode_question(tokenizer, item)  # noqa: E731
    evaluate = lambda samples=0: held_out(model, tokenizer, eval_items, encode, search, args, samples)  # noqa: E731
    if model.device.type == "cuda":  # does this run fit? (common.estimate_memory prints its estimate)
        num_trees, num_nodes, num_rounds, keep = rollout_shape(args)
        estimate_memory(
            model,
            rows=args.prompts_per_step * num_trees * keep // args.gradient_accumulation_steps,
            prompt_tokens=max(len(encode(x)) for x in train_items[:256]),
            completion_tokens=args.max_turns * (args.max_step_tokens + args.top_k_docs * args.max_doc_chars),
            rollout_rows=args.prompts_per_step * num_trees * max(1, num_nodes),
            dtype=args.dtype,
            reference=ref_model is not None,
            checkpointing=args.gradient_checkpointing,
        )
    rng = random.Random(args.seed)
    budget = Budget()
    start = time.time()

    with MetricsLogger(run_dir, plot_keys=PLOT_KEYS, model=(model, tokenizer)) as logger:
        with autocast(model.device, args.dtype):
            before = evaluate()
        logger.log(0, {f"eval/{k}": v for k, v in before.items()} | {"budget/generated_tokens": 0})
        print(f"[tree_grpo] held-out before training: EM {before['em']:.3f}, multi-hop EM {before['em_multihop']:.3f}")
        bar = tqdm(range(1, args.num_steps + 1), desc=f"tree_grpo ({args.rollout})")
        for step in bar:
            step_start = time.time()
            batch_items = rng.choices(train_items, k=args.prompts_per_step)
            # 1. rollout: M trees per question (chain: G independent trajectories), K leaves kept per tree
            model.eval()
            before_step = Budget(**vars(budget))  # the budget spent before this step
            with autocast(model.device, args.dtype):
                kept, _ = tree_rollout(model, tokenizer, [encode(x) for x in batch_items], search, args, rng, budget)
            prompt_index, tree_index, leaves = zip(*kept)
            # 2. rewards and tree advantages (inter-tree + intra-tree)
            responses = [leaf_sequence(leaf) for leaf in leaves]
            texts = ["".join(n.text for n in leaf.path()) for leaf in leaves]
            answers = [batch_items[i]["answer"] for i in prompt_index]
            rewards = torch.tensor([namesakes.em_format_reward(t, a) for t, a in zip(texts, answers)])  # (num_leaves,)
            advantages = tree_advantages(rewards, prompt_index, tree_index, terms=args.advantage)  # (num_leaves,)
            advantages = advantages.to(model.device)
            pad = tokenizer.pad_token_id
            prompt_ids, prompt_mask = pad_batch([leaf.root().prompt_ids for leaf in leaves], pad, True, model.device)
            response_ids, response_mask = pad_batch([r[0] for r in responses], pad, False, model.device)
            loss_mask, _ = pad_batch([r[1] for r in responses], 0, False, model.device)  # 0 on observations
            batch = {  # one row per kept leaf: its question's prompt, then its path's steps and observations
                "prompt_ids": prompt_ids,
                "prompt_mask": prompt_mask,  # (leaves, P)
                "completion_ids": response_ids,
                "completion_mask": response_mask,  # (leaves, T): steps + observations
            }
            # num_minibatches optimiser steps, each on whole questions (leaves come in question order, M*K each),
            # each split into gradient_accumulation_steps micro-batches: updates[j] = [rows, ...]
            questions = torch.arange(len(leaves)).view(len(batch_items), -1)  # (questions, M*K) row numbers
            minibatches = questions.tensor_split(args.num_minibatches)
            updates = [rows.flatten().chunk(args.gradient_accumulation_steps) for rows in minibatches]
            micro_batches = [{k: v[rows] for k, v in batch.items()} for update in updates for rows in update]
            # 3. log-probs of the sampling policy (only needed off-policy: more than one optimiser step per batch)
            #    and of the reference (only if beta > 0), in the training pass's micro-batches: (leaves, T)
            old_logps = ref_logps = None
            with autocast(model.device, args.dtype):
                if args.num_minibatches * args.num_iterations > 1:
                    old_logps = batch_logprobs(model, micro_batches, args.temperature, args.prefix_grouper)
                if ref_model is not None:
                    ref_logps = batch_logprobs(ref_model, micro_batches, args.temperature, args.prefix_grouper)
            # 4. num_iterations passes over the batch, one optimiser step per minibatch (with one of each, on-policy:
            #    old log-probs = current ones, detached)
            model.train()
            step_metrics, loss_sum, grad_norms = [], 0.0, []
            for _ in range(args.num_iterations):
                for update in updates:
                    num_items = sum(loss_mask[rows].sum() for rows in update)  # dapo's normaliser: this update's
                    for rows in update:
                        micro_batch = {k: v[rows] for k, v in batch.items()}
                        with autocast(model.device, args.dtype):
                            logps, entropy = leaf_logprobs(model, micro_batch, args.temperature, args.prefix_grouper)
                        loss, metrics = policy_loss(
                            logps,
                            logps.detach() if old_logps is None else old_logps[rows],
                            None if ref_logps is None else ref_logps[rows],
                            advantages[rows],
                            loss_mask[rows],
                            eps_low=args.eps_low,
                            eps_high=args.eps_high,
                            beta=args.beta,
                            loss_type=args.loss_type,
                            max_completion_length=args.max_turns * args.max_step_tokens,
                            num_items_in_batch=num_items,
                            grad_accum_steps=args.gradient_accumulation_steps,
                            dual_clip=args.dual_clip,
                        )
                        loss.backward()
                        metrics["entropy"] = masked_mean(entropy, loss_mask[rows]).item()
                        step_metrics.append(metrics)
                        loss_sum += loss.item() / (args.num_iterations * len(updates))
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item())
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            # 5. log
            correct = torch.tensor([namesakes.exact_match(t, a) for t, a in zip(texts, answers)]).float()
            tool_calls = sum(node.action == "search" for leaf in leaves for node in leaf.path())
            record = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]}
            record |= {
                "loss": loss_sum,
                "reward": rewards.mean().item(),
                "em": correct.mean().item(),
                "frac_zero_advantage": (advantages == 0).float().mean().item(),
                "tool_calls_per_episode": tool_calls / len(leaves),
                "trajectories": budget.trajectories - before_step.trajectories,
                "generated_tokens": budget.generated_tokens - before_step.generated_tokens,
                "budget/generated_tokens": budget.generated_tokens,
                "budget/tool_calls": budget.tool_calls,
                "budget/trajectories": budget.trajectories,
                "grad_norm": sum(grad_norms) / len(grad_norms),
                "step_time": time.time() - step_start,
            }
            if model.device.type == "cuda":  # measured, beside what estimate_memory printed
                record["memory/peak_gib"] = torch.cuda.max_memory_allocated(model.device) / 2**30
            last = step == args.num_steps or 0 < args.token_budget <= budget.generated_tokens
            samples = sampled_evals(before_step.generated_tokens, budget.generated_tokens, last) if sampled_evals else 0
            if step % args.eval_every == 0 or last or samples:
                with autocast(model.device, args.dtype):
                    scores = evaluate() | (evaluate(samples) if samples else {})
                record |= {f"eval/{k}": v for k, v in scores.items()}
            logger.log(step, record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", em=f"{record['em']:.2f}")
            if last:  # --num_steps reached, or the token budget spent
                break

    after = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
    results = {
        "before": before,
        "after": after,
        "budget": vars(budget),
        "wall_time_s": time.time() - start,
        "run_dir": str(run_dir),
    }
    print(
        f"[tree_grpo] held-out multi-hop EM {before['em_multihop']:.3f} -> {after['em_multihop']:.3f}, "
        f"{budget.generated_tokens} tokens generated, {budget.trajectories} trajectories, "
        f"{results['wall_time_s']:.0f}s"
    )
    save_run(run_dir, results, model, tokenizer)
    return results


PLOT_KEYS = [
    "reward",
    "eval/em_multihop",
    "eval/em_1hop",
    "tool_calls_per_episode",
    "budget/generated_tokens",
    "entropy",
]


if __name__ == "__main__":
    run_cli(Args, train)
