"""grpo.py: the pure functions against hand-computed numbers and TRL's formulas, the task, a smoke run, bad input."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, main_runner, script_runner

import grpo
from common import load_model
from prefix_grouper import logprobs_from_logits
from tasks import arithmetic

# ---------------------------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4; the second has no variance
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    std = math.sqrt(1 / 3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / torch.tensor([std + 1e-4] * 4 + [1e-4] * 4)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4), expected)
    # batch std: mean per group, std over all 8 rewards (mean 0.5, squares 4 * 0.25, unbiased / 7)
    batch_std = math.sqrt(1.0 / 7)
    expected_batch = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (batch_std + 1e-4)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, scale="batch"), expected_batch)
    torch.testing.assert_close(
        grpo.group_advantages(rewards, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    )


def test_group_advantages_are_zero_mean_per_group():
    rewards = torch.rand(6 * 5, generator=torch.Generator().manual_seed(0))
    advantages = grpo.group_advantages(rewards, 5).view(6, 5)
    torch.testing.assert_close(advantages.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages.std(1), torch.ones(6), atol=1e-3, rtol=0)  # up to the eps


@pytest.mark.parametrize(
    "rewards, group_size, message",
    [
        (torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, "NaN"),
        (torch.tensor([1.0, 0.0, 0.0, 1.0]), 1, "at least 2"),
        (torch.tensor([1.0, 0.0, 0.0]), 2, "multiple of group_size"),
    ],
)
def test_group_advantages_rejects_bad_input(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        grpo.group_advantages(rewards, group_size)


# ---------------------------------------------------------------------------------------------------------------
# policy_loss against hand-computed numbers and TRL's formulas


def test_policy_loss_by_hand():
    # one token each: ratio 1.5 with A = +1 is clipped at 1.2; ratio 0.5 with A = -1 is clipped at 0.8
    logps = torch.log(torch.tensor([[1.5], [0.5]]))
    old_logps = torch.zeros(2, 1)
    mask = torch.ones(2, 1)
    loss, metrics = grpo.policy_loss(logps, old_logps, None, torch.tensor([1.0, -1.0]), mask, loss_type="bnpo")
    # per-token losses: -min(1.5, 1.2) = -1.2 and -min(-0.5, -0.8) = 0.8; mean = -0.2
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert metrics["clip_ratio/high_mean"] == 0.5 and metrics["clip_ratio/low_mean"] == 0.5
    assert metrics["clip_ratio/region_mean"] == 1.0
    # inside the trust region nothing is clipped: ratio 1.1 with A = 2 gives -2.2
    loss, metrics = grpo.policy_loss(
        torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), None, torch.tensor([2.0]), torch.ones(1, 1)
    )
    assert loss.item() == pytest.approx(-2.2, abs=1e-6) and metrics["clip_ratio/region_mean"] == 0.0


def trl_loss(logps, old_logps, ref_logps, advantages, mask, eps_low, eps_high, beta, loss_type, max_len, num_items, ga):
    """TRL GRPOTrainer._compute_loss (trl 1.x, token-level importance sampling), written out independently."""
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / ga
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len) / ga
    return (per_token_loss * mask).sum() / num_items.clamp(min=1.0)  # dapo, steps_per_generation == ga


def random_batch(seed, rows=8, tokens=7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(rows, tokens, generator=g, dtype=torch.float64) * 3
    old_logps = logps + 0.4 * torch.randn(rows, tokens, generator=g, dtype=torch.float64)  # ratios well outside clip
    ref_logps = logps + 0.3 * torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 2, (rows,), generator=g).double()
    rewards[:4] = 1.0  # the first group of 4 has zero variance
    advantages = grpo.group_advantages(rewards, 4)
    lengths = torch.randint(1, tokens + 1, (rows,), generator=g)
    mask = (torch.arange(tokens)[None] < lengths[:, None]).double()
    mask[5] = 0.0  # an all-masked row (e.g. a masked truncated completion)
    return logps, old_logps, ref_logps, advantages, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("eps_low, eps_high, beta", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 0.04)])
def test_policy_loss_matches_trl(loss_type, eps_low, eps_high, beta):
    logps, old_logps, ref_logps, advantages, mask = random_batch(seed=1)
    logps.requires_grad_(True)
    ours, _ = grpo.policy_loss(logps, old_logps, ref_logps, advantages, mask, eps_low, eps_high, beta, loss_type)
    (grad_ours,) = torch.autograd.grad(ours, logps)
    theirs = trl_loss(
        logps, old_logps, ref_logps, advantages, mask, eps_low, eps_high, beta, loss_type, 7, mask.sum(), 1
    )
    (grad_theirs,) = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert grad_ours[5].abs().sum() == 0  # the all-masked row gets no gradient
    assert torch.isfinite(ours)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_loss_micro_batches_match_trl(loss_type):
    """Two micro-batches with TRL's gradient-accumulation semantics: same per-micro-batch losses as TRL; for every
    loss type but bnpo (normalised per micro-batch by design) they add up to the loss of the whole batch."""
    logps, old_logps, ref_logps, advantages, mask = random_batch(seed=2)
    kwargs = dict(eps_low=0.2, eps_high=0.28, beta=0.04, loss_type=loss_type)
    total = 0.0
    for rows in torch.arange(8).chunk(2):
        part = [t[rows] for t in (logps, old_logps, ref_logps, advantages, mask)]
        ours, _ = grpo.policy_loss(
            *part, **kwargs, max_completion_length=10, num_items_in_batch=mask.sum(), grad_accum_steps=2
        )
        theirs = trl_loss(*part, 0.2, 0.28, 0.04, loss_type, 10, mask.sum(), 2)
        torch.testing.assert_close(ours, theirs)
        total = total + ours
    whole, _ = grpo.policy_loss(logps, old_logps, ref_logps, advantages, mask, **kwargs, max_completion_length=10)
    if loss_type != "bnpo":
        torch.testing.assert_close(total, whole)
    else:
        assert not torch.allclose(total, whole)  # TRL's known accumulation dependence, kept on purpose


def test_on_policy_loss_is_zero_but_gradient_is_not():
    """pi_old = pi_theta.detach(): loss -mean_i(A_i) = 0 for zero-mean A; gradient -A_i / (B |o_i|)."""
    logps, _, _, advantages, _ = random_batch(seed=3)
    logps.requires_grad_(True)
    mask = torch.ones_like(logps)
    loss, _ = grpo.policy_loss(logps, logps.detach(), None, advantages, mask, loss_type="grpo")
    (grad,) = torch.autograd.grad(loss, logps)
    assert abs(loss.item()) < 1e-12
    torch.testing.assert_close(grad, -advantages[:, None].expand_as(grad) / (8 * 7))


def test_k3_kl_is_exact_near_zero():
    """k3 = exp(x) - x - 1 ~ x^2 / 2. In float32 the naive form loses everything at |x| ~ 1e-4; expm1 does not."""
    x = torch.full((1, 4), 3e-4)  # log pi_ref - log pi_theta
    logps = torch.zeros(1, 4)
    _, metrics = grpo.policy_loss(logps, logps, logps + x, torch.zeros(1), torch.ones(1, 4), beta=0.1)
    exact = math.expm1(3e-4) - 3e-4  # float64
    assert metrics["kl"] == pytest.approx(exact, rel=1e-3)
    naive = (torch.exp(x) - x - 1).mean().item()
    assert abs(naive - exact) / exact > 1e-2  # the reason for expm1


def test_policy_loss_rejects_unknown_loss_type():
    logps, old_logps, _, advantages, mask = random_batch(seed=4)
    with pytest.raises(ValueError, match="loss_type"):
        grpo.policy_loss(logps, old_logps, None, advantages, mask, loss_type="ppo")


# ---------------------------------------------------------------------------------------------------------------
# task and rewards


def test_addition_trace_and_rewards():
    assert arithmetic.addition_trace(47, 38) == "<think>7+8=15 4+3+1=8</think><answer>85</answer>"
    assert arithmetic.addition_trace(47, 38, drop_carry=True) == "<think>7+8=15 4+3=7</think><answer>75</answer>"
    assert arithmetic.addition_trace(75, 48) == "<think>5+8=13 7+4+1=12</think><answer>123</answer>"
    assert arithmetic.addition_trace(12, 34, drop_carry=True) == "<think>2+4=6 1+3=4</think><answer>46</answer>"
    rewards = arithmetic.reward_function(
        [
            "<think>7+8=15 4+3+1=8</think><answer>85</answer>",  # right, well formed
            "<think>7+8=15 4+3=7</think><answer>75</answer>",  # wrong, well formed
            "<answer>85</answer>",  # right, no reasoning
            "85",  # no tags at all
            "<think>x</think><answer> 1,234.0 </answer>",  # commas and '.0' are ignored
        ],
        ["85", "85", "85", "85", "1234"],
    )
    assert rewards["correct"].tolist() == [1, 0, 1, 0, 1]
    assert rewards["format"].tolist() == [1, 1, 0, 0, 1]
    torch.testing.assert_close(rewards["total"], torch.tensor([1.1, 0.1, 1.0, 0.0, 1.1]))
    with pytest.raises(ValueError, match="one answer per completion"):
        arithmetic.reward_function(["a", "b"], ["1"])


def test_arithmetic_task_is_seeded_and_split():
    train, held_out, demos = arithmetic.make_arithmetic_task(500, 100, seed=0, demo_noise=0.7)
    assert (train, held_out, demos) == arithmetic.make_arithmetic_task(500, 100, seed=0, demo_noise=0.7)
    assert not {x["question"] for x in train} & {x["question"] for x in held_out}
    assert len(train) == len(demos) == 500 and len(held_out) == 100
    a, b = map(int, train[0]["question"].rstrip("=").split("+"))
    assert train[0]["answer"] == str(a + b)
    # about demo_noise of the demos with a carry are wrong
    carries = [(p, c) for p, c in demos if int(p[0:2]) % 10 + int(p[3:5]) % 10 >= 10]
    wrong = sum(arithmetic.correctness_reward(c, str(eval(p.rstrip("=")))) == 0 for p, c in carries)
    assert 0.6 < wrong / len(carries) < 0.8


def test_small_addend_task():
    assert arithmetic.addition_trace(47, 8) == "<think>47+8=55</think><answer>55</answer>"  # one step for a 1-digit b
    assert arithmetic.addition_trace(47, 8, drop_carry=True) == "<think>47+8=45</think><answer>45</answer>"
    assert arithmetic.addition_trace(41, 3, drop_carry=True) == "<think>41+3=44</think><answer>44</answer>"  # no carry
    train, held_out, demos = arithmetic.make_arithmetic_task(600, 200, seed=0, demo_noise=0.0, small_addend=True)
    questions = [x["question"] for x in train + held_out]
    assert len(set(questions)) == 800 and all(1 <= int(q.rstrip("=").split("+")[1]) <= 9 for q in questions)
    assert [c for _, c in demos] == [x["solution"] for x in train]  # demo_noise=0: the demos are the solutions
    with pytest.raises(ValueError, match="at most 810"):
        arithmetic.make_arithmetic_task(700, 200, seed=0, demo_noise=0.0, small_addend=True)


def test_solutions_earn_the_full_reward():
    """The solutions --num_shots shows a chat model are right and well formed, on both tasks and on GSM8K."""
    items = arithmetic.make_arithmetic_task(50, 50, seed=1, demo_noise=0.7)[0]
    items += arithmetic.make_arithmetic_task(50, 50, seed=1, demo_noise=0.7, small_addend=True)[0]
    items += arithmetic.load_gsm8k(str(ROOT / "tests/fixtures/gsm8k"), num_train=10, num_eval=10)[0]
    rewards = arithmetic.reward_function([x["solution"] for x in items], [x["answer"] for x in items])
    assert rewards["total"].tolist() == pytest.approx([1.1] * len(items))


def test_gsm8k_fixture_loads():
    train, held_out, demos = arithmetic.load_gsm8k(str(ROOT / "tests/fixtures/gsm8k"), num_train=10, num_eval=10)
    assert [x["answer"] for x in train] == ["72", "10", "10", "2700"]
    assert [x["answer"] for x in held_out] == ["12", "5"]
    assert "<<" not in demos[0][1] and demos[0][1].endswith("<answer>72</answer>")


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="GSM8K|non-empty"):
        arithmetic.load_task("gsm8k", str(tmp_path), num_train=10, num_eval=10, seed=0, demo_noise=0.7)
    with pytest.raises(ValueError, match="--num_train must be at least 1"):  # the argument, not --num_shots
        grpo.Args(num_train=0)
    fixture = str(ROOT / "tests/fixtures/gsm8k")  # 4 training problems, all taken as worked examples
    with pytest.raises(ValueError, match=r"The gsm8k task has 0 training \(after 4 worked examples\)"):
        arithmetic.load_task("gsm8k", fixture, num_train=10, num_eval=10, seed=0, demo_noise=0.7, num_shots=4)


# ---------------------------------------------------------------------------------------------------------------
# rollout and scoring on the tiny model


@pytest.fixture(scope="module")
def tiny():
    """The warm start `grpo.py --num_eval 8 --sft_steps 50` trains from (one cache entry for both)."""
    _, _, demos = arithmetic.make_arithmetic_task(2000, 8, seed=0, demo_noise=0.7)
    return load_model("tiny", demos=demos, sft_steps=50)


def test_left_padding_does_not_change_logprobs(tiny):
    """A short prompt left-padded next to a long one gets the same log-probs as when it is alone."""
    model, tokenizer = tiny
    prompts = ["3+4=", "47+38="]
    completion = tokenizer(["<think>7+8=15</think>"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    assert enc["attention_mask"][0, 0] == 0  # really left-padded
    completions = completion.repeat(2, 1)
    batch = {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "completion_ids": completions,
             "completion_mask": torch.ones_like(completions)}  # fmt: skip
    both, _ = grpo.completion_logprobs(model, batch)
    alone = tokenizer(["3+4="], return_tensors="pt", add_special_tokens=False)
    batch = {"prompt_ids": alone["input_ids"], "prompt_mask": alone["attention_mask"], "completion_ids": completion,
             "completion_mask": torch.ones_like(completion)}  # fmt: skip
    one, _ = grpo.completion_logprobs(model, batch)
    torch.testing.assert_close(both[0], one[0], atol=1e-5, rtol=1e-5)


def test_plain_logprobs_are_the_chunked_ones_bit_for_bit(tiny):
    """grpo.py computes log-probs and entropies in plain tensor ops; prefix_grouper.logprobs_from_logits (a chunk at
    a time, recomputed in the backward) gives the same bits from the same logits: values and gradients."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollout = grpo.generate_completions(model, tokenizer, ["47+38=", "12+34="], 3, 32, 1.0, 1.0)
    batch = {k: v for k, v in rollout.items() if torch.is_tensor(v)}
    logits = []
    hook = model.register_forward_hook(lambda module, args, output: logits.append(output.logits))
    results = []
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        logps, entropy = grpo.completion_logprobs(model, batch, temperature=0.7)
        if chunked:  # the same forward's logits, through the chunked function
            logps, entropy = logprobs_from_logits(logits[-1][:, :-1], batch["completion_ids"], 0.7, chunk_bytes=2**12)
        ((logps + entropy) * batch["completion_mask"]).sum().backward()
        results.append((logps, entropy, [p.grad.clone() for p in model.parameters()]))
    hook.remove()
    (logps, entropy, grads), (chunked_logps, chunked_entropy, chunked_grads) = results
    assert torch.equal(logps, chunked_logps) and torch.equal(entropy, chunked_entropy)
    assert all(torch.equal(a, b) for a, b in zip(grads, chunked_grads))


def test_large_logits_go_the_chunked_way(monkeypatch):
    """Over 256 MiB of float32 logits (2**26 of them), completion_logprobs hands them to logprobs_from_logits."""

    class Huge(torch.nn.Module):  # logits (B, C + 1, 2**25) as a view of one number: no memory
        device = torch.device("cpu")

        def forward(self, input_ids, logits_to_keep, **kwargs):
            return SimpleNamespace(logits=torch.zeros(1, 1, 1).expand(len(input_ids), logits_to_keep, 2**25))

    seen = []
    monkeypatch.setattr(grpo, "logprobs_from_logits", lambda logits, *args: seen.append(logits.shape) or (0, 0))
    ones = torch.ones(2, 2, dtype=torch.long)
    batch = {"prompt_ids": ones, "prompt_mask": ones, "completion_ids": ones, "completion_mask": ones}
    assert grpo.completion_logprobs(Huge(), batch) == (0, 0) and seen == [(2, 2, 2**25)]  # 2**27 logits


def test_rollout_masks_after_first_eos(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollout = grpo.generate_completions(model, tokenizer, ["47+38=", "12+34="], 3, 32, 1.0, 1.0)
    ids, mask = rollout["completion_ids"], rollout["completion_mask"]
    assert ids.shape[0] == mask.shape[0] == 6 and torch.equal(rollout["prompt_ids"][0], rollout["prompt_ids"][2])
    for row in range(6):
        eos = (ids[row] == tokenizer.eos_token_id).nonzero().flatten()
        if len(eos):  # everything up to and including the first EOS, nothing after
            assert mask[row].sum() == eos[0] + 1 and mask[row, : eos[0] + 1].all()
            assert not rollout["is_truncated"][row]
        else:
            assert mask[row].all() and rollout["is_truncated"][row]
    assert (~rollout["is_truncated"]).any()  # the warm-started model does stop
    # the temperature used for scoring changes the log-probs as dividing the logits does
    logps_t1, _ = grpo.completion_logprobs(model, rollout, temperature=1.0)
    logps_t2, _ = grpo.completion_logprobs(model, rollout, temperature=2.0)
    assert not torch.allclose(logps_t1, logps_t2)


# ---------------------------------------------------------------------------------------------------------------
# the script end to end


run_script = script_runner("grpo.py")
run_main = main_runner("grpo.py")


def test_help_lists_every_option(tmp_path):
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in grpo.Args.__dataclass_fields__:
        assert f"--{name}" in result.stdout


def test_two_steps_change_every_parameter(tmp_path, tiny):
    result = run_script("--num_steps", "2", "--sft_steps", "50", "--num_eval", "8", "--learning_rate", "1e-3",
                        "--prompts_per_step", "4", "--max_new_tokens", "16",
                        "--output_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm-starting" not in result.stdout, "the run did not start from the fixture's model"
    (run_dir,) = tmp_path.iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for key in ["reward", "reward_std", "frac_reward_zero_std", "entropy", "grad_norm", "completions/clipped_ratio"]:
        assert key in records[1]
    assert (run_dir / "metrics.png").exists() and (run_dir / "results.json").exists()
    trained = type(tiny[0]).from_pretrained(run_dir / "model")
    start = dict(tiny[0].named_parameters())
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, start[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"


@pytest.mark.slow  # the quick tier trains on this fixture in test_mixed_precision.py (SMALL_RUNS)
def test_gsm8k_path_runs_on_the_fixture(tmp_path):
    result = run_script("--dataset", "gsm8k", "--dataset_path", str(ROOT / "tests/fixtures/gsm8k"), "--num_steps", "1",
                        "--sft_steps", "5", "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "8",
                        "--output_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--group_size", "1"], "group_size must be at least 2"),
        (["--model", "no-such-org/no-such-model"], "Could not load model 'no-such-org/no-such-model'"),
        (["--dataset", "gsm8k", "--dataset_path", "/no/such/folder"], "Could not load GSM8K"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--num_shots", "5", "--num_train", "5"], "num_shots must be below --num_train"),
        (["--small_addend"], "must be at most 810 (the task's problems), got 2000 + 200"),
        (["--num_shots", "2"], "--num_shots needs a chat model (e.g. --model smollm2-135m)"),  # tiny: at the door
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, argv, message, capsys):
    code, err = run_main(*argv, "--output_dir", str(tmp_path), capsys=capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert message in err.splitlines()[-1], err[-2000:]
