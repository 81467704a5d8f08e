"""The DPO truncation of the authors' runs (TRL 0.24's defaults), done by this package around TRL's collator.

TRL 0.24 kept each prompt's last 512 tokens and each prompt + response sequence's last 1024 (`max_prompt_length=512`,
`max_length=1024`, `truncation_mode="keep_end"`). TRL 1.x has no prompt limit and deprecates `keep_end` (removed in
2.0), so `RetMaskTrainer` turns TRL's own truncation off (TRL sees `max_length=None`: its collator cuts nothing and its
long-prompt filter drops nothing) and hands DPOTrainer a collator, its public `data_collator` argument, that cuts each
batch the authors' way: the same token ids as TRL 0.24, with no deprecated setting and no private TRL method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SIDES = ("left", "right")
"""`truncation_side`: "left" keeps a sequence's last tokens (TRL 0.24's `keep_end`), "right" its first ones."""


def truncate_prompt(
    prompt_ids: list[int], max_prompt_length: int | None = None, max_length: int | None = None, side: str = "left"
) -> list[int]:
    """The prompt tokens a row keeps: its last `max_prompt_length`; and under right truncation, where the prompt alone
    would still fill `max_length` (TRL would drop the row), its last `max_length // 2` (TRL < 1.0's default ratio)."""
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_length is not None and side == "right" and len(prompt_ids) >= max_length:
        prompt_ids = prompt_ids[-(max_length // 2) :]
    return prompt_ids


def truncate_sequences(
    batch: dict[str, Any], max_length: int | None, side: str, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Each row of a right-padded batch cut to `max_length` tokens: its last ones (side "left", TRL 0.24's
    `keep_end`: flush right, keep the last columns, flush left) or its first ones ("right"). Every tensor shaped like
    `input_ids` (masks included) is cut alike; padding is `pad_token_id` for `input_ids` and 0 elsewhere."""
    lengths = batch["attention_mask"].sum(dim=1)
    if max_length is None or int(lengths.max()) <= max_length:
        return batch
    start = (lengths - max_length).clamp(min=0) if side == "left" else torch.zeros_like(lengths)
    # start + max_length never passes the longest row (a row with start > 0 ends exactly at its length)
    columns = start[:, None] + torch.arange(max_length, device=lengths.device)
    width = max_length if not pad_to_multiple_of else -(-max_length // pad_to_multiple_of) * pad_to_multiple_of
    shape = batch["input_ids"].shape
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.shape == shape:
            cut = value.gather(1, columns)
            out[key] = torch.nn.functional.pad(
                cut, (0, width - max_length), value=pad_token_id if key == "input_ids" else 0
            )
    return out


@dataclass
class TruncatingCollator:
    """A preference collator (TRL's `DataCollatorForPreference` unless the user gives one) with the prompts cut
    before it and the sequences after it. Rows are never dropped."""

    collator: Callable
    max_prompt_length: int | None
    max_length: int | None
    side: str
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [
            {**e, "prompt_ids": truncate_prompt(e["prompt_ids"], self.max_prompt_length, self.max_length, self.side)}
            for e in examples
        ]
        return truncate_sequences(
            self.collator(examples), self.max_length, self.side, self.pad_token_id, self.pad_to_multiple_of
        )


@contextlib.contextmanager
def trl_truncation_off(args):
    """`args.max_length` hidden from TRL while it prepares datasets: its long-prompt filter keeps every row (the
    collator above cuts them instead)."""
    max_length, args.max_length = args.max_length, None
    try:
        yield
    finally:
        args.max_length = max_length
