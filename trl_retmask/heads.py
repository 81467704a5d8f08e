"""Heads: the one vocabulary for naming, saving, checking and choosing the attention heads to mask.

A head is `(layer, head)`, 0-based, the head being a query head. It is written `"L-H"` everywhere it is saved or
printed (the score-file key, `retmask.json`, the stages' output, `--heads 3-1,14-6`); a list of heads is a list of
`"L-H"`. `HeadSelectionArguments` says which heads to mask (explicit `heads`, or a selection from retrieval scores);
`selection.select_heads` turns it into heads once per run. This module sits below the scores and masking: it reads a
model's layout from `layout` and nothing above it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from .layout import head_layout
from .validation import check_choice, check_int, check_number, check_seed

__all__ = [
    "STRATEGIES",
    "Head",
    "HeadSelectionArguments",
    "format_head",
    "format_heads",
    "parse_head",
    "parse_heads",
    "validate_heads",
]

Head = tuple[int, int]
"""(layer, query head), both 0-based."""

STRATEGIES = ("retrieval", "random_non_retrieval", "random")
"""How heads are chosen: the retrieval heads, or as many random non-retrieval / random heads (the paper's controls)."""


# ---------------------------------------------------------------------------------------------- the saved form
def parse_head(key) -> Head:
    """A head as `(layer, head)` from `"LAYER-HEAD"` (the saved form, e.g. `"12-3"`) or a pair of ints."""
    if isinstance(key, str):
        if re.fullmatch(r"[0-9]+-[0-9]+", key.strip()):
            layer, head = key.strip().split("-")
            return int(layer), int(head)
    elif (
        isinstance(key, (tuple, list))
        and len(key) == 2
        and all(isinstance(k, Integral) and not isinstance(k, bool) for k in key)
    ):
        if key[0] >= 0 and key[1] >= 0:
            return int(key[0]), int(key[1])
    raise ValueError(f"Malformed head key {key!r}: expected 'LAYER-HEAD' (e.g. '12-3') or a (layer, head) pair.")


def format_head(head) -> str:
    """The saved form of one head: `"L-H"`."""
    layer, index = head
    return f"{layer}-{index}"


def format_heads(heads) -> list[str]:
    """The saved form of a list of heads: `["L-H", ...]` (empty for None)."""
    return [format_head(h) for h in heads or ()]


def parse_heads(text) -> list[Head] | None:
    """`"3-1,14-6"` (commas or spaces; or a list of heads in any form `parse_head` reads) as `[(3, 1), (14, 6)]`;
    None stays None. A head listed twice is refused (likely a typo for another head)."""
    if text is None:
        return None
    heads = [parse_head(h) for h in (text.replace(",", " ").split() if isinstance(text, str) else text)]
    if not heads:
        raise ValueError("`heads` is empty: give heads like '3-1,14-6' (LAYER-HEAD).")
    repeated = sorted({h for h in heads if heads.count(h) > 1})
    if repeated:
        raise ValueError(f"`heads` lists {', '.join(format_heads(repeated))} more than once; give each head once.")
    return heads


def validate_heads(model_or_config, heads: Iterable) -> list[Head]:
    """Normalise heads to a sorted list of (layer, head) ints; ValueError if any lies outside the model."""
    num_layers, num_heads, _ = head_layout(model_or_config)
    out = sorted({parse_head(h) for h in heads})
    bad = [(l, h) for l, h in out if not (0 <= l < num_layers and 0 <= h < num_heads)]
    if bad:
        raise ValueError(
            f"Heads {bad[:8]} are out of range: the model has layers 0..{num_layers - 1} and query heads "
            f"0..{num_heads - 1}. Check that the head scores belong to this model."
        )
    return out


# ------------------------------------------------------------------------------------------- what to mask
@dataclass
class HeadSelectionArguments:
    r"""
    Which heads to mask: the one vocabulary of `RetMaskConfig`, every `trl-retmask` stage and the recipes (stages
    pass it to `TrlParser` beside their other argument classes).

    Parameters:
        heads (`str`, *optional*):
            Explicit heads `"LAYER-HEAD,LAYER-HEAD"` (e.g. `"3-1,14-6"`) instead of a selection from scores (stored as
            a list of `(layer, head)`).
        head_scores (`str`, *optional*):
            Where the retrieval scores come from: a score file, a directory holding `retmask_head_scores.json` (e.g.
            a RetMask model), a model id with bundled scores, or a Hub repo holding `retmask_head_scores.json`. If
            `None`, the scores found for the model's own name or path.
        mask_threshold (`float`, *optional*, defaults to `0.1`):
            Mask the heads whose mean retrieval score is at least this value, in (0, 1] (ignored when `mask_top_k`
            is set).
        mask_top_k (`int`, *optional*):
            Mask the `k` highest-scoring heads instead of thresholding.
        mask_strategy (`str`, *optional*, defaults to `"retrieval"`):
            `"retrieval"` masks the selected retrieval heads; `"random_non_retrieval"` masks as many random heads
            outside them and `"random"` as many random heads of any kind (the paper's controls).
        mask_seed (`int`, *optional*, defaults to `0`):
            Seed of the random strategies.

    With neither `heads`, `head_scores`, `mask_threshold` nor `mask_top_k` set, nothing is masked (`masks` is
    False): the evaluation stages' default. `RetMaskConfig` and the stages that must mask refuse it.
    """

    heads: str | None = field(
        default=None, metadata={"help": "Explicit heads 'LAYER-HEAD,...' (e.g. '3-1,14-6') instead of a selection."}
    )
    head_scores: str | None = field(
        default=None,
        metadata={
            "help": "Retrieval scores: a score file, a directory or Hub repo holding retmask_head_scores.json, "
            "or a model id with bundled scores. Defaults to the scores found for the model's name."
        },
    )
    mask_threshold: float | None = field(
        default=0.1,
        metadata={
            "help": "Mask the heads whose mean retrieval score is at least this value, in (0, 1] (unless "
            "mask_top_k is set)."
        },
    )
    mask_top_k: int | None = field(
        default=None, metadata={"help": "Mask the k highest-scoring heads (replaces the threshold)."}
    )
    mask_strategy: str = field(
        default="retrieval",
        metadata={
            "help": "Which heads to mask: the retrieval heads, or the same number of random non-retrieval / "
            "random heads (controls).",
            "choices": list(STRATEGIES),
        },
    )
    mask_seed: int = field(default=0, metadata={"help": "Seed of the random masking strategies."})

    def __post_init__(self):
        self.check_selection()

    def check_selection(self) -> None:
        """Cheap checks of the selection fields: a bad value must fail here, not after minutes of loading."""
        if isinstance(self.head_scores, os.PathLike):
            self.head_scores = os.fspath(self.head_scores)
        if self.head_scores is not None and (not isinstance(self.head_scores, str) or not self.head_scores.strip()):
            raise ValueError(f"`head_scores` must be a path, model id or Hub repo id, got {self.head_scores!r}.")
        self.heads = parse_heads(self.heads)
        check_number("mask_threshold", self.mask_threshold, low=0, high=1, low_open=True, optional=True)
        check_int("mask_top_k", self.mask_top_k, minimum=1, optional=True)
        check_choice("mask_strategy", self.mask_strategy, STRATEGIES)
        check_seed("mask_seed", self.mask_seed)
        if self.heads and (self.head_scores is not None or self.mask_top_k is not None):
            raise ValueError("Give either `heads` or a selection from scores (`head_scores`/`mask_top_k`), not both.")
        if not self.heads and self.mask_threshold is None and self.mask_top_k is None and self.head_scores:
            raise ValueError("Set `mask_threshold` or `mask_top_k` to choose the heads to mask.")

    @property
    def masks(self) -> bool:
        """Whether any heads are to be masked (explicit heads, or a selection rule)."""
        return bool(self.heads) or self.mask_threshold is not None or self.mask_top_k is not None

    @property
    def selection(self) -> dict[str, Any]:
        """Keyword arguments of `HeadScores.select` (top-k, when set, replaces the threshold)."""
        threshold = None if self.mask_top_k is not None else self.mask_threshold
        return {
            "threshold": threshold,
            "top_k": self.mask_top_k,
            "strategy": self.mask_strategy,
            "seed": self.mask_seed,
        }
