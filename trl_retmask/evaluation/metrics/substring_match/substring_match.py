"""Substring exact match (HELMET / RULER synthetic recall): is each gold string in the output?"""

import re

import datasets
import evaluate

_DESCRIPTION = """Case-insensitive substring match of gold answers in generated text. `recall` is the mean fraction of
gold strings found per sample (RULER `string_match_all`); `all_match` is the fraction of samples where every
gold string is found (HELMET `substring_exact_match`). With `aliases=True` the gold strings of a sample are
alternative spellings of one answer: the sample scores 1 if any of them occurs as whole words."""

_KWARGS = """
Args:
    predictions: generated texts.
    references: for each prediction, the list of gold strings.
    aliases: treat each list as alternatives of one answer, matched on word boundaries (default False).
Returns:
    recall, all_match: floats in [0, 1].
"""


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def match_fraction(prediction: str, golds: list[str]) -> float:
    """Fraction of gold strings that occur in the prediction (whitespace and case normalised)."""
    if not golds:
        raise ValueError("Each reference needs at least one gold string.")
    pred = normalize(prediction)
    return sum(normalize(g) in pred for g in golds) / len(golds)


def match_any(prediction: str, aliases: list[str]) -> float:
    """1.0 if any alias occurs in the prediction as whole words (so "4" does not match "14"), else 0.0."""
    pred = normalize(prediction)
    return float(any(re.search(rf"(?<!\w){re.escape(normalize(a))}(?!\w)", pred) for a in aliases))


class SubstringMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, aliases=False):
        score = match_any if aliases else match_fraction
        fractions = [score(p, r) for p, r in zip(predictions, references)]
        n = max(len(fractions), 1)
        return {"recall": sum(fractions) / n, "all_match": sum(f == 1.0 for f in fractions) / n}
