"""The four algorithm files share one skeleton, and GRPO's shared machinery is the same text in each of them.

A reader compares files side by side (grpo.py, then crpo.py, ...): these tests keep that comparison honest. They
read the source only; nothing is run.
"""

import ast
import difflib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["grpo.py", "crpo.py", "grpo_pp.py", "tree_grpo.py"]
SECTIONS = ["The algorithm", "GRPO's shared machinery", "Training loop"]
TASKS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tasks").glob("*.py"))
EXPERIMENTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").glob("*.py"))
# the most lines (wc -l, docstring included) each file may have: past it, what a student came for gets buried
BUDGETS = {"grpo.py": 450, "crpo.py": 550, "grpo_pp.py": 650, "tree_grpo.py": 650, "prefix_grouper.py": 650,
           "common.py": 500, "plumbing.py": 500}  # fmt: skip
# grpo.py's functions that another file keeps word for word wherever it defines them
SHARED = [
    "generate_completions",
    "completion_logprobs",
    "batch_logprobs",
    "group_advantages",
    "policy_loss",
    "masked_mean",
]
# where a file's version differs from grpo.py's, and why (anything else must be the same text)
CHANGED = {
    ("grpo_pp.py", "generate_completions"): "the image goes along with the prompt",
    ("grpo_pp.py", "completion_logprobs"): "the image goes along, and <image> gets probability 0",
    ("tree_grpo.py", "batch_logprobs"): "a batch of leaves: leaf_logprobs (a trie with prefix_grouper)",
    ("tree_grpo.py", "policy_loss"): "the official code's dual clip (veRL's clip_ratio_c) for off-policy updates",
}


def functions(path: str) -> dict[str, str]:
    source = (ROOT / path).read_text()
    return {
        node.name: ast.get_source_segment(source, node)
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef | ast.ClassDef)
    }


def rules(lines: list[str]) -> list[int]:
    """Indices of the `# ------` lines that open each section (its title is the comment line under it)."""
    return [i for i, line in enumerate(lines[:-1]) if re.fullmatch(r"# -{20,}", line)]


def section_titles(path: str) -> list[str]:
    lines = (ROOT / path).read_text().splitlines()
    return [lines[i + 1].removeprefix("# ") for i in rules(lines)]


@pytest.mark.parametrize("path", ALGORITHMS)
def test_sections_are_the_same_in_the_same_order(path):
    titles = section_titles(path)
    assert [t.split(":")[0] for t in titles] == SECTIONS, titles
    # the shared-machinery and loop headers are word for word grpo.py's; "The algorithm" names the change
    assert titles[1:] == section_titles("grpo.py")[1:]


@pytest.mark.parametrize("path", ALGORITHMS)
def test_args_first_main_last(path):
    source = (ROOT / path).read_text()
    body = ast.parse(source).body
    first_rule = source.index("\n# ---")
    args = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == "Args")
    assert source.index("class Args") < first_rule, "Args comes before the first section"
    assert isinstance(body[-1], ast.If) and "__main__" in ast.unparse(body[-1].test)
    assert args.lineno < body[-1].lineno


@pytest.mark.parametrize("path", ALGORITHMS[1:])
def test_shared_machinery_is_grpo_text(path):
    grpo, mine = functions("grpo.py"), functions(path)
    assert "policy_loss" in mine and "masked_mean" in mine
    for name in SHARED:
        if name in mine and (path, name) not in CHANGED:
            assert mine[name] == grpo[name], f"{path}: {name} differs from grpo.py's; copy it, or list why in CHANGED"
    for (file, name), why in CHANGED.items():
        if file == path:
            assert mine[name] != grpo[name], f"{path}: {name} is grpo.py's again ({why} no longer holds)"


@pytest.mark.parametrize("path", ALGORITHMS + ["prefix_grouper.py", "common.py", "plumbing.py", *TASKS])
def test_no_file_imports_an_algorithm_file(path):
    """An algorithm file reads alone (common, plumbing, its task, prefix_grouper), and a task never needs one."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert not imported & {Path(a).stem for a in ALGORITHMS}, f"{path} imports {imported}"


@pytest.mark.parametrize("path", list(BUDGETS))
def test_line_budget_and_docstring(path):
    source = (ROOT / path).read_text()
    assert len(source.splitlines()) <= BUDGETS[path], f"{path}: over its budget of {BUDGETS[path]} lines"
    docstring = ast.parse(source).body[0]  # the module docstring, its quotes included
    assert isinstance(docstring, ast.Expr) and docstring.end_lineno <= 30, f"{path}: a docstring of at most 30 lines"


@pytest.mark.parametrize("path", ALGORITHMS)
def test_one_training_run_per_file(path):
    """A script trains once; comparisons over seeds and arms live in experiments/."""
    args = next(
        n for n in ast.parse((ROOT / path).read_text()).body if isinstance(n, ast.ClassDef) and n.name == "Args"
    )
    fields = {n.target.id for n in args.body if isinstance(n, ast.AnnAssign)}
    assert not fields & {"compare", "seeds", "arms", "sizes", "compare_tokens"}, f"{path}: {fields}"


def test_tests_folder_holds_tests_only():
    scripts = {p.name for p in (ROOT / "tests").glob("*.py")} - {"conftest.py"}
    assert all(name.startswith("test_") for name in scripts), sorted(scripts)


DOCUMENTS = ["README.md", "RESULTS.md", "tests/README.md", *ALGORITHMS, "prefix_grouper.py", "common.py",
             "plumbing.py", *TASKS, *EXPERIMENTS]  # fmt: skip


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_path_named_exists(document):
    """Relative links, and paths into the repo's folders, in the documents and module docstrings all exist."""
    text = (ROOT / document).read_text()
    if document.endswith(".py"):
        text = ast.get_docstring(ast.parse(text)) or ""
    base = (ROOT / document).parent
    links = re.findall(r"\]\(([^)#\s]+)", text)  # markdown links
    paths = re.findall(r"(?<![\w/.<-])((?:[\w-]+/)*[\w-]+\.(?:py|md|png|json|csv|ipynb|txt))\b", text)
    # a path in the text counts where it starts with a folder of this repository (others: TRL's, a run folder's)
    ours = {p.name for p in ROOT.iterdir() if p.is_dir()} - {"runs"}
    paths = [p for p in paths if p.split("/")[0] in ours]
    missing = []
    for name in set(links + paths):
        if name.startswith(("http:", "https:", "mailto:")):
            continue
        if not ((base / name).exists() or (ROOT / name).exists()):
            missing.append(name)
    assert not missing, f"{document} names paths that do not exist: {missing}"


def algorithm_lines(path: str) -> tuple[int, int]:
    """First and last line (1-based) of the file's section "The algorithm", its rule line included."""
    lines = (ROOT / path).read_text().splitlines()
    starts = rules(lines)
    start = next(i for i in starts if lines[i + 1].startswith("# The algorithm"))
    end = starts[starts.index(start) + 1]
    while not lines[end - 1].strip():  # the blank lines before the next rule
        end -= 1
    return start + 1, end


@pytest.mark.parametrize("path", ALGORITHMS[1:])
def test_readme_points_at_each_algorithm_section(path):
    """README's table links each file's section "The algorithm" by line numbers: they must be the current ones."""
    first, last = algorithm_lines(path)
    link = f"[lines {first}-{last}]({path}#L{first}-L{last})"
    assert link in (ROOT / "README.md").read_text(), f"README.md: the link to {path}'s algorithm is now {link}"


def reading_minutes(path: str) -> int:
    """README's rule, about 15 lines a minute: a variant's lines added to grpo.py (its diff), another file whole."""
    base = (ROOT / "grpo.py").read_text().splitlines()
    lines = (ROOT / path).read_text().splitlines()
    diff = difflib.unified_diff(base, lines, lineterm="", n=0)
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    return round(len(added if path in ALGORITHMS[1:] else lines) / 15)


@pytest.mark.parametrize("path", [*ALGORITHMS, "prefix_grouper.py"])
def test_readme_reading_table_gives_each_files_lines_and_minutes(path):
    lines = len((ROOT / path).read_text().splitlines())
    minutes = f"{reading_minutes(path)}{' after grpo.py' if path in ALGORITHMS[1:] else ''}"
    row = f"| [{path}]({path}) | {lines} | {minutes} |"
    assert row in (ROOT / "README.md").read_text(), f"README.md's reading table: the row of {path} is now {row}"
