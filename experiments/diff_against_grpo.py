"""Where each variant's diff against grpo.py lands: how much of what it changes is its idea.

    python experiments/diff_against_grpo.py                # the working tree
    python experiments/diff_against_grpo.py --rev 0a18aca  # the files as a commit had them (before and after)

A variant is meant to read as grpo.py plus its idea. For crpo.py, grpo_pp.py and tree_grpo.py this prints the
lines `difflib` finds changed against grpo.py (a replaced line counts once removed, once added), the added ones
by the part of the variant they land in (its docstring, Args and check_args, its algorithm section, GRPO's shared
machinery, the training loop, a function grpo.py does not have) and the removed ones by the function of grpo.py
they come from. Prints tables; asserts nothing.
"""

import ast
import difflib
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumbing import UsageError, arg, run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["crpo.py", "grpo_pp.py", "tree_grpo.py"]
SECTIONS = ["header", "the algorithm section", "GRPO's shared machinery", "the training loop"]


@dataclass
class Args:
    rev: str = arg("", "a git commit to read the files at ('': the working tree)")


def read(path: str, rev: str) -> list[str]:
    if not rev:
        return (ROOT / path).read_text().splitlines()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode:
        raise UsageError(f"--rev {rev}: git cannot show {path} there ({shown.stderr.strip()})")
    return shown.stdout.splitlines()


def places(lines: list[str]) -> list[str]:
    """For each line of an algorithm file, where it is: its docstring, Args, check_args, or its section and
    function (the sections open at the file's `# ----` rules)."""
    tree = ast.parse("\n".join(lines))
    owner = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            owner |= {i: node.name for i in range(start, node.end_lineno)}
    docstring_end = tree.body[0].end_lineno
    section = 0
    where = []
    for i, line in enumerate(lines):
        section += bool(re.fullmatch(r"# -{20,}", line))
        name = {"train_grpo": "train"}.get(owner.get(i), owner.get(i))  # grpo_pp.py's stage 1 is grpo.py's train
        if i < docstring_end:
            where.append("docstring")
        elif name in ("Args", "check_args"):
            where.append(name)
        else:
            where.append(f"{SECTIONS[min(section, 3)]}: {name or 'module level'}")
    return where


def main(args: Args):
    base = read("grpo.py", args.rev)
    base_places = places(base)
    base_functions = {p.split(": ")[-1] for p in base_places}
    for path in VARIANTS:
        lines = read(path, args.rev)
        where = places(lines)
        added, removed = Counter(), Counter()
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base, lines, autojunk=False).get_opcodes():
            if tag != "equal":
                removed.update(base_places[i] for i in range(i1, i2))
                for j in range(j1, j2):  # a function grpo.py lacks, or the part of the file it sits in
                    section, _, name = where[j].partition(": ")
                    new = name and name not in base_functions and section != "the algorithm section"
                    added[f"{section}, new: {name}" if new else section if name else where[j]] += 1
        total = sum(added.values()) + sum(removed.values())
        print(f"\n{path} against grpo.py{f' at {args.rev}' if args.rev else ''}: {total} lines changed")
        print("| lines | share | added in / removed from |\n|---|---|---|")
        for kind, counts in (("added in", added), ("removed from grpo.py:", removed)):
            for place, n in counts.most_common():
                print(f"| {n} | {n / total:.0%} | {kind} {place} |")


if __name__ == "__main__":
    run_cli(Args, main)
