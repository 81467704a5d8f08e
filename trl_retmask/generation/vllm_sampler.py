"""`seeded.sample_rows` inside a vLLM engine, as a logits processor (imports vLLM: loaded with the engine only).

A row asks for it through `SamplingParams.extra_args[EXTRA_ARG]` (a `RowSampling`'s fields as a dict: extra args
cross process boundaries as plain data in a multi-process engine) and is otherwise a greedy
request (temperature 0, no seed): vLLM then skips its own sampling and its per-request generators, and its greedy
argmax picks the one token this processor leaves finite. Rows without the argument are left alone. The position a
row's uniform is keyed on is the number of tokens it has generated (vLLM's live `output_tok_ids`), so a partial
prefill or a batch layout cannot shift it.
"""

from __future__ import annotations

from itertools import chain

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .seeded import RowSampling, sample_rows

EXTRA_ARG = "trl_retmask_sampling"


def row_sampling(params) -> RowSampling | None:
    """The `RowSampling` a request carries (None for a request this processor leaves alone); malformed ones refused."""
    value = (params.extra_args or {}).get(EXTRA_ARG)
    if value is None:
        return None
    try:
        return RowSampling(**value)
    except TypeError as err:
        raise ValueError(f"`extra_args[{EXTRA_ARG!r}]` must hold RowSampling's fields, got {value!r}: {err}") from None


class SeededSampler(LogitsProcessor):
    """Samples the rows that carry a `RowSampling` with `sample_rows`; not argmax-invariant, so vLLM applies it to
    greedy requests (before its penalties, which it leaves at their neutral values for these rows)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[RowSampling, list[int] | None, list[int]]] = {}

    @classmethod
    def validate_params(cls, params) -> None:
        row_sampling(params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params, prompt_ids, output_ids):
            row = row_sampling(params)
            return None if row is None else (row, prompt_ids, output_ids)

        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        index = sorted(self.rows)
        states = [self.rows[i] for i in index]
        penalised = any(row.repetition_penalty != 1.0 for row, _, _ in states)
        seen = [list(chain(prompt or (), out)) for _, prompt, out in states] if penalised else None
        idx = torch.tensor(index, device=logits.device)
        tokens = sample_rows(logits[idx], [s[0] for s in states], [len(s[2]) for s in states], seen)
        logits[idx] = float("-inf")
        logits[idx, tokens.to(logits.device)] = 0.0
        return logits


__all__ = ["EXTRA_ARG", "SeededSampler", "row_sampling"]
