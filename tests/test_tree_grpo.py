"""tree_grpo.py: advantages by hand, tree shape and leaf sequences, observation masking, the budget counter, the
environment (search, reward table, bad steps), the HotpotQA fixture, smoke runs and bad arguments."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT, main_runner, script_runner

import common
import grpo
import prefix_grouper as pg
import tree_grpo as T
from common import build_tiny_tokenizer
from experiments import tree_vs_chain
from tasks import namesakes

TOKENIZER = build_tiny_tokenizer(namesakes.TAGS)
KB = namesakes.make_knowledge_base(0)
TRAIN, EVAL, DEMOS, CORPUS = namesakes.make_kb_task(seed=0, demo_stop=0.5, demo_trust=0.5, num_eval=200)
SEARCH = namesakes.BM25(CORPUS)


# ----------------------------------------------------------------------------------------------------------------
# Advantages


def test_tree_advantages_by_hand():
    # one question, trees A = (1, 0, 0) and B = (1, 1, 0)
    # inter: mean 0.5, unbiased std sqrt(0.3) -> +-0.5 / 0.5477 = +-0.9129
    # intra A: mean 1/3, std sqrt(1/3) -> (1.1547, -0.5774, -0.5774); intra B: (0.5774, 0.5774, -1.1547)
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    advantages = T.tree_advantages(rewards, [0] * 6, [0, 0, 0, 1, 1, 1])
    expected = torch.tensor([2.0676, -1.4903, -1.4903, 1.4903, 1.4903, -2.0676])
    torch.testing.assert_close(advantages, expected, atol=1e-4, rtol=0)


def test_tree_advantages_groups_by_question_and_tree_in_any_order():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.2, 0.2])
    prompts, trees = [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0, 1]  # tree ids restart per question
    advantages = T.tree_advantages(rewards, prompts, trees)
    assert advantages[6:].eq(0).all()  # equal rewards: no signal; each tree of question 1 has one leaf: intra 0
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = T.tree_advantages(rewards[order], torch.tensor(prompts)[order], torch.tensor(trees)[order])
    torch.testing.assert_close(shuffled, advantages[order])


def test_chain_rollout_advantages_are_grpo_z_scores():
    # chains: every tree has one leaf, so the intra part is 0 and A is GRPO's group z-score
    rewards = torch.tensor([1.0, 0.2, 0.2, 0.0, 0.8, 0.1, 1.0, 1.0])
    advantages = T.tree_advantages(rewards, [0, 0, 0, 0, 1, 1, 1, 1], list(range(8)))
    torch.testing.assert_close(advantages, grpo.group_advantages(rewards, 4, eps=1e-6))


def test_tree_advantages_bad_input():
    with pytest.raises(ValueError, match="one length"):
        T.tree_advantages([1.0, 0.0], [0, 0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        T.tree_advantages([1.0, float("nan")], [0, 0], [0, 0])


def test_dual_clip_by_hand():
    # tokens: (A = -1, ratio 5), (A = -1, ratio 2), (A = +1, ratio 5); eps 0.2, c = 3
    # PPO clip: -min(w A, clip(w, 0.8, 1.2) A) = 5, 2, -1.2; the dual clip caps the A < 0 losses at -c A = 3
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[5.0, 2.0, 5.0]])).requires_grad_()
    advantages, mask = torch.tensor([-1.0]), torch.ones(1, 3)
    per_token = []
    for dual_clip in (None, 3.0):
        for t in range(3):
            a = advantages if t < 2 else -advantages
            loss, _ = T.policy_loss(logps[:, t : t + 1], old[:, t : t + 1], None, a, mask[:, :1], dual_clip=dual_clip)
            per_token.append(loss.item())
    assert per_token == pytest.approx([5.0, 2.0, -1.2, 3.0, 2.0, -1.2])
    # where the cap acts, that token gives no gradient (it cannot push a bad token's probability further)
    loss, _ = T.policy_loss(logps, old, None, torch.tensor([-1.0]), mask, dual_clip=3.0)
    loss.backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] != 0


@pytest.mark.parametrize("num_minibatches, num_iterations", [(1, 1), (2, 1), (2, 2)])
def test_off_policy_updates_use_old_logprobs_computed_once(tmp_path, monkeypatch, num_minibatches, num_iterations):
    """num_minibatches * num_iterations optimiser steps per rollout batch; the sampling policy's log-probs are
    computed once, before the first (in no-grad passes), and only when there is more than one step."""
    calls = {"no_grad": 0, "grad": 0}
    leaf_logprobs, step = T.leaf_logprobs, torch.optim.AdamW.step

    def counting_logprobs(*args, **kwargs):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return leaf_logprobs(*args, **kwargs)

    def counting_step(self, *args, **kwargs):  # the RL optimiser's steps (not the warm start's, at lr 3e-3)
        calls["steps"] = calls.get("steps", 0) + (self.param_groups[0]["lr"] == T.Args.learning_rate)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(T, "leaf_logprobs", counting_logprobs)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    args = T.Args(num_steps=1, sft_steps=2, num_eval=2, prompts_per_step=2, max_step_tokens=8, max_turns=2,
                  num_minibatches=num_minibatches, num_iterations=num_iterations, output_dir=str(tmp_path))  # fmt: skip
    T.train(args)
    updates = num_minibatches * num_iterations
    assert calls["grad"] == updates and calls["no_grad"] == (num_minibatches if updates > 1 else 0)
    assert calls["steps"] == updates


# ----------------------------------------------------------------------------------------------------------------
# Environment


def test_reward_table():
    think, answer = "<think>found</think>", "<answer>Tasa</answer>"
    hop = "<think>born in</think><search>Kavo</search><information>Kavo was born in Rilu.</information>"
    assert namesakes.em_format_reward(hop + think + answer, "tasa") == 1.0  # EM (case ignored), valid format
    assert namesakes.em_format_reward("<answer>the Tasa.</answer>", "Tasa") == 0.8  # EM after normalisation, no think
    assert namesakes.em_format_reward(hop + think + "<answer>Rilu</answer>", "Tasa") == 0.2  # wrong, valid
    assert namesakes.em_format_reward("<search>Kavo</search><answer>Rilu</answer>", "Tasa") == 0.1  # wrong, invalid
    assert namesakes.em_format_reward(hop + think, "Tasa") == 0.0  # no answer
    assert (
        namesakes.em_format_reward("<answer>Rilu</answer><answer>Tasa</answer>", "Tasa") == 0.8
    )  # the last one counts


def test_bad_steps_get_a_clear_observation_not_a_crash():
    assert namesakes.parse_step("<think>x</think><search>Kavo") == ("invalid", "")  # no closing tag
    assert namesakes.parse_step("<think>x</think><search>  </search>") == ("search", "")
    assert namesakes.parse_step("<think>x</think><answer> Tasa </answer>") == ("answer", "Tasa")
    hint = namesakes.run_tool("invalid", "", SEARCH, 1, 200)
    assert hint.startswith("<information>invalid step")
    assert namesakes.run_tool("search", "", SEARCH, 1, 200).startswith("<information>empty query")
    assert namesakes.run_tool("search", "Qqqq", SEARCH, 1, 200) == "<information>no results</information>"
    assert namesakes.run_tool("answer", "Tasa", SEARCH, 1, 200) == ""


def test_search_finds_every_entity_by_name():
    for title, text in CORPUS.items():
        assert SEARCH.search(title, k=1) == [text]
    # a first name finds the list of everyone who has it, one full name finds that person
    first, namesakes = next(iter(KB["namesakes"].items()))
    assert SEARCH.search(first) == [f"{first} may refer to: {', '.join(namesakes)}."] and len(namesakes) == 3


def test_kb_task_is_deterministic_and_every_question_answerable():
    again = namesakes.make_kb_task(seed=0, demo_stop=0.5, demo_trust=0.5, num_eval=200)
    assert again[0] == TRAIN and again[2] == DEMOS
    assert {x["hops"] for x in EVAL} == {1, 2, 3, 4} and {x["kind"] for x in EVAL} == set(namesakes.QUESTIONS)
    tool_calls = []
    for item in TRAIN + EVAL:
        person = item["path"][0]
        # the qualifier singles out exactly one of the namesakes the first name's document lists
        if item["first_name"] is not None:
            listed = CORPUS[item["first_name"]].removeprefix(f"{item['first_name']} may refer to: ")
            fits = [p for p in listed.rstrip(".").split(", ") if KB["facts"][p, item["qualifier"]] in item["question"]]
            assert fits == [person], item
        # every answer follows from the documents along the path
        for entity, relation, nxt in zip(item["path"], item["relations"], item["path"][1:]):
            assert f"{relation} {nxt}" in CORPUS[entity]
        # a policy without the two habits (never trusts a namesake who does not fit, never answers early) is right
        steps = namesakes.kb_trajectory(item, KB, random.Random(0), demo_stop=0.0, demo_trust=0.0)
        assert steps[-1][0].endswith(f"<answer>{item['answer']}</answer>")
        tool_calls.append(sum("<search>" in step for step, _ in steps))
    # that policy needs 1 search for a full name, up to 6 for the longest question: 3-5 on average
    assert min(tool_calls) == 1 and max(tool_calls) == 6 and 3 <= sum(tool_calls) / len(tool_calls) <= 5


def test_held_out_people_are_unseen_in_training():
    held_out = KB["held_out"]
    assert len(held_out) == 21 and {x["path"][0] for x in EVAL} == held_out
    assert not held_out & {x["path"][0] for x in TRAIN}  # no training question is about them
    assert not held_out & {x["answer"] for x in TRAIN}  # nor answered by them: they found no company
    assert not any(person in question for question, _ in DEMOS for person in held_out)


def test_demos_have_the_two_habits_to_unlearn():
    country = lambda person: KB["facts"][KB["facts"][person, "born in"], "city in"]  # noqa: E731
    listed_first = lambda x: KB["namesakes"][x["first_name"]][0]  # noqa: E731
    ambiguous = next(x for x in TRAIN if x["kind"] == "country_by_employer" and listed_first(x) != x["path"][0]
                     and country(listed_first(x)) != x["answer"])  # fmt: skip
    first = listed_first(ambiguous)  # listed first, not the one the question means, and born in another country
    # trust: goes on with the first namesake it checks, so it answers about the wrong person
    steps = [
        step for step, _ in namesakes.kb_trajectory(ambiguous, KB, random.Random(0), demo_stop=0.0, demo_trust=1.0)
    ]
    assert sum("<search>" in s for s in steps) == 3 and f"<search>{first}</search>" in steps[1]
    assert steps[-1].endswith(f"<answer>{country(first)}</answer>")
    # stop: answers with the entity in hand after the person's document (the city, not its country)
    steps = [
        step for step, _ in namesakes.kb_trajectory(ambiguous, KB, random.Random(0), demo_stop=1.0, demo_trust=0.0)
    ]
    assert steps[-1].endswith(f"<answer>{ambiguous['path'][1]}</answer>")
    # in the demos about the training questions both happen about as often as asked (half the time each; a policy
    # with both habits is right on 1-hop questions and about half the others); the rest are about other generated
    # knowledge bases; a demo's steps are trained, the observations are not
    ours = [(q, segments) for q, segments in DEMOS if q in ANSWERS]
    wrong = [q for q, segments in ours if not segments[-1][0].endswith(f"<answer>{ANSWERS[q]}</answer>")]
    assert 0.15 < len(ours) / len(DEMOS) < 0.25 and 0.3 < len(wrong) / len(ours) < 0.6, (len(ours), len(wrong))
    assert all(bool(trained) == ("<information>" not in text) for _, segments in DEMOS for text, trained in segments)


ANSWERS = {x["question"]: x["answer"] for x in TRAIN}


def test_hotpotqa_fixture_loads_and_skips_questions_without_answer(capsys):
    train, eval_items, demos, corpus = namesakes.load_hotpotqa(str(ROOT / "tests/fixtures/hotpotqa"), 10, 10)
    assert [x["answer"] for x in train] == ["Norvania", "Vey"]  # the empty-answer question is skipped
    assert "skipped 1" in capsys.readouterr().out
    assert len(eval_items) == 2 and train[0]["path"] == ["Quillworks", "Ada Venn"]
    assert corpus["Quillworks"] == "Quillworks is a paper company. It was founded by Ada Venn."
    assert namesakes.BM25(corpus).search("Quillworks", 1) == [corpus["Quillworks"]]
    question, segments = demos[0]
    assert question == train[0]["question"] and [trained for _, trained in segments] == [1, 0, 1, 0, 1]
    assert segments[2][0] == "<think>search</think><search>Ada Venn</search>" and "Norvania" in segments[4][0]


# ----------------------------------------------------------------------------------------------------------------
# Rollout: a scripted policy (two searches, then an answer) in place of the model


def scripted_steps(model, tokenizer, contexts, max_step_tokens, temperature, top_p, greedy=False):
    steps = []
    for context in contexts:
        searches = tokenizer.decode(context).count("<search>")
        text = "<think>x</think>" + ("<search>Kavo</search>" if searches < 2 else "<answer>Tasa</answer>")
        if random.random() < 0.3:  # sometimes a bad step: no closing tag
            text = "<think>x</think><search>Kav"
        steps.append((tokenizer(text, add_special_tokens=False)["input_ids"], text))
    return steps


@pytest.mark.parametrize("rollout, shape", [("tree", (2, 2, 1, 3)), ("tree", (3, 3, 2, 4)), ("chain", (4, 0, 0, 1))])
def test_tree_rollout_shape_sequences_masks_and_budget(monkeypatch, rollout, shape):
    monkeypatch.setattr(T, "generate_steps", scripted_steps)
    random.seed(0)
    m, n, rounds, k = shape
    args = replace(T.Args(), rollout=rollout, num_trees=m, expand_nodes=n, expand_rounds=rounds, keep_leaves=k,
                   group_size=m, max_turns=4)  # fmt: skip
    items = TRAIN[:3]
    prompts = [TOKENIZER(x["question"])["input_ids"] for x in items]
    budget = T.Budget()
    kept, roots = T.tree_rollout(None, TOKENIZER, prompts, SEARCH, args, random.Random(0), budget)

    assert len(roots) == 3 * m and len(kept) == 3 * m * k
    nodes = [d for r in roots for d in r.descendants()]
    for root in roots:
        assert sum(d.is_leaf for d in root.descendants()) == 1 + n * rounds  # one leaf per chain and expansion
    for q, t, leaf in kept:
        assert leaf.is_leaf and leaf.root() is roots[t] and t // m == q
        ids, mask = T.leaf_sequence(leaf)
        path = leaf.path()
        assert path[0].parent is roots[t] and all(b.parent is a for a, b in zip(path, path[1:]))
        assert ids == [i for node in path for i in node.step_ids + node.obs_ids]  # the path's steps, in order
        assert leaf.context_ids() == prompts[q] + ids
        # the loss mask is 1 exactly on generated tokens, 0 on every <information> block
        generated = TOKENIZER.decode([i for i, m_ in zip(ids, mask) if m_])
        observed = TOKENIZER.decode([i for i, m_ in zip(ids, mask) if not m_])
        steps = ["".join(node.text.partition("<information>")[0]) for node in path]
        assert generated == "".join(steps)
        assert observed == "".join(node.text[len(step) :] for node, step in zip(path, steps))
        assert observed.count("<information>") == sum(node.action != "answer" for node in path)
        assert leaf.action == "answer" or leaf.depth == args.max_turns
    # the budget counts every generated step (pruned leaves too), the non-empty searches, and every leaf
    assert budget.generated_tokens == sum(len(d.step_ids) for d in nodes)
    assert budget.tool_calls == sum(d.action == "search" for d in nodes)
    assert budget.trajectories == 3 * m * (1 + n * rounds)


def test_trees_get_more_trajectories_per_token_than_chains(monkeypatch):
    # expanding from a shared node re-uses the steps above it: 6 leaves cost less than 6 chains
    monkeypatch.setattr(T, "generate_steps", scripted_steps)
    random.seed(0)
    costs = {}
    for rollout in ("chain", "tree"):
        budget = T.Budget()
        args = replace(T.Args(), rollout=rollout)
        T.tree_rollout(None, TOKENIZER, [[1]] * 32, SEARCH, args, random.Random(0), budget)
        costs[rollout] = budget.trajectories / budget.generated_tokens
    assert costs["tree"] > 1.2 * costs["chain"]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation, greedy and sampled, on a scripted policy whose scores are known by hand


def namesake_checker(items):
    """A scripted policy: on a first-name question its k-th sample (greedy: always k = 0) searches only the
    namesake listed (k mod 3)-th, then answers right iff that is the person meant; a full-name question it searches
    and answers right. Every step draws from torch's generator, as sampling would."""
    by_question, calls = {x["question"]: x for x in items}, {"greedy": [], "k": {}}

    def steps(model, tokenizer, contexts, max_step_tokens, temperature, top_p, greedy=False):
        calls["greedy"].append(greedy)
        out = []
        for context in contexts:
            torch.rand(())
            item = next(x for q, x in by_question.items() if tokenizer.decode(context).startswith(q))
            prompt_len = len(namesakes.encode_question(tokenizer, item))
            done = tokenizer.decode(context[prompt_len:])  # the steps so far, with their observations
            if not done:  # the first step: the k-th sample of this question picks namesake k mod 3
                k = 0 if greedy else calls["k"].setdefault(item["question"], 0)
                calls["k"][item["question"]] = k + (not greedy)
                person = KB["namesakes"][item["first_name"]][k % 3] if item["first_name"] else item["path"][0]
                text = f"<think>x</think><search>{person}</search>"
            else:
                searched = done.split("<search>")[1].split("</search>")[0]
                text = f"<think>x</think><answer>{item['answer'] if searched == item['path'][0] else 'Nobody'}</answer>"
            out.append((tokenizer(text, add_special_tokens=False)["input_ids"], text))
        return out

    return steps, calls


def test_sampled_metrics_by_hand_on_a_scripted_policy(monkeypatch):
    items = EVAL[:60]
    steps, calls = namesake_checker(items)
    monkeypatch.setattr(T, "generate_steps", steps)
    encode = lambda item: namesakes.encode_question(TOKENIZER, item)  # noqa: E731
    args = T.Args()
    # by hand: a first-name question whose person is listed at position p is found by 3, 3, 2 of the 8 samples
    # k = 0..7 for p = 0, 1, 2 (k mod 3 = p), and by the greedy chain iff p = 0; a full-name question always
    position = [KB["namesakes"][x["first_name"]].index(x["path"][0]) if x["first_name"] else None for x in items]
    sampled = [1.0 if p is None else (3, 3, 2)[p] / 8 for p in position]
    greedy = [1.0 if p is None else float(p == 0) for p in position]
    assert {0, 1, 2, None} <= set(position)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    multihop = [i for i, x in enumerate(items) if x["hops"] > 1]
    first_name = [i for i, p in enumerate(position) if p is not None]

    rng_state = torch.get_rng_state()
    result = T.held_out(None, TOKENIZER, items, encode, SEARCH, args, samples=8)
    assert torch.equal(torch.get_rng_state(), rng_state)  # sampling drew from its own seed: training goes on as before
    assert set(calls["greedy"]) == {False} and set(calls["k"].values()) == {8} and len(calls["k"]) == len(items)
    assert result["sampled_em_multihop"] == pytest.approx(mean([sampled[i] for i in multihop]))
    assert result["sampled_found_person"] == pytest.approx(mean([sampled[i] for i in first_name]))
    assert result["sampled_em"] == pytest.approx(mean(sampled)) and result["sampled_tool_calls"] == 1.0
    calls["k"].clear()
    assert result == T.held_out(None, TOKENIZER, items, encode, SEARCH, args, samples=8)  # the same again

    calls["greedy"].clear()
    result = T.held_out(None, TOKENIZER, items, encode, SEARCH, args)
    assert set(calls["greedy"]) == {True} and not any(k.startswith("sampled") for k in result)
    assert result["em_multihop"] == pytest.approx(mean([greedy[i] for i in multihop]))
    assert result["found_person"] == pytest.approx(mean([greedy[i] for i in first_name]))


def test_namesake_checks_by_hand():
    # of the namesake searches followed by another step, the share followed by a search of another namesake,
    # apart for the person meant (fit) and the others (misfit)
    item = next(x for x in EVAL if x["first_name"] and x["hops"] > 1)
    meant, other = item["path"][0], next(n for n in KB["namesakes"][item["first_name"]] if n != item["path"][0])
    search = lambda query: (f"<think>x</think><search>{query}</search><information>doc</information>", "search")  # noqa: E731
    answer = ("<think>x</think><answer>Nowhere</answer>", "answer")
    checked = [search(item["first_name"]), search(other), search(meant), answer]  # misfit -> checked; fit -> no
    stuck = [search(other), search(other), answer]  # misfit -> the same one again (no), misfit -> answered (no)
    result = namesakes.evaluate([item, item], lambda chunk: [checked, stuck])
    assert (result["check_after_misfit"], result["check_after_fit"], result["found_person"]) == (1 / 3, 0.0, 0.5)


@pytest.mark.slow  # two short runs: the slower tier
def test_sampled_evaluation_at_each_quarter_leaves_training_unchanged(tmp_path):
    settings = dict(sft_steps=20, num_eval=6, rollout="chain", group_size=2, prompts_per_step=1, max_step_tokens=6,
                    max_turns=1, num_steps=40, token_budget=100, eval_every=100, output_dir=str(tmp_path))  # fmt: skip
    hooks = [tree_vs_chain.sampled_evals(budget=100, samples=n) for n in (0, 2)]  # the comparison's --eval_samples
    runs = [T.train(replace(T.Args(), **settings), sampled_evals=hook) for hook in hooks]
    records = [[json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
               for r in runs]  # fmt: skip
    assert len(records[0]) == len(records[1]) > 4
    for plain, sampled in zip(*records):  # the same run, with or without sampled evaluations
        assert {k: plain[k] for k in ("loss", "reward", "generated_tokens") if k in plain} == {
            k: sampled[k] for k in ("loss", "reward", "generated_tokens") if k in plain
        }
    # sampled (and greedy) evaluations at the first step past each quarter of the 100 tokens, and at the last
    tokens = [r["budget/generated_tokens"] for r in records[1]]
    quarters = [i for i in range(1, len(tokens)) if tokens[i] // 25 > tokens[i - 1] // 25 or i == len(tokens) - 1]
    assert len(quarters) == 4 and quarters[-1] == len(tokens) - 1 > 4 and tokens[-1] >= 100 > tokens[-2]
    assert [i for i, r in enumerate(records[1]) if "eval/sampled_em_multihop" in r] == quarters
    assert all("eval/em_multihop" in records[1][i] for i in quarters) and "eval/sampled_em" not in records[0][-1]
    assert [i for i, r in enumerate(records[1]) if "eval/em_multihop" in r] == [0] + quarters
    assert "sampled_found_person" in runs[1]["after"]


# ----------------------------------------------------------------------------------------------------------------
# Runs


run_script = script_runner("tree_grpo.py")
run_main = main_runner("tree_grpo.py")


# the tree's run in the slower tier: the quick tier trains a tree run in test_mixed_precision.py and in-process below
@pytest.mark.parametrize("rollout", [pytest.param("tree", marks=pytest.mark.slow), "chain"])
def test_two_step_smoke_run(tmp_path, rollout):
    result = run_script("--rollout", rollout, "--num_steps", "2", "--sft_steps", "20", "--num_eval", "10",
                        "--prompts_per_step", "2", "--max_step_tokens", "16", "--max_turns", "2",
                        "--output_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["trajectories"] == 2 * (6 if rollout == "tree" else 4)
    assert records[-1]["budget/generated_tokens"] > records[1]["budget/generated_tokens"] > 0
    assert "eval/em_multihop" in records[-1] and (run_dir / "metrics.png").exists()


@pytest.mark.slow  # the quick tier trains on this fixture in test_mixed_precision.py (SMALL_RUNS)
def test_hotpotqa_path_runs_on_the_fixture(tmp_path):
    result = run_script("--dataset", "hotpotqa", "--dataset_path", str(ROOT / "tests/fixtures/hotpotqa"),
                        "--num_steps", "1", "--sft_steps", "5", "--prompts_per_step", "2", "--max_step_tokens", "8",
                        "--max_turns", "2", "--output_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep_leaves", "4"], "more than the 1 + N*L = 3 leaves"),
        (["--rollout", "chain", "--group_size", "1"], "group_size must be at least 2"),
        (["--num_trees", "1", "--keep_leaves", "1"], "every advantage 0"),
        (["--dataset", "hotpotqa", "--dataset_path", "/no/such/folder"], "Could not load HotpotQA"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, argv, message, capsys):
    code, err = run_main(*argv, "--output_dir", str(tmp_path), capsys=capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert message in err.splitlines()[-1], err[-2000:]


def test_leaf_logprobs_through_the_trie_equal_each_leaf_alone(monkeypatch):
    """A rollout's leaves share their prompt and the steps before they branch: through trie_logprobs each shared
    token is encoded once, and the log-probs, entropies and every gradient equal the per-leaf forward."""
    monkeypatch.setattr(T, "generate_steps", scripted_steps)
    random.seed(0)
    args = replace(T.Args(), num_trees=2, expand_nodes=2, expand_rounds=1, keep_leaves=3, max_turns=4)
    items = TRAIN[:2]
    prompts = [TOKENIZER(x["question"])["input_ids"] for x in items]
    kept, _ = T.tree_rollout(None, TOKENIZER, prompts, SEARCH, args, random.Random(0), T.Budget())
    leaves = [leaf for _, _, leaf in kept]
    prompt_ids, prompt_mask = T.pad_batch([leaf.root().prompt_ids for leaf in leaves], 0, True, "cpu")
    response_ids, response_mask = T.pad_batch([T.leaf_sequence(leaf)[0] for leaf in leaves], 0, False, "cpu")
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": response_ids,
             "completion_mask": response_mask}  # fmt: skip
    model = common.build_tiny_model(TOKENIZER).train()
    results = []
    for prefix_grouper in (False, True):
        model.zero_grad(set_to_none=True)
        logps, entropy = T.leaf_logprobs(model, batch, prefix_grouper=prefix_grouper)
        (logps * response_mask).sum().backward()
        results.append((logps * response_mask, entropy * response_mask, [p.grad.clone() for p in model.parameters()]))
    (logps_n, entropy_n, grads_n), (logps_t, entropy_t, grads_t) = results
    torch.testing.assert_close(logps_t, logps_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy_t, entropy_n, atol=1e-5, rtol=0)
    assert all(((a - b).norm() / b.norm()).item() < 1e-4 for a, b in zip(grads_t, grads_n))
    sequences = [torch.cat([p[m.bool()], r[k.bool()]]) for p, m, r, k in zip(prompt_ids, prompt_mask, response_ids,
                                                                               response_mask)]  # fmt: skip
    assert pg.pack_trie(sequences).input_ids.numel() < 0.6 * sum(map(len, sequences))  # the sharing is real


def test_prefix_grouper_gives_the_same_step(tmp_path):
    """--prefix_grouper scores the leaves through a trie of what they share: the same seed gives the same
    rollouts, and the loss, entropy and gradient norm agree up to float rounding."""
    last = {}
    for prefix_grouper in (False, True):
        args = T.Args(num_steps=1, sft_steps=20, num_eval=10, prompts_per_step=2, max_step_tokens=16, max_turns=2,
                      prefix_grouper=prefix_grouper, output_dir=str(tmp_path / str(prefix_grouper)))  # fmt: skip
        run_dir = T.train(args)["run_dir"]
        last[prefix_grouper] = json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    naive, grouped = last[False], last[True]
    assert grouped["reward"] == naive["reward"] and grouped["generated_tokens"] == naive["generated_tokens"]
    for key in ("loss", "entropy", "grad_norm"):
        assert grouped[key] == pytest.approx(naive[key], rel=1e-4, abs=1e-6), key
