"""The environments the algorithm files train on, one module per task, and the loader and chat prompt they share.

arithmetic (grpo.py: addition, GSM8K), clinic (crpo.py: vignettes from a knowledge graph, MedQA), lesions
(grpo_pp.py: lesion images drawn from a graph, an image folder), namesakes (tree_grpo.py: a knowledge base with a
BM25 search tool, HotpotQA). A task module takes plain values, never a script's Args, and never imports an
algorithm file: its offline generator, its `datasets` path, the warm-start demonstrations, the prompt, the
task's own reward and the held-out evaluation. Each data set has one schema that every row read is checked
against (`rows`), so a malformed row is one error naming the file, the row and the field; a local file that
`datasets` cannot read (empty, not JSON) is named with its line (`local_data_problem`).
"""

import json
import os
from pathlib import Path

from plumbing import UsageError


def load_data(path: str, what: str, splits: dict, columns, offline_default: str, config_name=None):
    """`datasets.load_dataset` of a hub id or a local folder, checked before any training.

    splits: {our name: (accepted names, ...)}, e.g. {"train": ("train",), "eval": ("test", "validation")};
    columns: the fields every split must have. Returns {our name: Dataset}. A data set that cannot be loaded,
    lacks a split or a field is one UsageError that says what is wrong and how to run offline instead.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    hint = f"Pass a hub id or a local folder in {what}'s format, or run the offline default {offline_default}."
    try:
        data = load_dataset(path) if os.path.isdir(path) or config_name is None else load_dataset(path, config_name)
    except Exception as error:  # datasets raises many types: offline, missing files, bad format
        if isinstance(error, DatasetGenerationError) and error.__cause__:  # the reason, not the wrapper
            error = error.__cause__
        reason = local_data_problem(path) or f"{type(error).__name__}: {error}"
        raise UsageError(f"Could not load {what} from {path!r} ({reason}). {hint}") from None
    chosen = {}
    for ours, names in splits.items():
        found = [name for name in names if name in data]
        if not found:
            raise UsageError(
                f"{what} at {path!r} has the splits {sorted(data)}, but needs {' or '.join(map(repr, names))} "
                f"(a local folder: a file named {names[0]}.jsonl or similar). {hint}"
            )
        chosen[ours] = data[found[0]]
        if len(chosen[ours]) == 0:
            raise UsageError(f"{what} at {path!r}: the {found[0]!r} split has no rows. {hint}")
        missing = [column for column in columns if column not in chosen[ours].column_names]
        if missing:
            raise UsageError(
                f"{what} at {path!r}: the {found[0]!r} split has no field {', '.join(map(repr, missing))} "
                f"(its fields: {', '.join(chosen[ours].column_names)}). {hint}"
            )
    return chosen


def local_data_problem(path: str) -> str | None:
    """Why `datasets` could not read a local path: a file, not a folder; or the first of the folder's JSON, JSONL
    and CSV files that has no rows, is not UTF-8 text or has a line that is not JSON. None where none of these."""
    if os.path.isfile(path):
        return f"{path} is a file: pass the folder that holds each split's file (train.jsonl, test.jsonl or similar)"
    for file in sorted(Path(path).rglob("*")):
        kind = file.suffix.lower()
        if kind not in (".json", ".jsonl", ".csv"):
            continue
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            return f"{file} is not UTF-8 text: {error.reason} at byte {error.start}; save it as UTF-8"
        filled = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
        if len(filled) <= (kind == ".csv"):  # a CSV's first line is its header
            return f"{file} has no rows: give each split at least one"
        if kind == ".csv":
            continue
        try:
            if json.loads("\n".join(lines)) in ([], {}):  # one JSON document: a list of rows
                return f"{file} has no rows: give each split at least one"
        except json.JSONDecodeError:  # JSON lines: one row per line
            for number, line in filled:
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    return f"{file} line {number} is not JSON ({error.msg}): {line[:60]!r}"
    return None


def rows(path: str, split, limit: int, schema: dict) -> list[dict]:
    """The first `limit` rows of a split, each checked against its data set's schema before any is used. schema:
    {field: (ok(value, row) -> bool, what it must be)}. The first bad row is one UsageError naming the data set, the
    split, the row (its index in the split) and the field: `<path> (train) row 17: answer_idx must be one of the
    options A-D, got 'E'`. A row that does not decode (an image file that is not one) is reported the same way."""
    checked = []
    for i in range(min(limit, len(split))):
        where = f"{path} ({split.split}) row {i}"
        try:
            row = split[i]
        except Exception as error:  # datasets decodes images as they are read
            raise UsageError(f"{where} could not be read ({type(error).__name__}: {error})") from None
        for name, (ok, must) in schema.items():
            if not ok(row.get(name), row):
                must = must(row) if callable(must) else must
                raise UsageError(f"{where}: {name} must be {must}, got {str(repr(row.get(name)))[:80]}")
        checked.append(row)
    return checked


def is_text(value, row=None) -> bool:
    return isinstance(value, str) and bool(value.strip())


def is_texts(value, row=None) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def format_prompt(tokenizer, question: str, system_prompt: str | None = None, examples=()) -> str:
    """A chat model gets its chat template, with an optional system prompt and worked `examples` ((question,
    answer) pairs) as earlier turns; the tiny model gets the raw text (its warm start taught it the format)."""
    if tokenizer.chat_template is None:
        if examples:
            raise UsageError(
                "Worked examples (--num_shots) need a chat model with a chat template, e.g. --model smollm2-135m; "
                "the tiny model has none and learns the format from its warm start: use --num_shots 0."
            )
        return question
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for example_question, example_answer in examples:
        messages += [{"role": "user", "content": example_question}, {"role": "assistant", "content": example_answer}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
