"""grpo_pp.py (work in progress): the advantages and the DPO loss by hand, the lesion images and the knowledge
graph, the rewards, the image data set fixture, the tiny VLM, and bad input."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, main_runner, script_runner
from PIL import Image

import grpo_pp as G
from common import load_vlm
from experiments.grpo_pp_stability import with_method
from tasks import lesions


def test_binary_advantages_by_hand():
    rewards = torch.tensor([1.5, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])  # group 1 mean 0.625; group 2 all equal
    assert G.binary_advantages(rewards, 4).tolist() == [1, -1, -1, -1, 0, 0, 0, 0]
    # the size of a GRPO advantage depends on the group's std, the sign advantage does not
    tight = torch.tensor([0.50, 0.51, 0.50, 0.50])
    assert G.group_advantages(tight, 4).abs().max() > 1.4
    assert G.binary_advantages(tight, 4).tolist() == [-1, 1, -1, -1]
    assert G.nonzero_variance_groups(rewards, 4).tolist() == [True] * 4 + [False] * 4


def test_binary_advantages_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        G.binary_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        G.binary_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        G.binary_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_dpo_loss_by_hand():
    # chosen: policy -1.0 vs ref -1.5 -> implicit reward 0.1 * 0.5 = 0.05; rejected: -2.0 vs -1.5 -> -0.05
    loss, metrics = G.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))), abs=1e-6)  # 0.64440
    assert metrics["rewards/margins"] == pytest.approx(0.1) and metrics["rewards/accuracies"] == 1.0
    # policy == reference: loss log 2 for every pair
    zeros = torch.zeros(3)
    assert G.dpo_loss(zeros, zeros, zeros, zeros, beta=0.5)[0].item() == pytest.approx(math.log(2))
    # against the formula written with logsigmoid, on random numbers; the gradient raises chosen, lowers rejected
    logps = [torch.randn(5, generator=torch.Generator().manual_seed(i)) * 3 for i in range(4)]
    chosen = logps[0].clone().requires_grad_()
    loss, _ = G.dpo_loss(chosen, *logps[1:], beta=0.2)
    expected = -F.logsigmoid(0.2 * ((logps[0] - logps[2]) - (logps[1] - logps[3]))).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (chosen.grad < 0).all()  # descending the loss increases log pi(chosen)
    with pytest.raises(ValueError, match="one shape"):
        G.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def test_images_are_deterministic_per_seed():
    a = lesions.draw_lesion("melanoma", np.random.default_rng(0))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, lesions.draw_lesion("melanoma", np.random.default_rng(0)))
    assert not np.array_equal(a, lesions.draw_lesion("melanoma", np.random.default_rng(1)))
    train8, eval_a = lesions.make_lesion_task(8, 5, seed=3)
    train16, eval_b = lesions.make_lesion_task(16, 5, seed=3)
    assert len(train8) == 8 * len(lesions.CLASSES) and len(eval_a) == 5 * len(lesions.CLASSES)
    assert {x["label"] for x in eval_a} == set(lesions.CLASSES)
    # the held-out split does not depend on the training size, and never repeats a training image
    assert [np.asarray(x["image"]).tobytes() for x in eval_a] == [np.asarray(x["image"]).tobytes() for x in eval_b]
    assert {np.asarray(x["image"]).tobytes() for x in train16}.isdisjoint(
        np.asarray(x["image"]).tobytes() for x in eval_a
    )


def test_attributes_show_in_the_pixels():
    rng = np.random.default_rng(0)
    mean_colour = {
        c: np.mean([lesions.draw_lesion(c, rng)[12:20, 12:20].mean((0, 1)) for _ in range(10)], 0)
        for c in lesions.CLASSES
    }
    assert (
        mean_colour["melanoma"].sum() < mean_colour["nevus"].sum() < mean_colour["rosacea"].sum()
    )  # black < brown < pink
    red, green = mean_colour["psoriasis"][0], mean_colour["psoriasis"][1]
    assert red > 1.5 * green


def test_recognition_reward():
    good = "<think>red oval sharp scaly</think><answer>psoriasis</answer>"
    half = "<think>red oval sharp dotted</think><answer>psoriasis</answer>"  # dotted is not psoriasis
    wrong = "<think>brown round</think><answer>nevus</answer>"
    rewards = lesions.recognition_reward([good, half, wrong, "psoriasis"], ["psoriasis"] * 4, kg_weight=0.5)
    assert rewards["correct"].tolist() == [1, 1, 0, 0]
    assert rewards["format"].tolist() == [1, 1, 1, 0]
    assert rewards["kg"].tolist() == [1.0, 0.75, 1.0, 0.0]  # agreement with the graph of the *predicted* class
    assert rewards["total"].tolist() == [2.0, 1.875, 1.0, 0.0]
    with pytest.raises(ValueError, match="one label per completion"):
        lesions.recognition_reward([good], [])


def test_kg_fact_score():
    assert G.kg_fact_score("Psoriasis: itching and silvery scale; use a topical steroid.", "psoriasis") == 3
    # "moisturiser" is eczema's care, not psoriasis': one wrong fact
    assert G.kg_fact_score("It causes itching; use a moisturiser.", "psoriasis") == 0
    # a psoriasis image (red oval sharp scaly) called eczema: the attributes are checked against the image, the
    # symptoms and care against eczema, the class the answer names. Attributes: 3 right, "irregular" wrong; facts:
    # itching and dry skin right, topical steroid (psoriasis' care) wrong -> 3 + 2 - 2
    text = "<think>red irregular sharp scaly</think><answer>eczema</answer> Symptoms: itching, dry skin. "
    text += "Care: topical steroid."
    assert G.kg_fact_score(text, "psoriasis") == 3 and lesions.has_factual_error(text)
    assert G.kg_fact_score(text.replace("topical steroid", "moisturiser"), "psoriasis") == 5


def test_bad_images_and_classes_are_one_clear_error():
    image = Image.fromarray(lesions.draw_lesion("nevus", np.random.default_rng(0)))
    assert lesions.check_image(image) is image
    with pytest.raises(ValueError, match="convert it with image.convert"):
        lesions.check_image(image.convert("L"))
    with pytest.raises(ValueError, match="must be 32x32 for the tiny VLM"):
        lesions.check_image(image.resize((64, 64)))
    with pytest.raises(ValueError, match="knowledge graph knows"):
        lesions.draw_lesion("acne", np.random.default_rng(0))


def test_image_dataset_fixture_loads():
    train, held_out = lesions.load_image_dataset(str(ROOT / "tests/fixtures/lesions"), 2, 5, seed=0)
    assert sorted(x["label"] for x in train) == ["nevus", "nevus", "psoriasis", "psoriasis"]
    assert len(held_out) == 4 and all(x["image"].size == (32, 32) for x in held_out)
    with pytest.raises(ValueError, match="Could not load an image classification data set"):
        lesions.load_image_dataset("/no/such/folder", 2, 2, seed=0)


def test_tiny_vlm_sees_the_image_and_round_trips(tmp_path):
    model, processor = load_vlm("tiny-vlm", device="cpu")
    images = [Image.fromarray(lesions.draw_lesion(c, np.random.default_rng(0))) for c in ("nevus", "melanoma")]
    enc = processor(images=images, text=["<image>" + lesions.QUESTION] * 2, return_tensors="pt", padding=True)
    assert (enc["input_ids"] == model.config.image_token_index).sum(1).tolist() == [16, 16]  # 4x4 patches
    logits = model(**enc).logits
    assert not torch.allclose(logits[0, -1], logits[1, -1])  # different images, different predictions
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, processor_again = load_vlm(str(tmp_path), device="cpu")
    torch.testing.assert_close(again(**enc).logits, logits)
    assert processor_again.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True).endswith(lesions.QUESTION)
    with pytest.raises(ValueError, match="Run offline with --model tiny-vlm"):
        load_vlm("no-such-org/no-such-vlm")


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 runs


def test_prefix_grouper_encodes_each_image_once_with_the_same_logprobs_and_gradients():
    """--prefix_grouper: a group's image and prompt go through the model once; the vision tower sees each image
    once, and the log-probs (with <image> at probability 0) and every gradient equal the per-row forward."""
    model, processor = load_vlm("tiny-vlm", device="cpu")
    items = lesions.make_lesion_task(2, 1, seed=0)[0][:2]
    torch.manual_seed(0)
    batch = G.generate_completions(model, processor, [x["image"] for x in items], group_size=3, max_new_tokens=8)
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    model.train()
    images_seen, results = [], []
    model.model.vision_tower.register_forward_pre_hook(lambda m, args: images_seen.append(len(args[0])))
    for prefix_grouper in (False, True):
        model.zero_grad(set_to_none=True)
        logps, _ = G.completion_logprobs(model, batch, temperature=0.8, prefix_grouper=prefix_grouper)
        (logps * batch["completion_mask"]).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logps * batch["completion_mask"], grads))
    assert images_seen == [6, 2]  # 2 images x G=3 rows, then each image once
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    # (the keys' biases get gradient 0 up to rounding, ~1e-8: a softmax ignores a constant added to its logits)
    assert all(
        ((a - b).norm() / b.norm()).item() < 1e-4 for a, b in zip(results[1][1], results[0][1]) if b.norm() > 1e-6
    )


def test_grpo_pp_flag_turns_every_stabiliser_on():
    plain, plus = G.Args(grpo_pp=False), G.Args()
    assert (plain.advantage, plain.skip_zero_variance, plain.eps_high, plain.loss_type, plain.beta) == (
        "group", False, 0.2, "grpo", 0.0)  # fmt: skip
    assert (plus.advantage, plus.skip_zero_variance, plus.eps_high, plus.loss_type, plus.beta) == (
        "binary", True, 0.28, "dapo", 0.04)  # fmt: skip
    # experiments/grpo_pp_stability.py turns GRPO++'s args into GRPO's the same way
    assert with_method(plus, method=False) == plain and with_method(plain, method=True) == plus


def test_warm_start_has_the_systematic_mix_up():
    demos = lesions.warm_start_demos(seed=0, noise=0.6, per_class=50)
    named = [(lesions.parse_answer(c)["answer"], c) for _, c in demos]
    mixed = sum(answer != lesions.CLASSES[i // 50] for i, (answer, _) in enumerate(named)) / len(named)
    assert 0.5 < mixed < 0.7
    # the description is always the image's true attributes
    truth = lambda i: {lesions.KNOWLEDGE_GRAPH[lesions.CLASSES[i // 50]][k] for k in lesions.ATTRIBUTES}  # noqa: E731
    assert all(lesions.parse_answer(c)["attributes"] == truth(i) for i, (_, c) in enumerate(named))


run_script = script_runner("grpo_pp.py")
run_main = main_runner("grpo_pp.py")


SMALL = ["--num_steps", "2", "--eval_every", "1", "--warm_start_steps", "3", "--images_per_class", "2",
         "--eval_per_class", "2", "--prompts_per_step", "2", "--group_size", "3", "--max_new_tokens", "8"]  # fmt: skip


@pytest.mark.parametrize(
    "flags", [[], ["--no_grpo_pp"], ["--no_grpo_pp", "--advantage", "binary", "--kg_weight", "0.5"]]
)
def test_stage1_two_step_smoke_run(tmp_path, flags):
    result = run_script(*SMALL, *flags, "--stage", "1", "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval/macro_f1" in records[-1] and "frac_reward_zero_std" in records[-1]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["curve"]) == 3 and (run_dir / "metrics.png").exists()


def test_stage1_runs_on_the_image_folder_fixture(tmp_path):
    fixture = str(ROOT / "tests/fixtures/lesions")
    result = run_script(*SMALL, "--stage", "1", "--dataset_path", fixture, "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_macro_f1_by_hand():
    # class a: TP 1, FP 1, FN 1 -> 2/4; class b: TP 1, FP 0, FN 1 -> 2/3; an unparsed answer (None) is a miss
    assert lesions.macro_f1(["a", "a", "b", None], ["a", "b", "b", "a"]) == pytest.approx((0.5 + 2 / 3) / 2)


def test_majority_vote_by_hand():
    # runs of 3 answers: "a" wins 2-1; an unparsable answer is a vote too; a tie goes to the answer named first
    assert lesions.majority_vote(["a", "b", "a", None, None, "c", "b", "c", "d"], 3) == ["a", None, "b"]


def test_stage1_reports_the_majority_vote(tmp_path):
    args = G.Args(stage="1", **{k.removeprefix("--"): type(getattr(G.Args(), k.removeprefix("--")))(v)
                                for k, v in zip(SMALL[::2], SMALL[1::2])}, output_dir=str(tmp_path))  # fmt: skip
    results = G.train_grpo(args)
    assert 0 <= results["f1_vote"] <= 1 and results["collapses"] >= 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--group_size", "1"], "group_size must be at least 2"),
        (["--dataset_path", "/no/such/folder"], "Could not load an image classification data set"),
        (["--model", "no-such-org/no-such-vlm"], "Run offline with --model tiny-vlm"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, argv, message, capsys):
    code, err = run_main(*argv, "--output_dir", str(tmp_path), capsys=capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert message in err.splitlines()[-1], err[-2000:]


def test_conversations_and_factual_errors():
    rng = random.Random(0)
    texts = [lesions.conversation("psoriasis", rng, error_rate=0.5) for _ in range(200)]
    assert 0.4 < sum(error for _, error in texts) / 200 < 0.6
    assert all(
        lesions.has_factual_error(text) == error for text, error in texts
    )  # the check finds every injected error
    clean = lesions.conversation("nevus", rng)[0]
    assert clean.endswith("Symptoms: no symptoms. Care: watch for change.") and not lesions.has_factual_error(clean)
    assert G.kg_fact_score(clean, "nevus") == 6  # 4 attributes, 1 symptom, 1 care


def test_stages_2_and_3_smoke_run(tmp_path, capsys):
    stages = ["--stage", "all", "--sft_steps", "2", "--dpo_samples", "2", "--dpo_margin", "0", "--dpo_epochs", "1"]
    result = run_script(*SMALL, *stages, "--answer_tokens", "16", "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name.split("__")[0] for p in tmp_path.iterdir())
    assert runs == ["dpo-stage3", "grpo_pp-stage1", "sft-stage2"]
    stage3 = next(p for p in tmp_path.iterdir() if p.name.startswith("dpo-stage3"))
    results = json.loads((stage3 / "results.json").read_text())
    assert {"macro_f1", "fact_error_rate"} <= set(results["after"]) and results["pairs"] >= 0
    # stage 3 alone needs the model of stage 2
    code, err = run_main(*SMALL, "--stage", "3", "--output_dir", str(tmp_path), capsys=capsys)
    assert code == 2 and "needs --init" in err.splitlines()[-1]
