"""Counter-based seeded sampling: each row's next token drawn from one uniform keyed on (row seed, token position).

A sampled pair must depend on its prompt and seed only, not on the batch it was decoded in, the number of processes
or the resume point. vLLM offers that through a `torch.Generator` per seeded request, which its sampler draws from
one row at a time in a Python loop (a 38% slowdown on the CPU engine, docs/benchmarks.md). Here a row needs no
generator state at all: its uniform for position t is a hash of (seed, t), and the token is found by inverse CDF
over the row's filtered distribution, so every row of a batch is sampled in one vectorised step. Sampling is exact
(the token follows softmax(logits / T) after top-k, top-p, min-p and the repetition penalty, as transformers and
vLLM apply them); the random stream is ours, so pairs sampled this way differ from the `generate` backend's.

`sample_rows` is the whole rule (no vLLM needed: tested against the distribution directly);
`vllm_sampler.SeededSampler` runs it inside the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, position: int) -> float:
    """A uniform in (0, 1) that depends on (seed, position) only: SplitMix64 of the seed, mixed again with the
    position (two rounds, so nearby seeds and positions give unrelated values)."""
    bits = _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))
    return ((bits >> 11) + 0.5) / (1 << 53)


@dataclass(frozen=True)
class RowSampling:
    """One row's sampling settings (the generation config's, for a sampled row) and its seed."""

    seed: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(
                f"A sampled row needs temperature > 0, got {self.temperature}; greedy rows are not seeded."
            )


def _penalise(logits: torch.Tensor, rows: Sequence[RowSampling], seen: Sequence[Sequence[int]]) -> None:
    """transformers' / vLLM's repetition penalty, in place on every row at once: each row's seen tokens' positive
    logits divided by its penalty, negative ones multiplied. One host tensor of all rows' ids per step, and only the
    seen positions touched (a token seen twice is written twice with the same value)."""
    ids = torch.tensor(list(chain.from_iterable(seen)), dtype=torch.long, device=logits.device)
    if not ids.numel():
        return
    penalty = torch.tensor([r.repetition_penalty for r in rows], dtype=logits.dtype, device=logits.device)
    row = torch.repeat_interleave(torch.arange(len(rows), device=logits.device), torch.tensor([len(s) for s in seen]))
    p, value = penalty[row], logits[row, ids]
    logits[row, ids] = torch.where(value > 0, value / p, value * p)


def sample_rows(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    positions: Sequence[int],
    seen: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """The next token of every row of `logits` ([rows, vocab]), each from its own settings and the uniform of
    (its seed, its position). `seen`: each row's prompt and generated ids, for the repetition penalty. The rules
    and their order are transformers' (penalty, temperature, top-k, top-p, min-p); ties at the top-k / top-p edge
    are kept, as in vLLM."""
    if logits.shape[0] != len(rows) or len(rows) != len(positions):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(rows)} settings and {len(positions)} positions differ.")
    x = logits.to(torch.float32, copy=True)
    if seen is not None and any(row.repetition_penalty != 1.0 for row in rows):
        _penalise(x, rows, seen)
    x.div_(torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=x.device).unsqueeze(1))
    top_k = torch.tensor([r.top_k if 0 < r.top_k < x.shape[1] else x.shape[1] for r in rows], device=x.device)
    if (top_k < x.shape[1]).any():
        kth = x.sort(dim=1, descending=True).values.gather(1, (top_k - 1).unsqueeze(1))
        x.masked_fill_(x < kth, float("-inf"))
    top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=x.device)
    if (top_p < 1).any():
        ordered, order = x.sort(dim=1)  # ascending, as transformers' TopPLogitsWarper
        tail = ordered.softmax(dim=1).cumsum(dim=1) <= (1 - top_p).unsqueeze(1)
        tail[:, -1] = False  # the most likely token always stays
        x.masked_fill_(tail.scatter(1, order, tail), float("-inf"))
    probs = x.softmax(dim=1)
    min_p = torch.tensor([r.min_p for r in rows], dtype=torch.float32, device=x.device)
    if (min_p > 0).any():
        probs.masked_fill_(probs < min_p.unsqueeze(1) * probs.max(dim=1, keepdim=True).values, 0.0)
    cdf = probs.to(torch.float64).cumsum(dim=1)
    u = torch.tensor([seeded_uniform(r.seed, p) for r, p in zip(rows, positions)], dtype=torch.float64)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=x.shape[1] - 1)


__all__ = ["RowSampling", "sample_rows", "seeded_uniform"]
