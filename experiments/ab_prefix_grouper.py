"""Prefix Grouper A/B: another version of prefix_grouper.py against this one, in one process, alternating round by
round (grouped and trie sides only, forward+backward, median of the rounds), on bench_prefix_grouper.py's cells.

    git show 6a9adbc~1:prefix_grouper.py > /tmp/previous.py      # the version before the change measured
    python experiments/ab_prefix_grouper.py /tmp/previous.py tiny 5
"""

import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from importlib.machinery import SourceFileLoader
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402

import prefix_grouper as new  # noqa: E402
from experiments.bench_prefix_grouper import full_tree, random_batch, random_model, random_tree  # noqa: E402
from plumbing import UsageError, run_cli  # noqa: E402

NEEDS = ("prefix_grouper_attention", "shared_prefix_logprobs", "trie_logprobs")  # what both sides are timed on


@dataclass
class Args:
    """No options: the previous version, the model and the rounds are positional."""


POSITIONALS = {
    "previous": dict(metavar="PREVIOUS.py", help="the other version of prefix_grouper.py"),
    "model_name": dict(metavar="MODEL", choices=("tiny", "small"), help="the random model's shape: tiny | small"),
    "rounds": dict(metavar="ROUNDS", type=int, help="interleaved timing rounds, their median (at least 1)"),
}


def load_previous(path: str):
    """The other prefix_grouper.py as a module, or a UsageError naming the file and what it lacks."""
    if not Path(path).is_file():
        raise UsageError(f"PREVIOUS.py {path}: no such file; e.g. git show <commit>:prefix_grouper.py > {path}")
    if Path(path).read_bytes() == (ROOT / "prefix_grouper.py").read_bytes():
        raise UsageError(f"PREVIOUS.py {path} is this prefix_grouper.py: both sides would be the same code")
    spec = importlib.util.spec_from_file_location("pg_old", path, loader=SourceFileLoader("pg_old", path))
    old = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(old)
    except Exception as error:
        raise UsageError(f"PREVIOUS.py {path} does not load as Python ({type(error).__name__}: {error})") from None
    if missing := [name for name in NEEDS if not hasattr(old, name)]:
        raise UsageError(f"PREVIOUS.py {path} is not a prefix_grouper.py: it has no {', '.join(missing)}")
    return old


def fb(mod, model, kind, prompts, completions):
    """Seconds of one forward+backward of the summed log-probs through `mod`'s attention function."""
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


def cells(model_name: str, V: int) -> dict:
    """bench_prefix_grouper.py's cells for the model: {name: (group | tree, prompts, completions)}."""
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
    return cells


def main(options: Args, previous: str, model_name: str, rounds: int):
    if rounds < 1:
        raise UsageError(f"ROUNDS must be at least 1, got {rounds}")
    old = load_previous(previous)
    model = random_model(model_name, "sdpa", torch.float32, torch.device("cpu")).train()
    print(f"| cell | previous s | new s | previous / new |  ({model_name}, median of {rounds} interleaved rounds)")
    print("|---|---|---|---|")
    for name, (kind, prompts, completions) in cells(model_name, model.config.vocab_size).items():
        fb(old, model, kind, prompts, completions)
        fb(new, model, kind, prompts, completions)  # warm-up
        t_old, t_new = [], []
        for _ in range(rounds):
            t_old.append(fb(old, model, kind, prompts, completions))
            t_new.append(fb(new, model, kind, prompts, completions))
        a, b = statistics.median(t_old), statistics.median(t_new)
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    run_cli(Args, main, POSITIONALS)
