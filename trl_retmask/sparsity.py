"""How concentrated a model's retrieval is across its heads: the paper finds RetMask's gains grow with it (models
whose retrieval sits in few heads respond strongly, models with distributed retrieval weakly)."""

from __future__ import annotations

import math

import numpy as np


def retrieval_sparsity(mean_scores) -> dict[str, float]:
    """Summary of per-head mean retrieval scores (any shape; negatives count as 0).

    gini: Gini coefficient of the per-head means (0 = even, ->1 = all in one head). entropy: Shannon entropy of the
    normalised means divided by log(n) (1 = even). top_X_mass: share of the total score held by the top X% of heads.
    n_above_0.1: heads with mean >= 0.1.
    """
    x = np.sort(np.clip(np.asarray(mean_scores, dtype=float).ravel(), 0.0, None))
    n, total = x.size, float(x.sum())
    out = {
        "n_heads": n,
        "max": float(x[-1]),
        "mean": float(x.mean()),
        "n_above_0.1": int((x >= 0.1).sum()),
        "n_above_0.05": int((x >= 0.05).sum()),
    }
    if total <= 0:
        return {
            **out,
            "gini": 0.0,
            "entropy": float("nan"),
            "top_1pct_mass": float("nan"),
            "top_5pct_mass": float("nan"),
        }
    ranks = np.arange(1, n + 1)
    gini = float(((2 * ranks - n - 1) * x).sum() / (n * total))
    p = x[x > 0] / total
    entropy = float(-(p * np.log(p)).sum() / np.log(n)) if n > 1 else 0.0
    top = {f"top_{pct}pct_mass": float(x[-max(1, math.ceil(n * pct / 100)) :].sum() / total) for pct in (1, 5)}
    return {**out, "gini": gini, "entropy": entropy, **top}
