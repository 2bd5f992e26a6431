"""GRPO++ (DermIQ-VLM): a stabilised GRPO on a vision-language model, then SFT, then knowledge-graph DPO.

Paper: DermIQ-VLM (Swapnil, Saha, Khan, Haque, 2025), https://arxiv.org/abs/2510.01236. Read grpo.py first.

STATUS: work in progress. This file has the task (procedural lesion images and their knowledge graph), the
GRPO++ advantage, and the DPO loss, with tests; the three training stages come next (see README).

The idea. Three stages that mimic how a dermatologist is trained: (1) GRPO++, a GRPO made stable enough for
reasoning-based disease recognition from few images; (2) SFT for conversation; (3) DPO whose preference pairs are
scored against a knowledge graph instead of by experts.

What the paper leaves open, and our interpretation. The paper's text and code are not public: only the abstract,
and one secondary source saying GRPO++ uses "a binary advantage". Every stabiliser below is therefore our reading,
each behind its own flag so that GRPO vs GRPO++ is one switch (../shared/papers/crpo-and-grpo-pp.md, part B3):
    binary advantage   A_i = sign(r_i - mean(r_group))  in {-1, 0, +1}: no division by a near-zero std
    skip zero-variance groups (no loss where every reward is equal), clip-higher (eps_high 0.28), token-mean
    loss (DAPO), and a k3 KL anchor to the reference model (beta 0.04).
DPO (Rafailov et al., 2023), with y_w the answer the knowledge graph scores best and y_l the worst:
    loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

The task. 32x32 RGB "lesions" drawn in code: a blob on a skin-tone background whose colour, shape, border and
texture encode one of six classes; every class shares attributes with others, so recognising one takes a
combination. The knowledge graph gives each class's visual attributes, symptoms and care.
"""

import colorsys
import math
import random
import re

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Task: a knowledge graph, lesion images drawn from it, and the rewards

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
        raise ValueError(f"unknown class {name!r}: the knowledge graph knows {', '.join(CLASSES)}")
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


def check_image(image, size: int = IMAGE_SIZE):
    """The tiny VLM sees size x size RGB images; anything else is one clear error (a real VLM's processor resizes)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"image mode is {image.mode!r}, the model needs 'RGB': convert it with image.convert('RGB')")
    if image.size != (size, size):
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]}, the tiny VLM needs {size}x{size}: resize it with "
            f"image.resize(({size}, {size})), or use a real VLM (--model a folder or hub id), whose processor resizes"
        )
    return image


def load_image_dataset(path: str, images_per_class: int, eval_per_class: int, seed: int, size: int = IMAGE_SIZE):
    """An image classification data set through `datasets` (hub id or local folder, e.g. an `imagefolder` with
    train/ and test/ sub-folders of one folder per class). Its class names must be in the knowledge graph."""
    from datasets import load_dataset

    try:
        data = load_dataset(path)
    except Exception as error:  # datasets raises many types: offline, missing files, bad format
        raise ValueError(
            f"Could not load an image data set from {path!r} ({type(error).__name__}: {error}). Pass a local "
            f"folder with train/ and test/ sub-folders of one folder per class, or run the offline default."
        ) from None
    names = data["train"].features["label"].names

    def take(split, per_class):
        rng, counts, items = random.Random(seed), {}, []
        for row in rng.sample(list(split), len(split)):
            label = check_class(names[row["label"]])
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                items.append({"image": check_image(row["image"], size), "label": label})
        return items

    test = "test" if "test" in data else "validation"
    return take(data["train"], images_per_class), take(data[test], eval_per_class)


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


# ----------------------------------------------------------------------------------------------------------------
# Advantages


def binary_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO++'s advantage (our reading): A_i = sign(r_i - mean of its group), in {-1, 0, +1}.

    rewards is (num_groups * group_size,), grouped contiguously. Unlike (r - mean) / std it never divides by a
    near-zero std, so one lucky sample in a low-variance group cannot get a huge advantage.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (GRPO compares completions of one prompt), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} values, got {rewards.shape}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(
            f"rewards at positions {bad} are NaN or infinite; return 0.0 for a completion you cannot score"
        )
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    # A_i = sign(r_i - mean_group(r))
    return torch.sign(grouped - grouped.mean(dim=1, keepdim=True)).view(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage, as grpo.py: (r_i - mean of its group) / (unbiased std of its group + eps)."""
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)).view(-1)


def nonzero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups * G,) bool: True for the completions of groups whose rewards are not all equal (GRPO++ trains
    only on those; a zero-variance group has advantage 0 anyway but still counts in a token-mean normaliser)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values > grouped.min(dim=1).values).repeat_interleave(group_size)


# ----------------------------------------------------------------------------------------------------------------
# DPO (stage 3)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1):
    """Direct Preference Optimization on sequence log-probs (sums over answer tokens), one entry per pair.

        loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

    Returns (mean loss, metrics): the implicit rewards beta * (log pi - log ref) of chosen and rejected answers,
    their margin and the share of pairs where the chosen one is ahead (TRL's rewards/* names).
    """
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape (one entry per pair), got {sorted(shapes)}")
    chosen_reward = beta * (policy_chosen_logps - ref_chosen_logps)  # (num_pairs,)
    rejected_reward = beta * (policy_rejected_logps - ref_rejected_logps)  # (num_pairs,)
    # -log sigmoid(x) = softplus(-x), stable for large |x|
    loss = F.softplus(-(chosen_reward - rejected_reward)).mean()
    metrics = {
        "rewards/chosen": chosen_reward.mean().item(),
        "rewards/rejected": rejected_reward.mean().item(),
        "rewards/margins": (chosen_reward - rejected_reward).mean().item(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().mean().item(),
    }
    return loss, metrics


def kg_fact_score(answer: str, label: str, penalty: float = 1.0) -> float:
    """Score a conversational answer against the graph: facts of the true class it states, minus `penalty` times
    the facts it states that belong only to other classes (a wrong symptom, care or attribute)."""
    text = answer.lower()
    truth = KNOWLEDGE_GRAPH[check_class(label)]
    true_facts = {truth[k] for k in ATTRIBUTES} | set(truth["symptoms"]) | {truth["care"]}
    other_facts = {
        fact
        for name, node in KNOWLEDGE_GRAPH.items()
        if name != label
        for fact in [*(node[k] for k in ATTRIBUTES), *node["symptoms"], node["care"]]
    } - true_facts
    stated = lambda facts: sum(re.search(rf"\b{re.escape(f)}\b", text) is not None for f in facts)  # noqa: E731
    return stated(true_facts) - penalty * stated(other_facts)


if __name__ == "__main__":
    raise SystemExit("grpo_pp.py is work in progress: the training stages are not in this version yet (see README)")
