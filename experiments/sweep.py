"""Comparing runs over seeds: train each arm for every seed, then a table of mean ± std and a plot.

Every comparison script in this folder calls `seed_sweep(train, {arm: [Args, one per seed]}, ...)`; the table,
every run's numbers and curve and the sweep's settings go to one JSON file beside the plot.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plumbing import UsageError, arg, check_args_shared


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
    table = summarize_runs(results, list(next(iter(results.values()))[0]))
    print(f"\n{title or 'comparison'} (mean ± std over seeds)\n\n{table}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(results, out.with_suffix(".png"), curves=curves, curve_labels=curve_labels, title=title)
    summary = {"args": settings, "results": results, "curves": curves, "table": table}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"[sweep] table, plot and numbers in {out}.json and {out}.png")
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
