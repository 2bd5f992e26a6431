"""Clinical vignettes from a knowledge graph (offline) and MedQA: crpo.py's task and its strict evaluation.

A knowledge graph of 12 diseases and their findings, with deliberate overlaps. A vignette lists 3 findings of the
gold disease and 4 options whose distractors share findings with it, e.g.
    prompt:  "anosmia, fever, cough? A covid B strep C flu D mono"
    full:    "<dx>anosmia, fever, cough; A fits; B no cough; C no anosmia; D no fever</dx><conclusion>A</conclusion>"
    lazy:    "<dx>A fits</dx><conclusion>A</conclusion>"
The stem always holds the gold disease's key finding. The tiny model is warm-started on a mix of lazy (50%),
partial (30%), full (10%) and wrong or hallucinated (10%) demonstrations, so most of what it samples reasons
lazily or partly. No held-out question appears in training. The findings are exact words, so "cites a finding"
is a string match (real text would need clinical NER).
"B no cough" is a valid rejection only if cough is in the case and the graph does not give disease B a cough
(`valid_rejection`): a rejection for a finding the distractor has would teach a wrong reason.

MedQA (4 options, GBaker/MedQA-USMLE-4-options format) has no knowledge graph. What stands in (`load_medqa`):
the findings are the case's metamap phrases; the vocabulary a response may cite from is every phrase of the
training split, so a cited phrase the case does not mention counts as invented; and a graph mined from the
training split, option text -> the phrases of the training cases whose answer it is, refutes a rejection whose
reason was seen with that option. It is weaker than a curated graph: an option never seen as an answer refutes
nothing.
"""

import random
import re

import torch

from plumbing import UsageError
from tasks import is_text, is_texts, load_data, rows

SYSTEM_PROMPT = (
    "Diagnose the case. Inside <dx> </dx> cite the case's findings, say which option fits and reject each other "
    "option with a finding it lacks (e.g. 'B no cough'); then give only the option letter inside "
    "<conclusion> </conclusion>."
)


# The knowledge graph: disease -> findings, the first one its key finding (no other disease has it). The others
# are shared across diseases on purpose, so each distractor matches part of the case. Names are the usual
# clinical abbreviations (appy = appendicitis, chole = cholecystitis, pna = pneumonia, ...) to keep prompts short.
KNOWLEDGE_GRAPH = {
    "flu": ["myalgia", "fever", "cough", "headache"],
    "covid": ["anosmia", "fever", "cough", "dyspnea"],
    "strep": ["exudate", "fever", "pharyngitis", "adenopathy"],
    "mono": ["splenomegaly", "fatigue", "pharyngitis", "adenopathy"],
    "hepatitis": ["jaundice", "fatigue", "nausea", "fever"],
    "chole": ["murphy-sign", "fever", "ruq-pain", "nausea"],
    "appy": ["rlq-pain", "fever", "nausea", "anorexia"],
    "pna": ["crackles", "fever", "cough", "dyspnea"],
    "asthma": ["wheeze", "dyspnea", "cough", "nausea"],
    "migraine": ["aura", "headache", "nausea", "photophobia"],
    "meningitis": ["neck-stiffness", "fever", "headache", "photophobia"],
    "anemia": ["pallor", "fatigue", "dyspnea", "headache"],
}


FINDINGS = sorted({f for findings in KNOWLEDGE_GRAPH.values() for f in findings})


LETTERS = "ABCD"


def make_item(gold, stem, rng):
    """A vignette: the stem's findings, and 4 options: the gold disease and 3 distractors, each lacking a stem
    finding (so it can be rejected for a reason). Distractors that share a stem finding are preferred; a few
    stems have fewer than 3 of those, and get the rest from the other diseases."""
    others = [d for d in KNOWLEDGE_GRAPH if d != gold and set(stem) - set(KNOWLEDGE_GRAPH[d])]
    sharing = [d for d in others if set(stem) & set(KNOWLEDGE_GRAPH[d])]
    distractors = rng.sample(sharing, min(3, len(sharing)))
    distractors += rng.sample([d for d in others if d not in sharing], 3 - len(distractors))
    options = distractors + [gold]
    rng.shuffle(options)
    return {
        "question": f"{', '.join(stem)}? " + " ".join(f"{L} {d}" for L, d in zip(LETTERS, options)),
        "options": dict(zip(LETTERS, options)),
        "answer": LETTERS[options.index(gold)],
        "findings": list(stem),  # the stem's findings
        "vocabulary": FINDINGS,  # the words that count as findings when the reasoning is parsed
        "option_findings": {L: KNOWLEDGE_GRAPH[d] for L, d in zip(LETTERS, options)},  # what the graph gives each
    }


def clinical_trace(item, style, rng):
    """A demonstration in one of four styles: lazy, partial, full, or wrong (a wrong answer or an invented finding)."""
    gold, findings = item["answer"], item["findings"]
    distractors = [L for L in item["options"] if L != gold]

    def rejection(letter):  # "B no cough": a stem finding the distractor lacks
        missing = [f for f in findings if f not in KNOWLEDGE_GRAPH[item["options"][letter]]]
        return f"{letter} no {rng.choice(missing)}"

    if style == "lazy":
        clauses = [f"{gold} fits"]
    elif style == "partial":
        clauses = [rng.choice(findings), f"{gold} fits", rejection(rng.choice(distractors))]
    elif style == "full":
        clauses = [", ".join(findings), f"{gold} fits"] + [rejection(L) for L in distractors]
    else:  # wrong: half a wrong conclusion, half an invented finding
        if rng.random() < 0.5:
            gold = rng.choice(distractors)
            clauses = [", ".join(findings), f"{gold} fits"]
        else:
            invented = rng.choice([f for f in FINDINGS if f not in findings])
            clauses = [", ".join(findings[:2] + [invented]), f"{gold} fits"]
    return f"<dx>{'; '.join(clauses)}</dx><conclusion>{gold}</conclusion>"


DEMO_STYLES = {"lazy": 0.5, "partial": 0.3, "full": 0.1, "wrong": 0.1}


def make_clinic_task(num_train: int, num_eval: int, seed: int):
    """Vignettes from the knowledge graph; no held-out question appears in training. Returns (train, eval, demos)."""
    rng = random.Random(seed)
    combos = [(d, stem) for d, fs in KNOWLEDGE_GRAPH.items() for stem in _key_and_two(fs)]  # 12 diseases x 3
    eval_items = [make_item(*rng.choice(combos), rng) for _ in range(num_eval)]
    held_out = {x["question"] for x in eval_items}
    train_items = []
    while len(train_items) < num_train:
        item = make_item(*rng.choice(combos), rng)
        if item["question"] not in held_out:
            train_items.append(item)
    styles = rng.choices(list(DEMO_STYLES), weights=list(DEMO_STYLES.values()), k=num_train)
    demos = [(x["question"], clinical_trace(x, style, rng)) for x, style in zip(train_items, styles)]
    return train_items, eval_items, demos


def _key_and_two(findings):
    """The stems of a disease: its key finding and two of its other three findings."""
    return [[f for f in findings if f != left_out] for left_out in findings[1:]]


def present(options) -> dict:
    """A MedQA row's options that it has: datasets gives an option the row lacks (another row's E) as None."""
    return {k: v for k, v in sorted(options.items()) if v is not None} if isinstance(options, dict) else {}


# MedQA's format (GBaker/MedQA-USMLE-4-options): {field: (check, what it must be)}
MEDQA_SCHEMA = {
    "question": (is_text, "non-empty text"),
    "options": (
        lambda v, row: len(present(v)) >= 2 and all(is_text(x) for x in present(v).values()),
        "a dict of at least 2 option letters, each with non-empty text",
    ),
    "answer_idx": (
        lambda v, row: v in present(row["options"]),
        lambda row: f"one of the options {sorted(present(row['options']))}",
    ),
    "metamap_phrases": (lambda v, row: v is None or is_texts(v), "a list of phrases (or absent)"),
}


def load_medqa(path: str, num_train: int, num_eval: int):
    """MedQA 4-option (GBaker/MedQA-USMLE-4-options format: question, options {A..D}, answer_idx, and
    metamap_phrases, which stand in for the findings). No knowledge graph: the warm-start demos are lazy, and the
    training split stands in for the graph (see the module docstring): its phrases are the vocabulary, and each
    option text gets the phrases of the training cases whose answer it is."""
    columns = ("question", "options", "answer_idx")
    data = load_data(path, "MedQA", {"train": ("train",), "eval": ("test",)}, columns, "--dataset clinic")
    train_rows = rows(path, data["train"], num_train, MEDQA_SCHEMA)
    phrases = lambda row: [p.lower() for p in row.get("metamap_phrases") or []]  # noqa: E731
    vocabulary = tuple(sorted({p for row in train_rows for p in phrases(row)}))  # one tuple, shared by every item
    mined_graph = {}  # option text -> phrases of the training cases it answers
    for row in train_rows:
        mined_graph.setdefault(row["options"][row["answer_idx"]].lower().strip(), set()).update(phrases(row))

    def to_items(rows):
        items = []
        for row in rows:
            options = present(row["options"])
            question = row["question"] + " " + " ".join(f"{L} {text}" for L, text in options.items())
            graph = {L: sorted(mined_graph.get(text.lower().strip(), ())) for L, text in options.items()}
            item = {"question": question, "options": options, "answer": row["answer_idx"], "findings": phrases(row)}
            items.append(check_item(item | {"vocabulary": vocabulary, "option_findings": graph}))
        return items

    train_items = to_items(train_rows)
    eval_items = to_items(rows(path, data["eval"], num_eval, MEDQA_SCHEMA))
    demos = [(x["question"], f"<dx>{x['answer']} fits</dx><conclusion>{x['answer']}</conclusion>") for x in train_items]
    return train_items, eval_items, demos


def check_item(item):
    """One clear error for a malformed item, naming what is wrong."""
    for key in ("question", "options", "answer", "findings", "vocabulary", "option_findings"):
        if key not in item:
            raise UsageError(
                f"item is missing {key!r}: each item needs question, options, answer, findings, vocabulary and "
                f"option_findings (what the knowledge graph gives each option)"
            )
    if not isinstance(item["options"], dict) or len(item["options"]) < 2:
        raise UsageError(f"item needs at least 2 options as a dict letter -> text, got {item['options']!r}")
    if item["answer"] not in item["options"]:
        raise UsageError(f"item's answer {item['answer']!r} is not one of its options {sorted(item['options'])}")
    return item


def load_task(dataset, dataset_path, num_train, num_eval, data_seed):
    """(train items, held-out items, the tiny model's demos) of the generated clinic task or of MedQA."""
    if dataset == "clinic":
        train_items, eval_items, demos = make_clinic_task(num_train, num_eval, data_seed)
    else:
        train_items, eval_items, demos = load_medqa(dataset_path, num_train, num_eval)
    if not train_items or not eval_items:
        raise UsageError(
            f"The {dataset} task has {len(train_items)} training and {len(eval_items)} held-out items; "
            f"both must be non-empty (check --num_train, --num_eval and the data files)."
        )
    return train_items, eval_items, demos


# ----------------------------------------------------------------------------------------------------------------
# Reading a response, and the held-out evaluation against the graph


def parse_response(completion: str, item) -> dict:
    """Split a response into what the rewards look at: format, conclusion letter, cited findings, the options the
    <dx> says fit, and the (option, reason) rejections."""
    match = re.fullmatch(r"\s*<dx>(.*?)</dx>\s*<conclusion>\s*(.*?)\s*</conclusion>\s*", completion, re.DOTALL)
    if match is None:
        return {"formatted": False, "conclusion": None, "cited": [], "fits": set(), "rejections": []}
    dx, conclusion = match.group(1), match.group(2)
    letters = "".join(item["options"])
    return {
        "formatted": conclusion in item["options"],
        "conclusion": conclusion,
        # findings named anywhere in the reasoning: the case's own, and any other the task knows of
        "cited": [f for f in dict.fromkeys([*item["findings"], *item["vocabulary"]]) if f in dx],
        "fits": set(re.findall(rf"\b([{letters}]) fits\b", dx)),
        "rejections": [(L, reason.strip()) for L, reason in re.findall(rf"\b([{letters}]) no ([^;]+)", dx)],
    }


def in_case(finding, item) -> bool:
    """The case has this finding: one of its findings, or words its question text contains."""
    return finding in item["findings"] or finding in item["question"].lower()


def valid_rejection(letter, reason, item) -> bool:
    """A valid rejection ("B no cough") of distractor B: the case has cough and the graph gives B no cough."""
    return reason in item["findings"] and reason not in item["option_findings"][letter]


def strict_metrics(completion: str, item) -> dict:
    """One answer checked against the knowledge graph.

    faithful: the <dx> cites at least one finding of the case, invents none, and says the concluded option fits;
    hallucinated: it cites a finding the case does not have; citations: stem findings cited; rejections: share
    of distractors rejected with a stem finding as the reason, right or wrong; valid_rejections: those whose
    reason the graph confirms, the distractor really lacks it (what the training reward counts).
    """
    parsed = parse_response(completion, item)
    invented = [f for f in parsed["cited"] if not in_case(f, item)]
    reasons = dict(parsed["rejections"])
    distractors = [letter for letter in item["options"] if letter != item["answer"]]
    rejected = [letter for letter in distractors if reasons.get(letter) in item["findings"]]
    valid = [letter for letter in rejected if valid_rejection(letter, reasons[letter], item)]
    return {
        "accuracy": float(parsed["conclusion"] == item["answer"]),
        "faithfulness": float(bool(parsed["cited"]) and not invented and parsed["conclusion"] in parsed["fits"]),
        "hallucination": float(bool(invented)),
        "citations": float(sum(f in parsed["cited"] for f in item["findings"])),
        "rejections": len(rejected) / len(distractors),
        "valid_rejections": len(valid) / len(distractors),
    }


@torch.no_grad()
def evaluate(model, tokenizer, items, to_prompt, max_new_tokens, generate_completions, batch_size=256):
    """Greedy decoding on held-out items with the script's `generate_completions`: the mean of `strict_metrics`
    over answers, and the mean length."""
    model.eval()
    per_answer, lengths = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [to_prompt(x) for x in chunk]
        rollout = generate_completions(
            model, tokenizer, prompts, group_size=1, max_new_tokens=max_new_tokens, greedy=True
        )
        per_answer += [strict_metrics(text, item) for text, item in zip(rollout["texts"], chunk)]
        lengths += rollout["completion_mask"].sum(1).tolist()
    metrics = {key: sum(m[key] for m in per_answer) / len(per_answer) for key in per_answer[0]}
    metrics["mean_length"] = sum(lengths) / len(lengths)
    return metrics
