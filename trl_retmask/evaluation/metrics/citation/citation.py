"""Answer correctness and citation recall / precision (HELMET / ALCE generation with citations), checked by
construction.

ALCE judges support with an NLI model; the suite's documents are synthetic, so whether a document supports a
statement is known exactly: it does when it contains the gold answer that the statement states.
"""

import re

import datasets
import evaluate

_DESCRIPTION = """Scores an answer written over numbered documents [1]..[N] with bracketed citations.
- correctness: fraction of gold answers present in the output (case-insensitive substring).
- citation_recall: over statements (sentences) that state at least one gold answer, the fraction whose cited
  documents together contain every gold answer the statement states; 0 when no statement states an answer.
- citation_precision: over all citations in the output, the fraction that point to a document containing a gold
  answer stated in the same statement; 0 when the output cites nothing."""

_KWARGS = """
Args:
    predictions: generated answers.
    references: for each, {"answers": [gold strings], "documents": [text of document 1, 2, ...]}.
Returns:
    correctness, citation_recall, citation_precision: means over samples, in [0, 1].
"""

_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_SENT = re.compile(r"(?<=[.!?])\s+(?=\S)")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def split_statements(text: str) -> list[tuple[str, list[int]]]:
    """Sentences of the output with the document numbers each one cites."""
    out = []
    for sentence in _SENT.split(text.strip()):
        if sentence.strip():
            cites = [int(n) for group in _CITE.findall(sentence) for n in group.split(",")]
            out.append((_CITE.sub("", sentence), cites))
    return out


def citation_scores(prediction: str, answers: list[str], documents: list[str]) -> dict[str, float]:
    """Scores of one output; document numbers are 1-based, out-of-range citations support nothing."""
    if not answers:
        raise ValueError("Each reference needs at least one gold answer.")
    docs = [_norm(d) for d in documents]
    golds = [_norm(a) for a in answers]
    correctness = sum(g in _norm(prediction) for g in golds) / len(golds)
    claims = supported = n_cites = precise = 0
    for statement, cites in split_statements(prediction):
        stated = [g for g in golds if g in _norm(statement)]
        cited = [docs[c - 1] for c in cites if 1 <= c <= len(docs)]
        if stated:
            claims += 1
            supported += all(any(g in d for d in cited) for g in stated)
        n_cites += len(cites)
        precise += sum(1 <= c <= len(docs) and any(g in docs[c - 1] for g in stated) for c in cites)
    return {
        "correctness": correctness,
        "citation_recall": supported / claims if claims else 0.0,
        "citation_precision": precise / n_cites if n_cites else 0.0,
    }


class Citation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Gao et al., Enabling Large Language Models to Generate Text with Citations (ALCE), EMNLP 2023.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": {
                        "answers": datasets.Sequence(datasets.Value("string")),
                        "documents": datasets.Sequence(datasets.Value("string")),
                    },
                }
            ),
        )

    def _compute(self, predictions, references):
        rows = [citation_scores(p, r["answers"], r["documents"]) for p, r in zip(predictions, references)]
        n = max(len(rows), 1)
        return {k: sum(r[k] for r in rows) / n for k in ("correctness", "citation_recall", "citation_precision")}
