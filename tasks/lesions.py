"""Skin lesions drawn from a knowledge graph (offline) and image folders: grpo_pp.py's task, reward and evaluations.

32x32 RGB "lesions" drawn in code: a blob on a skin-tone background whose colour, shape, border and texture
encode one of six classes; every class shares attributes with others, so recognising one takes a combination.
The knowledge graph gives each class's visual attributes, symptoms and care. The low-data training split has
`images_per_class` images per class (8, 16 or 32); the held-out split is balanced and depends only on the seed.
Reward (VLM-R1 style): 1 for the right class + 0.5 for the <think>..</think><answer>..</answer> format
(+ kg_weight x the share of the attributes named in <think> that the graph gives the predicted class).
The tiny VLM is warm-started on attribute captions whose class name is a look-alike (CONFUSED_WITH) with
probability `noise`: it sees well but mixes classes up, a systematic error for RL to correct.
Stage 2's conversations are written from the graph (the recognition trace, then symptoms and care), a known share
with one fact swapped for another class's; the factual error rate (`evaluate_answers`) is measured on answers
sampled at T=1, because greedy decoding shows the most likely fact and so hides the errors SFT taught.
An image data set (hub id or folder, e.g. an `imagefolder` with train/ and test/) works when its class names are
in the graph.
"""

import colorsys
import json
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from plumbing import UsageError
from tasks import load_data, rows

ATTRIBUTES = {
    "colour": ["brown", "black", "red", "pink"],
    "shape": ["round", "oval", "irregular"],
    "border": ["sharp", "blurry"],
    "texture": ["smooth", "scaly", "dotted"],
}


# class -> visual attributes (what the image shows), symptoms and care (what the conversation needs)
KNOWLEDGE_GRAPH = {
    "nevus": {"colour": "brown", "shape": "round", "border": "sharp", "texture": "smooth",
              "symptoms": ["no symptoms"], "care": "watch for change"},
    "melanoma": {"colour": "black", "shape": "irregular", "border": "blurry", "texture": "dotted",
                 "symptoms": ["growing", "bleeding"], "care": "urgent biopsy"},
    "psoriasis": {"colour": "red", "shape": "oval", "border": "sharp", "texture": "scaly",
                  "symptoms": ["itching", "silvery scale"], "care": "topical steroid"},
    "eczema": {"colour": "red", "shape": "irregular", "border": "blurry", "texture": "scaly",
               "symptoms": ["itching", "dry skin"], "care": "moisturiser"},
    "keratosis": {"colour": "brown", "shape": "oval", "border": "sharp", "texture": "scaly",
                  "symptoms": ["no symptoms"], "care": "no treatment"},
    "rosacea": {"colour": "pink", "shape": "round", "border": "blurry", "texture": "dotted",
                "symptoms": ["flushing", "burning"], "care": "avoid triggers"},
}  # fmt: skip


CLASSES = list(KNOWLEDGE_GRAPH)


IMAGE_SIZE = 32


# hue (0-1), saturation, value of each colour; each image jitters them
COLOURS = {"brown": (0.07, 0.65, 0.45), "black": (0.05, 0.35, 0.15), "red": (0.99, 0.75, 0.75),
           "pink": (0.95, 0.35, 0.95)}  # fmt: skip


def check_class(name: str) -> str:
    if name not in KNOWLEDGE_GRAPH:
        raise UsageError(f"unknown class {name!r}: the knowledge graph knows {', '.join(CLASSES)}")
    return name


def draw_lesion(label: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A (size, size, 3) uint8 image of one lesion of class `label`: a blob on skin whose colour, shape, border
    and texture are the class's attributes, with random skin tone, position, size, rotation and noise."""
    attrs = KNOWLEDGE_GRAPH[check_class(label)]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size  # (size, size) each, in [0, 1)
    skin = np.array(colorsys.hsv_to_rgb(0.08 + rng.uniform(-0.02, 0.02), rng.uniform(0.2, 0.4), rng.uniform(0.8, 1)))
    # the blob: an ellipse in a rotated frame; "irregular" modulates its radius with the angle
    cx, cy = 0.5 + rng.uniform(-0.08, 0.08, size=2)
    angle = rng.uniform(0, math.pi)
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
    v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
    radius = rng.uniform(0.26, 0.33)
    aspect = {"round": 1.0, "oval": 0.55, "irregular": 0.85}[attrs["shape"]]
    r = np.sqrt(u**2 + (v / aspect) ** 2) / radius  # (size, size): 1 on the border
    if attrs["shape"] == "irregular":
        theta = np.arctan2(v, u)
        phases = rng.uniform(0, 2 * math.pi, size=3)
        r = r / (1 + sum(0.15 * np.sin(k * theta + p) for k, p in zip((3, 5, 7), phases)))
    softness = {"sharp": 0.04, "blurry": 0.35}[attrs["border"]]
    alpha = np.clip((1 - r) / softness + 0.5, 0, 1)  # (size, size): 1 inside, 0 outside
    hue, sat, val = COLOURS[attrs["colour"]]
    colour = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.02, 0.02)) % 1, sat, val * rng.uniform(0.9, 1.1)))
    lesion = np.broadcast_to(colour, (size, size, 3)).copy()
    if attrs["texture"] == "scaly":  # pale stripes across the lesion
        stripes = 0.5 + 0.5 * np.sin(2 * math.pi * (u * rng.uniform(7, 9) + rng.uniform(0, 1)))
        lesion += 0.35 * (stripes > 0.6)[..., None] * (1 - lesion)
    elif attrs["texture"] == "dotted":  # dark dots
        dots = rng.random((size, size)) < 0.12
        lesion[dots] *= 0.35
    image = alpha[..., None] * lesion + (1 - alpha[..., None]) * skin
    image += rng.normal(0, 0.03, size=image.shape)  # sensor noise
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_lesion_task(images_per_class: int, eval_per_class: int, seed: int):
    """A low-data training split (images_per_class per class) and a balanced held-out split, as lists of
    {"image": PIL image, "label": class}. The held-out images depend only on `seed`, not on the training size."""
    from PIL import Image

    def split(count, stream):
        rng = np.random.default_rng([seed, stream])
        items = [{"image": Image.fromarray(draw_lesion(c, rng)), "label": c} for _ in range(count) for c in CLASSES]
        random.Random(seed + stream).shuffle(items)
        return items

    return split(images_per_class, 0), split(eval_per_class, 1)


def image_problem(image, size: int | None = IMAGE_SIZE) -> str | None:
    """What is wrong with an image for the VLM, or None: the tiny VLM sees size x size RGB images; size=None (a
    real VLM, whose processor resizes) checks only the mode."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        return f"a PIL image, not {type(image).__name__}"
    if image.mode != "RGB":
        return f"RGB, not {image.mode!r}: convert it with image.convert('RGB')"
    if size is not None and image.size != (size, size):
        return (
            f"{size}x{size} for the tiny VLM, not {image.size[0]}x{image.size[1]}: resize it with "
            f"image.resize(({size}, {size})), or use a real VLM (--model a folder or hub id), whose processor resizes"
        )
    return None


def check_image(image, size: int | None = IMAGE_SIZE):
    """The image, or one clear UsageError saying what it must be (image_problem)."""
    if problem := image_problem(image, size):
        raise UsageError(f"the image must be {problem}")
    return image


# How `datasets` (its imagefolder builder) finds the class of each image of a local folder
IMAGE_LAYOUT = (
    "one folder per class, every image one level below its split's folder (train/<class>/<image>, "
    "test/<class>/<image>) and two or more classes in train/, or a metadata.jsonl beside the images with the "
    "fields file_name and label (a class name)"
)


def image_folders(path: str) -> str:
    """Where the images of a local folder are, for an error message ('' for a hub id)."""
    from PIL import Image

    if not os.path.isdir(path):
        return ""
    kinds = Image.registered_extensions()
    folders = sorted({str(f.parent.relative_to(path)) for f in Path(path).rglob("*") if f.suffix.lower() in kinds})
    return f". The images of {path} are in {', '.join(folders[:8]) or 'no folder'}"


def load_image_dataset(path: str, images_per_class: int, eval_per_class: int, seed: int, size: int | None = IMAGE_SIZE):
    """An image classification data set through `datasets` (hub id or local folder, e.g. an `imagefolder` with
    train/ and test/ sub-folders of one folder per class). Its class names must be in the knowledge graph; a label
    is a class name, or its index in the data set's `ClassLabel`."""
    import datasets

    splits = {"train": ("train",), "eval": ("test", "validation")}
    data = load_data(path, "an image classification data set", splits, ("image",), "(no --dataset_path)")

    def take(split, per_class):
        image, label = split.features["image"], split.features.get("label")
        if not isinstance(image, datasets.Image):  # e.g. a JSONL file of image paths: datasets reads text
            raise UsageError(f"{path} ({split.split}): 'image' holds no images ({image}); give them as {IMAGE_LAYOUT}")
        if label is None or None in split["label"]:  # datasets found no class for some images
            raise UsageError(
                f"{path} ({split.split}) has images without a class: `datasets` finds an image's class by "
                f"{IMAGE_LAYOUT}{image_folders(path)}"
            )
        split = split.cast_column("image", datasets.Image(mode="RGB"))  # RGBA, grayscale or CMYK files: RGB
        names = label.names if isinstance(label, datasets.ClassLabel) else None  # None: the labels are class names

        def class_of(value):  # a ClassLabel's index (-1: none), or the class name itself
            if names is None:
                return value
            return names[value] if value in range(len(names)) else None

        must = f"the index of a class the knowledge graph has ({', '.join(CLASSES)}), or its name"
        must += f"; the data set's classes: {', '.join(names)}" if names else ""
        schema = {  # {field: (check, what it must be)}
            "label": (lambda v, row: class_of(v) in KNOWLEDGE_GRAPH, must),
            "image": (lambda v, row: image_problem(v, size) is None, lambda row: image_problem(row["image"], size)),
        }
        rng, counts, items = random.Random(seed), {}, []
        for row in rng.sample(rows(path, split, len(split), schema), len(split)):
            class_name = class_of(row["label"])
            if counts.get(class_name, 0) < per_class:
                counts[class_name] = counts.get(class_name, 0) + 1
                items.append({"image": row["image"], "label": class_name})
        short = [f"{name} ({count})" for name, count in sorted(counts.items()) if count < per_class]
        if short:  # said, never silently fewer than asked
            print(f"[lesions] {path} ({split.split}): fewer than {per_class} images of {', '.join(short)}: all taken")
        return items

    return take(data["train"], images_per_class), take(data["eval"], eval_per_class)


def image_size_for(model: str) -> int | None:
    """The size a model sees the lesions at: the tiny VLM's IMAGE_SIZE (by name, or a folder holding one, as stages 2
    and 3 start from), None for a real VLM, whose processor resizes."""
    config = Path(model) / "config.json"
    vision = json.loads(config.read_text()).get("vision_config", {}) if config.is_file() else {}
    return IMAGE_SIZE if model == "tiny-vlm" or vision.get("image_size") == IMAGE_SIZE else None


def load_task(dataset_path, images_per_class, eval_per_class, data_seed, size=IMAGE_SIZE):
    """(train items, held-out items): the generated lesions, or an image data set (`size` None: a real VLM, whose
    processor resizes)."""
    if dataset_path:
        return load_image_dataset(dataset_path, images_per_class, eval_per_class, data_seed, size)
    return make_lesion_task(images_per_class, eval_per_class, data_seed)


QUESTION = "What skin disease is this?"


def parse_answer(completion: str) -> dict:
    """The named attributes in <think> and the class in <answer>: {"answer", "attributes", "formatted"}."""
    think = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    answer = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    named = set(re.findall(r"[a-z]+", think.group(1).lower())) if think else set()
    values = {v for options in ATTRIBUTES.values() for v in options}
    return {
        "answer": answer.group(1).strip().lower() if answer else None,
        "attributes": named & values,
        "formatted": re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", completion, re.DOTALL)
        is not None,
    }


def recognition_reward(completions: list[str], labels: list[str], kg_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """R = correct class + 0.5 * format (+ kg_weight * share of the named attributes the graph lists for the
    predicted class; 0 when none is named)."""
    if len(completions) != len(labels):
        raise ValueError(f"{len(completions)} completions but {len(labels)} labels: pass one label per completion")
    correct, formatted, agreement = [], [], []
    for completion, label in zip(completions, labels):
        parsed = parse_answer(completion)
        correct.append(float(parsed["answer"] == check_class(label)))
        formatted.append(float(parsed["formatted"]))
        graph = KNOWLEDGE_GRAPH.get(parsed["answer"])
        named = parsed["attributes"]
        agreement.append(len(named & {graph[k] for k in ATTRIBUTES}) / len(named) if graph and named else 0.0)
    correct, formatted, agreement = map(torch.tensor, (correct, formatted, agreement))
    return {"correct": correct, "format": formatted, "kg": agreement,
            "total": correct + 0.5 * formatted + kg_weight * agreement}  # fmt: skip


def make_prompt(processor) -> str:
    """The question with the image placeholder: the model's chat template if it has one, else '<image>question'."""
    text = f"{QUESTION} Describe its colour, shape, border and texture inside <think> </think>, then name it inside " \
        "<answer> </answer>."  # fmt: skip
    if getattr(processor, "chat_template", None) is None:
        return "<image>" + QUESTION
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def caption(label: str, answer: str) -> str:
    """A recognition trace: the class's visual attributes, then a class name."""
    attrs = KNOWLEDGE_GRAPH[label]
    return f"<think>{' '.join(attrs[k] for k in ATTRIBUTES)}</think><answer>{answer}</answer>"


# the tiny VLM's warm start mixes up each class with one that shares attributes with it
CONFUSED_WITH = {"nevus": "keratosis", "keratosis": "psoriasis", "psoriasis": "eczema", "eczema": "melanoma",
                 "melanoma": "rosacea", "rosacea": "nevus"}  # fmt: skip


def warm_start_demos(seed: int, noise: float, per_class: int = 200):
    """The tiny VLM's stand-in for pretraining: images (a separate stream from the task's splits) captioned with
    their true attributes, and with the class a look-alike (CONFUSED_WITH) with probability `noise`: a model that
    sees well but has a systematic mix-up for RL to correct."""
    from PIL import Image

    rng, pick = np.random.default_rng([seed, 2]), random.Random(seed)
    demos = []
    for c in CLASSES:
        for _ in range(per_class):
            answer = CONFUSED_WITH[c] if pick.random() < noise else c
            demos.append((Image.fromarray(draw_lesion(c, rng)), caption(c, answer)))
    return demos


def macro_f1(predictions: list, labels: list) -> float:
    """Mean over the classes present in `labels` of F1 = 2 TP / (2 TP + FP + FN); an unparsable answer is a miss."""
    scores = []
    for c in sorted(set(labels)):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return sum(scores) / len(scores)


@torch.no_grad()
def evaluate(model, processor, items, max_new_tokens, generate_completions, batch_size=128):
    """Greedy recognition on held-out images with the script's `generate_completions`: macro-F1, accuracy, share
    well formatted."""
    model.eval()
    predictions, formatted = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [x["image"] for x in chunk]
        rollout = generate_completions(
            model, processor, images, group_size=1, max_new_tokens=max_new_tokens, greedy=True
        )
        parsed = [parse_answer(t) for t in rollout["texts"]]
        predictions += [p["answer"] for p in parsed]
        formatted += [p["formatted"] for p in parsed]
    labels = [x["label"] for x in items]
    return {"macro_f1": macro_f1(predictions, labels),
            "accuracy": sum(p == y for p, y in zip(predictions, labels)) / len(items),
            "format": sum(formatted) / len(items)}  # fmt: skip


@torch.no_grad()
def vote_macro_f1(model, processor, items, max_new_tokens, samples, generate_completions):
    """Macro-F1 of the majority class over `samples` answers sampled at T=1 per held-out image (an unparsable
    answer is a vote for no class)."""
    model.eval()
    rollout = generate_completions(model, processor, [x["image"] for x in items], group_size=samples,
                                   max_new_tokens=max_new_tokens)  # fmt: skip
    return macro_f1(majority_vote([parse_answer(t)["answer"] for t in rollout["texts"]], samples),
                    [x["label"] for x in items])  # fmt: skip


def majority_vote(answers: list, samples: int) -> list:
    """The most common answer of each run of `samples` consecutive answers (a tie goes to the one named first)."""
    return [Counter(answers[i : i + samples]).most_common(1)[0][0] for i in range(0, len(answers), samples)]


FACTS = sorted({f for node in KNOWLEDGE_GRAPH.values() for f in [*node["symptoms"], node["care"]]})


def conversation(label: str, rng: random.Random, error_rate: float = 0.0) -> tuple[str, bool]:
    """A conversational answer from the graph: the recognition trace, then symptoms and care. With probability
    error_rate one of them is another class's (a factual error, as SFT data written in a hurry would have).
    Returns (text, has_error)."""
    node = dict(KNOWLEDGE_GRAPH[label])
    has_error = rng.random() < error_rate
    if has_error:
        key = rng.choice(["symptoms", "care"])
        node[key] = rng.choice([n[key] for n in KNOWLEDGE_GRAPH.values() if n[key] != node[key]])
    text = f"{caption(label, label)} Symptoms: {', '.join(node['symptoms'])}. Care: {node['care']}."
    return text, has_error


def stated_facts(completion: str) -> set[str]:
    """The graph's symptoms and care stated after the answer."""
    text = completion.split("</answer>", 1)[-1].lower()
    return {f for f in FACTS if re.search(rf"\b{re.escape(f)}\b", text)}


def has_factual_error(completion: str) -> bool:
    """True if the answer states a symptom or care that the graph does not give the class it names."""
    node = KNOWLEDGE_GRAPH.get(parse_answer(completion)["answer"])
    facts = stated_facts(completion)
    return bool(facts) and (node is None or not facts <= {*node["symptoms"], node["care"]})


@torch.no_grad()
def evaluate_answers(model, processor, items, max_new_tokens, samples, generate_completions):
    """Conversational answers on held-out images. Greedy: macro-F1 of the named class and the factual error rate
    (share of answers stating a symptom or care the graph does not give the class they name). Sampled at T=1,
    `samples` per image: the same error rate and the facts stated per answer. Greedy decoding hides a minority of
    wrong facts behind the most likely one; sampling shows how often the model says them."""
    model.eval()
    images, labels = [x["image"] for x in items], [x["label"] for x in items]
    greedy = generate_completions(model, processor, images, group_size=1, max_new_tokens=max_new_tokens, greedy=True)
    greedy = greedy["texts"]
    sampled = generate_completions(model, processor, images, group_size=samples, max_new_tokens=max_new_tokens)
    sampled = sampled["texts"]
    return {"macro_f1": macro_f1([parse_answer(t)["answer"] for t in greedy], labels),
            "fact_error_rate_greedy": sum(map(has_factual_error, greedy)) / len(greedy),
            "fact_error_rate": sum(map(has_factual_error, sampled)) / len(sampled),
            "facts_stated": sum(len(stated_facts(t)) for t in sampled) / len(sampled),
            "example": greedy[0]}  # fmt: skip
