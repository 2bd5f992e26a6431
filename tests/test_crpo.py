"""crpo.py: each objective on hand-written responses, the advantage modes by hand, the task, a smoke run, bad input."""

import json
import math

import pytest
import torch
from conftest import ROOT, main_runner, script_runner

import crpo
from tasks import clinic

# "fever, cough, anosmia? A covid B strep C flu D pna", gold A
ITEM = clinic.check_item(
    {
        "question": "fever, cough, anosmia? A covid B strep C flu D pna",
        "options": {"A": "covid", "B": "strep", "C": "flu", "D": "pna"},
        "answer": "A",
        "findings": ["fever", "cough", "anosmia"],
        "vocabulary": clinic.FINDINGS,
        "option_findings": {L: clinic.KNOWLEDGE_GRAPH[d] for L, d in zip("ABCD", ["covid", "strep", "flu", "pna"])},
    }
)
FULL = "<dx>fever, cough, anosmia; A fits; B no cough; C no anosmia; D no anosmia</dx><conclusion>A</conclusion>"
LAZY = "<dx>A fits</dx><conclusion>A</conclusion>"
WRONG = "<dx>fever, cough; C fits</dx><conclusion>C</conclusion>"
HALLUCINATED = "<dx>fever, cough, rash-free, myalgia; A fits; B no cough</dx><conclusion>A</conclusion>"
UNGROUNDED = "<dx>fever, cough, anosmia; B fits; A no fever</dx><conclusion>A</conclusion>"
MALFORMED = "<dx>fever, cough, anosmia; A fits<conclusion>A</conclusion>"


def rewards_of(text):
    return {name: r.item() for name, r in crpo.reward_function([text], [ITEM]).items()}


def test_rewards_on_hand_written_responses():
    assert rewards_of(FULL) == {"accuracy": 1, "faithfulness": 1, "comprehensiveness": 1, "format": 1}
    # lazy: right and grounded, but cites nothing and rejects nothing
    assert rewards_of(LAZY) == {"accuracy": 1, "faithfulness": 0.5, "comprehensiveness": 0, "format": 1}
    # wrong: cites 2 of 3 findings, grounded in its own (wrong) reasoning
    assert rewards_of(WRONG) == pytest.approx(
        {"accuracy": 0, "faithfulness": 1.0, "comprehensiveness": 0.5 * 2 / 3, "format": 1}
    )
    # hallucinated: myalgia is not in the case (precision 2/3); 1 of 3 distractors rejected for a stem finding
    assert rewards_of(HALLUCINATED) == pytest.approx(
        {"accuracy": 1, "faithfulness": 0.5 * 2 / 3 + 0.5, "comprehensiveness": 0.5 * 2 / 3 + 0.5 / 3, "format": 1}
    )
    # the conclusion contradicts the reasoning: not grounded
    assert rewards_of(UNGROUNDED)["faithfulness"] == 0.5
    # no closing </dx>: nothing is parsed, not even the conclusion
    assert rewards_of(MALFORMED) == {"accuracy": 0, "faithfulness": 0, "comprehensiveness": 0, "format": 0}
    assert rewards_of("<dx>A fits</dx><conclusion>E</conclusion>")["format"] == 0  # not an option


def test_a_rejection_earns_credit_only_when_the_graph_confirms_it():
    full = clinic.strict_metrics(FULL, ITEM)
    assert full == {"accuracy": 1, "faithfulness": 1, "hallucination": 0, "citations": 3, "rejections": 1,
                    "valid_rejections": 1}  # fmt: skip
    # valid: strep lacks cough, flu and pna lack anosmia. Contradicted: pna HAS cough, so "D no cough" names a
    # finding of the case that the rejected disease has; it earns no comprehensiveness and is not valid
    assert clinic.valid_rejection("B", "cough", ITEM) and clinic.valid_rejection("D", "anosmia", ITEM)
    assert not clinic.valid_rejection("D", "cough", ITEM)
    assert not clinic.valid_rejection("B", "myalgia", ITEM)  # strep lacks myalgia, but the case does not have it
    text = "<dx>fever, cough, anosmia; A fits; B no cough; C no anosmia; D no cough</dx><conclusion>A</conclusion>"
    assert rewards_of(text)["comprehensiveness"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert clinic.strict_metrics(text, ITEM)["rejections"] == 1.0  # a stem finding as the reason, right or wrong
    assert clinic.strict_metrics(text, ITEM)["valid_rejections"] == pytest.approx(2 / 3)
    hallucinated = clinic.strict_metrics(HALLUCINATED, ITEM)
    assert hallucinated["hallucination"] == 1 and hallucinated["faithfulness"] == 0 and hallucinated["citations"] == 2
    assert clinic.strict_metrics(LAZY, ITEM)["faithfulness"] == 0  # cites nothing


def test_objective_advantages_by_hand():
    # one group of 4: accuracy [1, 1, 0, 0], faithfulness [1, 0, 1, 0]; weights 10 and 1
    rewards = {"accuracy": torch.tensor([1.0, 1, 0, 0]), "faithfulness": torch.tensor([1.0, 0, 1, 0])}
    weights = {"accuracy": 10.0, "faithfulness": 1.0}
    # sum then normalise: R = [11, 10, 1, 0], mean 5.5, unbiased std sqrt((30.25 + 20.25) * 2 / 3)
    std = math.sqrt((5.5**2 + 4.5**2) * 2 / 3)
    expected = torch.tensor([5.5, 4.5, -4.5, -5.5]) / (std + 1e-4)
    torch.testing.assert_close(crpo.objective_advantages(rewards, weights, 4), expected)
    # normalise then sum: each objective's z-score is +-0.5 / sqrt(1/3); weighted sum, then a batch z-score
    z = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    combined = torch.tensor([11 * z, 9 * z, -9 * z, -11 * z])
    expected = (combined - combined.mean()) / (combined.std() + 1e-4)
    torch.testing.assert_close(crpo.objective_advantages(rewards, weights, 4, mode="normalize_then_sum"), expected)


def test_all_correct_group_learns_from_the_other_objectives():
    """Zero accuracy variance: the advantage is the faithfulness/comprehensiveness ranking, not 0."""
    rewards = crpo.reward_function([FULL, LAZY, LAZY, FULL], [ITEM] * 4)
    advantages = crpo.objective_advantages(rewards, crpo.METHOD_WEIGHTS["crpo"], 4)
    assert advantages[0] > 0 > advantages[1] and torch.isclose(advantages[0], advantages[3])
    baseline = crpo.objective_advantages(rewards, crpo.METHOD_WEIGHTS["grpo"], 4)
    torch.testing.assert_close(baseline, torch.zeros(4))  # GRPO sees no difference between them


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown objective 'safety'"):
        crpo.parse_weights("accuracy=10,safety=1")
    with pytest.raises(ValueError, match="unknown objective 'safety'"):
        crpo.objective_advantages({"accuracy": torch.ones(4)}, {"safety": 1.0}, 4)
    with pytest.raises(ValueError, match="NaN"):
        crpo.objective_advantages({"accuracy": torch.tensor([1.0, float("nan")])}, {"accuracy": 1.0}, 2)
    with pytest.raises(ValueError, match="at least 2"):
        crpo.objective_advantages({"accuracy": torch.ones(4)}, {"accuracy": 1.0}, 1)
    with pytest.raises(ValueError, match="answer 'E' is not one of its options"):
        clinic.check_item({**ITEM, "answer": "E"})
    with pytest.raises(ValueError, match="missing 'findings'"):
        clinic.check_item({k: v for k, v in ITEM.items() if k != "findings"})
    with pytest.raises(ValueError, match="at least 2 options"):
        clinic.check_item({**ITEM, "options": {"A": "covid"}})


def test_clinic_task():
    train, held_out, demos = clinic.make_clinic_task(300, 50, seed=0)
    assert (train, held_out, demos) == clinic.make_clinic_task(300, 50, seed=0)
    assert not {x["question"] for x in train} & {x["question"] for x in held_out}
    for item in train + held_out:
        gold = item["options"][item["answer"]]
        assert set(item["findings"]) <= set(clinic.KNOWLEDGE_GRAPH[gold])  # the gold disease has every finding
        for letter, disease in item["options"].items():
            if letter != item["answer"]:  # every distractor can be rejected for a stem finding it lacks
                assert set(item["findings"]) - set(clinic.KNOWLEDGE_GRAPH[disease])
    # the demos are scored as their style says: full ones get the maximum CRPO reward
    scored = [rewards_of_item(c, x) for (_, c), x in zip(demos, train)]
    assert max(r["comprehensiveness"] for r in scored) == 1.0 and min(r["comprehensiveness"] for r in scored) == 0.0
    assert 0.8 < sum(r["accuracy"] for r in scored) / len(scored) < 0.99


def rewards_of_item(text, item):
    return {name: r.item() for name, r in crpo.reward_function([text], [item]).items()}


def test_medqa_fixture_loads():
    train, held_out, demos = clinic.load_medqa(str(ROOT / "tests/fixtures/medqa"), 10, 10)
    assert [x["answer"] for x in train] == ["B", "C", "D"] and len(held_out) == 2
    assert "fever" in train[0]["findings"]
    text = "<dx>fever, sore throat, enlarged spleen; B fits; A no enlarged spleen</dx><conclusion>B</conclusion>"
    r = rewards_of_item(text, train[0])
    # 3 of 8 phrases cited; strep pharyngitis answers no training case, so nothing refutes "A no enlarged spleen"
    assert r == pytest.approx({"accuracy": 1, "faithfulness": 1, "comprehensiveness": 0.5 * 3 / 8 + 0.5 / 3,
                               "format": 1})  # fmt: skip


def test_medqa_stand_ins_for_the_graph(tmp_path):
    """Without a graph: the training split's phrases are the vocabulary (so a finding can be invented), and the
    training cases an option answers stand in for what it has (so a rejection can be contradicted)."""
    rows = [
        {"question": "Fever and a positive Murphy sign.", "options": {"A": "Cholecystitis", "B": "Appendicitis"},
         "answer_idx": "A", "metamap_phrases": ["fever", "positive murphy sign"]},
        {"question": "Fever and right lower quadrant pain.", "options": {"A": "Cholecystitis", "B": "Appendicitis"},
         "answer_idx": "B", "metamap_phrases": ["fever", "right lower quadrant pain"]},
    ]  # fmt: skip
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, _, _ = clinic.load_medqa(str(tmp_path), 10, 10)
    appendicitis = train[1]
    assert appendicitis["option_findings"]["A"] == ["fever", "positive murphy sign"]  # cholecystitis's cases
    assert "positive murphy sign" in appendicitis["vocabulary"]
    # "A no fever": cholecystitis's training case has fever, so the rejection is contradicted
    contradicted = "<dx>fever, right lower quadrant pain; B fits; A no fever</dx><conclusion>B</conclusion>"
    valid = contradicted.replace("A no fever", "A no right lower quadrant pain")
    assert rewards_of_item(contradicted, appendicitis)["comprehensiveness"] == 0.5
    assert rewards_of_item(valid, appendicitis)["comprehensiveness"] == 1.0
    assert clinic.strict_metrics(contradicted, appendicitis)["valid_rejections"] == 0
    # citing another case's finding is invented: precision 2/3, a hallucination, not faithful
    invented = "<dx>fever, right lower quadrant pain, positive murphy sign; B fits</dx><conclusion>B</conclusion>"
    assert rewards_of_item(invented, appendicitis)["faithfulness"] == pytest.approx(0.5 * 2 / 3 + 0.5)
    metrics = clinic.strict_metrics(invented, appendicitis)
    assert metrics["hallucination"] == 1 and metrics["faithfulness"] == 0


run_script = script_runner("crpo.py")
run_main = main_runner("crpo.py")


@pytest.mark.slow  # the quick tier runs both methods end to end in test_compare.py and test_mixed_precision.py
@pytest.mark.parametrize("method", ["crpo", "grpo"])
def test_two_step_smoke_run(tmp_path, method):
    result = run_script("--method", method, "--num_steps", "2", "--sft_steps", "20", "--num_train", "100",
                        "--num_eval", "4", "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "48",
                        "--output_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ["rewards/accuracy/mean", "rewards/faithfulness/mean", "frac_accuracy_zero_std", "eval/faithfulness"]:
        assert key in records[-1]
    assert (run_dir / "metrics.png").exists()


@pytest.mark.slow  # the quick tier trains on this fixture in test_mixed_precision.py (SMALL_RUNS)
def test_medqa_path_runs_on_the_fixture(tmp_path):
    result = run_script("--dataset", "medqa", "--dataset_path", str(ROOT / "tests/fixtures/medqa"), "--num_steps",
                        "1", "--sft_steps", "5", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens",
                        "8", "--output_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--weights", "accuracy=10,empathy=1"], "unknown objective 'empathy'"),
        (["--group_size", "1"], "group_size must be at least 2"),
        (["--dataset", "medqa", "--dataset_path", "/no/such/folder"], "Could not load MedQA"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, argv, message, capsys):
    code, err = run_main(*argv, "--output_dir", str(tmp_path), capsys=capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert message in err.splitlines()[-1], err[-2000:]


def test_entropy_bonus_enters_the_loss(tmp_path):
    """--entropy_coef c subtracts c x the batch's token-mean entropy from the loss that is backpropagated (the same
    rollouts with and without it: one step from the same seed)."""
    records = {}
    for coef in (0.0, 0.5):
        args = crpo.Args(num_steps=1, sft_steps=20, num_train=100, num_eval=4, prompts_per_step=2, group_size=3,
                         max_new_tokens=24, entropy_coef=coef, output_dir=str(tmp_path / str(coef)))  # fmt: skip
        run_dir = crpo.train(args)["run_dir"]
        records[coef] = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")][-1]
    assert records[0.0]["entropy"] == records[0.5]["entropy"] > 0
    assert records[0.5]["loss"] == pytest.approx(records[0.0]["loss"] - 0.5 * records[0.0]["entropy"], abs=1e-6)
