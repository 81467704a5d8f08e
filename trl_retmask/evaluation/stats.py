"""How sure are the suite's numbers? Percentile bootstrap intervals and paired tests on the same samples.

Every reported score is a mean of per-item scores (suite answers, short-answer questions, perplexity chunks), so
its uncertainty comes from which items were drawn: intervals resample items (10,000 times, fixed seed, numpy).
Models evaluated on the same prompts are compared *paired*: per-item differences, a paired-bootstrap interval of
their mean and a two-sided sign-flip (paired permutation) p-value, exact when every sign pattern can be
enumerated. Scores that average groups (a category = the mean of its tasks) are stratified: items are resampled
and sign-flipped within their group and the statistic is the mean of the group means, as reported. Training seeds
are combined by averaging each item over the seeds first, then pairing (`combine_runs`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .registry import TASK_CATEGORY

N_RESAMPLES = 10_000
CONFIDENCE = 0.95


def _check(values, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values; drop or fix those items first.")
    return arr


def _check_settings(n_resamples: int, confidence: float) -> None:
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")


def _strata(n: int, strata) -> list[np.ndarray]:
    """Index arrays of the groups (one group when `strata` is None)."""
    if strata is None:
        return [np.arange(n)]
    if len(strata) != n:
        raise ValueError(f"strata has {len(strata)} labels for {n} values; give one label per value.")
    groups = defaultdict(list)
    for i, label in enumerate(strata):
        groups[label].append(i)
    return [np.asarray(idx) for idx in groups.values()]


def stratified_mean(values, strata=None) -> float:
    """The mean of the group means (the plain mean without `strata`): how category scores average tasks."""
    arr = _check(values)
    return float(np.mean([arr[idx].mean() for idx in _strata(len(arr), strata)]))


def _bootstrap_means(arr: np.ndarray, groups, n_resamples: int, rng) -> np.ndarray:
    """Stratified mean of `n_resamples` resamples (items drawn with replacement within each group)."""
    total = np.zeros(n_resamples)
    for idx in groups:
        total += arr[idx][rng.integers(0, len(idx), (n_resamples, len(idx)))].mean(axis=1)
    return total / len(groups)


def _interval(stats: np.ndarray, confidence: float) -> list[float]:
    alpha = 1 - confidence
    return [float(v) for v in np.quantile(stats, [alpha / 2, 1 - alpha / 2])]


def bootstrap_ci(
    values, strata=None, *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval `[low, high]` of the (stratified) mean."""
    _check_settings(n_resamples, confidence)
    arr = _check(values)
    rng = np.random.default_rng(seed)
    return _interval(_bootstrap_means(arr, _strata(len(arr), strata), n_resamples, rng), confidence)


def summarize(values, strata=None, **kwargs) -> dict:
    """`{"mean", "ci": [low, high], "n"}` of per-item scores."""
    return {"mean": stratified_mean(values, strata), "ci": bootstrap_ci(values, strata, **kwargs), "n": len(values)}


def perplexity_ci(
    chunks: Sequence[Sequence[float]], *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> list[float]:
    """Bootstrap interval of exp(total NLL / total tokens), resampling `[NLL, tokens]` chunks."""
    _check_settings(n_resamples, confidence)
    arr = np.asarray(chunks, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0 or (arr[:, 1] <= 0).any():
        raise ValueError(
            "chunks must be a non-empty list of [summed NLL, token count > 0] pairs "
            "(heldout_perplexity(..., return_chunks=True))."
        )
    idx = np.random.default_rng(seed).integers(0, len(arr), (n_resamples, len(arr)))
    return _interval(np.exp(arr[idx, 0].sum(1) / arr[idx, 1].sum(1)), confidence)


def sign_flip_p_value(differences, strata=None, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, bool]:
    """Two-sided paired permutation p-value of the (stratified) mean difference: each item's sign is flipped at
    random (under no difference both orders are equally likely). Returns `(p, exact)`; exact enumeration of all
    sign patterns of the non-zero differences when there are at most `n_resamples` of them, else Monte Carlo
    with the observed pattern counted, `(1 + hits) / (1 + n_resamples)`."""
    _check_settings(n_resamples, 0.5)
    arr = _check(differences, "differences")
    weights = np.zeros(len(arr))
    groups = _strata(len(arr), strata)
    for idx in groups:
        weights[idx] = 1 / (len(groups) * len(idx))
    terms = (weights * arr)[arr != 0]  # zero differences do not change under a flip
    observed = abs(terms.sum())
    if terms.size == 0:
        return 1.0, True
    tolerance = 1e-9 * max(observed, 1e-12)
    if 2**terms.size <= n_resamples:
        patterns = ((np.arange(2**terms.size)[:, None] >> np.arange(terms.size)) & 1) * 2 - 1
        return float(np.mean(np.abs(patterns @ terms) >= observed - tolerance)), True
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 1000):  # chunks bound the memory for many items
        signs = rng.choice((-1.0, 1.0), (min(1000, n_resamples - start), terms.size))
        hits += int((np.abs(signs @ terms) >= observed - tolerance).sum())
    return (1 + hits) / (1 + n_resamples), False


def paired_comparison(
    a, b, strata=None, *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> dict:
    """`a` vs `b` scored on the same items (same order): `{"difference": mean(a - b), "ci": paired-bootstrap
    interval, "p_value": sign-flip test, "exact": whether p was enumerated, "n"}`."""
    a, b = _check(a, "a"), _check(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"Paired scores need the same items: a has {len(a)}, b has {len(b)}.")
    diff = a - b
    p, exact = sign_flip_p_value(diff, strata, n_resamples=n_resamples, seed=seed)
    return {
        "difference": stratified_mean(diff, strata),
        "ci": bootstrap_ci(diff, strata, n_resamples=n_resamples, confidence=confidence, seed=seed),
        "p_value": p,
        "exact": exact,
        "n": len(diff),
    }


# ---------------------------------------------------------------------------------------------- suite tables
def combine_runs(runs: Sequence[Sequence[dict]]) -> tuple[list[tuple], np.ndarray]:
    """Per-sample records of one or more runs (e.g. training seeds; `evaluate_long_context(...)["per_sample"]`)
    -> (sorted sample keys `(task, length, seed)`, each sample's score averaged over the runs). Every run must
    hold the same samples: pairing and seed means are only meaningful on the same prompts."""
    if not runs:
        raise ValueError("combine_runs needs at least one run of per-sample records.")
    tables = []
    for run in runs:
        table = {(r["task"], int(r["length"]), int(r["seed"])): float(r["score"]) for r in run}
        if len(table) != len(run):
            raise ValueError("A run holds the same (task, length, seed) sample twice.")
        tables.append(table)
    keys = sorted(tables[0])
    if any(sorted(t) != keys for t in tables[1:]):
        raise ValueError(
            "The runs were scored on different suite samples (lengths, tasks, n_per_task or seed "
            "differ); evaluate them with the same suite settings."
        )
    return keys, np.mean([[t[k] for k in keys] for t in tables], axis=0)


def _views(keys: list[tuple]):
    """(level, name, length, item indices, strata) for every number of a suite table."""
    views = []
    for task, length in sorted({(k[0], k[1]) for k in keys}):
        views.append(("task", task, length, [i for i, k in enumerate(keys) if k[:2] == (task, length)], None))
    for cat, length in sorted({(TASK_CATEGORY[k[0]], k[1]) for k in keys}):
        idx = [i for i, k in enumerate(keys) if (TASK_CATEGORY[k[0]], k[1]) == (cat, length)]
        views.append(("category", cat, length, idx, [keys[i][0] for i in idx]))
    views.append(("overall", "overall", None, list(range(len(keys))), [k[:2] for k in keys]))
    return views


def _nest(rows) -> dict:
    out: dict = {"task": defaultdict(dict), "category": defaultdict(dict)}
    for level, name, length, value in rows:
        if level == "overall":
            out["overall"] = value
        else:
            out[level][name][str(length)] = value
    return {k: dict(v) if isinstance(v, defaultdict) else v for k, v in out.items()}


def suite_summary(runs: Sequence[Sequence[dict]], **kwargs) -> dict:
    """Mean and bootstrap interval of every suite number of a model (its runs' seed-mean per sample):
    `{"task": {task: {length: summary}}, "category": {cat: {length: summary}}, "overall": summary}`; the overall
    score is the mean over all (task, length) cells."""
    keys, scores = combine_runs(runs)
    return _nest(
        (level, name, n, summarize(scores[idx], strata, **kwargs)) for level, name, n, idx, strata in _views(keys)
    )


def suite_comparison(runs_a: Sequence[Sequence[dict]], runs_b: Sequence[Sequence[dict]], **kwargs) -> dict:
    """`paired_comparison` of model a vs model b at every level of `suite_summary` (seed means per sample)."""
    keys, a = combine_runs(runs_a)
    keys_b, b = combine_runs(runs_b)
    if keys != keys_b:
        raise ValueError("The two models were scored on different suite samples; compare runs of the same suite.")
    return _nest(
        (level, name, n, paired_comparison(a[idx], b[idx], strata, **kwargs))
        for level, name, n, idx, strata in _views(keys)
    )
