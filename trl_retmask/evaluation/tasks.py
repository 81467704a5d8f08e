"""Task builders of the long-context suite, in the spirit of HELMET, built offline from the suite's own text
(`registry.TASKS` names each with its category, metric and scorers).

The filler is `data/eval/suite/` (a middle part of Dracula that neither detection's haystack nor the shipped
training prompts contain), so the suite measures retrieval from text the model was neither scored nor trained on.

Every sample is a plain dict (JSON-serialisable) with the user prompt, the reference its metric needs and the
generation budget. Samples are a pure function of (task, tokenizer, length, seed): gold answers are planted by
construction (invented names and 7-digit numbers that do not occur in the PG-19 text), so no labelled data set
is needed and any context length can be produced. `length` is the target prompt length in tokens of the given
tokenizer (chat template included, approximately: sentences are counted one by one).
"""

from __future__ import annotations

import json
import random
import re
import uuid
import weakref
from pathlib import Path

from ..chat import encode_rendered, render_user_prompt
from ..niah_samples import load_haystack

SUITE_TEXT_DIR = Path(__file__).resolve().parent.parent / "data" / "eval" / "suite"
"""The suite's filler text (disjoint from the detection haystack and from the training prompts)."""

_ADJ = (
    "amber",
    "brisk",
    "calm",
    "dusty",
    "eager",
    "faint",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lucky",
    "mellow",
    "nimble",
    "olive",
    "proud",
    "quiet",
    "rusty",
    "silent",
    "tidy",
    "upbeat",
    "vivid",
    "wary",
    "young",
    "zesty",
    "bold",
    "crisp",
    "dapper",
    "fuzzy",
    "grand",
)
_NOUN = (
    "anchor",
    "badger",
    "canyon",
    "dolphin",
    "ember",
    "falcon",
    "glacier",
    "harbor",
    "island",
    "jackal",
    "kettle",
    "lantern",
    "meadow",
    "nectar",
    "orchid",
    "pepper",
    "quartz",
    "raven",
    "saddle",
    "thimble",
    "umbrella",
    "violin",
    "walnut",
    "yarrow",
    "zephyr",
    "beacon",
    "cobalt",
    "dune",
    "fjord",
    "garnet",
)
_OBJECTS = (
    "silver lantern",
    "brass compass",
    "oak chest",
    "glass harp",
    "iron key",
    "velvet map",
    "copper bell",
    "ivory flute",
    "jade mirror",
    "linen banner",
    "pewter cup",
    "amber clock",
)
_OWNERS = (
    "Edda Marsh",
    "Tobin Kestrel",
    "Ysolde Brack",
    "Orrin Vale",
    "Maribel Thorne",
    "Caspian Ford",
    "Wilhelmina Rook",
    "Dorian Ash",
    "Petra Quill",
    "Anselm Gray",
)
_TOWNS = (
    "Brackenford",
    "Quellmoor",
    "Ashcombe Vale",
    "Windrell",
    "Harrowgate Cross",
    "Tamsinby",
    "Lowmere",
    "Corvalis Point",
    "Elderwick",
    "Fenhollow",
    "Marrowby",
    "Sallowdene",
)
_MAKERS = (
    "Jorund Pell",
    "Ilse Varrow",
    "Benedikt Sorrel",
    "Calla Dunmore",
    "Hesper Lowe",
    "Matthias Greave",
    "Odile Fenwick",
    "Rurik Hale",
    "Sabine Oakes",
    "Tavish Morrow",
)
_MENTIONS = (
    "Many travellers had heard stories about the {obj}.",
    "Nobody in the village had seen the {obj} for years.",
    "Some said the {obj} was older than the church itself.",
    "Children were warned never to touch the {obj}.",
)


# ---------------------------------------------------------------- haystack, counted in tokens of a tokenizer
class _Haystack:
    """The suite's text split into sentences, each with its token count for one tokenizer.

    Long sentences are cut at clause boundaries (`,;:`) into pieces of at most ~`MAX_WORDS` words, so that a
    context stops close to its token budget (one 100-word sentence would otherwise leave a gap of 100 tokens).
    """

    MAX_WORDS = 24

    def __init__(self, tokenizer):
        text = " ".join(load_haystack(SUITE_TEXT_DIR).split())
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3]
        self.sentences = [piece for s in sentences for piece in self._pieces(s)]
        self.counts = [len(ids) for ids in tokenizer(self.sentences, add_special_tokens=False)["input_ids"]]
        self.index = {s: i for i, s in enumerate(self.sentences)}

    @classmethod
    def _pieces(cls, sentence: str) -> list[str]:
        pieces = []
        for clause in re.split(r"(?<=[,;:])\s+", sentence):
            if pieces and len(pieces[-1].split()) + len(clause.split()) <= cls.MAX_WORDS:
                pieces[-1] += " " + clause
            else:
                pieces.append(clause)
        return pieces

    def take(self, n_tokens: int, rng: random.Random) -> list[str]:
        """Consecutive sentences from a random start, at most `n_tokens` tokens in all (at least one sentence)."""
        start, out, total = rng.randrange(len(self.sentences)), [], 0
        i = start
        while total < n_tokens:
            if total + self.counts[i] > n_tokens and out:
                break
            out.append(self.sentences[i])
            total += self.counts[i]
            i = (i + 1) % len(self.sentences)
            if i == start:
                break
        return out


_HAYSTACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _haystack(tokenizer) -> _Haystack:
    """Sentence token counts are computed once per tokenizer object."""
    try:
        hay = _HAYSTACKS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _Haystack(tokenizer)
    if hay is None:
        hay = _HAYSTACKS[tokenizer] = _Haystack(tokenizer)
    return hay


def n_tokens(tokenizer, prompt: str) -> int:
    """Prompt length as the model will see it (chat template applied when the tokenizer has one)."""
    return len(encode_rendered(tokenizer, render_user_prompt(tokenizer, prompt))["input_ids"])


def _budget(tokenizer, template: str, length: int, minimum: int = 64, **fields) -> int:
    """Tokens left for filler once the fixed parts of the prompt are counted."""
    overhead = n_tokens(tokenizer, template.format(context="", **fields))
    return max(length - overhead, minimum)


def _insert(sentences: list[str], inserts: list[str], rng: random.Random) -> tuple[list[str], list[float]]:
    """Insert sentences at random distinct depths; returns the new list and each insert's depth in [0, 1]."""
    slots = sorted(
        rng.sample(range(len(sentences) + 1), len(inserts))
        if len(inserts) <= len(sentences) + 1
        else [rng.randrange(len(sentences) + 1) for _ in inserts]
    )
    order = list(range(len(inserts)))
    rng.shuffle(order)
    out = list(sentences)
    depths = [0.0] * len(inserts)
    for offset, (slot, j) in enumerate(zip(slots, order)):
        out.insert(slot + offset, inserts[j])
        depths[j] = slot / max(len(sentences), 1)
    return out, depths


def _keys(rng: random.Random, k: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in _ADJ for n in _NOUN], k)
    return [f"{a}-{n}" for a, n in pairs]


def _numbers(rng: random.Random, k: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), k)]


def _sample(task, length, seed, prompt, reference, max_new_tokens, **meta):
    return {
        "task": task,
        "length": length,
        "seed": seed,
        "prompt": prompt,
        "reference": reference,
        "max_new_tokens": max_new_tokens,
        "meta": meta,
    }


# ---------------------------------------------------------------- synthetic recall (RULER / HELMET style)
_NIAH = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n{context}\n\n{question}"
)
_NEEDLE = "One of the special magic numbers for {key} is: {value}."


def _niah(task, tokenizer, length, seed, n_keys, n_values, max_new_tokens):
    rng = random.Random(f"{task}-{length}-{seed}")
    keys, values = _keys(rng, n_keys), _numbers(rng, n_keys * n_values)
    target, gold = keys[0], values[:n_values]
    if n_values > 1:
        question = (
            f"What are all the special magic numbers for {target} mentioned in the provided text? "
            f"Answer with the {n_values} numbers only."
        )
    else:
        question = (
            f"What is the special magic number for {target} mentioned in the provided text? "
            "Answer with the number only."
        )
    needles = [_NEEDLE.format(key=keys[i // n_values], value=values[i]) for i in range(n_keys * n_values)]
    needle_tokens = sum(len(ids) for ids in tokenizer(needles, add_special_tokens=False)["input_ids"])
    hay = _haystack(tokenizer).take(_budget(tokenizer, _NIAH, length, question=question) - needle_tokens, rng)
    sentences, depths = _insert(hay, needles, rng)
    prompt = _NIAH.format(context=" ".join(sentences), question=question)
    return _sample(
        task, length, seed, prompt, gold, max_new_tokens, key=target, depths=depths[:n_values], distractor_keys=keys[1:]
    )


def niah_single(tokenizer, length: int, seed: int = 0) -> dict:
    """One needle (key -> 7-digit number) in the haystack; the model must return the number."""
    return _niah("niah_single", tokenizer, length, seed, n_keys=1, n_values=1, max_new_tokens=32)


def niah_multikey(tokenizer, length: int, seed: int = 0) -> dict:
    """Four needles with different keys; the model must return the number of the asked key, not a distractor's."""
    return _niah("niah_multikey", tokenizer, length, seed, n_keys=4, n_values=1, max_new_tokens=32)


def niah_multivalue(tokenizer, length: int, seed: int = 0) -> dict:
    """Four needles sharing one key; the model must return all four numbers (scored by fraction found)."""
    return _niah("niah_multivalue", tokenizer, length, seed, n_keys=1, n_values=4, max_new_tokens=64)


_JSON = (
    "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{context}\n\n"
    'Key: "{key}"\nCorresponding value:'
)


def json_kv(tokenizer, length: int, seed: int = 0) -> dict:
    """A JSON object of random UUID pairs filling the length; the model must return the asked key's value."""
    rng = random.Random(f"json_kv-{length}-{seed}")

    def uid():
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    pool = [(uid(), uid()) for _ in range(16)]
    fixed = n_tokens(tokenizer, _JSON.format(context="{}", key=pool[0][0]))
    measured = n_tokens(tokenizer, _JSON.format(context=json.dumps(dict(pool), indent=1), key=pool[0][0]))
    n = max(int(16 * (length - fixed) / max(measured - fixed, 1)), 2)  # pairs that fill the length
    pool += [(uid(), uid()) for _ in range(n - len(pool))]
    kv = dict(pool[:n])
    key = rng.choice(list(kv))
    prompt = _JSON.format(context=json.dumps(kv, indent=1), key=key)
    return _sample("json_kv", length, seed, prompt, [kv[key]], 96, key=key, n_pairs=n, depth=list(kv).index(key) / n)


# ---------------------------------------------------------------- documents with planted facts
def _facts(rng: random.Random):
    obj = f"{rng.choice(_OBJECTS)} of {rng.choice(_OWNERS)}"
    town, maker = rng.choice(_TOWNS), rng.choice(_MAKERS)
    return obj, town, maker


def _documents(tokenizer, n_tokens_total: int, rng: random.Random, per_doc: int, header: str) -> list[list[str]]:
    """Documents as lists of consecutive haystack sentences, about `per_doc` tokens each, filling the budget."""
    hay, docs, total = _haystack(tokenizer), [], 0
    cost = len(tokenizer(header, add_special_tokens=False)["input_ids"]) + 1
    while len(docs) < 3 or total + cost + per_doc // 2 <= n_tokens_total:
        docs.append(hay.take(max(min(per_doc, n_tokens_total - total - cost), 1), rng))
        total += sum(hay.counts[hay.index[s]] for s in docs[-1]) + cost
    return docs


def _plant(doc: list[str], sentence: str, rng: random.Random) -> None:
    doc.insert(rng.randrange(len(doc) + 1), sentence)


_RERANK = (
    "You are provided with a list of documents, each indicated by its ID. Rank the documents by their "
    "relevance to the question, from most to least relevant. Write the IDs of the 10 most relevant "
    "documents in this format:\nRanking: ID3 > ID1 > ID2\n\n{context}\n\nQuestion: {question}"
)


def rerank(tokenizer, length: int, seed: int = 0) -> dict:
    """Passages with IDs; one states the answer (relevance 2), two mention the subject (1), the rest are filler (0)."""
    rng = random.Random(f"rerank-{length}-{seed}")
    obj, town, _ = _facts(rng)
    question = f"Where is the {obj} kept?"
    docs = _documents(
        tokenizer, _budget(tokenizer, _RERANK, length, question=question), rng, 72, "\n\n[ID: 12345] Document: "
    )
    picks = rng.sample(range(len(docs)), 3)
    _plant(docs[picks[0]], f"The {obj} is kept in {town}.", rng)
    for i, mention in zip(picks[1:], rng.sample(_MENTIONS, 2)):
        _plant(docs[i], mention.format(obj=obj), rng)
    docs = [" ".join(d) for d in docs]
    ids = [str(i) for i in rng.sample(range(10_000, 100_000), len(docs))]
    relevance = [0.0] * len(docs)
    relevance[picks[0]] = 2.0
    for i in picks[1:]:
        relevance[i] = 1.0
    context = "\n\n".join(f"[ID: {i}] Document: {d}" for i, d in zip(ids, docs))
    prompt = _RERANK.format(context=context, question=question)
    return _sample("rerank", length, seed, prompt, {"ids": ids, "relevance": relevance}, 64, question=question)


_CITE = (
    "Write an accurate and concise answer to the question using only the provided documents (some of which "
    "might be irrelevant) and cite them properly. Always cite for any factual claim: put the document number "
    "in brackets after the sentence, e.g. [2]. Cite at least one and at most three documents per sentence.\n\n"
    "{context}\n\nQuestion: {question}"
)


def cite(tokenizer, length: int, seed: int = 0) -> dict:
    """Numbered documents; two facts about one object sit in two of them; answer both and cite where they are."""
    rng = random.Random(f"cite-{length}-{seed}")
    obj, town, maker = _facts(rng)
    question = f"Where is the {obj} kept, and who made it?"
    docs = _documents(tokenizer, _budget(tokenizer, _CITE, length, question=question), rng, 80, "\n\nDocument [12]: ")
    a, b = rng.sample(range(len(docs)), 2)
    _plant(docs[a], f"The {obj} is kept in {town}.", rng)
    _plant(docs[b], f"The {obj} was made by {maker}.", rng)
    docs = [" ".join(d) for d in docs]
    context = "\n\n".join(f"Document [{i + 1}]: {d}" for i, d in enumerate(docs))
    prompt = _CITE.format(context=context, question=question)
    return _sample(
        "cite",
        length,
        seed,
        prompt,
        {"answers": [town, maker], "documents": docs},
        80,
        question=question,
        supporting=[a + 1, b + 1],
    )
