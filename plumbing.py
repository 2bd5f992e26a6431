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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Range:
    """The numbers an option accepts: from `low` to `high`, either end open (excluded) or None (unbounded). NaN
    and the infinities are in no range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"> {self.low}" if self.low_open else f"at least {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


class Devices:
    """What --device accepts: auto, cpu, or a cuda (cuda:N) or mps device this machine has."""

    def __contains__(self, name) -> bool:
        import torch

        kind, _, index = str(name).partition(":")
        if name in ("auto", "cpu"):
            return True
        if kind == "cuda" and torch.cuda.is_available():
            return not index or (index.isdigit() and int(index) < torch.cuda.device_count())
        return name == "mps" and torch.backends.mps.is_available()

    def __str__(self) -> str:
        return "auto, cpu, or a cuda or mps device this machine has"


def accepted(text: str) -> Range | Devices:
    """'>= 1', '> 0', '[0, 1]', '(0, 1]', '[0, 1)' or 'device' as what check_args_shared tests."""
    if text == "device":
        return Devices()
    if text.startswith(">"):
        low = text.lstrip(">=").strip()
        return Range(float(low) if "." in low else int(low), low_open=not text.startswith(">="))
    low, high = (float(x) if "." in x else int(x) for x in text[1:-1].split(","))
    return Range(low, high, low_open=text[0] == "(", high_open=text[-1] == ")")


ACCEPTS = {}  # each declared field -> what it accepts (not in its metadata: HfArgumentParser hands that to argparse)


def arg(default, help: str, accepts: str | None = None):
    """An Args field: its default, one line of help and what it accepts ('>= 1', '> 0', '[0, 1]', '(0, 1]', ...,
    'device'), which --help shows after the help and check_args_shared checks."""
    declared = dataclasses.field(
        default=default, metadata={"help": f"{help} [{accepted(accepts)}]" if accepts else help}
    )
    if accepts:
        ACCEPTS[declared] = accepts
    return declared


def check_args_shared(args):
    """The checks every script's `Args.__post_init__` shares: every field's value against what its declaration
    accepts (`arg`), and a writable output folder. Raises UsageError, so parse_args turns it into argparse's
    `error: --flag must be ..., got ...` before any loading. What one range cannot say (a divisor of the batch, a
    stage that needs --init) stays in the script's check_args."""
    for field in dataclasses.fields(args):
        accepts, value = ACCEPTS.get(field), getattr(args, field.name)
        if accepts and value is not None and value not in accepted(accepts):
            raise UsageError(f"--{field.name} must be {accepted(accepts)}, got {value}")
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


def shown(path: Path) -> str:
    """A path as a message shows it: under the home folder as ~/..., so logs and notebooks carry no user's name."""
    path = Path(path)
    return f"~/{path.relative_to(Path.home())}" if path.is_relative_to(Path.home()) else str(path)


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
    run stopped by Ctrl-C also saves the model as it is to run_dir/model; it then says exactly what was saved.

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
        if exc_type is KeyboardInterrupt:  # say exactly what the run folder holds now
            kept = [f"metrics and plot up to step {self.records[-1]['step']}"] if self.records else []
            if self.model is not None:
                for part in self.model:
                    part.save_pretrained(self.run_dir / "model")
                kept.append("the model as it was")
            saved = " and ".join(kept) + " saved" if kept else "nothing saved but args.json (no step had finished)"
            print(f"\n[run] interrupted: {saved} in {self.run_dir}", file=sys.stderr)
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
