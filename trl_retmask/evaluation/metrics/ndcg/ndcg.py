"""NDCG@k of a predicted ranking against graded relevance labels (HELMET passage re-ranking)."""

import math

import datasets
import evaluate

_DESCRIPTION = """Normalised discounted cumulative gain at cut-off k, linear gain (as trec_eval's ndcg_cut_k,
which HELMET uses): DCG = sum_i rel(d_i) / log2(i + 1) over the first k predicted ids (duplicates and unknown ids
count as irrelevant), divided by the DCG of the ideal ordering."""

_KWARGS = """
Args:
    predictions: for each query, the predicted ranking as a list of ids, best first.
    references: for each query, {"ids": [...], "relevance": [...]}, graded relevance of each judged id (0 = not).
    k: cut-off (default 10).
Returns:
    ndcg: mean NDCG@k over queries, in [0, 1].
"""


def ndcg_at_k(ranking: list[str], relevance: dict[str, float], k: int = 10) -> float:
    """NDCG@k of one ranking; `relevance` maps id -> graded relevance. 0 when no id is relevant."""
    seen, dcg = set(), 0.0
    for i, doc_id in enumerate(ranking[:k]):
        if doc_id in seen:
            continue
        seen.add(doc_id)
        dcg += relevance.get(doc_id, 0.0) / math.log2(i + 2)
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


class Ndcg(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": {
                        "ids": datasets.Sequence(datasets.Value("string")),
                        "relevance": datasets.Sequence(datasets.Value("float32")),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, k=10):
        scores = [ndcg_at_k(p, dict(zip(r["ids"], r["relevance"])), k) for p, r in zip(predictions, references)]
        return {"ndcg": sum(scores) / max(len(scores), 1)}
