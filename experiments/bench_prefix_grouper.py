"""Prefix Grouper against the naive repeated-prefix forward: equivalence, then speed and memory tables.

    python experiments/bench_prefix_grouper.py            # the tiny model's shape on this machine's CPU
    python experiments/bench_prefix_grouper.py --model small
    python experiments/bench_prefix_grouper.py --device cuda --model qwen2.5-0.5b --dtype bfloat16   # a GPU
First it checks, on the device it times, that log-probs and gradients equal the naive computation's; then it
times forward+backward of the summed log-probs for each (P, S, G) of a group, and of Tree-GRPO-shaped trees
with trie_logprobs, each against the same batch with every sequence in its own row. Random weights: speed and
memory depend on the shape only. The tables go to RESULTS.md.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from common import pick_device  # noqa: E402
from experiments.sweep import int_list  # noqa: E402
from plumbing import arg, check_args_shared, run_cli  # noqa: E402
from prefix_grouper import pack_trie, repeated_prefix_logprobs, shared_prefix_logprobs, trie_logprobs, unflatten  # noqa: E402


@dataclass
class Args:
    """What to time, on which machine (--help lists every option and what it accepts)."""

    model: Literal["tiny", "small", "qwen2.5-0.5b"] = arg(
        "tiny", "random weights of a shape: tiny (0.8M Qwen2) | small (width 512, 32k vocabulary) | qwen2.5-0.5b"
    )
    device: str = arg("auto", "where it checks and times: auto | cpu | cuda | cuda:N | mps", "device")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "the timed model's weights")
    kernel: Literal["sdpa", "eager"] = arg("sdpa", "attention kernel of both sides")
    prompt_lengths: str = arg("256,1024", "P values, comma-separated")
    completion_lengths: str = arg("64,256", "S values, comma-separated")
    group_sizes: str = arg("4,8", "G values, comma-separated")
    repeats: int = arg(3, "timed forward+backward passes per cell (median)", ">= 1")
    trees: bool = arg(True, "also the tree table: trie_logprobs vs each leaf alone")

    def __post_init__(self):
        check_args_shared(self)  # every field in its declared range: bad values fail before any model is built
        int_list(self.prompt_lengths, "--prompt_lengths", least=1, name="length")
        int_list(self.completion_lengths, "--completion_lengths", least=1, name="length")
        int_list(self.group_sizes, "--group_sizes", least=1, name="size")


def random_model(name, kernel, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shapes = {  # random weights: speed and memory depend on the shape only
        "tiny": dict(vocab_size=107, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2),
        "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2),
        "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2),
    }  # fmt: skip
    config = Qwen2Config(**shapes[name], tie_word_embeddings=True, max_position_embeddings=32768)
    config._attn_implementation = kernel
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def random_batch(vocab_size, prompt_lengths, completion_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab_size, (p,), generator=g) for p in prompt_lengths]
    completions = [[torch.randint(3, vocab_size, (s,), generator=g) for s in group] for group in completion_lengths]
    return prompts, completions


def check_equivalence(model):
    """Log-probs and gradients of both paths on a batch with uneven lengths, on the model's device; returns the
    largest differences."""
    prompts, completions = random_batch(model.config.vocab_size, [7, 3, 12], [[5, 2, 9], [4], [1, 6]])
    prompts = [p.to(model.device) for p in prompts]
    completions = [[c.to(model.device) for c in group] for group in completions]
    results = []
    for fn in (shared_prefix_logprobs, repeated_prefix_logprobs):
        model.zero_grad()
        logps = fn(model, prompts, completions)
        sum(lp.sum() for group in logps for lp in group).backward()
        results.append((torch.cat([lp for g in logps for lp in g]), [p.grad.clone() for p in model.parameters()]))
    (lp_grouped, g_grouped), (lp_naive, g_naive) = results
    logp_diff = (lp_grouped - lp_naive).abs().max().item()
    grad_diff = max(((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(g_grouped, g_naive))
    return logp_diff, grad_diff


def forward_backward(fn, model, prompts, completions):
    """Seconds and peak memory of one forward+backward of the summed log-probs.

    Memory on CUDA is torch.cuda.max_memory_allocated above what was allocated before; on CPU (no allocator
    statistics) it is the bytes of the tensors autograd saves for backward, the activations that dominate it.
    """
    cuda = model.device.type == "cuda"
    saved = {}

    def pack_hook(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        logps = fn(model, prompts, completions)
    sum(lp.sum() for group in logps for lp in group).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - base if cuda else sum(saved.values())
    model.zero_grad(set_to_none=True)
    return seconds, memory


def benchmark(args: Args):
    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = random_model(args.model, args.kernel, dtype, device).train()
    memory_kind = "peak CUDA memory" if device.type == "cuda" else "saved activations"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nforward+backward, {args.model} (random weights), {args.dtype}, {args.kernel}, {name}; "
          f"median of {args.repeats}; memory = {memory_kind}\n")  # fmt: skip
    print("| P | S | G | naive s | grouped s | speed-up | ideal G(P+S)/(P+GS) | share of ideal | naive MB | "
          "grouped MB | memory ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for p in map(int, args.prompt_lengths.split(",")):
        for s in map(int, args.completion_lengths.split(",")):
            for g in map(int, args.group_sizes.split(",")):
                prompts, completions = random_batch(model.config.vocab_size, [p], [[s] * g])
                prompts = [x.to(device) for x in prompts]
                completions = [[x.to(device) for x in group] for group in completions]
                cell = {}
                for label, fn in (("naive", repeated_prefix_logprobs), ("grouped", shared_prefix_logprobs)):
                    forward_backward(fn, model, prompts, completions)  # warm-up
                    runs = [forward_backward(fn, model, prompts, completions) for _ in range(args.repeats)]
                    cell[label] = (sorted(r[0] for r in runs)[len(runs) // 2], max(r[1] for r in runs))
                (tn, mn), (tg, mg) = cell["naive"], cell["grouped"]
                ideal = g * (p + s) / (p + g * s)
                row = dict(P=p, S=s, G=g, naive_s=tn, grouped_s=tg, naive_mb=mn / 2**20, grouped_mb=mg / 2**20)
                rows.append(row)
                print(f"| {p} | {s} | {g} | {tn:.3f} | {tg:.3f} | {tn / tg:.2f}x | {ideal:.2f} | "
                      f"{tn / tg / ideal:.0%} | {mn / 2**20:.0f} | {mg / 2**20:.0f} | {mn / mg:.2f}x |",
                      flush=True)  # fmt: skip
    return rows


def random_tree(vocab_size, prompt_length, trees, expansions, turns, step_tokens, seed=0):
    """A Tree-GRPO-shaped rollout of one question: `trees` chains of `turns` steps of `step_tokens` tokens (a step
    and its observation), and per tree `expansions` more leaves, each branching off an existing leaf at a random
    step and finishing with new steps. Returns the prompt and the leaves' responses."""
    g = torch.Generator().manual_seed(seed)
    new_steps = lambda n: [torch.randint(3, vocab_size, (step_tokens,), generator=g) for _ in range(n)]  # noqa: E731
    prompt, responses = torch.randint(3, vocab_size, (prompt_length,), generator=g), []
    for _ in range(trees):
        leaves = [new_steps(turns)]
        for _ in range(expansions):
            parent = leaves[int(torch.randint(len(leaves), (1,), generator=g))]
            keep = int(torch.randint(turns, (1,), generator=g))  # branch after this many steps (0: at the root)
            leaves.append(parent[:keep] + new_steps(turns - keep))
        responses += [torch.cat(steps) for steps in leaves]
    return prompt, responses


def full_tree(vocab_size, prompt_length, levels, children, step_tokens, seed=0):
    """A tree that branches at every step: `levels` steps of `step_tokens` tokens, each node with `children`
    children, children**levels leaves. Returns the prompt and the leaves' responses."""
    g = torch.Generator().manual_seed(seed)
    prompt, paths = torch.randint(3, vocab_size, (prompt_length,), generator=g), [[]]
    for _ in range(levels):
        paths = [path + [torch.randint(3, vocab_size, (step_tokens,), generator=g)] for path in paths
                 for _ in range(children)]  # fmt: skip
    return prompt, [torch.cat(path) for path in paths]


def trie_of_groups(model, prompts, completions):
    """trie_logprobs with shared_prefix_logprobs's inputs and output (for the benchmark)."""
    sequences = [torch.cat([prompt, c]) for prompt, group in zip(prompts, completions) for c in group]
    starts = [len(prompt) for prompt, group in zip(prompts, completions) for _ in group]
    return unflatten(torch.cat(trie_logprobs(model, sequences, starts)), [len(c) for g in completions for c in g],
                     completions)  # fmt: skip


def tree_benchmark(args: Args, model):
    """Forward+backward of a tree's leaf log-probs: each leaf as its own row vs trie_logprobs."""
    print("\ntrees: trie_logprobs vs each leaf alone (repeated_prefix_logprobs), one question, forward+backward\n")
    print("| shape | leaves | leaf tokens | trie tokens | ideal | naive s | trie s | speed-up | share of ideal | "
          "naive MB | trie MB | memory ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    vocab = model.config.vocab_size
    shapes = {  # random_tree: (prompt, M trees, expansions per tree = N*L, turns, tokens per step and observation)
        "default (M=2, N=2, L=1, 4 turns)": lambda: random_tree(vocab, 256, 2, 2, 4, 96),
        "deeper (M=2, N=4, L=3, 8 turns)": lambda: random_tree(vocab, 256, 2, 12, 8, 64),
        # full_tree: (prompt, levels, children per node, tokens per step and observation)
        "3 levels x 3 children, prompt 256": lambda: full_tree(vocab, 256, 3, 3, 64),
        "3 levels x 3 children, prompt 512": lambda: full_tree(vocab, 512, 3, 3, 64),
    }
    for name, build in shapes.items():
        prompt, responses = build()
        prompt, responses = prompt.to(model.device), [r.to(model.device) for r in responses]
        sequences = [torch.cat([prompt, r]) for r in responses]
        trie_tokens = pack_trie(sequences).input_ids.numel()
        leaf_tokens = sum(map(len, sequences))
        cell = {}
        for label, fn in (("naive", repeated_prefix_logprobs), ("trie", trie_of_groups)):
            forward_backward(fn, model, [prompt], [responses])  # warm-up
            runs = [forward_backward(fn, model, [prompt], [responses]) for _ in range(args.repeats)]
            cell[label] = (sorted(r[0] for r in runs)[len(runs) // 2], max(r[1] for r in runs))
        (tn, mn), (tt, mt) = cell["naive"], cell["trie"]
        print(f"| {name} | {len(sequences)} | {leaf_tokens} | {trie_tokens} | {leaf_tokens / trie_tokens:.2f} | "
              f"{tn:.3f} | {tt:.3f} | {tn / tt:.2f}x | {tn / tt / (leaf_tokens / trie_tokens):.0%} | "
              f"{mn / 2**20:.0f} | {mt / 2**20:.0f} | {mn / mt:.2f}x |", flush=True)  # fmt: skip


def main(args: Args):
    tiny = random_model("tiny", args.kernel, torch.float32, pick_device(args.device)).train()  # where we benchmark
    logp_diff, grad_diff = check_equivalence(tiny)
    print(f"equivalence on the tiny model (float32, {args.kernel}, {tiny.device}): max |log-prob difference| "
          f"{logp_diff:.1e}, max relative gradient difference {grad_diff:.1e}")  # fmt: skip
    if logp_diff > 1e-5 or grad_diff > 1e-4:
        sys.exit("prefix_grouper does not match the naive computation")
    benchmark(args)
    if args.trees:
        tree_benchmark(args, random_model(args.model, args.kernel, {"float32": torch.float32, "bfloat16":
                                          torch.bfloat16}[args.dtype], pick_device(args.device)).train())  # fmt: skip


if __name__ == "__main__":
    run_cli(Args, main)
