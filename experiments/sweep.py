"""Comparing runs over seeds: train each arm for every seed, then a table of mean ± std and a plot.

Every comparison script in this folder calls `seed_sweep(train, {arm: [Args, one per seed]}, ...)`; the table,
every run's numbers and curve and the sweep's settings go to one JSON file beside the plot. A comparison too long
for one command runs arm by arm (or seeds by seeds), then one table and plot of all its parts:
    python experiments/sweep.py OUT PART.json [PART.json ...] --title ... --curve_labels X Y
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, when run as a script

from plumbing import UsageError, arg, check_args_shared  # noqa: E402


@dataclass
class Sweep:
    """What a comparison adds to the script's own options."""

    seeds: str = arg("0,1,2,3,4", "comma-separated seeds, each run once per arm")

    def __post_init__(self):
        check_args_shared(self)  # a subclass's fields in their declared ranges
        seeds = int_list(self.seeds, "--seeds")
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"--seeds repeats a seed ({self.seeds}): a repeated run would shrink the spread")


def int_list(text: str, flag: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (for --seeds, --sizes); anything else is a UsageError naming the flag."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated whole numbers, e.g. 0,1,2; got {text!r}") from None
    return values


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


def seed_sweep(train, runs: dict, summarize, out, settings, curve=None, curve_labels=("step", ""), title=None) -> dict:
    """Compare methods over seeds: run `train(run_args)` for every entry of `runs` ({method: [Args, one per
    seed]}), and reduce each result to {metric: value} with `summarize`. Prints a table of mean ± std per method and
    writes `out`.json (the sweep's `settings`, every run's metrics and curve, the table) and `out`.png (plot_comparison;
    `curve(result)` -> (xs, ys) adds each run's curve, its axes named by curve_labels). Returns {method: [metrics,
    one per seed]}."""
    results, curves = {}, {}
    for method, method_runs in runs.items():
        for run_args in method_runs:
            result = train(run_args)
            results.setdefault(method, []).append(summarize(result))
            if curve is not None:
                curves.setdefault(method, []).append(curve(result))
    save_comparison(results, curves, out, {"args": settings}, title, curve_labels)
    return results


def save_comparison(results, curves, out, header: dict, title, curve_labels):
    """Print the table of mean ± std and write `out`.json (`header`, every run's metrics and curve, the table) and
    `out`.png: what seed_sweep and merge_parts both leave."""
    table = summarize_runs(results, list(next(iter(results.values()))[0]))
    print(f"\n{title or 'comparison'} (mean ± std over seeds)\n\n{table}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(results, out.with_suffix(".png"), curves=curves, curve_labels=curve_labels, title=title)
    summary = header | {"results": results, "curves": curves, "table": table}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"[sweep] table, plot and numbers in {out}.json and {out}.png")


def merge_parts(parts, out, title=None, curve_labels=("step", "")) -> dict:
    """seed_sweep's JSON files of one comparison run in parts -> one table, JSON and plot at `out`: each arm's runs
    in the order of the parts. The parts must agree on every setting but --arms, --seeds and --output_dir."""
    saved = [json.loads(Path(part).read_text()) for part in parts]
    if missing := [part for part, one in zip(parts, saved) if not {"args", "results", "curves"} <= set(one)]:
        raise UsageError(f"{missing[0]} is not a comparison's JSON (seed_sweep's: args, results, curves, table)")
    for part, other in zip(parts[1:], saved[1:]):
        if differ := sorted(k for k in other["args"] | saved[0]["args"] if k not in ("arms", "seeds", "output_dir") and
                            other["args"].get(k) != saved[0]["args"].get(k)):  # fmt: skip
            raise UsageError(f"{part} was run with other settings than {parts[0]}: {', '.join(differ)}")
    results, curves = {}, {}
    for one in saved:
        for method, runs in one["results"].items():
            results.setdefault(method, []).extend(runs)
            curves.setdefault(method, []).extend(one["curves"].get(method, []))
    header = {"parts": [str(p) for p in parts], "args": [one["args"] for one in saved]}
    save_comparison(results, curves, out, header, title, curve_labels)
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="One table and plot of a comparison run in parts (merge_parts).")
    parser.add_argument("out", help="the merged files' path without suffix: OUT.json and OUT.png")
    parser.add_argument("parts", nargs="+", help="the parts' JSON files, as seed_sweep wrote them")
    parser.add_argument("--title", default=None, help="the plot's title")
    parser.add_argument("--curve_labels", nargs=2, default=("step", ""), help="the curve panel's x and y labels")
    cli = parser.parse_args()
    try:
        merge_parts(cli.parts, cli.out, cli.title, tuple(cli.curve_labels))
    except (UsageError, OSError, json.JSONDecodeError) as error:
        sys.exit(f"sweep.py: {error}")
