"""The tasks of the long-context suite, one entry each: builder, category, metric and scorers.

Adding a task is one `register(Task(...))` (its builder in `tasks.py`), plus its metric under `metrics/` when no
shipped one fits. The categories, the scoring of `suite.py`, the statistics of `stats.py` and the training
callback's logs all read this registry, so nothing else changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import tasks
from .metrics import load_metric
from .metrics.citation.citation import citation_scores
from .metrics.ndcg.ndcg import ndcg_at_k
from .metrics.substring_match.substring_match import match_fraction

__all__ = [
    "CATEGORIES",
    "PRIMARY",
    "TASKS",
    "TASK_CATEGORY",
    "Task",
    "build_suite",
    "parse_ranking",
    "register",
    "resolve_tasks",
]


def parse_ranking(text: str, ids: list[str]) -> list[str]:
    """IDs in the order the model wrote them (known IDs only, first occurrence)."""
    known, out = set(ids), []
    for token in re.findall(r"\d+", text):
        if token in known and token not in out:
            out.append(token)
    return out


def _as_is(output: str, reference) -> str:
    return output


@dataclass(frozen=True)
class Task:
    """One task of the suite.

    Args:
        name: the task's name (`sample["task"]`).
        category: the category it is averaged into (its tasks share `primary`).
        build: `(tokenizer, length, seed) -> sample` (a dict with `task`, `length`, `seed`, `prompt`, `reference`,
            `max_new_tokens`), a pure function of its arguments.
        metric: the shipped `evaluate` metric that scores a batch of answers (`metrics/<metric>/`).
        primary: the key of the metric's result that scores the task (and its category).
        score: `(reference, output) -> float`, the primary score of one answer (what the statistics resample).
        predict: `(output, reference) -> prediction`, the model's answer as the metric reads it.
        metric_kwargs: extra arguments of the metric's `compute`.
        derive: `result -> extra keys`, numbers computed from the metric's result (e.g. an average).
        logged: what the training callback logs per task and length, `{log name: result key}`.
    """

    name: str
    category: str
    build: Callable[..., dict]
    metric: str
    primary: str
    score: Callable[[Any, str], float]
    predict: Callable[[str, Any], Any] = _as_is
    metric_kwargs: Mapping[str, Any] = field(default_factory=dict)
    derive: Callable[[dict], dict] | None = None
    logged: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, tokenizer, length: int, seed: int = 0) -> dict:
        """One sample of this task, with its category."""
        return {**self.build(tokenizer, length, seed), "category": self.category}

    def compute(self, samples: list[dict], outputs: list[str]) -> dict[str, float]:
        """The metric's result over these answers (plus `derive`'s numbers)."""
        refs = [s["reference"] for s in samples]
        preds = [self.predict(o, r) for o, r in zip(outputs, refs)]
        result = dict(load_metric(self.metric).compute(predictions=preds, references=refs, **self.metric_kwargs))
        if self.derive is not None:
            result.update(self.derive(result))
        return {k: float(v) for k, v in result.items()}


TASKS: dict[str, Task] = {}
"""Every task of the suite (HELMET's synthetic recall, passage re-ranking, generation with citations)."""
CATEGORIES: dict[str, tuple[str, ...]] = {}
"""Suite categories and their tasks, in registration order."""
TASK_CATEGORY: dict[str, str] = {}
PRIMARY: dict[str, str] = {}
"""The one number per category: substring recall, NDCG@10, mean of correctness and citation recall/precision."""


def register(task: Task) -> Task:
    """Add `task` to the suite (its category is created when new): the one step of adding a task."""
    if task.name in TASKS:
        raise ValueError(f"A task named {task.name!r} is already registered.")
    if PRIMARY.setdefault(task.category, task.primary) != task.primary:
        raise ValueError(
            f"The tasks of category {task.category!r} are scored by {PRIMARY[task.category]!r}, not "
            f"{task.primary!r}: a category averages one number."
        )
    TASKS[task.name] = task
    CATEGORIES[task.category] = (*CATEGORIES.get(task.category, ()), task.name)
    TASK_CATEGORY[task.name] = task.category
    return task


def _rerank_score(ref, output: str) -> float:
    return ndcg_at_k(parse_ranking(output, ref["ids"]), dict(zip(ref["ids"], ref["relevance"])), 10)


_CITE_PARTS = ("correctness", "citation_recall", "citation_precision")

for _name in ("niah_single", "niah_multikey", "niah_multivalue", "json_kv"):
    register(
        Task(
            _name,
            "recall",
            getattr(tasks, _name),
            "substring_match",
            "recall",
            score=lambda ref, output: match_fraction(output, ref),
            logged={_name: "recall"},
        )
    )
register(
    Task(
        "rerank",
        "rerank",
        tasks.rerank,
        "ndcg",
        "ndcg",
        score=_rerank_score,
        metric_kwargs={"k": 10},
        predict=lambda output, ref: parse_ranking(output, ref["ids"]),
    )
)
register(
    Task(
        "cite",
        "cite",
        tasks.cite,
        "citation",
        "cite_avg",
        score=lambda ref, output: sum(citation_scores(output, ref["answers"], ref["documents"]).values()) / 3,
        derive=lambda result: {"cite_avg": sum(result[k] for k in _CITE_PARTS) / 3},
        logged={f"cite_{k}": k for k in _CITE_PARTS},
    )
)


def resolve_tasks(categories=None) -> list[str]:
    """Task names from category or task names (None = every category); ValueError on unknown names."""
    names = list(CATEGORIES) if categories is None else ([categories] if isinstance(categories, str) else categories)
    out = []
    for name in names:
        if name in CATEGORIES:
            out += [t for t in CATEGORIES[name] if t not in out]
        elif name in TASKS:
            out += [name] if name not in out else []
        else:
            raise ValueError(
                f"Unknown category or task {name!r}; choose from categories {list(CATEGORIES)} or tasks {list(TASKS)}."
            )
    return out


def build_suite(tokenizer, lengths=(1024,), categories=None, n_per_task: int = 4, seed: int = 0) -> list[dict]:
    """All samples for the given lengths and categories (or task names); sample i of a task uses seed `seed + i`."""
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}.")
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    if not lengths or any(int(n) < 128 for n in lengths):
        raise ValueError(f"lengths must be token counts >= 128, got {lengths}.")
    names = resolve_tasks(categories)
    return [TASKS[t](tokenizer, int(n), seed + i) for n in lengths for t in names for i in range(n_per_task)]
