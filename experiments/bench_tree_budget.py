"""Benchmark: trajectories per 1k generated tokens for chain GRPO and several tree shapes, on tree_grpo.py's task.

    python experiments/bench_tree_budget.py    # a table (about 2 minutes on 2 CPU cores once the warm start is cached)

Rolls out the warm-started tiny model (tree_grpo.py's defaults) on the same 64 training questions for each shape,
sampling at temperature 1, and counts the trajectories (leaves) and the tokens the policy generated. An expansion
starts at a node drawn uniformly among the root and the non-leaf nodes, so more expansions per tree (N, L) buy
more leaves per token. Prints a table; asserts nothing.
"""

import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tree_grpo as T  # noqa: E402
from common import load_model  # noqa: E402
from plumbing import run_cli  # noqa: E402
from tasks import namesakes  # noqa: E402

SHAPES = {  # name: (rollout, M, N, L, K)
    "chain, G=4": ("chain", 4, 0, 0, 1),
    "tree, M=2 N=2 L=1 (the paper's)": ("tree", 2, 2, 1, 3),
    "tree, M=2 N=3 L=1": ("tree", 2, 3, 1, 4),
    "tree, M=2 N=4 L=1": ("tree", 2, 4, 1, 5),
    "tree, M=2 N=2 L=2": ("tree", 2, 2, 2, 5),
    "tree, M=1 N=4 L=2": ("tree", 1, 4, 2, 9),
}


@dataclass
class Args:
    """No options: tree_grpo.py's defaults, the shapes above."""


def main(options: Args):
    args = T.Args()
    train_items, _, demos, corpus = namesakes.load_task(
        args.dataset, args.dataset_path, args.num_train, args.num_eval, args.data_seed, args.demo_stop, args.demo_trust
    )
    model, tokenizer = load_model(
        "tiny", demos=demos, sft_steps=args.sft_steps, sft_batch_size=args.sft_batch_size, extra_tags=namesakes.TAGS
    )
    search = namesakes.BM25(corpus)
    items = random.Random(0).sample(train_items, 64)
    prompts = [namesakes.encode_question(tokenizer, x) for x in items]
    rows, chain_rate = [], None
    for name, (rollout, m, n, rounds, k) in SHAPES.items():
        shape = replace(args, rollout=rollout, num_trees=m, group_size=max(m, 2), expand_nodes=n,
                        expand_rounds=rounds, keep_leaves=k)  # fmt: skip
        torch.manual_seed(0)
        budget = T.Budget()
        T.tree_rollout(model, tokenizer, prompts, search, shape, random.Random(0), budget)
        rate = 1000 * budget.trajectories / budget.generated_tokens
        chain_rate = chain_rate or rate
        per_trajectory = budget.generated_tokens / budget.trajectories
        rows.append(f"| {name} | {budget.trajectories // len(items)} | {per_trajectory:.1f} | {rate:.1f} "
                    f"| {rate / chain_rate:.2f}x |")  # fmt: skip
    print("| shape | trajectories per question | tokens per trajectory | per 1k tokens | vs chain |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    run_cli(Args, main)
