"""People who share a first name (offline) and HotpotQA: tree_grpo.py's search task, its tool, reward and evaluation.

A knowledge base of fictional people, cities, countries and companies, one short document each, found by a
plain-Python BM25 search (nothing can be answered from memory). Three people share each first name, and the
first name's document lists them:
    <think>who</think><search>Kavo</search><information>Kavo may refer to: Kavo the pilot, Kavo the baker, Kavo the
    singer.</information><think>check</think><search>Kavo the pilot</search><information>Kavo the pilot was born
    in Bota and works for Mesa.</information><think>check</think><search>Kavo the baker</search><information>Kavo
    the baker was born in Lido and works for Zemo.</information><think>born in</think><search>Lido</search>
    <information>Lido is a city in Tasa.</information><think>city in</think><answer>Tasa</answer>
for "In which country was the Kavo who works for Zemo born?". Six kinds of question, from one search ("Where was
Kavo the baker born?") to six: 3.3 searches on average for a policy that checks the namesakes in the listed
order. The tiny model is warm-started on scripted trajectories (loss on the steps only) about the training
questions and about four other generated knowledge bases, so that it learns to read and copy names rather than
remember people, with two habits to unlearn: at a namesake the question does not fit it goes on with them anyway
(demo_trust: a wrong turn that checking the next namesake recovers from), and at each further hop it answers too
early with the entity in hand (demo_stop). 21 held-out people (one namesake of each of 21 first names) are asked
about only in evaluation.
Reward (the official Tree-GRPO `qa_em_format.py`): exact match after normalisation (lower case, no punctuation or
articles), with a format check (think -> (search -> information -> think)* -> answer):
    EM and valid format 1.0 | EM, invalid format 0.8 | wrong, valid format 0.2 | wrong, invalid, answered 0.1 |
    no answer 0
HotpotQA (hub or local folder, distractor setting): each question's paragraphs form the searchable corpus.
"""

import math
import random
import re
import string
from collections import Counter

from plumbing import UsageError
from tasks import format_prompt, is_text, is_texts, load_data, rows

TAGS = ("<search>", "</search>", "<information>", "</information>")  # the tiny tokenizer gives each one token


SYSTEM_PROMPT = (
    "Answer the given question. Reason inside <think> and </think>. To look something up, write "
    "<search> query </search>; the results come back between <information> and </information>. Search as often as "
    "you need, then give only the answer inside <answer> and </answer>, for example <answer> Beijing </answer>."
)


SYLLABLES = ["ka", "ro", "mi", "ta", "ve", "lo", "zu", "ne", "sa", "di", "po", "ri", "ga", "lu", "te", "bo"]
JOBS = ["painter", "pilot", "singer", "farmer", "doctor", "baker", "sailor", "writer"]  # "Kavo the pilot"


# question kind: (template, the relation that singles out the person among their namesakes or None for a full
# name, the relations followed from the person to the answer)
QUESTIONS = {
    "born": ("Where was {} born?", None, ["born in"]),
    "born_by_employer": ("Where was the {} who works for {} born?", "works for", ["born in"]),
    "employer_by_birthplace": ("Who employs the {} born in {}?", "born in", ["works for"]),
    "country_by_employer": ("In which country was the {} who works for {} born?", "works for", ["born in", "city in"]),
    "founder_by_birthplace": (
        "Who founded the company the {} born in {} works for?", "born in", ["works for", "founded by"]
    ),
    "hq_country_by_birthplace": (
        "In which country is the company the {} born in {} works for based?", "born in",
        ["works for", "based in", "city in"],
    ),
}  # fmt: skip


def make_knowledge_base(seed: int, num_names=33, namesakes=3, num_held_out=21, num_cities=20, num_countries=6,
                        num_companies=12):  # fmt: skip
    """Fictional people, cities, countries and companies with made-up names, and one short document each.

    People share first names: each of `num_names` first names belongs to `namesakes` people ("Kavo the pilot",
    "Kavo the baker", ...) who were born in different cities and work for different companies, and the first
    name's own document lists them ("Kavo may refer to: Kavo the pilot, Kavo the baker, Kavo the singer."). One
    person of each of the first `num_held_out` first names is held out: asked about only in evaluation, and
    founder of no company.
    Returns {"docs": {title: text}, "facts": {(entity, relation): entity}, "people": [full names], "namesakes":
    {first name: [full names, in the order its document lists them]}, "held_out": {full names}}.
    """
    rng = random.Random(seed)
    names = [a + b for a in SYLLABLES for b in SYLLABLES if a != b]
    rng.shuffle(names)
    names = iter(n.capitalize() for n in names)
    take = lambda n: [next(names) for _ in range(n)]  # noqa: E731
    first_names, cities, countries, companies = take(num_names), take(num_cities), take(num_countries), take(
        num_companies
    )  # fmt: skip
    facts, docs, namesakes_of, people = {}, {}, {}, []
    for first in first_names:
        group = [f"{first} the {job}" for job in rng.sample(JOBS, namesakes)]
        for person, city, company in zip(group, rng.sample(cities, namesakes), rng.sample(companies, namesakes)):
            facts[person, "born in"], facts[person, "works for"] = city, company
            docs[person] = f"{person} was born in {city} and works for {company}."
        people += group
        rng.shuffle(group)
        namesakes_of[first] = group
        docs[first] = f"{first} may refer to: {', '.join(group)}."
    held_out = set(people[namesakes - 1 : namesakes * num_held_out : namesakes])  # the last of each of the first groups
    for city in cities:
        facts[city, "city in"] = rng.choice(countries)
        docs[city] = f"{city} is a city in {facts[city, 'city in']}."
    for company in companies:
        founder = rng.choice([p for p in people if p not in held_out])
        facts[company, "founded by"], facts[company, "based in"] = founder, rng.choice(cities)
        docs[company] = f"{company} was founded by {founder} and is based in {facts[company, 'based in']}."
    for country in countries:
        docs[country] = f"{country} is a country."
    return {"docs": docs, "facts": facts, "people": people, "namesakes": namesakes_of, "held_out": held_out}


def kb_question(kb, person: str, kind: str) -> dict:
    """One question with its gold answer and the entities on the way: path[0] = the person, path[-1] = the answer.

    hops = the documents on the shortest path to the answer: the first name's list (when the question gives only
    the first name), the person's document, then one per further relation. A question that gives only the first
    name also needs the namesakes checked in turn, one search each, until the one the qualifier fits.
    """
    template, qualifier, relations = QUESTIONS[kind]
    first = person.split()[0]
    path = [person]
    for relation in relations:
        path.append(kb["facts"][path[-1], relation])
    question = template.format(person) if qualifier is None else template.format(first, kb["facts"][person, qualifier])
    return {"question": question, "answer": path[-1], "hops": len(relations) + (qualifier is not None), "kind": kind,
            "path": path, "relations": relations, "first_name": None if qualifier is None else first,
            "qualifier": qualifier}  # fmt: skip


def kb_trajectory(item, kb, rng, demo_stop: float, demo_trust: float) -> list[tuple[str, str]]:
    """A scripted trajectory as (step, observation) pairs. It searches the first name, checks the namesakes in the
    listed order until the qualifier fits, then follows the relations: each step's thought names the relation it
    reads off the last document ("<think>born in</think><search>Lido</search>"). Two habits for RL to unlearn: at a
    namesake who does not fit it goes on with them anyway with probability demo_trust (a wrong turn; checking the
    next one would recover), and at each further hop it answers too early, with the entity in hand, with
    probability demo_stop."""
    docs, person, relations = kb["docs"], item["path"][0], item["relations"]
    if item["first_name"] is None:  # a full name: its own document
        steps = [(f"<think>who</think><search>{person}</search>", information([docs[person]]))]
    else:
        first = item["first_name"]
        steps = [(f"<think>who</think><search>{first}</search>", information([docs[first]]))]
        for candidate in kb["namesakes"][first]:
            steps.append((f"<think>check</think><search>{candidate}</search>", information([docs[candidate]])))
            if candidate == person:
                break
            if rng.random() < demo_trust:  # the wrong turn: go on with a namesake the qualifier does not fit
                person = candidate
                break
    entity = person
    for hop, relation in enumerate(relations):
        entity = kb["facts"][entity, relation]  # read off the last document
        if hop == len(relations) - 1 or rng.random() < demo_stop:
            return steps + [(f"<think>{relation}</think><answer>{entity}</answer>", "")]
        steps.append((f"<think>{relation}</think><search>{entity}</search>", information([docs[entity]])))


def make_kb_task(seed: int, demo_stop: float, demo_trust: float, num_eval: int, num_demos: int = 3000, num_demo_kbs=4):
    """Questions about 78 people for training and about 21 held-out people (one namesake each of 21 first names)
    for evaluation. The warm start's demos are about the training questions and about every person of
    `num_demo_kbs` other generated knowledge bases (the same names in other roles): the tiny model learns to read
    and copy names, not to remember 78 people.

    Returns (train, eval, demos, corpus); a demo is a whole scripted trajectory, its steps and observations.
    """
    kb = make_knowledge_base(seed)
    items = [kb_question(kb, person, kind) for person in kb["people"] for kind in QUESTIONS]
    train_items = [x for x in items if x["path"][0] not in kb["held_out"]]
    eval_items = [x for x in items if x["path"][0] in kb["held_out"]][:num_eval]
    others = [make_knowledge_base(seed + 1000 * (i + 1)) for i in range(num_demo_kbs)]
    pool = [(x, kb) for x in train_items] + [
        (kb_question(other, person, kind), other)
        for other in others for person in other["people"] if person not in kb["held_out"] for kind in QUESTIONS
    ]  # fmt: skip
    rng = random.Random(seed)
    demos = []  # (question, [(step, trained), (observation, not trained), ...]): the loss is on the steps only
    for item, item_kb in rng.choices(pool, k=num_demos):
        steps = kb_trajectory(item, item_kb, rng, demo_stop, demo_trust)
        demos.append((item["question"], [(text, trained) for s in steps for text, trained in zip(s, (1, 0)) if text]))
    return train_items, eval_items, demos, kb["docs"]


def is_context(value, row=None) -> bool:
    """HotpotQA's context: {'title': [...], 'sentences': [[...], ...]}, one list of sentences per title."""
    if not isinstance(value, dict) or not isinstance(value.get("sentences"), list):
        return False
    if not isinstance(value.get("title"), list) or not all(is_text(title) for title in value["title"]):
        return False
    return len(value["title"]) == len(value["sentences"]) and all(is_texts(x) for x in value["sentences"])


# HotpotQA's format (the distractor setting): {field: (check, what it must be)}
HOTPOTQA_SCHEMA = {
    "question": (is_text, "non-empty text"),
    "answer": (lambda v, row: isinstance(v, str), "text (an empty answer: the question is skipped)"),
    "context": (is_context, "{'title': [...], 'sentences': [[...], ...]}, one list of sentences per title"),
    "supporting_facts": (
        lambda v, row: (
            isinstance(v, dict)
            and is_texts(v.get("title"))
            and set(v["title"]) <= set(row["context"]["title"])
            and bool(v["title"] or not row["answer"].strip())  # an answered question has its gold paragraphs
        ),
        "{'title': [...]} naming paragraphs of the row's context (one or more where the row has an answer)",
    ),
}


def load_hotpotqa(path: str, num_train: int, num_eval: int):
    """HotpotQA (distractor setting) from the hub ('hotpot_qa') or a local folder in its format: 'question',
    'answer', 'context' {'title': [...], 'sentences': [[...]]}, 'supporting_facts' {'title': [...]}. Every
    question's paragraphs (gold and distractors) form the searchable corpus; a title met again with another text
    keeps both, the later one as 'Title (2)'. Questions without an answer are skipped. Returns (train, eval, demos,
    corpus)."""
    columns = ("question", "answer", "context", "supporting_facts")
    splits = {"train": ("train",), "eval": ("validation", "test")}
    data = load_data(path, "HotpotQA", splits, columns, "--dataset kb", config_name="distractor")
    texts, first_repeat, skipped = {}, None, 0  # texts: title -> its distinct texts, in the order met

    def document(title, n):  # the corpus's name for a title's n-th text: 'Morn', 'Morn (2)', ...
        return title if n == 0 else f"{title} ({n + 1})"

    def to_items(split, limit):
        nonlocal first_repeat, skipped
        items = []
        for i, row in enumerate(rows(path, split, limit, HOTPOTQA_SCHEMA)):
            documents = {}  # this row's title -> its documents
            for title, sentences in zip(row["context"]["title"], row["context"]["sentences"]):
                text, known = "".join(sentences).strip(), texts.setdefault(title, [])
                if text not in known:
                    known.append(text)
                    if len(known) == 2 and first_repeat is None:
                        first_repeat = (title, f"{path} ({split.split}) row {i}")
                documents.setdefault(title, []).append(document(title, known.index(text)))
            if not row["answer"].strip():
                skipped += 1
                continue
            gold = list(dict.fromkeys(row["supporting_facts"]["title"]))  # gold paragraphs, in order
            searched = [doc for title in gold for doc in documents[title]]  # what the demo searches for
            items.append(
                {
                    "question": row["question"],
                    "answer": row["answer"].strip(),
                    "hops": len(gold),
                    "kind": row.get("type", "hotpotqa"),
                    "path": searched,
                }
            )
        return items

    train_items = to_items(data["train"], num_train)
    eval_items = to_items(data["eval"], num_eval)
    if skipped:
        print(f"[tree_grpo] skipped {skipped} HotpotQA questions with an empty answer")
    if first_repeat:
        title, where = first_repeat
        repeated = sum(len(known) > 1 for known in texts.values())
        print(
            f"[tree_grpo] {repeated} HotpotQA paragraph titles have more than one text (the first: {title!r}, "
            f"at {where}); each text is kept as a document of its own, the later ones titled {title + ' (2)'!r}, ..."
        )
    corpus = {document(title, n): text for title, known in texts.items() for n, text in enumerate(known)}
    demos = []  # search each gold paragraph's title in turn, then answer
    for item in train_items:
        segments = []
        for title in item["path"]:
            segments += [(f"<think>search</think><search>{title}</search>", 1), (information([corpus[title]]), 0)]
        demos.append((item["question"], segments + [(f"<think>found</think><answer>{item['answer']}</answer>", 1)]))
    return train_items, eval_items, demos, corpus


def encode_question(tokenizer, item) -> list[int]:
    """The prompt's token ids: the question in the model's chat template (the tiny model: the question alone)."""
    return tokenizer(format_prompt(tokenizer, item["question"], SYSTEM_PROMPT), add_special_tokens=False)["input_ids"]


def load_task(dataset, dataset_path, num_train, num_eval, data_seed, demo_stop, demo_trust):
    """(train items, held-out items, the tiny model's demos, the searchable corpus {title: text})."""
    if dataset == "kb":
        train_items, eval_items, demos, corpus = make_kb_task(data_seed, demo_stop, demo_trust, num_eval)
    else:
        train_items, eval_items, demos, corpus = load_hotpotqa(dataset_path, num_train, num_eval)
    if not train_items or not eval_items:
        raise UsageError(
            f"The {dataset} task has {len(train_items)} training and {len(eval_items)} held-out questions; "
            f"both must be non-empty (check --num_train, --num_eval and the data files)."
        )
    return train_items, eval_items, demos, corpus


class BM25:
    """Okapi BM25 over {title: text} in plain Python; deterministic (ties go to the earlier document).

    Title words count twice, a simple field boost, and a query that is a document's whole title (up to case and
    punctuation) finds that document first, as an encyclopedia's search box does: "Kavo the pilot" finds Kavo the
    pilot's page before the page that lists every Kavo.
    """

    def __init__(self, corpus: dict[str, str], k1: float = 1.2, b: float = 0.75):
        self.titles = list(corpus)
        self.texts = [corpus[t] for t in self.titles]
        self.docs = [Counter(words(t) * 2 + words(corpus[t])) for t in self.titles]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg_length = sum(self.lengths) / max(len(self.docs), 1)
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log((n - f + 0.5) / (f + 0.5) + 1) for w, f in df.items()}
        self.k1, self.b = k1, b
        self.by_title = {" ".join(words(t)): i for i, t in enumerate(self.titles)}

    def search(self, query: str, k: int = 1) -> list[str]:
        """The texts of the k best documents (fewer if fewer share a word with the query)."""
        terms = words(query)
        scores = []
        for i, (doc, length) in enumerate(zip(self.docs, self.lengths)):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_length)
            score = sum(self.idf[t] * doc[t] * (self.k1 + 1) / (doc[t] + norm) for t in terms if t in doc)
            if score > 0:
                scores.append((-score, i))
        exact = self.by_title.get(" ".join(terms))
        ranked = [i for _, i in sorted(scores) if i != exact]
        return [self.texts[i] for i in ([exact] if exact is not None else []) + ranked][:k]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def information(docs: list[str]) -> str:
    return "<information>" + " ".join(docs) + "</information>"


def parse_step(text: str) -> tuple[str, str]:
    """(action, argument) of one generated step: ('search', query), ('answer', answer) or ('invalid', '')."""
    match = re.search(r"<(search|answer)>([^<]*)</\1>\s*$", text)
    return (match.group(1), match.group(2).strip()) if match else ("invalid", "")


def run_tool(action: str, argument: str, search: BM25, top_k: int, max_doc_chars: int) -> str:
    """The observation appended after a step: search results, a hint for an empty query or invalid step, or ''."""
    if action == "search":
        if not argument:
            return information(["empty query: write a name inside <search> </search>"])
        return information([doc[:max_doc_chars] for doc in search.search(argument, top_k)] or ["no results"])
    if action == "invalid":
        return information(["invalid step: end it with </search> or </answer>"])
    return ""


VALID_FORMAT = re.compile(
    r"\s*<think>[^<]*</think>\s*(?:<search>[^<]*</search>\s*<information>[^<]*</information>\s*"
    r"<think>[^<]*</think>\s*)*<answer>[^<]*</answer>\s*"
)


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def extract_answer(response: str) -> str | None:
    answers = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
    return answers[-1].strip() if answers else None  # the last one counts


def exact_match(response: str, answer: str) -> bool:
    """The last <answer> equals the gold answer after normalisation."""
    return normalize_answer(extract_answer(response) or "") == normalize_answer(answer)


def em_format_reward(response: str, answer: str) -> float:
    """The official exact-match + format table: 1.0 / 0.8 / 0.2 / 0.1 / 0 (see the module docstring)."""
    predicted = extract_answer(response)
    if predicted is None:
        return 0.0
    valid = VALID_FORMAT.fullmatch(response) is not None
    if normalize_answer(predicted) == normalize_answer(answer):
        return 1.0 if valid else 0.8
    return 0.2 if valid else 0.1


def evaluate(items, play, habits=True, batch_size=128):
    """Held-out EM overall, on 1-hop and on multi-hop questions, the share in a valid format, and tool calls per
    episode, over the trajectories `play(items)` gives: for each item, its steps as (text with the observation,
    action). With `habits` (the kb task) also the two habits: of the questions that give only a first name, the
    share where the last namesake searched is the one meant (found_person), and of the multi-hop questions, the
    share answered with an entity from the middle of the path (answered_early); and whether the policy reads a
    namesake's document: of the namesake searches followed by another step, the share followed by a search of
    another namesake, when the searched one is the one meant (check_after_fit: ideally 0) and when not
    (check_after_misfit: 1 - the warm start's demo_trust in its demos)."""
    em, valid, calls, hops, found, early, checks = [], [], [], [], [], [], {True: [], False: []}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for item, steps in zip(chunk, play(chunk)):
            text = "".join(step for step, _ in steps)
            em.append(exact_match(text, item["answer"]))
            valid.append(VALID_FORMAT.fullmatch(text) is not None)
            calls.append(sum(action == "search" for _, action in steps))
            hops.append(item["hops"])
            if item.get("first_name"):  # the kb task's habits
                queries = [parse_step(step.partition("<information>")[0])[1] for step, _ in steps]
                namesakes = [q for q in queries if q.startswith(f"{item['first_name']} the ")]
                found.append(bool(namesakes) and namesakes[-1] == item["path"][0])
                names = [q if action == "search" and q in namesakes else None for q, (_, action) in zip(queries, steps)]
                for name, after in zip(names, names[1:]):  # a namesake searched, then another step
                    if name:  # checked: that step searches another namesake
                        checks[name == item["path"][0]].append(after not in (None, name))
            if item.get("relations") and len(item["relations"]) > 1:
                early.append(extract_answer(text) in item["path"][1:-1])
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "em": mean(em),
        "em_1hop": mean([e for e, h in zip(em, hops) if h == 1]),
        "em_multihop": mean([e for e, h in zip(em, hops) if h > 1]),
        "format": mean(valid),
        "tool_calls": mean(calls),
        **({"found_person": mean(found), "answered_early": mean(early)} if habits else {}),
        **({"check_after_fit": mean(checks[True]), "check_after_misfit": mean(checks[False])} if habits else {}),
    }
