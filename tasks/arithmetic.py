"""Two-digit addition (offline) and GSM8K: grpo.py's task, its reward and its held-out evaluation.

Offline default: two-digit addition, e.g. prompt "47+38=", answered with a digit-by-digit trace and the result,
"<think>7+8=15 4+3+1=8</think><answer>85</answer>". The tiny model is warm-started on demonstrations that forget
the carry most of the time (demo_noise), so it starts knowing the format but making a systematic mistake; the
reward (1 for the right number, +0.1 for the format) is what teaches it to carry. GSM8K (hub id or local folder)
trains with the same reward.
A pretrained chat model gets no warm start: `num_shots` K shows it K solved training problems as earlier chat
turns, which is how it learns the format. `small_addend` (47+8=, answered "<think>47+8=55</think><answer>55
</answer>") is the task SmolLM2-135M-Instruct partly solves with 3 shots, unlike two-digit sums
(experiments/probe_smollm2_arithmetic.py measures both), and GRPO needs some right answers in a group to learn.
"""

import random
import re

import torch

from plumbing import UsageError
from tasks import is_text, load_data, rows

SYSTEM_PROMPT = (
    "Solve the problem. Think step by step inside <think> </think>, then give only the final number "
    "inside <answer> </answer>."
)


def addition_trace(a: int, b: int, drop_carry: bool = False) -> str:
    """The digit-by-digit demonstration, e.g. 47+38 -> '<think>7+8=15 4+3+1=8</think><answer>85</answer>'.

    With drop_carry the tens step forgets the carry (4+3=7 -> 75): a consistent trace with a wrong answer.
    A one-digit b gets the sum in one step, 47+8 -> '<think>47+8=55</think><answer>55</answer>' (drop_carry: 45):
    SmolLM2-135M copies the digit trace badly (0% right vs 41% in experiments/probe_smollm2_arithmetic.py).
    """
    if b < 10:
        total = a + b - (10 if drop_carry and a % 10 + b >= 10 else 0)
        return f"<think>{a}+{b}={total}</think><answer>{total}</answer>"
    ones = a % 10 + b % 10
    carry = ones // 10 if not drop_carry else 0
    tens = a // 10 + b // 10 + carry
    tens_step = f"{a // 10}+{b // 10}+1={tens}" if carry else f"{a // 10}+{b // 10}={tens}"
    return f"<think>{a % 10}+{b % 10}={ones} {tens_step}</think><answer>{tens}{ones % 10}</answer>"


def make_arithmetic_task(num_train: int, num_eval: int, seed: int, demo_noise: float, small_addend: bool = False):
    """Two-digit additions (small_addend: a two-digit plus a one-digit number), split into disjoint train and
    held-out sets. Each item has its question, answer and a correct solution. Returns (train, eval, demos)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in (range(1, 10) if small_addend else range(10, 100))]
    rng.shuffle(pairs)  # 8100 problems (small_addend: 810)
    if num_eval + num_train > len(pairs):
        raise UsageError(
            f"--num_train + --num_eval must be at most {len(pairs)} (the task's problems), got {num_train} + {num_eval}"
        )
    to_item = lambda a, b: {"question": f"{a}+{b}=", "answer": str(a + b), "solution": addition_trace(a, b)}  # noqa: E731
    eval_items = [to_item(a, b) for a, b in pairs[:num_eval]]
    train_pairs = pairs[num_eval : num_eval + num_train]
    train_items = [to_item(a, b) for a, b in train_pairs]
    demos = [(f"{a}+{b}=", addition_trace(a, b, drop_carry=rng.random() < demo_noise)) for a, b in train_pairs]
    return train_items, eval_items, demos


# GSM8K's format: {field: (check, what it must be)}; the final number after '####'
GSM8K_SCHEMA = {
    "question": (is_text, "non-empty text"),
    "answer": (
        lambda v, row: is_text(v) and "####" in v and bool(v.rpartition("####")[2].strip()),
        "text ending in '#### <number>'",
    ),
}


def load_gsm8k(path: str, num_train: int, num_eval: int):
    """GSM8K from the hub ('openai/gsm8k') or a local folder with train/test files in its format
    (fields 'question' and 'answer', the answer ending in '#### <number>'). Returns (train, eval, demos)."""
    splits = {"train": ("train",), "eval": ("test",)}
    data = load_data(path, "GSM8K", splits, ("question", "answer"), "--dataset arithmetic", config_name="main")

    def to_items(split, limit):
        items = []
        for row in rows(path, split, limit, GSM8K_SCHEMA):
            reasoning, _, answer = row["answer"].rpartition("####")
            reasoning = re.sub(r"<<.*?>>", "", reasoning).strip()  # drop the calculator annotations
            answer = answer.strip().replace(",", "")
            solution = f"<think>{reasoning}</think><answer>{answer}</answer>"
            items.append({"question": row["question"], "answer": answer, "solution": solution})
        return items

    train_items, eval_items = to_items(data["train"], num_train), to_items(data["eval"], num_eval)
    return train_items, eval_items, [(x["question"], x["solution"]) for x in train_items]


def load_task(dataset, dataset_path, num_train, num_eval, seed, demo_noise, small_addend=False, num_shots=0):
    """(train items, held-out items, the tiny model's demos, the `num_shots` worked examples for a chat model)."""
    if dataset == "arithmetic":
        train_items, eval_items, demos = make_arithmetic_task(num_train, num_eval, seed, demo_noise, small_addend)
    else:
        train_items, eval_items, demos = load_gsm8k(dataset_path, num_train, num_eval)
    # num_shots: the first training problems, solved, shown to a chat model as earlier turns (not trained on)
    shots = [(x["question"], x["solution"]) for x in train_items[:num_shots]]
    train_items = train_items[num_shots:]
    if not train_items or not eval_items:
        raise UsageError(
            f"The {dataset} task has {len(train_items)} training (after {num_shots} worked examples) and "
            f"{len(eval_items)} held-out problems; both must be non-empty (check --num_train, --num_eval, "
            f"--num_shots and the data files)."
        )
    return train_items, eval_items, demos, shots


def extract_answer(completion: str) -> str | None:
    match = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    return match.group(1).strip() if match else None


def correctness_reward(completion: str, answer: str) -> float:
    """1 if the number in <answer> equals the reference (commas and a trailing '.0' ignored), else 0."""
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    normalise = lambda s: s.replace(",", "").replace("$", "").strip().removesuffix(".0")  # noqa: E731
    return float(normalise(predicted) == normalise(answer))


def format_reward(completion: str) -> float:
    """1 if the completion is exactly <think>...</think><answer>...</answer>, else 0."""
    return float(re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", completion, re.DOTALL) is not None)


def reward_function(completions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Per-completion rewards by name; the training reward is their weighted sum (correct + 0.1 format)."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers: pass one answer per completion")
    correct = torch.tensor([correctness_reward(c, a) for c, a in zip(completions, answers)])
    formatted = torch.tensor([format_reward(c) for c in completions])
    return {"correct": correct, "format": formatted, "total": correct + 0.1 * formatted}


@torch.no_grad()
def evaluate(model, tokenizer, items, to_prompt, max_new_tokens, generate_completions, batch_size=256):
    """Greedy decoding on held-out problems with the script's `generate_completions`: accuracy, share well
    formatted, mean completion length."""
    model.eval()
    correct, formatted, length = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [to_prompt(x) for x in chunk]
        rollout = generate_completions(
            model, tokenizer, prompts, group_size=1, max_new_tokens=max_new_tokens, greedy=True
        )
        rewards = reward_function(rollout["texts"], [x["answer"] for x in chunk])
        correct += rewards["correct"].tolist()
        formatted += rewards["format"].tolist()
        length += rollout["completion_mask"].sum(1).tolist()
    n = len(items)
    return {"accuracy": sum(correct) / n, "format": sum(formatted) / n, "mean_length": sum(length) / n}
