"""Tree-GRPO's step-level credit where the policy can take the step: a table of logits, one decisive step.

    python experiments/tree_credit.py        # RESULTS.md's comparison: 4 arms, d = 1 and 6, luck 0 and 2, seeds 0-9
    python experiments/tree_credit.py --seeds 0,1,2 --decisive 6 --luck 2 --arms chain,tree   # a smaller one

The problem: a question q, then H steps; at each step the policy picks one of C actions from a table of logits
indexed by (question, step): (Q, H, C) parameters, all 0 at the start (uniform). One step d is decisive: the reward
is 1 if the action at step d is the question's correct one (q mod C), else 0; the other steps do not matter. With
luck b > 0 the environment's answer to the first step also pays a bonus b with probability 1/2 (a search that
happened to return a good page): no action controls it, and every leaf below that first step shares it.
The arms, trained on the same number of sampled actions (the budget; an action drawn is one sampled step):
    chain       G chains per question, chain GRPO's advantages (tree_grpo.py's chain rollout: G one-leaf trees,
                tree_advantages, whose A_intra is then 0: A is the group z-score)
    tree        M trees per question grown as tree_grpo.tree_rollout grows them (one chain each, then L rounds of N
                nodes drawn uniformly with replacement among the root and the non-leaf nodes, each continued to a
                leaf), every leaf kept, A = tree_grpo.tree_advantages = A_inter + A_intra
    tree_inter  the same trees, A_inter alone: GRPO over a question's leaves, no sibling contrast
    tree_intra  the same trees, A_intra alone: the sibling contrast alone
Each leaf is its own trajectory in the loss, so a step shared by several leaves gets the sum of their advantages.
The loss is tree_grpo.py's on-policy one (ratio 1, dapo: a token mean over the batch), AdamW and the clip of the
gradient's norm at 1 as there, one update per batch. Read: P(correct action at step d), exact from the table,
averaged over the questions, after each update, against the actions sampled so far; the actions sampled until it
first reaches 0.9. And, at the uniform policy, how much each arm's gradient says about the decision per sampled
action (`decision_signal`).

Settings, declared in RESULTS.md ("Tree-GRPO's step-level credit, on a policy that can take the step") before the
full run: H = 6, C = 4, Q = 4 questions in every batch, chain G = 4 against trees M = 2, N = 2, L = 1 (6 leaves for
~26 actions a question, against 4 for 24), lr 0.05, a budget of 20,000 sampled actions, d = 1 and 6, luck 0 and
2, seeds 0-9.
The notebook (tutorials/05_tree_grpo.ipynb) calls compare(seeds=range(5)) and plot(result, axes).
"""

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tree_grpo.py, plumbing.py

from experiments.sweep import check_out, int_list, name_list  # noqa: E402
from plumbing import UsageError, arg, check_args_shared, run_cli  # noqa: E402
from tree_grpo import policy_loss as tree_grpo_loss  # noqa: E402
from tree_grpo import tree_advantages  # noqa: E402

ARMS = {  # arm: (rollout, the terms of tree_advantages it keeps)
    "chain": ("chain", "both"),
    "tree": ("tree", "both"),
    "tree_inter": ("tree", "inter"),
    "tree_intra": ("tree", "intra"),
}


@dataclass
class Setting:
    """One run's problem, rollout and optimiser."""

    horizon: int = 6  # H, steps per trajectory
    choices: int = 4  # C, actions per step
    decisive: int = 6  # d, the step whose action is rewarded (1..H)
    luck: float = 0.0  # b, the bonus the environment pays at random (p = 1/2) after the first step
    questions: int = 4  # Q, in every batch; question q's correct action is q mod C
    group_size: int = 4  # chain: G trajectories per question
    num_trees: int = 2  # tree: M trees per question
    expand_nodes: int = 2  # tree: N nodes expanded per tree and round
    expand_rounds: int = 1  # tree: L rounds
    learning_rate: float = 0.05  # AdamW, no weight decay
    budget: int = 20000  # sampled actions per run
    target: float = 0.9  # read: the sampled actions until P(correct at d) first reaches this


# ----------------------------------------------------------------------------------------------------------------
# The rollouts: trees grown as tree_grpo.tree_rollout grows them, on the decision problem


@dataclass
class Tree:
    """One question's tree. Node 0 is the root (depth 0); node i took action[i] at step depth[i]; a leaf has depth
    H. luck[i]: the bonus the environment paid after the first step on node i's path (0 at the root)."""

    parent: list[int] = field(default_factory=lambda: [-1])
    depth: list[int] = field(default_factory=lambda: [0])
    action: list[int] = field(default_factory=lambda: [-1])
    luck: list[float] = field(default_factory=lambda: [0.0])
    sampled: int = 0  # actions drawn to grow it: one per node below the root

    def path(self, node: int) -> list[int]:
        """The actions from the root to `node`, in step order."""
        actions = []
        while node > 0:
            actions.append(self.action[node])
            node = self.parent[node]
        return actions[::-1]

    def leaves(self, horizon: int) -> list[int]:
        return [i for i, d in enumerate(self.depth) if d == horizon]

    def open_nodes(self, horizon: int) -> list[int]:
        """The root and the non-leaf nodes: where tree_grpo.py draws the nodes it expands."""
        return [i for i, d in enumerate(self.depth) if d < horizon]


def expand(tree: Tree, node: int, cumulative, luck: float, rng) -> int:
    """Continue `node` to a new leaf: H - depth(node) actions, step k's drawn from cumulative[k - 1], the running
    sum of the policy's probabilities (H, C). Returns the new leaf."""
    start = tree.depth[node]
    horizon, choices = cumulative.shape
    u = rng.random((horizon - start, 1))  # (steps, 1): each action is the first whose cumulative probability passes u
    actions = np.minimum((u >= cumulative[start:]).sum(1), choices - 1)  # (steps,)
    bonus = luck * float(rng.random() < 0.5) if start == 0 else tree.luck[node]  # the environment's, after step 1
    for depth, action in enumerate(actions.tolist(), start + 1):
        tree.parent.append(node)
        tree.depth.append(depth)
        tree.action.append(action)
        tree.luck.append(bonus)
        node = len(tree.depth) - 1
    tree.sampled += horizon - start
    return node


def grow_tree(probs, num_nodes: int, num_rounds: int, luck: float, rng) -> Tree:
    """tree_grpo.tree_rollout for one tree: one chain, then num_rounds rounds of num_nodes nodes drawn uniformly
    with replacement among the root and the non-leaf nodes (of the tree as it was before the round), each continued
    to a leaf: 1 + N*L leaves. num_nodes = 0: one chain. probs: (H, C)."""
    cumulative = probs.cumsum(-1)  # (H, C)
    tree = Tree()
    expand(tree, 0, cumulative, luck, rng)
    for _ in range(num_rounds):
        candidates = tree.open_nodes(len(probs))
        for i in rng.integers(len(candidates), size=num_nodes).tolist():
            expand(tree, candidates[i], cumulative, luck, rng)
    return tree


def rollout(probs, setting: Setting, kind: str, rng):
    """Every question's trees (chain: G one-leaf trees), every leaf kept. probs: (Q, H, C). Returns the leaves'
    actions (leaves, H), rewards, question ids and tree ids (leaves,), and the actions sampled."""
    num_trees, num_nodes = (setting.group_size, 0) if kind == "chain" else (setting.num_trees, setting.expand_nodes)
    paths, rewards, question_ids, tree_ids, sampled = [], [], [], [], 0
    for q in range(len(probs)):
        for t in range(num_trees):
            tree = grow_tree(probs[q], num_nodes, setting.expand_rounds, setting.luck, rng)
            sampled += tree.sampled
            for leaf in tree.leaves(setting.horizon):
                path = tree.path(leaf)
                paths.append(path)
                rewards.append(float(path[setting.decisive - 1] == q % setting.choices) + tree.luck[leaf])
                question_ids.append(q)
                tree_ids.append(t)
    return torch.tensor(paths), torch.tensor(rewards), torch.tensor(question_ids), torch.tensor(tree_ids), sampled


def policy_loss(logits, paths, question_ids, advantages):
    """tree_grpo.py's own loss on-policy (every ratio 1, dapo): -A of each leaf on each of its H actions, a mean
    over all of them. logits: (Q, H, C); paths: (leaves, H); question_ids, advantages: (leaves,)."""
    steps = torch.arange(paths.shape[1])
    log_probs = logits.log_softmax(-1)[question_ids[:, None], steps, paths]  # (leaves, H)
    on_policy = log_probs.detach()  # pi_old = pi_theta: the ratio is 1, its gradient is not 0
    return tree_grpo_loss(log_probs, on_policy, None, advantages.to(log_probs.dtype), torch.ones_like(log_probs))[0]


def p_correct(logits, setting: Setting) -> float:
    """P(correct action at the decisive step), averaged over the questions: the learning curve."""
    probs = logits.detach().softmax(-1)[:, setting.decisive - 1]  # (Q, C)
    questions = torch.arange(len(probs))
    return probs[questions, questions % setting.choices].mean().item()


# ----------------------------------------------------------------------------------------------------------------
# One run, and what the gradient says about the decision


def train(setting: Setting, arm: str, seed: int) -> dict:
    """One arm, one seed: updates until `budget` actions are sampled. Returns the curve [(sampled, P)] and the
    reads. Every tree arm of a seed draws the same tree shapes (the node picks use the same random stream)."""
    kind, terms = ARMS[arm]
    rng = np.random.default_rng(seed)
    logits = torch.zeros(setting.questions, setting.horizon, setting.choices, requires_grad=True)  # (Q, H, C)
    optimizer = torch.optim.AdamW([logits], lr=setting.learning_rate, weight_decay=0.0)
    sampled, curve = 0, [(0, p_correct(logits, setting))]
    while sampled < setting.budget:
        probs = logits.detach().double().softmax(-1).numpy()  # (Q, H, C)
        paths, rewards, question_ids, tree_ids, spent = rollout(probs, setting, kind, rng)
        advantages = tree_advantages(rewards, question_ids, tree_ids, terms=terms)  # (leaves,)
        loss = policy_loss(logits, paths, question_ids, advantages)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([logits], 1.0)  # tree_grpo.py's max_grad_norm (a table's norm stays below it)
        optimizer.step()
        sampled += spent
        curve.append((sampled, p_correct(logits, setting)))
    reached = next((x for x, p in curve if p >= setting.target), None)
    return {"seed": seed, "sampled_to_target": reached, "p_at_quarter": at(curve, setting.budget / 4),
            "updates": len(curve) - 1, "curve": curve}  # fmt: skip


def decision_signal(setting: Setting, arm: str, batches: int = 1000, seed: int = 0) -> dict:
    """What one question's batch of leaves tells the decision, at the uniform policy: the gradient g of the loss on
    the correct action's logit at step d, over `batches` batches. signal = mean(g)^2 / var(g) adds up over
    independent batches, so signal per 1,000 sampled actions compares arms at one budget (higher: fewer actions
    for the same certainty about the direction of the update). zero: the share of batches whose g is 0."""
    kind, terms = ARMS[arm]
    rng = np.random.default_rng(seed)
    logits = torch.zeros(1, setting.horizon, setting.choices, requires_grad=True)  # (1, H, C): one question
    probs = logits.detach().double().softmax(-1).numpy()
    grads, sampled = [], 0
    for _ in range(batches):
        paths, rewards, question_ids, tree_ids, spent = rollout(probs, setting, kind, rng)
        advantages = tree_advantages(rewards, question_ids, tree_ids, terms=terms)
        (grad,) = torch.autograd.grad(policy_loss(logits, paths, question_ids, advantages), logits)
        grads.append(-grad[0, setting.decisive - 1, 0].item())  # ascent on the correct action (question 0: action 0)
        sampled += spent
    grads = np.array(grads)
    snr2 = grads.mean() ** 2 / grads.var(ddof=1)
    return {"signal_per_1k": float(1000 * snr2 / (sampled / batches)), "sampled_per_batch": sampled / batches,
            "zero": float((np.abs(grads) < 1e-9).mean())}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The comparison, its plot, the command line


def at(curve, x: float) -> float:
    """P at `x` sampled actions: the value after the last update that had sampled at most x."""
    return [p for sampled, p in curve if sampled <= x][-1]


def panel(decisive: int, luck: float) -> str:
    return f"d={decisive}, luck={luck:g}"


def compare(decisive=(1, 6), luck=(0.0, 2.0), seeds=range(5), arms=("chain", "tree"), **settings) -> dict:
    """Every arm for every seed at each decisive step and luck (settings: other fields of Setting). Returns
    {"settings", "grid", "runs", "mean", "std", "summary"}; runs, mean, std and summary are keyed by
    panel(d, luck), then arm: each seed's run, P on the grid (mean and std over seeds), the reads over seeds."""
    base = Setting(**settings)
    grid = np.linspace(0, base.budget, 49).tolist()
    result = {"settings": asdict(base) | {"decisive": list(decisive), "luck": list(luck), "seeds": list(seeds),
              "arms": list(arms)}, "grid": grid, "runs": {}, "mean": {}, "std": {}, "summary": {}}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few dozen numbers: one thread is faster (and leaves the other core)
    try:
        for b in luck:
            for d in decisive:
                setting, key = replace(base, decisive=d, luck=b), panel(d, b)
                for name in ("runs", "mean", "std", "summary"):
                    result[name][key] = {}
                for arm in arms:
                    runs = [train(setting, arm, seed) for seed in seeds]
                    values = np.array([[at(run["curve"], x) for x in grid] for run in runs])  # (seeds, grid)
                    result["runs"][key][arm] = runs
                    result["mean"][key][arm] = values.mean(0).tolist()
                    result["std"][key][arm] = values.std(0, ddof=1).tolist() if len(runs) > 1 else [0.0] * len(grid)
                    result["summary"][key][arm] = summarize(runs, setting)
    finally:
        torch.set_num_threads(threads)
    return result


def signal_by_step(luck=(0.0, 2.0), arms=("chain", "tree"), batches: int = 1000, **settings) -> dict:
    """decision_signal for every decisive step d = 1..H and luck: {panel(d, luck): {arm: decision_signal}}."""
    base, signal = Setting(**settings), {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in luck:
            for d in range(1, base.horizon + 1):
                setting = replace(base, decisive=d, luck=b)
                signal[panel(d, b)] = {arm: decision_signal(setting, arm, batches) for arm in arms}
    finally:
        torch.set_num_threads(threads)
    return signal


def summarize(runs, setting: Setting) -> dict:
    """Over seeds: the actions sampled to reach the target (mean, std, each seed's; runs that never reached it
    count as the budget and are counted in not_reached), and P after a quarter of the budget."""
    reached = [run["sampled_to_target"] for run in runs]
    values = np.array([setting.budget if r is None else r for r in reached], dtype=float)
    quarter = np.array([run["p_at_quarter"] for run in runs])
    spread = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"to_target_mean": float(values.mean()), "to_target_std": spread(values), "to_target": reached,
            "not_reached": reached.count(None), "p_at_quarter_mean": float(quarter.mean()),
            "p_at_quarter_std": spread(quarter), "updates": [run["updates"] for run in runs]}  # fmt: skip


def plot(result: dict, axes=None):
    """One panel per (luck, d), rows by luck: each arm's mean P over seeds against the sampled actions, a band of
    ± one std, the target dashed. axes: as many matplotlib Axes (any shape), or None for a new Figure (no pyplot).
    Returns the figure."""
    keys = list(result["mean"])
    lucks = result["settings"]["luck"]
    if axes is None:
        from matplotlib.figure import Figure  # no backend switch in the caller's notebook

        rows, cols, signal = len(lucks), len(keys) // len(lucks), "signal" in result
        grid_axes = Figure(figsize=(4.2 * (cols + signal), 3.3 * rows), layout="constrained").subplots(
            rows, cols + signal, squeeze=False
        )
        axes = grid_axes[:, :cols]
        for b, ax in zip(lucks, grid_axes[:, -1] if signal else []):  # a last column: decision_signal against d
            plot_signal(result["signal"], ax, b)
    axes = list(np.ravel(axes))
    grid = np.array(result["grid"])
    settings = result["settings"]
    for ax, key in zip(axes, keys):
        for i, arm in enumerate(result["mean"][key]):
            mean, std = np.array(result["mean"][key][arm]), np.array(result["std"][key][arm])
            summary, runs = result["summary"][key][arm], len(settings["seeds"])
            label = f"{arm}: {summary['to_target_mean']:,.0f} ± {summary['to_target_std']:,.0f}"
            if summary["not_reached"]:
                label = f"{arm}: reached in {runs - summary['not_reached']} of {runs} runs"
            ax.plot(grid, mean, color=f"C{i}", label=label)
            ax.fill_between(grid, mean - std, np.minimum(mean + std, 1.0), color=f"C{i}", alpha=0.2)
        ax.axhline(settings["target"], color="gray", linestyle="--", linewidth=0.8)
        decisive, luck = key.split(", ")
        ax.set(xlabel="sampled actions", ylabel="P(correct action at step d)", ylim=(0, 1.02),
               title=f"{decisive} of H={settings['horizon']}, {luck}")  # fmt: skip
        ax.legend(
            fontsize=7, loc="lower right", title=f"sampled actions to P = {settings['target']:g}", title_fontsize=7
        )
        ax.grid(alpha=0.3)
    figure = axes[0].figure
    figure.suptitle(f"chain GRPO (G={settings['group_size']}) vs Tree-GRPO (M={settings['num_trees']}, "
                    f"N={settings['expand_nodes']}, L={settings['expand_rounds']}): the decisive step's probability, "
                    f"mean ± std over {len(settings['seeds'])} seeds", fontsize=9)  # fmt: skip
    return figure


def plot_signal(signal: dict, ax, luck: float = 0.0):
    """signal_by_step's signal per 1,000 sampled actions against the decisive step d, one line per arm, at one
    luck."""
    rows = {
        int(key.split(",")[0].removeprefix("d=")): arms
        for key, arms in signal.items()
        if key.endswith(f", luck={luck:g}")
    }
    steps = sorted(rows)
    for i, arm in enumerate(rows[steps[0]]):
        ax.plot(steps, [rows[d][arm]["signal_per_1k"] for d in steps], "o-", color=f"C{i}", label=arm)
    ax.set(xlabel="decisive step d", ylabel="signal per 1,000 sampled actions", xticks=steps, ylim=(0, None),
           title=f"signal on step d per action, luck={luck:g}")  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def table(result: dict) -> str:
    """A markdown table of the reads: one row per panel and arm."""
    lines = ["| d, luck | arm | sampled actions to P >= target | not reached | P at a quarter of the budget |",
             "|---|---|---|---|---|"]  # fmt: skip
    for key, arms in result["summary"].items():
        for arm, s in arms.items():
            reached = f"{s['to_target_mean']:,.0f} ± {s['to_target_std']:,.0f}"
            quarter = f"{s['p_at_quarter_mean']:.3f} ± {s['p_at_quarter_std']:.3f}"
            lines.append(f"| {key} | {arm} | {reached} | {s['not_reached']} | {quarter} |")
    return "\n".join(lines)


@dataclass
class Args:
    seeds: str = arg("0,1,2,3,4,5,6,7,8,9", "comma-separated seeds, each run once per arm and panel")
    decisive: str = arg("1,6", "the decisive steps d, one panel each (1..H)")
    luck: str = arg("0,2", "the environment's bonus b after the first step, one panel row each (>= 0)")
    arms: str = arg(",".join(ARMS), "some of " + ", ".join(ARMS))
    horizon: int = arg(6, "H, steps per trajectory", ">= 1")
    choices: int = arg(4, "C, actions per step", ">= 2")
    questions: int = arg(4, "Q, questions in every batch", ">= 1")
    group_size: int = arg(4, "chain: G trajectories per question", ">= 2")
    num_trees: int = arg(2, "tree: M trees per question", ">= 1")
    expand_nodes: int = arg(2, "tree: N nodes expanded per tree and round", ">= 0")
    expand_rounds: int = arg(1, "tree: L expansion rounds", ">= 0")
    learning_rate: float = arg(0.05, "AdamW learning rate", "> 0")
    budget: int = arg(20000, "sampled actions per run", ">= 1")
    target: float = arg(0.9, "read the sampled actions until P(correct at d) reaches this", "(0, 1)")
    signal_batches: int = arg(2000, "batches per arm and step d for decision_signal (0: skip it)", ">= 0")
    out: str = arg("assets/tree_credit", "writes OUT.json and OUT.png")

    def __post_init__(self):
        check_args_shared(self)
        int_list(self.seeds, "--seeds")
        if bad := [d for d in int_list(self.decisive, "--decisive", least=1) if d > self.horizon]:
            raise UsageError(f"--decisive must be steps between 1 and --horizon {self.horizon}, got {bad[0]}")
        try:
            luck = [float(b) for b in self.luck.split(",")]
        except ValueError:
            raise UsageError(f"--luck must be comma-separated numbers, got {self.luck!r}") from None
        if not all(0 <= b < float("inf") for b in luck):
            raise UsageError(f"--luck must be at least 0, got {self.luck}")
        if len(set(luck)) != len(luck):
            raise UsageError(f"--luck repeats a value ({self.luck})")
        arms, leaves = name_list(self.arms, ARMS), 1 + self.expand_nodes * self.expand_rounds  # leaves of a tree
        if (trees := [arm for arm in arms if ARMS[arm][0] == "tree"]) and leaves == 1:
            raise UsageError(
                f"--expand_nodes {self.expand_nodes} x --expand_rounds {self.expand_rounds} leaves each tree one "
                f"chain: {', '.join(trees)} would be chain GRPO, without a sibling to contrast; raise both, or --arms "
                "chain"
            )
        # the most actions one batch samples: every question's chains, or trees of `leaves` chains each
        per_question = [self.group_size if arm == "chain" else self.num_trees * leaves for arm in arms]
        batch = self.questions * self.horizon * max(per_question)
        if self.budget < batch:
            raise UsageError(
                f"--budget {self.budget} is below one batch ({batch} actions at most); give {batch} or more"
            )
        if self.signal_batches == 1:
            raise UsageError("--signal_batches must be 0 (skip it) or at least 2 (its variance is over batches)")
        check_out(self.out, "--out")


def main(args: Args):
    start = time.time()
    settings = {
        k: v for k, v in asdict(args).items() if k in Setting.__dataclass_fields__ and k not in ("decisive", "luck")
    }
    decisive, luck = [int(d) for d in args.decisive.split(",")], [float(b) for b in args.luck.split(",")]
    result = compare(decisive, luck, [int(s) for s in args.seeds.split(",")], args.arms.split(","), **settings)
    if args.signal_batches:  # what each arm's gradient says about the decision at each step d, at the start
        result["signal"] = signal_by_step(luck, args.arms.split(","), args.signal_batches, **settings)
    result["wall_time_s"] = time.time() - start
    print(table(result))
    if "signal" in result:
        arms = args.arms.split(",")
        print(f"\nsignal per 1,000 sampled actions at the uniform policy\n\n| d, luck | {' | '.join(arms)} |")
        print("|---" * (len(arms) + 1) + "|")
        for key, row in result["signal"].items():
            print(f"| {key} | " + " | ".join(f"{row[a]['signal_per_1k']:.1f}" for a in arms) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result).savefig(out.with_suffix(".png"), dpi=90)
    for arms in result["runs"].values():  # the JSON keeps each run's P on the grid, not after every update
        for run in (run for runs in arms.values() for run in runs):
            curve = run.pop("curve")
            run["p_on_grid"] = [round(at(curve, x), 4) for x in result["grid"]]
    for name in ("mean", "std"):
        result[name] = {key: {arm: [round(p, 4) for p in ps] for arm, ps in arms.items()}
                        for key, arms in result[name].items()}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(result | {"args": asdict(args)}, indent=1))
    print(f"[tree_credit] {result['wall_time_s']:.0f} s; numbers and curves in {out}.json, the plot in {out}.png")
    return result


if __name__ == "__main__":
    run_cli(Args, main)
