"""The run plumbing every script shares: the command line, bad-input errors, seeding, the run folder, metrics, plots.

Nothing here is algorithm logic or a model (models: common.py). Each script parses its `Args` dataclass with
`run_cli`, writes `runs/<algo>__<model>__seed<seed>__<time>/` with `make_run_dir`, and logs through
`MetricsLogger`, which keeps the metrics and the plot however the run ends.
"""

import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from transformers import HfArgumentParser

# ----------------------------------------------------------------------------------------------------------------
# Arguments, bad input, seeding


class UsageError(ValueError):
    """Bad input from the user (an argument, a data file, a model name). On the command line it is one line,
    `error: ...`, and exit code 2, like argparse's own errors; in Python it is a ValueError."""


def parse_args(args_class, argv=None):
    """Parse the command line into the script's `Args` dataclass (`--help` lists every field with its help), or
    into several: an experiment passes (the script's Args, its own), and gets a tuple back.

    Fields are given as `--num_steps 10` or `--num-steps 10`; booleans as `--flag`, `--flag false` or `--no_flag`.
    An unknown flag, or a value that the dataclass's `__post_init__` refuses, prints the usage line and
    `error: ...` and exits with code 2, before any model is loaded.
    """
    parser = HfArgumentParser(args_class)
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # raised by Args.__post_init__
        parser.error(str(error))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parsed) if isinstance(args_class, tuple) else parsed[0]


def run_cli(args_class, main):
    """`main(parse_args(args_class))` as a command (`main(*args)` for several classes): bad input (UsageError) is
    `error: ...` and exit code 2, and Ctrl-C stops with exit code 130, both without a traceback (what the run had
    is kept: MetricsLogger says what)."""
    args = parse_args(args_class)
    prog = Path(sys.argv[0]).name
    try:
        main(*args) if isinstance(args, tuple) else main(args)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def check_args_shared(args):
    """The checks every script's `Args.__post_init__` shares, each applied only where the script has that field:
    counts at least 1, group size at least 2, the sampling and clipping settings in their ranges, a writable
    output folder. Raises UsageError, so parse_args turns it into argparse's `error: ...` before any loading."""
    counts = ("num_steps", "eval_every", "prompts_per_step", "num_iterations", "gradient_accumulation_steps",
              "num_train", "num_eval", "max_new_tokens", "max_turns", "max_step_tokens", "images_per_class",
              "eval_per_class", "answer_tokens", "answer_samples", "dpo_samples")  # fmt: skip
    rules = [(name, lambda v: v >= 1, "must be at least 1") for name in counts] + [
        ("token_budget", lambda v: v >= 0, "must be at least 0 (0: run --num_steps steps)"),
        ("dual_clip", lambda v: v is None or v > 1, "must be > 1 (it caps the loss of a token whose ratio is above c)"),
        ("group_size", lambda v: v >= 2, "must be at least 2 (GRPO compares completions of one prompt)"),
        ("temperature", lambda v: v > 0, "must be > 0: GRPO needs different samples in a group (and scores with it)"),
        ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1] (1 samples from the whole distribution)"),
        ("eps_low", lambda v: 0 <= v < 1, "must be in [0, 1): the ratio is clipped below at 1 - eps_low > 0"),
        ("eps_high", lambda v: v is None or v >= 0, "must be at least 0"),
        ("beta", lambda v: v is None or v >= 0, "must be at least 0 (0: no KL penalty and no reference model)"),
        ("max_grad_norm", lambda v: v > 0, "must be > 0 (a gradient clipped to norm 0 never trains)"),
        ("learning_rate", lambda v: v > 0, "must be > 0"),
    ]
    for name, valid, rule in rules:
        if hasattr(args, name) and not valid(getattr(args, name)):
            raise UsageError(f"--{name} {rule}, got {getattr(args, name)}")
    if hasattr(args, "output_dir"):
        check_output_dir(args.output_dir)


def check_output_dir(path: str):
    """UsageError unless `path` is a folder we can write in, or can be made (checked before minutes of work)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output_dir {path!r}: {existing} is a file, not a folder; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {path!r}: {existing} is not writable; pass a folder you can write in")


# ----------------------------------------------------------------------------------------------------------------
# Run folder, metrics, plots


def make_run_dir(algo: str, args, root="runs") -> Path:
    """runs/{algo}__{model}__seed{seed}__{time}/ with the arguments saved as args.json; prints where it is."""
    model = Path(str(args.model)).name.replace("/", "_")
    name = f"{algo}__{model}__seed{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, suffix = Path(root) / name, 0
    while True:
        try:
            run_dir.mkdir(parents=True)
            break
        except FileExistsError:  # another run started in the same second
            suffix += 1
            run_dir = Path(root) / f"{name}-{suffix}"
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    print(f"[{algo}] run folder: {run_dir}")
    return run_dir


def save_run(run_dir, results: dict, *parts):
    """The trained model's parts (model, tokenizer or processor) in run_dir/model, the results in results.json."""
    for part in parts:
        part.save_pretrained(Path(run_dir) / "model")
    (Path(run_dir) / "results.json").write_text(json.dumps(results, indent=2))


def on_policy_note(tag: str):
    """The console explains the usual surprise of on-policy GRPO once, at the start of a run."""
    print(
        f"[{tag}] note: with num_iterations=1 the policy is on-policy (ratio == 1) and advantages are zero-mean, so\n"
        f"       the logged loss stays near 0 while its gradient is not 0. Watch the reward and held-out metrics."
    )


class MetricsLogger:
    """Appends one JSON line per `log()` to metrics.jsonl; on exit (also Ctrl-C or an error) writes metrics.csv and
    metrics.png, so an interrupted run keeps its curves. Given `model` (a (model, tokenizer or processor) pair), a
    run stopped by Ctrl-C also saves the model as it is to run_dir/model.

        with MetricsLogger(run_dir, model=(model, tokenizer)) as logger:
            logger.log(step, {"reward": 0.5})
    """

    def __init__(self, run_dir, plot_keys=None, model=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.plot_keys = plot_keys
        self.model = model
        self.records = []

    def log(self, step: int, metrics: dict):
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.records:
            write_csv(self.records, self.run_dir / "metrics.csv")
            plot_metrics(self.records, self.run_dir / "metrics.png", keys=self.plot_keys)
        if exc_type is KeyboardInterrupt:
            if self.model is not None:
                for part in self.model:
                    part.save_pretrained(self.run_dir / "model")
            kept = "metrics, plot and model" if self.model is not None else "metrics and plot"
            print(f"\n[common] interrupted: {kept} saved in {self.run_dir}", file=sys.stderr)
        return False  # re-raise any exception


def write_csv(records, path):
    columns = list(dict.fromkeys(k for record in records for k in record))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def plot_metrics(records, path, keys=None, title=None):
    """One small panel per metric against step; metrics logged only now and then (eval) are drawn as markers."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch in the caller's notebook, no display needed

    keys = keys or [k for k in dict.fromkeys(k for r in records for k in r) if k != "step"]
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 10 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
