"""The data a run is given (issue 36): an empty split, a file that is not JSON, a folder layout that loses the
image classes, labels given as class names, a paragraph title with two texts. Each is one clear error that names
the file and the row or folder (on the command line `error: ...` and exit code 2), or, where the data is usable,
it loads as the user meant."""

import json
import re
import shutil
from collections import Counter

import pytest
from conftest import ROOT, main_runner
from PIL import Image

import plumbing
from tasks import arithmetic, clinic, lesions, namesakes

LESIONS = ROOT / "tests/fixtures/lesions"  # train/ and test/, each with nevus/ and psoriasis/ (32x32 PNGs)
GSM8K_ROW = {"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}
MEDQA_ROW = {"question": "Fever and a rash?", "options": {"A": "measles", "B": "flu"}, "answer_idx": "A"}
HOTPOTQA_ROW = {
    "question": "Where was Ada born?",
    "answer": "Norvania",
    "supporting_facts": {"title": ["Ada"]},
    "context": {"title": ["Ada", "Bob"], "sentences": [["Ada was born in Norvania."], ["Bob is a baker."]]},
}
# data set: (its loader, its held-out split, a well-formed row)
DATASETS = {
    "gsm8k": (arithmetic.load_gsm8k, "test", GSM8K_ROW),
    "medqa": (clinic.load_medqa, "test", MEDQA_ROW),
    "hotpotqa": (namesakes.load_hotpotqa, "validation", HOTPOTQA_ROW),
}


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def data_folder(folder, name, **files):
    """A folder of the data set `name`: both splits hold its well-formed row, except the files given (name: text)."""
    _, held_out, row = DATASETS[name]
    folder.mkdir()
    for split in ("train", held_out):
        (folder / f"{split}.jsonl").write_text(jsonl([row]))
    for file_name, text in files.items():
        (folder / file_name).write_text(text)
    return str(folder)


def load(name, path):
    return DATASETS[name][0](path, 10, 10)


# ---------------------------------------------------------------------------------------------------------------
# files that datasets cannot read: the error names the file (and the line)

EMPTY = [("gsm8k", "train.jsonl", ""), ("medqa", "test.jsonl", "\n \n"), ("hotpotqa", "train.jsonl", "")]


@pytest.mark.parametrize("name, file_name, text", EMPTY, ids=[name for name, _, _ in EMPTY])
def test_an_empty_split_names_its_file(tmp_path, name, file_name, text):
    path = data_folder(tmp_path / name, name, **{file_name: text})
    with pytest.raises(plumbing.UsageError, match=re.escape(f"{path}/{file_name} has no rows")):
        load(name, path)


def test_a_file_that_is_not_json_lines_names_the_file_and_the_line(tmp_path):
    bad_line = data_folder(tmp_path / "bad_line", "gsm8k", **{"train.jsonl": jsonl([GSM8K_ROW] * 2) + "{oops\n"})
    with pytest.raises(plumbing.UsageError, match=re.escape(f"{bad_line}/train.jsonl line 3 is not JSON")):
        load("gsm8k", bad_line)
    utf16 = data_folder(tmp_path / "utf16", "gsm8k")
    (tmp_path / "utf16/train.jsonl").write_bytes(jsonl([GSM8K_ROW]).encode("utf-16"))
    with pytest.raises(plumbing.UsageError, match=re.escape(f"{utf16}/train.jsonl is not UTF-8 text")):
        load("gsm8k", utf16)
    (tmp_path / "csv").mkdir()  # a CSV with its header and no row
    (tmp_path / "csv/train.csv").write_text("question,answer\n")
    (tmp_path / "csv/test.csv").write_text('question,answer\nWhat is 1+1?,"1+1=2 #### 2"\n')
    with pytest.raises(plumbing.UsageError, match=re.escape(f"{tmp_path}/csv/train.csv has no rows")):
        load("gsm8k", str(tmp_path / "csv"))
    with pytest.raises(plumbing.UsageError, match="train.jsonl is a file: pass the folder that holds each split's"):
        load("gsm8k", f"{bad_line}/train.jsonl")


# (data set, a row's missing or null value, what the error says about row 1 of the train split)
MISSING = [
    ("gsm8k", '{"question": "What is 2+2?", "answer": NaN}', "answer must be text ending in '#### <number>', got None"),
    ("medqa", '{"question": "Cough?", "options": {"A": "flu", "B": "cold"}}', "answer_idx must be one of the options"),
    ("hotpotqa", json.dumps({**HOTPOTQA_ROW, "answer": None}), "answer must be text"),
    (
        "hotpotqa",
        json.dumps({**HOTPOTQA_ROW, "supporting_facts": {"title": []}}),
        "supporting_facts must be {'title': [...]} naming paragraphs of the row's context (one or more where",
    ),
    (
        "hotpotqa",
        json.dumps({**HOTPOTQA_ROW, "context": {"title": ["Ada", " "], "sentences": [["Ada."], ["Bob."]]}}),
        "context must be {'title': [...], 'sentences': [[...], ...]}",
    ),
]


@pytest.mark.parametrize("name, line, message", MISSING, ids=[f"{n}:{m[:20]}" for n, _, m in MISSING])
def test_a_row_with_a_missing_or_null_value_names_the_row(tmp_path, name, line, message):
    train = jsonl([DATASETS[name][2]]) + line + "\n"
    path = data_folder(tmp_path / name, name, **{"train.jsonl": train})
    with pytest.raises(plumbing.UsageError, match=re.escape(f"{path} (train) row 1: {message}")):
        load(name, path)


# ---------------------------------------------------------------------------------------------------------------
# image folders


def image_folder(tmp_path, layout):
    """A copy of the lesions fixture laid out as `layout` says."""
    folder = tmp_path / layout
    if layout == "one class":  # datasets labels by folder only where there are two or more classes
        for split in ("train", "test"):
            shutil.copytree(LESIONS / split / "nevus", folder / split / "nevus")
    elif layout == "a class in a sub-folder":  # images at two depths: datasets drops every label
        shutil.copytree(LESIONS, folder)
        shutil.move(folder / "train/nevus", tmp_path / "nevus")
        shutil.move(tmp_path / "nevus", folder / "train/nevus/2024")
    else:  # "no class folders": every image straight in train/ or test/
        for image in LESIONS.glob("*/*/*.png"):
            (folder / image.parts[-3]).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, folder / image.parts[-3] / f"{image.parent.name}-{image.name}")
    return str(folder)


LAYOUTS = {
    "one class": "test/nevus, train/nevus",
    "a class in a sub-folder": "train/nevus/2024, train/psoriasis",
    "no class folders": "test, train",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_folder_layout_that_loses_the_classes_says_where_the_images_are(tmp_path, layout):
    path = image_folder(tmp_path, layout)
    with pytest.raises(plumbing.UsageError) as error:
        lesions.load_image_dataset(path, 2, 2, seed=0)
    assert str(error.value).startswith(f"{path} (train) has images without a class: `datasets` finds")
    assert "train/<class>/<image>" in str(error.value) and LAYOUTS[layout] in str(error.value)


def with_metadata(tmp_path, label):
    """The lesions fixture with a metadata.jsonl in each split: file_name and label (a class name)."""
    shutil.copytree(LESIONS, tmp_path / "images")
    for split in ("train", "test"):
        images = sorted((tmp_path / "images" / split).glob("*/*.png"))
        rows = [{"file_name": f"{x.parent.name}/{x.name}", "label": label(x.parent.name)} for x in images]
        (tmp_path / "images" / split / "metadata.jsonl").write_text(jsonl(rows))
    return str(tmp_path / "images")


def test_class_names_as_labels_and_images_that_are_not_rgb_load(tmp_path):
    path = with_metadata(tmp_path, label=lambda class_name: class_name)
    rgba = tmp_path / "images/train/nevus/0.png"
    Image.open(rgba).convert("RGBA").save(rgba)
    train, held_out = lesions.load_image_dataset(path, 3, 2, seed=0)
    assert sorted(x["label"] for x in train) == ["nevus"] * 3 + ["psoriasis"] * 3
    assert sorted(x["label"] for x in held_out) == ["nevus"] * 2 + ["psoriasis"] * 2
    assert {x["image"].mode for x in train} == {"RGB"}


def test_labels_that_name_no_class_and_a_jsonl_of_image_paths_are_clear_errors(tmp_path):
    path = with_metadata(tmp_path / "numbers", label=lambda class_name: ["nevus", "psoriasis"].index(class_name))
    with pytest.raises(plumbing.UsageError, match=r"\(train\) row \d+: label must be the index of a class .* got 0"):
        lesions.load_image_dataset(path, 2, 2, seed=0)
    (tmp_path / "paths").mkdir()
    for split in ("train", "test"):
        rows = [{"image": str(x), "label": x.parent.name} for x in sorted((LESIONS / split).glob("*/*.png"))]
        (tmp_path / "paths" / f"{split}.jsonl").write_text(jsonl(rows))
    with pytest.raises(plumbing.UsageError, match=re.escape("paths (train): 'image' holds no images (")):
        lesions.load_image_dataset(str(tmp_path / "paths"), 2, 2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# HotpotQA: one paragraph title, two texts


def test_a_paragraph_title_with_two_texts_keeps_both_and_says_so_once(tmp_path, capsys):
    two_in_one_row = {
        **HOTPOTQA_ROW,
        "context": {
            "title": ["Ada", "Ada"],
            "sentences": [["Ada is a name."], HOTPOTQA_ROW["context"]["sentences"][0]],
        },
    }
    another_text = {
        **HOTPOTQA_ROW,
        "context": {"title": ["Bob"], "sentences": [["Bob is a pilot."]]},
        "question": "What does Bob do?",
        "answer": "pilot",
        "supporting_facts": {"title": ["Bob"]},
    }
    files = {"train.jsonl": jsonl([two_in_one_row, HOTPOTQA_ROW, another_text])}
    path = data_folder(tmp_path / "hotpotqa", "hotpotqa", **files)
    train, _, demos, corpus = load("hotpotqa", path)
    assert corpus == {
        "Ada": "Ada is a name.",
        "Ada (2)": "Ada was born in Norvania.",
        "Bob": "Bob is a baker.",
        "Bob (2)": "Bob is a pilot.",
    }
    assert [x["path"] for x in train] == [["Ada", "Ada (2)"], ["Ada (2)"], ["Bob (2)"]]
    assert [x["hops"] for x in train] == [1, 1, 1]
    searches = re.findall(r"<search>(.*?)</search>", "".join(text for text, _ in demos[1][1]))
    assert searches == ["Ada (2)"] and "Norvania" in demos[1][1][1][0]  # the demo reads the text with the answer
    assert namesakes.BM25(corpus).search("Ada (2)", 1) == ["Ada was born in Norvania."]
    said = [line for line in capsys.readouterr().out.splitlines() if "more than one text" in line]
    assert said == [
        f"[tree_grpo] 2 HotpotQA paragraph titles have more than one text (the first: 'Ada', at {path} (train) "
        "row 0); each text is kept as a document of its own, the later ones titled 'Ada (2)', ..."
    ]


# ---------------------------------------------------------------------------------------------------------------
# the command line: `error: ...` and exit code 2, before any model loads

COMMAND_LINE = [
    ("grpo.py", ["--dataset", "gsm8k"], "gsm8k", "train.jsonl has no rows"),
    ("crpo.py", ["--dataset", "medqa"], "medqa", "train.jsonl line 2 is not JSON"),
    ("tree_grpo.py", ["--dataset", "hotpotqa"], "hotpotqa", "validation.jsonl has no rows"),
    ("grpo_pp.py", [], "one class", "(train) has images without a class"),
]


@pytest.mark.parametrize("script, argv, data, message", COMMAND_LINE, ids=[s for s, _, _, _ in COMMAND_LINE])
def test_the_command_line_names_the_file_says_error_and_exits_2(tmp_path, capsys, script, argv, data, message):
    broken = {
        "gsm8k": {"train.jsonl": ""},
        "medqa": {"train.jsonl": jsonl([MEDQA_ROW]) + "{'question': 'single quotes'}\n"},
        "hotpotqa": {"validation.jsonl": ""},
    }
    path = image_folder(tmp_path, data) if data == "one class" else data_folder(tmp_path / data, data, **broken[data])
    argv = [*argv, "--dataset_path", path, "--output_dir", str(tmp_path / "runs")]
    code, err = main_runner(script)(*argv, capsys=capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.splitlines()[-1].startswith(f"{script}: error: ") and message in err.splitlines()[-1], err[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing ran


def test_a_folder_with_fewer_images_than_asked_says_so(capsys):
    train, _ = lesions.load_image_dataset(str(LESIONS), 16, 1, seed=0)
    counts = Counter(item["label"] for item in train)
    said = capsys.readouterr().out
    assert f"fewer than 16 images of nevus ({counts['nevus']}), psoriasis ({counts['psoriasis']})" in said
    assert max(counts.values()) < 16
