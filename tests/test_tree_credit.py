"""experiments/tree_credit.py: the tree sampler's accounting on a hand-built tree, a shared step's summed advantage
by hand, chain advantages as GRPO's z-scores, the sign of the decision's gradient, the same seed's same run, and
the comparison's table, plot and command line at a small budget."""

import numpy as np
import pytest
import torch

import plumbing
from experiments import tree_credit as TC


def fixed(actions, choices):
    """Cumulative probabilities (H, C) that make expand() take actions[k] at step k + 1, whatever u is."""
    probs = np.zeros((len(actions), choices))
    probs[np.arange(len(actions)), actions] = 1.0
    return probs.cumsum(-1)


def test_a_hand_built_tree_counts_each_sampled_action_once():
    rng, tree = np.random.default_rng(0), TC.Tree()
    first = TC.expand(tree, 0, fixed([1, 0, 1, 0], 2), 0.0, rng)  # the init chain: nodes 1-4, 4 actions
    assert (first, tree.sampled) == (4, 4)
    TC.expand(tree, 2, fixed([1, 1, 0, 1], 2), 0.0, rng)  # from depth 2: steps 3 and 4 only, nodes 5-6
    TC.expand(tree, 0, fixed([0, 0, 0, 0], 2), 0.0, rng)  # from the root: a new chain, nodes 7-10
    assert tree.sampled == 4 + 2 + 4 == len(tree.depth) - 1
    assert tree.leaves(4) == [4, 6, 10]
    assert [tree.path(leaf) for leaf in tree.leaves(4)] == [[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert tree.open_nodes(4) == [0, 1, 2, 3, 5, 7, 8, 9]  # the root and every non-leaf node: expansion's choices
    assert tree.parent[5] == 2 and tree.depth[5] == 3


@pytest.mark.parametrize("num_nodes, num_rounds", [(0, 0), (2, 1), (3, 2)])
def test_grown_trees_have_1_plus_n_l_leaves_and_cost_what_they_sampled(num_nodes, num_rounds):
    rng, probs = np.random.default_rng(1), np.full((5, 3), 1 / 3)
    for _ in range(20):
        tree = TC.grow_tree(probs, num_nodes, num_rounds, 0.0, rng)
        assert len(tree.leaves(5)) == 1 + num_nodes * num_rounds
        assert tree.sampled == len(tree.depth) - 1 <= 5 * (1 + num_nodes * num_rounds)


def test_expansions_start_uniformly_at_the_root_or_a_non_leaf_node():
    # one expansion of a chain of H = 6 starts at the root (a second depth-1 node) 1 time in 6
    rng, probs = np.random.default_rng(2), np.full((6, 2), 0.5)
    trees = [TC.grow_tree(probs, 1, 1, 0.0, rng) for _ in range(1200)]
    from_root = np.mean([tree.depth.count(1) == 2 for tree in trees])
    assert abs(from_root - 1 / 6) < 0.05, from_root
    assert np.mean([tree.sampled for tree in trees]) == pytest.approx(6 + 3.5, abs=0.2)  # 6 + (6+5+...+1)/6


def test_every_leaf_shares_the_luck_of_its_first_step():
    rng, probs = np.random.default_rng(3), np.full((4, 2), 0.5)
    for _ in range(20):
        tree = TC.grow_tree(probs, 3, 2, 2.0, rng)
        for leaf in tree.leaves(4):
            node = leaf
            while tree.depth[node] > 1:
                node = tree.parent[node]
            assert tree.luck[leaf] == tree.luck[node] in (0.0, 2.0)


def test_a_shared_step_gets_the_sum_of_its_leaves_advantages():
    # d = 2, correct action 0; tree A: [0,0] (1), then from its step-1 node [0,1] (0), from the root [1,1] (0);
    # tree B: [1,0] (1), then from its step-1 node [1,1] (0), from the root [0,0] (1): the paper's example
    trees = []
    for chain, branch, new in (([0, 0], [0, 1], [1, 1]), ([1, 0], [1, 1], [0, 0])):
        rng, tree = np.random.default_rng(0), TC.Tree()
        TC.expand(tree, 0, fixed(chain, 2), 0.0, rng)
        TC.expand(tree, 1, fixed(branch, 2), 0.0, rng)
        TC.expand(tree, 0, fixed(new, 2), 0.0, rng)
        trees.append(tree)
    paths = torch.tensor([tree.path(leaf) for tree in trees for leaf in tree.leaves(2)])  # (6, 2)
    rewards = (paths[:, 1] == 0).float()
    assert rewards.tolist() == [1, 0, 0, 1, 0, 1]
    advantages = TC.tree_advantages(rewards, [0] * 6, [0, 0, 0, 1, 1, 1])
    # by hand (tree_grpo's worked example): A_inter +-0.9129, A_intra A (1.1547, -0.5774, -0.5774)
    torch.testing.assert_close(advantages[:3], torch.tensor([2.0676, -1.4903, -1.4903]), atol=1e-4, rtol=0)
    # tree A's step-1 node (action 0) lies under leaves 0 and 1: 2.0676 - 1.4903 = 0.5774 = 2 (1/2 - 1/3) / 0.5774
    assert (advantages[0] + advantages[1]).item() == pytest.approx(0.5774, abs=1e-4)
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(TC.policy_loss(logits, paths, torch.zeros(6, dtype=torch.long), advantages), logits)
    # each node once, weighted by the summed advantage of the leaves under it: -(sum_nodes w (e_a - pi)) / (6 * 2)
    expected = torch.zeros(1, 2, 2)
    for tree, offset in zip(trees, (0, 3)):
        weight = {}
        for i, leaf in enumerate(tree.leaves(2)):
            node = leaf
            while node > 0:
                weight[node] = weight.get(node, 0.0) + advantages[offset + i].item()
                node = tree.parent[node]
        for node, w in weight.items():
            expected[0, tree.depth[node] - 1] -= w * (torch.eye(2)[tree.action[node]] - 0.5) / 12
    torch.testing.assert_close(grad, expected)
    assert len(trees[0].depth) - 1 == 5  # tree A: 5 nodes for its leaves' 6 steps, the step-1 node shared


def test_chain_advantages_are_grpo_z_scores():
    setting = TC.Setting(horizon=3, choices=3, decisive=2, luck=2.0, questions=3, group_size=4)
    probs = np.full((3, 3, 3), 1 / 3)
    paths, rewards, question_ids, tree_ids, sampled = TC.rollout(probs, setting, "chain", np.random.default_rng(4))
    assert paths.shape == (12, 3) and sampled == 3 * 4 * 3  # G chains of H actions per question
    advantages = TC.tree_advantages(rewards, question_ids, tree_ids)
    for q in range(3):
        r = rewards[question_ids == q].numpy()
        expected = (r - r.mean()) / (r.std(ddof=1) + 1e-6) if r.std() > 0 else np.zeros(4)
        np.testing.assert_allclose(advantages[question_ids == q].numpy(), expected, atol=1e-5)
    assert set(rewards.tolist()) <= {0.0, 1.0, 2.0, 3.0}


@pytest.mark.parametrize("arm", list(TC.ARMS))
def test_the_decisions_gradient_is_never_wrong_in_sign_without_luck(arm):
    """What RESULTS.md's reading rests on: without luck the correct action's logit at step d is pushed up by every
    batch that has a success and a failure, and never down; with luck some batches push it down."""
    setting = TC.Setting(decisive=4, questions=1)
    logits = torch.zeros(1, 6, 4, requires_grad=True)
    probs = logits.detach().double().softmax(-1).numpy()
    for luck, wrong_sign in ((0.0, False), (2.0, True)):
        rng, signs = np.random.default_rng(5), []
        for _ in range(200):
            paths, rewards, q, t, _ = TC.rollout(probs, TC.replace(setting, luck=luck), TC.ARMS[arm][0], rng)
            advantages = TC.tree_advantages(rewards, q, t, terms=TC.ARMS[arm][1])
            (grad,) = torch.autograd.grad(TC.policy_loss(logits, paths, q, advantages), logits)
            signs.append(-grad[0, 3, 0].item())
        assert (min(signs) < -1e-6) == wrong_sign, (luck, min(signs))


def test_the_same_seed_gives_the_same_run_and_training_learns():
    setting = TC.Setting(decisive=3, luck=2.0, budget=1500)
    first, again = TC.train(setting, "tree", 0), TC.train(setting, "tree", 0)
    assert first == again
    assert TC.train(setting, "tree", 1)["curve"] != first["curve"]
    run = TC.train(TC.replace(setting, luck=0.0, budget=3000), "chain", 0)
    assert run["curve"][0] == (0, pytest.approx(0.25)) and run["curve"][-1][1] > 0.5
    assert run["curve"][-1][0] >= 3000 > run["curve"][-2][0]  # stops at the first update past the budget


def test_compare_table_and_plot_at_a_small_budget():
    from matplotlib.figure import Figure

    result = TC.compare(decisive=(1, 3), luck=(0.0, 1.0), seeds=(0, 1), arms=("chain", "tree"), horizon=3,
                        budget=600)  # fmt: skip
    assert list(result["mean"]) == ["d=1, luck=0", "d=3, luck=0", "d=1, luck=1", "d=3, luck=1"]
    assert all(len(result["runs"][key][arm]) == 2 for key in result["runs"] for arm in ("chain", "tree"))
    assert all(len(curve) == len(result["grid"]) for arms in result["mean"].values() for curve in arms.values())
    assert "| d=3, luck=1 | tree |" in TC.table(result)
    result["signal"] = TC.signal_by_step(luck=(0.0, 1.0), batches=20, horizon=3)
    assert list(result["signal"]) == [f"d={d}, luck={b}" for b in (0, 1) for d in (1, 2, 3)]
    figure = TC.plot(result)  # 2 x 2 curves and a column of signal panels
    assert len(figure.axes) == 6 and all(ax.get_xlabel() and ax.get_ylabel() and ax.get_title() for ax in figure.axes)
    axes = Figure().subplots(1, 4)
    TC.plot(result, axes)
    assert axes[0].get_legend() is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--decisive", "7"], "--decisive must be steps between 1 and --horizon 6, got 7"),
        (["--arms", "chain,forest"], "--arms: unknown arm 'forest'"),
        (["--seeds", "0,0"], "--seeds repeats a value"),
        (["--luck", "0,-1"], "--luck must be at least 0"),
        (["--budget", "0"], "--budget must be at least 1"),
    ],
)
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        plumbing.parse_args(TC.Args, argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_command_writes_the_table_plot_and_every_seed(tmp_path, capsys):
    import json

    argv = ["--seeds", "0,1", "--decisive", "2", "--luck", "0,1", "--arms", "chain,tree_intra", "--horizon", "2",
            "--budget", "300", "--signal_batches", "10", "--out", str(tmp_path / "tc")]  # fmt: skip
    TC.main(plumbing.parse_args(TC.Args, argv))
    saved = json.loads((tmp_path / "tc.json").read_text())
    runs = saved["runs"]["d=2, luck=1"]["tree_intra"]
    assert [run["seed"] for run in runs] == [0, 1] and len(runs[0]["p_on_grid"]) == len(saved["grid"])
    assert list(saved["signal"]) == ["d=1, luck=0", "d=2, luck=0", "d=1, luck=1", "d=2, luck=1"]
    assert (tmp_path / "tc.png").stat().st_size > 0 and "| d=2, luck=0 | chain |" in capsys.readouterr().out
