"""Benchmark: grpo_pp.py's log-prob pass (forward and backward) with and without --prefix_grouper, on the tiny VLM.

    python experiments/bench_grpo_pp_prefix_grouper.py      # prints a table

G completions of one image share the image's tokens and the prompt; with --prefix_grouper they are encoded once
(and the vision tower sees each image once). A stage-1 batch: 12 images x G completions of 48 random tokens, the
warm-started tiny VLM's shapes with random weights (speed depends on shapes only); median of 3 after a warm-up.
Memory = bytes autograd saves for the backward (the CPU has no allocator statistics).
"""

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo_pp as G  # noqa: E402
from common import load_vlm  # noqa: E402
from experiments.bench_prefix_grouper import forward_backward  # noqa: E402
from plumbing import run_cli  # noqa: E402
from tasks import lesions  # noqa: E402


def batch_for(processor, images, group_size, completion_tokens, vocab_size, seed=0):
    prompt_ids, prompt_mask, pixels = G.encode_prompts(processor, images, "cpu")
    g = torch.Generator().manual_seed(seed)
    rows = len(images) * group_size
    return {
        "prompt_ids": prompt_ids.repeat_interleave(group_size, 0),
        "prompt_mask": prompt_mask.repeat_interleave(group_size, 0),
        "pixel_values": pixels.repeat_interleave(group_size, 0),
        "completion_ids": torch.randint(3, vocab_size - 1, (rows, completion_tokens), generator=g),
        "completion_mask": torch.ones(rows, completion_tokens, dtype=torch.long),
    }


def masked_logprobs(model, batch, prefix_grouper):
    """completion_logprobs in the nested form bench_prefix_grouper.forward_backward sums."""
    return [[G.completion_logprobs(model, batch, prefix_grouper=prefix_grouper)[0] * batch["completion_mask"]]]


@dataclass
class Args:
    """No options: the batches above."""


def main(options: Args):
    model, processor = load_vlm("tiny-vlm", "cpu")
    model.train()
    images = [x["image"] for x in lesions.make_lesion_task(2, 1, seed=0)[0][:12]]
    vocab_size = model.get_output_embeddings().out_features
    print(f"\ntiny VLM (random weights), float32, CPU, {torch.get_num_threads()} threads; 12 images; median of 3\n")
    print("| G | completion tokens | prompt tokens | naive s | grouped s | speed-up | naive MB | grouped MB | "
          "memory ratio |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for group_size, completion_tokens in ((8, 48), (8, 16), (4, 48)):
        batch = batch_for(processor, images, group_size, completion_tokens, vocab_size)
        cell = {}
        for grouped in (False, True):
            forward_backward(masked_logprobs, model, batch, grouped)  # warm-up
            runs = [forward_backward(masked_logprobs, model, batch, grouped) for _ in range(3)]
            cell[grouped] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
        (tn, mn), (tg, mg) = cell[False], cell[True]
        print(f"| {group_size} | {completion_tokens} | {batch['prompt_ids'].size(1)} | {tn:.3f} | {tg:.3f} | "
              f"{tn / tg:.2f}x | {mn / 2**20:.0f} | {mg / 2**20:.0f} | {mn / mg:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    run_cli(Args, main)
