"""Tree-GRPO against chain GRPO at one budget of generated tokens (RESULTS.md, "Tree-GRPO vs chain GRPO").

    python experiments/tree_vs_chain.py --prefix_grouper                          # 4 arms, seeds 0-4, 70k tokens
    python experiments/tree_vs_chain.py --arms tree,tree_off_policy --prefix_grouper   # off-policy updates
    python experiments/tree_vs_chain.py --arms chain --tokens 280000 --eval_samples 8 --num_steps 400 \
        --prefix_grouper --output_dir runs/280k       # one arm of the 280k comparison (then tree, tree_l2)
Every arm of every seed trains from one warm start until it has generated --tokens tokens; then a table (held-out
greedy multi-hop EM at a quarter, half, three quarters of the budget and at its end) and the EM-vs-tokens curves.
With --eval_samples the table adds the sampled policy's multi-hop EM at each quarter (read at the first step past
it) and found_person at the end, greedy and sampled, and the curves are the sampled EM's. Every option of
tree_grpo.py applies to every arm but --seed, --token_budget and what every arm sets (--rollout, --advantage); the
budget must hold one step of every arm (all its trajectories at --max_turns steps of --max_step_tokens tokens).
"""

import json
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the algorithm files

import tree_grpo  # noqa: E402
from experiments.sweep import (  # noqa: E402
    Sweep,
    int_list,
    name_list,
    options_given,
    refuse_same_runs,
    refuse_set_for_every_run,
    seed_sweep,
)
from plumbing import UsageError, arg, run_cli  # noqa: E402

# what each arm sets: chain GRPO, Tree-GRPO, Tree-GRPO with one advantage term (the ablation), off-policy updates
ARMS = {
    "chain": {"rollout": "chain", "advantage": "both"},
    "tree": {"rollout": "tree", "advantage": "both"},
    "tree_inter": {"rollout": "tree", "advantage": "inter"},
    "tree_intra": {"rollout": "tree", "advantage": "intra"},
    "tree_off_policy": {"rollout": "tree", "advantage": "both", "num_minibatches": 4},  # 4 optimiser steps a batch
    "tree_l2": {"rollout": "tree", "advantage": "both", "expand_rounds": 2, "keep_leaves": 5},  # every leaf of 2 rounds
}
DEFAULT_ARMS = "chain,tree,tree_inter,tree_intra"


@dataclass
class Comparison(Sweep):
    arms: str = arg(DEFAULT_ARMS, "some of " + ", ".join(ARMS))
    tokens: int = arg(70000, "the budget: each run stops after generating this many tokens", ">= 1")
    eval_samples: int = arg(
        0, "also N sampled chains a question at the first step past each quarter of --tokens", ">= 0"
    )

    def __post_init__(self):
        super().__post_init__()  # and every field in its declared range
        name_list(self.arms, ARMS)


def sampled_evals(budget: int, samples: int):
    """tree_grpo.train's hook: `samples` sampled chains a held-out question at the first step past each quarter of
    the budget (the last step is past the fourth; quarters one step crosses together share it), none elsewhere."""
    return lambda tokens_before, tokens_after, last: (
        samples if last or tokens_after * 4 // budget > tokens_before * 4 // budget else 0
    )


def logged(run) -> list[dict]:
    """Every record a run logged (metrics.jsonl in its folder): step 0's evaluation, then one a training step."""
    with open(Path(run["run_dir"]) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def em_at_budget(curve, tokens):
    """Held-out multi-hop EM at a given number of generated tokens, linearly interpolated between evaluations."""
    points = [(p["budget/generated_tokens"], p["eval/em_multihop"]) for p in curve]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= tokens <= x1:
            return y0 + (y1 - y0) * (tokens - x0) / max(x1 - x0, 1)
    raise ValueError(f"the run generated {points[-1][0]} tokens, fewer than {tokens}")


def first_past(curve, key, tokens):
    """`key` at the first evaluation that has it at or past `tokens` generated tokens (sampled metrics are read at
    the first step past each quarter of the budget, within one step's tokens of it)."""
    return next(p[key] for p in curve if key in p and p["budget/generated_tokens"] >= tokens)


def trajectories(args: tree_grpo.Args) -> int:
    """Trajectories per question in one step: each tree's first chain and its expansions (chain GRPO: G)."""
    trees, nodes, rounds, _ = tree_grpo.rollout_shape(args)
    return trees * (1 + nodes * rounds)


def plan(args: tree_grpo.Args, comparison: Comparison) -> dict:
    """{arm: [tree_grpo.Args, one per seed]}, or a UsageError: an option the comparison sets, two arms that would be
    the same runs, a budget below one step of an arm or beyond what --num_steps steps can generate."""
    arms, budget = name_list(comparison.arms, ARMS), comparison.tokens
    every_arm = set.intersection(*(set(ARMS[arm]) for arm in arms))
    refuse_set_for_every_run(
        args,
        {"seed": "from --seeds", "token_budget": "from --tokens"} | {k: "from each arm in --arms" for k in every_arm},
    )
    seeds = int_list(comparison.seeds, "--seeds")
    runs = {arm: [replace(args, **ARMS[arm], seed=seed, token_budget=budget) for seed in seeds] for arm in arms}
    refuse_same_runs(runs, given=options_given(args, sorted({k for arm in arms for k in ARMS[arm]})))
    for arm in arms:
        one = runs[arm][0]
        most = one.prompts_per_step * trajectories(one) * one.max_turns * one.max_step_tokens  # one step at most
        if budget < most:
            raise UsageError(
                f"--tokens {budget} is below one step of the arm {arm}: --prompts_per_step {one.prompts_per_step} x "
                f"{trajectories(one)} trajectories x --max_turns {one.max_turns} x --max_step_tokens "
                f"{one.max_step_tokens} = up to {most} tokens; give --tokens {most} or more, or a smaller step"
            )
        if args.num_steps * most < budget:
            raise UsageError(
                f"--num_steps {args.num_steps} steps of the arm {arm} generate at most {args.num_steps * most} "
                f"tokens, fewer than --tokens {budget}: raise --num_steps (or lower --tokens)"
            )
    return runs


def main(args: tree_grpo.Args, comparison: Comparison):
    runs, budget, samples = plan(args, comparison), comparison.tokens, comparison.eval_samples

    def summarize(run):
        tokens = run["budget"]["generated_tokens"]
        if tokens < budget:
            raise UsageError(
                f"a run stopped after --num_steps {args.num_steps} steps with {tokens} of the {budget} tokens of "
                f"--tokens generated: raise --num_steps (or lower --tokens)"
            )
        records = logged(run)
        evals = [r for r in records if "eval/em_multihop" in r]  # every held-out evaluation, with its tokens
        at = {f"em_multihop_at_{budget * f / 4000:g}k": em_at_budget(evals, budget * f // 4) for f in (1, 2, 3)}
        sampled = {}
        if samples:  # the sampled policy at each quarter; the namesake check at the end
            for f in (1, 2, 3, 4):
                name = f"sampled_em_multihop_at_{budget * f / 4000:g}k"
                sampled[name] = first_past(evals, "eval/sampled_em_multihop", budget * f // 4)
            sampled |= {k: run["after"][k] for k in ("found_person", "sampled_found_person") if k in run["after"]}
        last_steps = max(1, len(records[1:]) // 4)  # the final training steps (a quarter of them) the reward averages
        return at | {
            "em_multihop": run["after"]["em_multihop"],
            "em_1hop": run["after"]["em_1hop"],
            **sampled,
            "tool_calls": run["after"]["tool_calls"],
            "trajectories_per_1k_tokens": 1000 * run["budget"]["trajectories"] / tokens,
            "steps": records[-1]["step"],
            "train_reward_last_quarter": sum(r["reward"] for r in records[1:][-last_steps:]) / last_steps,
        }

    key = "eval/sampled_em_multihop" if samples else "eval/em_multihop"

    def curve(run):  # held-out multi-hop EM (sampled with --eval_samples) against the generated tokens (thousands)
        points = [p for p in logged(run) if key in p]
        return [p["budget/generated_tokens"] / 1000 for p in points], [p[key] for p in points]

    arms = comparison.arms
    name = "tree_grpo_compare" if arms == DEFAULT_ARMS else "tree_grpo_" + arms.replace(",", "_vs_")
    out = f"{args.output_dir}/tree_grpo_compare/{name}"
    title = (
        f"chain GRPO (G={args.group_size}) vs Tree-GRPO (M={args.num_trees}, N={args.expand_nodes}, "
        f"L={args.expand_rounds}, K={args.keep_leaves}) at {budget / 1000:g}k generated tokens, tiny model"
    )
    labels = ("generated tokens (thousands)", "held-out multi-hop EM" + (", sampled" if samples else ""))
    settings = asdict(args) | asdict(comparison)
    train = partial(tree_grpo.train, sampled_evals=sampled_evals(budget, samples))
    return seed_sweep(train, runs, summarize, out, settings, curve=curve, curve_labels=labels, title=title)


ARGS = (tree_grpo.Args, Comparison)  # the script's options and the comparison's

if __name__ == "__main__":
    run_cli(ARGS, main)
