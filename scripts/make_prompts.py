"""Build the shipped prompt set trl_retmask/data/prompts/prompts.jsonl (deterministic; no downloads).

Two halves, as the RetMask issue asks: general instructions (templates x topics, the paper's setting is general
chat) and instructions over short documents (excerpts of pg19_part1/part2 only: pg19_part3's tail is the held-out
perplexity text of `trl_retmask.evaluation.general`, so training never sees it).

    python scripts/make_prompts.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HAYSTACK = ROOT / "trl_retmask" / "data" / "haystack"
OUT = ROOT / "trl_retmask" / "data" / "prompts" / "prompts.jsonl"

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
    "photosynthesis", "saving money", "learning a new language", "the water cycle", "public libraries",
    "volcanoes", "healthy sleep", "electric cars", "composting", "the history of the printing press",
    "time management", "honey bees", "recycling plastic", "the moon's phases", "writing a good résumé",
    "bicycles in cities", "rainforests", "first aid for small cuts", "chess openings", "baking bread",
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


def excerpts(rng: random.Random, n: int, words: int = 120) -> list[str]:
    """`n` excerpts of about `words` words, starting at sentence beginnings, from pg19_part1 and pg19_part2."""
    text = " ".join(" ".join((HAYSTACK / f).read_text().split()) for f in ("pg19_part1.txt", "pg19_part2.txt"))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if "Chapter:" not in s]
    out = []
    for start in rng.sample(range(len(sentences) - 50), n):
        chunk, i = [], start
        while sum(len(s.split()) for s in chunk) < words:
            chunk.append(sentences[i])
            i += 1
        out.append(" ".join(chunk))
    return out


def main(seed: int = 0) -> None:
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
    main()
