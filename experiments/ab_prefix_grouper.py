"""Prefix Grouper A/B: another version of prefix_grouper.py against this one, in one process, alternating round by
round (grouped and trie sides only, forward+backward, median of the rounds), on bench_prefix_grouper.py's cells.

    git show 6a9adbc~1:prefix_grouper.py > /tmp/previous.py      # the version before the change measured
    python experiments/ab_prefix_grouper.py /tmp/previous.py tiny 5
"""

import importlib.util
import statistics
import sys
import time

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402

import prefix_grouper as new  # noqa: E402

spec = importlib.util.spec_from_file_location("pg_old", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
from bench_prefix_grouper import full_tree, random_batch, random_model, random_tree  # noqa: E402

model_name = sys.argv[2]
rounds = int(sys.argv[3])
model = random_model(model_name, "sdpa", torch.float32, torch.device("cpu")).train()
V = model.config.vocab_size


def fb(mod, kind, prompts, completions):
    AttentionInterface.register("prefix_grouper", mod.prefix_grouper_attention)
    t = time.perf_counter()
    if kind == "group":
        out = [x for g in mod.shared_prefix_logprobs(model, prompts, completions) for x in g]
    else:
        seqs = [torch.cat([prompts[0], c]) for c in completions[0]]
        out = mod.trie_logprobs(model, seqs, [len(prompts[0])] * len(seqs))
    sum(x.sum() for x in out).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


cells = {}
if model_name == "tiny":
    for p in (256, 1024):
        for s in (64, 256):
            for g in (4, 8):
                cells[f"group P={p} S={s} G={g}"] = ("group",) + random_batch(V, [p], [[s] * g])
trees = {
    "default (M=2, N=2, L=1, 4 turns)": random_tree(V, 256, 2, 2, 4, 96),
    "deeper (M=2, N=4, L=3, 8 turns)": random_tree(V, 256, 2, 12, 8, 64),
    "3 levels x 3 children, prompt 256": full_tree(V, 256, 3, 3, 64),
    "3 levels x 3 children, prompt 512": full_tree(V, 512, 3, 3, 64),
}
if model_name == "small":
    cells["group P=1024 S=64 G=8"] = ("group",) + random_batch(V, [1024], [[64] * 8])
    trees = {k: v for k, v in trees.items() if not k.startswith("deeper")}
for name, (prompt, responses) in trees.items():
    cells[f"tree {name}"] = ("tree", [prompt], [responses])
print(f"| cell | previous s | new s | previous / new |  ({model_name}, median of {rounds} interleaved rounds)")
print("|---|---|---|---|")
for name, (kind, prompts, completions) in cells.items():
    fb(old, kind, prompts, completions)
    fb(new, kind, prompts, completions)  # warm-up
    t_old, t_new = [], []
    for _ in range(rounds):
        t_old.append(fb(old, kind, prompts, completions))
        t_new.append(fb(new, kind, prompts, completions))
    a, b = statistics.median(t_old), statistics.median(t_new)
    print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)
