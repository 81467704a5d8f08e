"""Build the shipped prompt set trl_retmask/data/prompts/prompts.jsonl (deterministic; no downloads).

Two halves: general instructions (templates x topics; the paper's setting is general chat) and instructions over
short documents. The documents come from text that nothing else uses, so training never sees evaluation text:

- `data/haystack/pg19_part{1,2,3}.txt`: detection / NIAH haystack (The Last of the Mohicans; the opening of
  Dracula as part3 -- the beginning is all the authors' detector reads of their part3, the same book);
- `data/eval/suite/pg19_part3_suite.txt`: the evaluation suite's text (Dracula, middle);
- `data/prompts/sources/pg19_part3_train.txt`: the document prompts' text (Dracula, after the suite's part);
- `data/eval/heldout_pg19.txt`: the general check's held-out perplexity text (Dracula, tail).

`--split-from PG19_PART3` rewrites those Dracula files from the full PG-19 excerpt (shared/data/haystack/pg19_part3.txt)
at fixed paragraph boundaries. Any excerpt sharing a 50-character window with evaluation text is skipped.

    python scripts/make_prompts.py [--split-from ../shared/data/haystack/pg19_part3.txt]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "trl_retmask" / "data"
HAYSTACK = DATA / "haystack"
SUITE_TEXT = DATA / "eval" / "suite" / "pg19_part3_suite.txt"
HELDOUT_TEXT = DATA / "eval" / "heldout_pg19.txt"
TRAIN_TEXT = DATA / "prompts" / "sources" / "pg19_part3_train.txt"
OUT = DATA / "prompts" / "prompts.jsonl"
WINDOW = 50
# Paragraphs of pg19_part3 that open the suite's part, the training part and the held-out tail.
SUITE_START = '"I don\'t see where the joke comes in there either!" I said;'
TRAIN_START = '"Perhaps a body-snatcher," I suggested.'

GENERAL_TEMPLATES = [
    "Explain {topic} to a ten-year-old in a short paragraph.",
    "Give three practical tips about {topic}.",
    "Write a short poem about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Write a two-sentence summary of why {topic} matters.",
    "List five interesting facts about {topic}.",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "Describe a common misconception about {topic} and correct it.",
]
TOPICS = [
    "photosynthesis",
    "saving money",
    "learning a new language",
    "the water cycle",
    "public libraries",
    "volcanoes",
    "healthy sleep",
    "electric cars",
    "composting",
    "the history of the printing press",
    "time management",
    "honey bees",
    "recycling plastic",
    "the moon's phases",
    "writing a good résumé",
    "bicycles in cities",
    "rainforests",
    "first aid for small cuts",
    "chess openings",
    "baking bread",
]
STANDALONE = [
    "What is the difference between weather and climate?",
    "How do I convert 5 kilometres to miles? Show the calculation.",
    "Write a haiku about autumn leaves.",
    "Suggest a name for a small bakery and explain the choice.",
    "What is 17 multiplied by 23? Explain step by step.",
    "Write a Python function that returns the largest number in a list.",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Give me a simple recipe for a vegetable soup.",
    "Why is the sky blue? Answer in two sentences.",
    "Plan a one-day sightseeing itinerary for a rainy day in a big city.",
    "What questions should I ask before adopting a dog?",
    "Write a short motivational message for a student before an exam.",
    "Explain what a prime number is, with three examples.",
    "Rewrite this sentence to sound more formal: 'hey, can u send me the file asap?'",
    "Describe the rules of tic-tac-toe briefly.",
    "What are good habits for keeping a clean kitchen?",
    "Compare reading a paper book with reading an e-book.",
    "Write a limerick about a forgetful cat.",
    "How does a refrigerator keep food cold?",
    "Give a short definition of democracy.",
]
DOC_TEMPLATES = [
    "Read the passage below and summarise it in two sentences.\n\n{doc}",
    "Who are the people mentioned in the following passage, and what are they doing?\n\n{doc}",
    "What is the mood of the following passage? Quote one phrase that supports your answer.\n\n{doc}",
    "Read the passage and answer: where does the scene take place?\n\n{doc}",
    "Write one question that can be answered from the passage below, then answer it.\n\n{doc}",
    "List three details from the following passage.\n\n{doc}",
    "Rewrite the following passage in simple modern English.\n\n{doc}",
    "What happens first and what happens last in the passage below?\n\n{doc}",
]


def normalise(text: str) -> str:
    return " ".join(text.split())


def split_part3(source: Path) -> None:
    """Cut the full pg19_part3 into detection head, suite text, training text and held-out tail (file by file)."""
    text = source.read_text(encoding="utf-8")
    heldout = HELDOUT_TEXT.read_text(encoding="utf-8")
    suite_at, train_at, heldout_at = text.index(SUITE_START), text.index(TRAIN_START), text.index(heldout[:200])
    if not suite_at < train_at < heldout_at:
        raise ValueError(f"{source}: split markers out of order; is it PG-19 part3 (Dracula)?")
    for path, part in (
        (HAYSTACK / "pg19_part3.txt", text[:suite_at]),
        (SUITE_TEXT, text[suite_at:train_at]),
        (TRAIN_TEXT, text[train_at:heldout_at]),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(part.rstrip() + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)} ({len(part)} characters)")


def evaluation_windows() -> set[str]:
    """Every 50-character window of the texts evaluation and detection draw from (whitespace-normalised)."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(HAYSTACK.glob("*.txt"))]
    texts += [SUITE_TEXT.read_text(encoding="utf-8"), HELDOUT_TEXT.read_text(encoding="utf-8")]
    windows = set()
    for t in map(normalise, texts):
        windows.update(t[i : i + WINDOW] for i in range(len(t) - WINDOW + 1))
    return windows


def excerpts(rng: random.Random, n: int, words: int = 120) -> list[str]:
    """`n` excerpts of about `words` words, starting at sentence beginnings, from the training text only."""
    sentences = [
        s for s in re.split(r"(?<=[.!?])\s+", normalise(TRAIN_TEXT.read_text(encoding="utf-8"))) if "Chapter:" not in s
    ]
    banned = evaluation_windows()
    out, starts = [], list(range(len(sentences) - 50))
    rng.shuffle(starts)
    for start in starts:
        chunk, i = [], start
        while sum(len(s.split()) for s in chunk) < words:
            chunk.append(sentences[i])
            i += 1
        doc = " ".join(chunk)
        if not any(doc[j : j + WINDOW] in banned for j in range(len(doc) - WINDOW + 1)):
            out.append(doc)
        if len(out) == n:
            return out
    raise ValueError(f"Only {len(out)} of {n} excerpts of {TRAIN_TEXT} avoid the evaluation text.")


def main(seed: int = 0, split_from: str | None = None) -> None:
    if split_from:
        split_part3(Path(split_from))
    rng = random.Random(seed)
    general = [t.format(topic=topic) for topic in TOPICS for t in rng.sample(GENERAL_TEMPLATES, 5)] + STANDALONE
    docs = [DOC_TEMPLATES[i % len(DOC_TEMPLATES)].format(doc=d) for i, d in enumerate(excerpts(rng, 104))]
    prompts = general + docs
    rng.shuffle(prompts)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    print(f"wrote {len(prompts)} prompts ({len(general)} general, {len(docs)} over documents) to {OUT}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-from", default=None, help="full PG-19 part3 text to re-split (Dracula).")
    args = parser.parse_args()
    main(args.seed, args.split_from)
