"""Comparing runs over seeds: train each arm for every seed, then a table of mean ± std and a plot; and the small
helpers the experiments' command lines share (lists of seeds and arms, checks that two arms differ, positionals).

Every comparison script in this folder calls `seed_sweep(train, {arm: [Args, one per seed]}, ...)`; the table,
every run's numbers, curve and run folder and the sweep's settings go to one JSON file beside the plot. A comparison
too long for one command runs arm by arm (or seeds by seeds), then one table and plot of all its parts:
    python experiments/sweep.py OUT PART.json [PART.json ...] --title ... --curve_labels X Y
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, when run as a script

from plumbing import UsageError, arg, check_args_shared, check_seed, run_cli  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# The command lines: what a comparison adds to a script's options, and the checks they share


@dataclass
class Sweep:
    """What a comparison adds to the script's own options."""

    seeds: str = arg("0,1,2,3,4", "comma-separated seeds, each run once per arm")

    def __post_init__(self):
        check_args_shared(self)  # a subclass's fields in their declared ranges
        int_list(self.seeds, "--seeds", name="seed")


def int_list(text: str, flag: str, least: int = 0, name: str = "value") -> list[int]:
    """'0,1,2' -> [0, 1, 2] (for --seeds, --sizes): whole numbers of at least `least`, none twice; anything else
    is a UsageError naming the flag."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated whole numbers, e.g. 0,1,2; got {text!r}") from None
    if small := [value for value in values if value < least]:
        raise UsageError(f"{flag} must be whole numbers of at least {least}, got {small[0]}")
    for value in values if flag == "--seeds" else []:
        check_seed(flag, value)
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} repeats a {name} ({text}): give each once")
    return values


def name_list(text: str, known, flag: str = "--arms") -> list[str]:
    """'grpo,grpo_pp' -> ['grpo', 'grpo_pp'], each one of `known` and none twice; else a UsageError naming the flag."""
    names = text.split(",")
    if unknown := [name for name in names if name not in known]:
        raise UsageError(f"{flag}: unknown arm {unknown[0]!r}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise UsageError(f"{flag} repeats an arm ({text}): give each once")
    return names


def options_given(args, names) -> list[str]:
    """Those of the fields `names` given on the command line: a value other than the field's default."""
    return [name for name in names if getattr(args, name) != type(args).__dataclass_fields__[name].default]


def refuse_set_for_every_run(args, fields: dict):
    """UsageError where an option was given that the comparison sets itself for every run, {field: what sets it}:
    the value given would be replaced without a word."""
    if names := options_given(args, fields):
        raise UsageError(f"--{names[0]}: the comparison sets it for every run ({fields[names[0]]}); leave it out")


def refuse_same_runs(runs: dict, label_fields=(), given=()):
    """UsageError where two arms would train the same runs: {arm: [Args, one per seed]} equal at every seed, once
    the fields that only name a run (`label_fields`) are left out. An option given for every arm can do it: `given`
    names the options the user gave among those the arms set."""
    settings = {arm: [{k: v for k, v in asdict(a).items() if k not in label_fields} for a in runs[arm]] for arm in runs}
    arms = list(runs)
    for i, first in enumerate(arms):
        if same := [second for second in arms[i + 1 :] if settings[second] == settings[first]]:
            options = ", ".join(f"--{name}" for name in given) or "an option given"
            raise UsageError(
                f"the arms {first!r} and {same[0]!r} would be the same runs: what tells them apart is set for both by "
                f"{options}; leave it out, or compare other arms"
            )


def check_out(out: str, what: str = "OUT"):
    """UsageError unless the files `out`.json and `out`.png can be written (its folder exists and is writable, or can
    be made)."""
    folder = Path(out).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {out}: cannot write in {folder}; give a path in a folder you can write in")


# ----------------------------------------------------------------------------------------------------------------
# The comparison: every arm for every seed, one table, one plot, one JSON


def summarize_runs(results, keys) -> str:
    """A markdown table of mean ± std over seeds: results = {method: [{metric: value} per seed]}."""
    methods = list(results)
    lines = [f"| metric | {' | '.join(methods)} |", "|---" * (len(methods) + 1) + "|"]
    for key in keys:
        cells = []
        for method in methods:
            values = [run[key] for run in results[method]]
            spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            cells.append(f"{np.mean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {key} | {' | '.join(cells)} |")
    return "\n".join(lines)


def runs_table(folders) -> str:
    """A markdown table of where each run of the comparison is: folders = {method: [{seed, run_dir} per run]}."""
    lines = ["| arm | seed | run folder |", "|---|---|---|"]
    for method, runs in folders.items():
        lines += [f"| {method} | {run['seed']} | {run['run_dir'] or 'not recorded'} |" for run in runs]
    return "\n".join(lines)


def seed_sweep(train, runs: dict, summarize, out, settings, curve=None, curve_labels=("step", ""), title=None) -> dict:
    """Compare methods over seeds: run `train(run_args)` for every entry of `runs` ({method: [Args, one per
    seed]}), and reduce each result to {metric: value} with `summarize`. Prints a table of mean ± std per method and
    one of the run folders, and writes `out`.json (the sweep's `settings`, every run's metrics, curve and folder, the
    table) and `out`.png (plot_comparison; `curve(result)` -> (xs, ys) adds each run's curve, its axes named by
    curve_labels). Returns {method: [metrics, one per seed]}."""
    results, curves, folders = {}, {}, {}
    for method, method_runs in runs.items():
        for run_args in method_runs:
            result = train(run_args)
            results.setdefault(method, []).append(summarize(result))
            folders.setdefault(method, []).append({"seed": run_args.seed, "run_dir": result.get("run_dir")})
            if curve is not None:
                curves.setdefault(method, []).append(curve(result))
    save_comparison(results, curves, folders, out, {"args": settings}, title, curve_labels)
    return results


def save_comparison(results, curves, folders, out, header: dict, title, curve_labels):
    """Print the table of mean ± std and the runs' folders, and write `out`.json (`header`, every run's metrics,
    curve and folder, the table) and `out`.png: what seed_sweep and merge_parts both leave."""
    table = summarize_runs(results, list(next(iter(results.values()))[0]))
    print(f"\n{title or 'comparison'} (mean ± std over seeds)\n\n{table}\n\nthe runs:\n\n{runs_table(folders)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(results, out.with_suffix(".png"), curves=curves, curve_labels=curve_labels, title=title)
    summary = header | {"results": results, "curves": curves, "runs": folders, "table": table}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"[sweep] table, plot and numbers in {out}.json and {out}.png")


def read_part(part) -> dict:
    """One part's JSON as seed_sweep wrote it, or a UsageError naming the file."""
    if not Path(part).is_file():
        raise UsageError(f"{part}: no such file; give the JSON files a comparison wrote (OUT.json)")
    try:
        one = json.loads(Path(part).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{part} is not JSON ({error}); give the JSON files a comparison wrote (OUT.json)") from None
    if not (isinstance(one, dict) and {"args", "results", "curves"} <= set(one) and isinstance(one["args"], dict)):
        raise UsageError(f"{part} is not a comparison's JSON (seed_sweep's: args, results, curves, table)")
    return one


def part_runs(one: dict, method: str) -> list[dict]:
    """[{seed, run_dir}] of one arm's runs in a part, in order (a part written before run folders were recorded:
    the seeds of its --seeds, the folders unknown)."""
    if method in one.get("runs", {}):
        return one["runs"][method]
    try:
        seeds = int_list(str(one["args"].get("seeds")), "--seeds")
    except UsageError:
        seeds = []
    if len(seeds) != len(one["results"][method]):
        seeds = [None] * len(one["results"][method])
    return [{"seed": seed, "run_dir": None} for seed in seeds]


def merge_parts(parts, out, title=None, curve_labels=("step", "")) -> dict:
    """seed_sweep's JSON files of one comparison run in parts -> one table, JSON and plot at `out`: each arm's runs
    in the order of the parts. The parts must agree on every setting but --arms, --seeds and --output_dir, and no
    arm may have a seed in two parts."""
    check_out(out)
    if Path(out).suffix == ".json":  # OUT forgotten, or given as a file: a part would be overwritten
        raise UsageError(f"OUT {out}: give the merged files' path without .json (OUT.json and OUT.png), then the parts")
    if len({Path(part).resolve() for part in parts}) < len(parts):
        raise UsageError(f"a part is given twice ({' '.join(map(str, parts))}): its runs would count twice")
    if Path(out).with_suffix(".json").resolve() in {Path(part).resolve() for part in parts}:
        raise UsageError(f"OUT {out} would overwrite a part: OUT comes first, the merged files' path")
    saved = [read_part(part) for part in parts]
    for part, other in zip(parts[1:], saved[1:]):
        if differ := sorted(k for k in other["args"] | saved[0]["args"] if k not in ("arms", "seeds", "output_dir") and
                            other["args"].get(k) != saved[0]["args"].get(k)):  # fmt: skip
            raise UsageError(f"{part} was run with other settings than {parts[0]}: {', '.join(differ)}")
    results, curves, folders = {}, {}, {}
    for part, one in zip(parts, saved):
        for method, runs in one["results"].items():
            seen = {run["seed"] for run in folders.get(method, [])} - {None}
            if twice := [run["seed"] for run in part_runs(one, method) if run["seed"] in seen]:
                raise UsageError(f"{part}: arm {method!r} ran seed {twice[0]} in an earlier part too; give it once")
            results.setdefault(method, []).extend(runs)
            curves.setdefault(method, []).extend(one["curves"].get(method, []))
            folders.setdefault(method, []).extend(part_runs(one, method))
    header = {"parts": [str(p) for p in parts], "args": [one["args"] for one in saved]}
    save_comparison(results, curves, folders, out, header, title, curve_labels)
    return results


def plot_comparison(results, path, curves=None, title=None, curve_labels=("step", "")):
    """One panel per metric: a bar per method at the mean over seeds, the std as an error bar, each seed a dot.
    With `curves` ({method: [(xs, ys), one per seed]}) a first panel draws every run's curve."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch in the caller's notebook, no display needed

    methods, keys = list(results), list(next(iter(results.values()))[0])
    panels = len(keys) + bool(curves)
    cols = min(4, panels)
    fig = Figure(figsize=(2.6 * cols + 0.6 * bool(curves), 3.0 * math.ceil(panels / cols)))
    axes = list(fig.subplots(math.ceil(panels / cols), cols, squeeze=False).flat)
    if curves:
        ax = axes.pop(0)
        for i, method in enumerate(methods):
            for j, (xs, ys) in enumerate(curves[method]):
                ax.plot(xs, ys, color=f"C{i}", alpha=0.7, label=method if j == 0 else None)
        ax.set(xlabel=curve_labels[0], ylabel=curve_labels[1])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax, key in zip(axes, keys):
        for i, method in enumerate(methods):
            values = [run[key] for run in results[method]]
            spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
            ax.bar(i, np.mean(values), yerr=spread, color=f"C{i}", alpha=0.6, capsize=4)
            ax.scatter([i] * len(values), values, color=f"C{i}", s=12, zorder=3)
        ax.set_xticks(range(len(methods)), methods, fontsize=7, rotation=20 if len(methods) > 2 else 0)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@dataclass
class MergeArgs:
    """sweep.py's options: OUT and the parts are positional."""

    title: str = arg("", "the plot's title")
    curve_labels: list[str] = field(
        default_factory=lambda: ["step", ""], metadata={"help": "the curve panel's x and y labels"}
    )

    def __post_init__(self):
        if len(self.curve_labels) != 2:
            raise UsageError(f"--curve_labels takes two labels, x then y; got {len(self.curve_labels)}")


PARTS = {
    "out": dict(metavar="OUT", help="the merged files' path without suffix: OUT.json and OUT.png"),
    "parts": dict(metavar="PART.json", nargs="+", help="the parts' JSON files, as the comparison wrote them"),
}


def merge(args: MergeArgs, out: str, parts: list[str]) -> dict:
    """The command: merge_parts with sweep.py's options."""
    return merge_parts(parts, out, args.title or None, tuple(args.curve_labels))


if __name__ == "__main__":
    run_cli(MergeArgs, merge, PARTS)
