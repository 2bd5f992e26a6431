"""The run plumbing every script shares: the command line, bad input, seeding, the run folder, the model cache's
folders, metrics, plots.

Nothing here is algorithm logic or a model (models: common.py). Each script parses its `Args` dataclass with
`run_cli`, writes `runs/<algo>__<model>__seed<seed>__<time>/` with `make_run_dir`, and logs through
`MetricsLogger`, which keeps the metrics and the plot however the run ends (Ctrl-C, SIGTERM, an error).
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

# ----------------------------------------------------------------------------------------------------------------
# Arguments, bad input, seeding


class UsageError(ValueError):
    """Bad input from the user (an argument, a data file, a model name). On the command line it is one line,
    `error: ...`, and exit code 2, like argparse's own errors; in Python it is a ValueError."""


def parse_args(args_class, argv=None, positionals=None):
    """Parse the command line into the script's `Args` dataclass (`--help` lists every field with its help), or
    into several: an experiment passes (the script's Args, its own), and gets a tuple back. A command that also
    takes positional arguments passes `positionals` ({name: argparse's add_argument options}) and gets
    (what it would get without them, {name: value}).

    Fields are given as `--num_steps 10` or `--num-steps 10`; booleans as `--flag`, `--flag false` or `--no_flag`.
    An unknown flag, a value that the dataclass's `__post_init__` refuses, or an option that the chosen mode does
    not use (MODES) prints the usage line and `error: ...` and exits with code 2, before any model is loaded.
    """
    parser = HfArgumentParser(args_class)
    for name, options in (positionals or {}).items():
        parser.add_argument(name, **options)
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # raised by Args.__post_init__
        parser.error(str(error))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    named = vars(parsed.pop()) if positionals else None  # the positional arguments, in a namespace of their own
    if not isinstance(args_class, tuple):  # (not an experiment's: its arms may switch the mode)
        for name in sorted(given_on_command_line(parser, args_class, argv)):
            if unused := unused_in_mode(parsed[0], name):
                parser.error(unused)
    result = tuple(parsed) if isinstance(args_class, tuple) else parsed[0]
    return (result, named) if positionals else result


# An option that one mode alone uses says so at the start of its help: "gsm8k: a hub id or a local folder" is used
# with --dataset gsm8k only. Given on the command line in another mode it is an error, never silently unused. A
# prefix that is one of an option's choices (gsm8k, tree, ...) names that option; these name the values they mean.
MODES = {
    "tiny warm start": ("model", ["tiny"]),
    "tiny-vlm": ("model", ["tiny-vlm"]),
    "stage 1": ("stage", ["all", "1"]),
    "stage 2 or 3 alone": ("stage", ["2", "3"]),
    "stage 2": ("stage", ["all", "2"]),
    "stage 3": ("stage", ["all", "3"]),
    "stages 2-3": ("stage", ["all", "2", "3"]),
}


def mode_of(args_class, name: str) -> tuple[str, list[str]] | None:
    """(option, its values) under which option `name` is used, as the prefix of its help says; None: always."""
    fields = {field.name: field for field in dataclasses.fields(args_class)}
    prefix, colon, _ = fields[name].metadata.get("help", "").partition(":")
    choosers = [option for option, field in fields.items() if prefix in typing.get_args(field.type)]
    if colon and (prefix in MODES or choosers):
        return MODES.get(prefix) or (choosers[0], [prefix])
    return None


def unused_in_mode(args, name: str) -> str | None:
    """Why option `name` is unused in the mode that `args` chose, or None. The option that chooses its mode may be
    unused itself (grpo_pp.py's warm-start options serve --model tiny-vlm, which only stage 1 loads)."""
    option = name
    while found := mode_of(type(args), option):
        option, values = found
        if str(getattr(args, option)) not in values:
            return (
                f"--{name} is used only with --{option} {' or '.join(values)}, and this run has --{option} "
                f"{getattr(args, option)}: leave --{name} out, or set --{option} {' or '.join(values)}"
            )
    return None


def given_on_command_line(parser, args_class, argv=None) -> set[str]:
    """The fields of `args_class` that the command line sets: argparse fills in a default only where the namespace
    it is given lacks the field, so every field that still holds the marker was not given."""
    unset = object()
    namespace = argparse.Namespace(**{field.name: unset for field in dataclasses.fields(args_class)})
    parser.parse_known_args(argv, namespace=namespace)
    return {field.name for field in dataclasses.fields(args_class) if getattr(namespace, field.name) is not unset}


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `docker stop` and Slurm send) raised as Ctrl-C is, so a run stopped by it keeps what
    Ctrl-C keeps (MetricsLogger)."""


def raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the run is saving what it has, then stops
    raise Terminated


def run_cli(args_class, main, positionals=None):
    """`main(parse_args(args_class))` as a command (`main(*args)` for several classes; `main(args, **named)` with
    positional arguments): bad input (UsageError) is `error: ...` and exit code 2, Ctrl-C stops with exit code 130
    and SIGTERM with 143, all without a traceback (what the run had is kept: MetricsLogger says what)."""
    args, named = parse_args(args_class, positionals=positionals) if positionals else (parse_args(args_class), {})
    prog = Path(sys.argv[0]).name
    default_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main(*args, **named) if isinstance(args, tuple) else main(args, **named)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, default_sigterm)


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
        kind, _, index = str(name).partition(":")
        if name in ("auto", "cpu"):
            return True
        if kind == "cuda" and torch.cuda.is_available():
            return not index or (index.isdigit() and int(index) < torch.cuda.device_count())
        return kind == "mps" and index in ("", "0") and torch.backends.mps.is_available()

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


def check_seed(flag: str, value: int):
    """A seed numpy accepts (below 2**32), or a UsageError naming the flag."""
    if value >= 2**32:
        raise UsageError(f"{flag} must be below 2**32 = 4294967296 (numpy's seeds), got {value}")


def check_args_shared(args):
    """The checks every script's `Args.__post_init__` shares: every field's value against what its declaration
    accepts (`arg`), seeds within numpy's, and an output folder we can write the run in. Raises UsageError, so
    parse_args turns it into argparse's `error: --flag must be ..., got ...` before any loading. What one range
    cannot say (a divisor of the batch, a stage that needs --init) stays in the script's check_args."""
    for field in dataclasses.fields(args):
        accepts, value = ACCEPTS.get(field), getattr(args, field.name)
        if accepts and value is not None and value not in accepted(accepts):
            raise UsageError(f"--{field.name} must be {accepted(accepts)}, got {value}")
        if field.name.endswith("seed") and isinstance(value, int):
            check_seed(f"--{field.name}", value)
    if hasattr(args, "output_dir"):
        check_output_dir(args.output_dir)


# what a run adds under --output_dir: its folder (make_run_dir's names stay under 110 characters) and the longest
# path written in it, model/model-00001-of-00002.safetensors (a model saved in shards)
RUN_FOLDER_ROOM = 150


def check_output_dir(path: str):
    """UsageError unless `path` is a folder we can write in, or can be made, with names and paths that the file
    system takes, the run folder and its files included (checked before minutes of work)."""
    absolute = existing = Path(path).absolute()
    while not os.path.exists(existing):  # (Path.exists raises where a name is too long)
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output_dir {path!r}: {existing} is a file, not a folder; pass a folder")
    try:  # a folder made and removed there: what permissions, a read-only mount or /proc allow
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        raise UsageError(
            f"--output_dir {path!r}: {existing} is not writable ({error.strerror}); pass a folder you can write in"
        ) from None
    name_max, path_max = (255, 260)  # Windows' limits; elsewhere the file system's own
    if hasattr(os, "pathconf"):
        name_max, path_max = (os.pathconf(existing, f"PC_{limit}_MAX") for limit in ("NAME", "PATH"))
    for name in absolute.relative_to(existing).parts:  # the folders still to make
        if len(os.fsencode(name)) > name_max:
            raise UsageError(
                f"--output_dir: the folder name {name[:30]}... is {len(os.fsencode(name))} bytes, and this file "
                f"system takes at most {name_max}: pass a shorter name"
            )
    if len(os.fsencode(absolute)) + RUN_FOLDER_ROOM >= path_max:
        raise UsageError(
            f"--output_dir is {len(os.fsencode(absolute))} bytes long as an absolute path; with the run folder and "
            f"its files (up to {RUN_FOLDER_ROOM} more) it would pass the {path_max} this file system takes: pass "
            f"a shorter path"
        )


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextmanager
def own_random_state():
    """Run a block without touching the caller's random streams (python, numpy, torch CPU and CUDA): building or
    warm-starting a model inside it leaves a run's randomness the same whether its model cache was empty or not."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# ----------------------------------------------------------------------------------------------------------------
# Run folder, model cache, metrics, plots


def shown(path: Path) -> str:
    """A path as a message shows it: under the home folder as ~/..., so logs and notebooks carry no user's name."""
    path = Path(path)
    return f"~/{path.relative_to(Path.home())}" if path.is_relative_to(Path.home()) else str(path)


def make_run_dir(algo: str, args, root="runs") -> Path:
    """runs/{algo}__{model}__seed{seed}__{time}/ with the arguments saved as args.json; prints where it is."""
    model = Path(str(args.model)).name.replace("/", "_")[:48]  # cut: the run folder's name stays short
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


def cached(path: Path, build):
    """Make sure the model folder `path` is complete, calling build(folder) to write it if not: written under
    another name with a marker listing each file's size, then renamed into place, so no run sees half a model (a
    folder that does not match its marker is rebuilt); a file lock makes parallel runs wait for one build; the
    build has its own random state, so a run is the same with a cold or a warm cache. A complete entry is only
    read (a read-only cache serves it); a build that fails leaves nothing behind."""
    from filelock import FileLock  # a dependency of huggingface_hub, so of transformers
    from safetensors import SafetensorError

    if is_complete(path):
        return path
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):
            if path.exists() and not is_complete(path):
                print(f"[cache] the cache entry {path} is incomplete or damaged: rebuilding it", file=sys.stderr)
                shutil.rmtree(path)
            if not path.exists():
                for stale in path.parent.glob(f"{path.name}.tmp*"):  # builds killed midway (we hold the lock)
                    shutil.rmtree(stale)
                with own_random_state():
                    build(tmp)
                sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
                (tmp / CACHE_MARKER).write_text(json.dumps(sizes, indent=1))
                tmp.rename(path)
    except (OSError, SafetensorError) as error:  # a read-only or full disk (safetensors: "I/O error: ...")
        raise UsageError(
            f"Could not write the model cache entry {shown(path)} ({error}): the model is built there once; set "
            f"GRPO_FAMILY_CACHE to a folder you can write in, with room for it"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failed build wrote
    return path


CACHE_MARKER = "complete.json"  # written last into a cache entry: {file name: size in bytes}


def is_complete(path: Path) -> bool:
    """True if the cache entry has its marker and every file it lists, at its size."""
    try:
        sizes = json.loads((path / CACHE_MARKER).read_text())
        return all((path / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError):
        return False


def on_policy_note(tag: str):
    """The console explains the usual surprise of on-policy GRPO once, at the start of a run."""
    print(
        f"[{tag}] note: with num_iterations=1 the policy is on-policy (ratio == 1) and advantages are zero-mean, so\n"
        f"       the logged loss stays near 0 while its gradient is not 0. Watch the reward and held-out metrics."
    )


class MetricsLogger:
    """Appends one JSON line per `log()` to metrics.jsonl; on exit (also Ctrl-C or an error) writes metrics.csv and
    metrics.png, so an interrupted run keeps its curves. Given `model` (a (model, tokenizer or processor) pair), a
    run stopped by Ctrl-C or SIGTERM also saves the model as it is to run_dir/model; it then says exactly what was
    saved. Bad input found before the first record (UsageError) leaves no run folder behind.

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
        if exc_type and issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C or SIGTERM: say what the folder holds
            kept = [f"metrics and plot up to step {self.records[-1]['step']}"] if self.records else []
            if self.model is not None:
                for part in self.model:
                    part.save_pretrained(self.run_dir / "model")
                kept.append("the model as it was")
            saved = " and ".join(kept) + " saved" if kept else "nothing saved but args.json (no step had finished)"
            how = "terminated (SIGTERM)" if issubclass(exc_type, Terminated) else "interrupted"
            print(f"\n[run] {how}: {saved} in {self.run_dir}", file=sys.stderr)
        if exc_type and issubclass(exc_type, UsageError) and not self.records:
            if {path.name for path in self.run_dir.iterdir()} <= {"args.json"}:
                shutil.rmtree(self.run_dir)
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
