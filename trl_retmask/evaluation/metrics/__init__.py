"""Metrics of the long-context suite, each an `evaluate` module loadable from its local directory.

Each directory holds one self-contained script (stdlib + evaluate + datasets only) so that
``evaluate.load(metric_path("ndcg"))`` works offline; the plain scoring functions in the same scripts are
also importable directly (``from trl_retmask.evaluation.metrics.ndcg.ndcg import ndcg_at_k``).
"""

from __future__ import annotations

import functools
import os

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))
METRIC_NAMES = ("substring_match", "ndcg", "citation")


def metric_path(name: str) -> str:
    """Local directory of a shipped metric, for `evaluate.load`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; shipped metrics are {METRIC_NAMES}.")
    return os.path.join(METRICS_DIR, name)


@functools.cache
def load_metric(name: str):
    """`evaluate.load` of a shipped metric from its local file (never the Hub); cached per process."""
    import evaluate

    return evaluate.load(metric_path(name), keep_in_memory=True)
