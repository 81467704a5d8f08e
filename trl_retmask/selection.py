"""Selection: the heads a run masks, chosen once from `HeadSelectionArguments` and handed down.

It sits one floor above the head vocabulary (`heads`) and the scores (`scores`): explicit heads are checked
against the model, else the retrieval scores are resolved and the selection rule applied to them.
"""

from __future__ import annotations

from .heads import Head, HeadSelectionArguments, validate_heads
from .scores import HeadScores, resolve_head_scores

__all__ = ["select_heads"]


def select_heads(args: HeadSelectionArguments, model, scores=None) -> tuple[list[Head], HeadScores | None]:
    """The heads to mask and the scores they come from, checked against `model`: `args.heads` when given (no
    scores), else `scores` (else `args.head_scores`, else the model's own) resolved and selected with
    `args.selection`. The one selection path: run it once per run and hand its result down."""
    if args.heads:
        if scores is not None:
            raise ValueError("Give either `heads` or head scores to select from, not both.")
        return validate_heads(model, args.heads), None
    if not args.masks:
        raise ValueError("Set `heads`, `mask_threshold` or `mask_top_k` to choose the heads to mask.")
    scores = resolve_head_scores(scores if scores is not None else args.head_scores, model)
    return scores.select(**args.selection), scores
