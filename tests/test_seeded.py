"""The counter-based seeded sampler: draws follow the filtered softmax (checked against a direct computation of it),
and a row's token depends on its logits, settings, seed and position only."""

from __future__ import annotations

import math

import pytest
import torch

from trl_retmask.generation.seeded import RowSampling, sample_rows, seeded_uniform

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]
N = 20_000


def expected(row: RowSampling, seen=()):
    """The distribution transformers' warpers give, written out per token (no tensors, no sorting tricks)."""
    z = list(LOGITS)
    for t in set(seen):
        z[t] = z[t] / row.repetition_penalty if z[t] > 0 else z[t] * row.repetition_penalty
    z = [v / row.temperature for v in z]
    keep = [True] * len(z)
    if row.top_k:
        kth = sorted(z, reverse=True)[row.top_k - 1]
        keep = [v >= kth for v in z]

    def normalised():
        w = [math.exp(v) if k else 0.0 for v, k in zip(z, keep)]
        return [x / sum(w) for x in w]

    if row.top_p < 1:
        p = normalised()
        keep = [k and sum(q for q in p if q > p[i]) < row.top_p for i, k in enumerate(keep)]
    p = normalised()
    if row.min_p:
        keep = [k and p[i] >= row.min_p * max(p) for i, k in enumerate(keep)]
        p = normalised()
    return p


@pytest.mark.parametrize(
    "settings, seen",
    [
        (dict(temperature=1.0), ()),
        (dict(temperature=0.6), ()),
        (dict(temperature=1.3, top_k=3), ()),
        (dict(temperature=1.0, top_p=0.7), ()),
        (dict(temperature=0.8, top_k=5, top_p=0.9), ()),
        (dict(temperature=1.0, min_p=0.3), ()),
        (dict(temperature=1.0, repetition_penalty=1.5), (0, 5, 6)),
    ],
)
def test_draws_follow_the_filtered_softmax(settings, seen):
    """20,000 draws (seeds 0..N-1, positions varied) against the exact distribution: Pearson's chi-square below the
    0.9999 quantile, filtered tokens never drawn."""
    rows = [RowSampling(seed=s, **settings) for s in range(N)]
    tokens = sample_rows(torch.tensor([LOGITS] * N), rows, [s % 97 for s in range(N)], [seen] * N)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).tolist()
    p = expected(rows[0], seen)
    assert all(c == 0 for c, q in zip(counts, p) if q == 0), (counts, p)
    live = [(c, q * N) for c, q in zip(counts, p) if q > 0]
    chi2 = sum((c - e) ** 2 / e for c, e in live)
    quantile = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9}[len(live) - 1]  # chi2 0.9999
    assert chi2 < quantile, (counts, [round(q * N) for q in p])


def test_uniforms_are_uniform_and_keyed_on_seed_and_position():
    values = [seeded_uniform(seed, pos) for seed in range(200) for pos in range(50)]
    assert all(0 < v < 1 for v in values)
    bins = torch.histc(torch.tensor(values), bins=10, min=0, max=1)
    assert ((bins - 1000).abs() < 150).all(), bins  # 10,000 draws, 10 bins: sd ~30
    assert len(set(values)) == len(values)
    assert seeded_uniform(7, 3) == seeded_uniform(7, 3) != seeded_uniform(7, 4) != seeded_uniform(8, 3)


def test_a_row_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000) * 3
    rows = [RowSampling(seed=100 + i, temperature=0.9, top_p=0.95) for i in range(6)]
    positions = [0, 5, 9, 2, 2, 40]
    together = sample_rows(logits, rows, positions).tolist()
    order = [4, 1, 5, 0, 3, 2]
    shuffled = sample_rows(logits[order], [rows[i] for i in order], [positions[i] for i in order]).tolist()
    alone = [sample_rows(logits[i : i + 1], [rows[i]], [positions[i]]).item() for i in range(6)]
    assert together == alone == [shuffled[order.index(i)] for i in range(6)]
    moved = sample_rows(logits, rows, [p + 1 for p in positions]).tolist()
    assert moved != together


def test_top_k_one_is_greedy_and_bad_settings_are_refused():
    torch.manual_seed(1)
    logits = torch.randn(16, 300)
    rows = [RowSampling(seed=i, temperature=2.0, top_k=1) for i in range(16)]
    assert sample_rows(logits, rows, [3] * 16).tolist() == logits.argmax(1).tolist()
    with pytest.raises(ValueError, match="temperature > 0"):
        RowSampling(seed=1, temperature=0.0)
    with pytest.raises(ValueError, match="differ"):
        sample_rows(logits, rows[:3], [0] * 16)


def test_the_repetition_penalty_builds_the_same_host_tensors_for_any_number_of_rows(monkeypatch):
    """The penalty is applied to all rows at once: a step of 64 penalised rows makes as many tensors as a step of 2
    (it made one per row per step), and each row's result is the per-row rule applied to it alone (mixed penalties,
    one row at 1.0 untouched, repeated and unseen tokens)."""
    import trl_retmask.generation.seeded as seeded

    made = []
    real = torch.tensor
    monkeypatch.setattr(seeded.torch, "tensor", lambda *a, **k: made.append(1) or real(*a, **k))

    def step(n):
        made.clear()
        rows = [RowSampling(seed=s, repetition_penalty=(1.0, 1.3, 2.0)[s % 3]) for s in range(n)]
        seen = [[s % 8, (s * 3) % 8, s % 8] for s in range(n)]
        sample_rows(real([LOGITS] * n), rows, list(range(n)), seen)
        return len(made), rows, seen

    few = step(2)[0]
    count, rows, seen = step(64)
    assert count == few
    logits = real([LOGITS] * 64)
    x = logits.clone()
    seeded._penalise(x, rows, seen)
    for i, (row, ids) in enumerate(zip(rows, seen)):  # per row, written out
        want = logits[i].tolist()
        for t in set(ids):
            want[t] = want[t] / row.repetition_penalty if want[t] > 0 else want[t] * row.repetition_penalty
        assert x[i].tolist() == pytest.approx(want, rel=1e-6)  # float32 against Python floats
