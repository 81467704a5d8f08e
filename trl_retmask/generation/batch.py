"""Batched generation: one left-padded, seeded decode per call with an optional head mask, cut at EOS. The
backend protocol (`GenerateBackend`) says how a batch is decoded; `generate_batch` pads, seeds and cuts for all."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from trl.trainer.utils import pad

from ..chat import check_prompt_ids
from ..masking import mask_heads
from ..validation import check_int, check_number
from .window import check_window, model_window

__all__ = ["DEFAULT_BACKEND", "GenerateBackend", "eos_ids", "generate_batch", "make_generation_config", "model_device"]


def make_generation_config(
    model, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = 0, **overrides
):
    """A copy of the model's generation config for up to `max_new_tokens` new tokens, one sequence per prompt.

    `temperature == 0` decodes greedily (sampling fields cleared, so transformers does not warn); otherwise it
    samples with `temperature`, `top_p`, `top_k` (0 = off; None = the model's generation config value, off when it
    has none: vLLM's rule, not transformers' fallback of 50). `overrides` (any `GenerationConfig` field, e.g.
    `repetition_penalty`) come last. The pad token defaults to EOS when the model has none.
    """
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_number("temperature", temperature, low=0)
    check_number("top_p", top_p, low=0, high=1, low_open=True)
    check_int("top_k", top_k, minimum=0, optional=True)
    config = copy.deepcopy(model.generation_config)
    if temperature > 0:
        if top_k is None:  # vLLM reads generation_config.json; absent -> off (transformers would fill in 50)
            top_k = config.top_k or 0
        config.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    unknown = config.update(max_new_tokens=max_new_tokens, num_beams=1, use_cache=True, **overrides)
    if unknown:
        raise ValueError(f"Unknown generation settings {sorted(unknown)}: use fields of transformers.GenerationConfig.")
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return config


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class GenerateBackend:
    """How one left-padded batch is decoded, head masking included: `model.generate` with its dynamic KV cache, the
    rows flagged `masked` in a call of their own under `mask_heads`. The default, and the best on a CPU.

    Subclasses (e.g. `static.StaticCacheBackend`) return the same tokens for greedy decoding. `joint` says
    whether rows of both kinds share one decode loop (and so one seeded random stream); `row_seeded` that each row
    samples from a seed of its own (`seeds=`, one per row: `vllm.VLLMBackend`) rather than from the batch's stream; a
    backend that keeps state (hooks, a compiled step, an engine) releases it in `close()`.
    """

    name = "generate"
    joint = False
    row_seeded = False
    sampling_stream = ""
    """Names how the backend draws sampled tokens where that changed under the same `name`: part of the pair-cache
    fingerprint, so pairs sampled the old way are not reused. Change it with any change to sampled outputs."""

    def __call__(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation_config,
        *,
        heads: Sequence = (),
        masked: Sequence[bool],
    ) -> list[list[int]]:
        """New token ids per row (not yet cut at EOS); row i decodes with `heads` masked iff `masked[i]`."""
        new: list[list[int] | None] = [None] * len(masked)
        for flag in (False, True):
            idx = [i for i, m in enumerate(masked) if m == flag]
            if not idx:
                continue
            rows = torch.tensor(idx, device=input_ids.device)
            with mask_heads(model, heads) if flag else nullcontext():
                out = model.generate(
                    input_ids=input_ids[rows],
                    attention_mask=attention_mask[rows],
                    generation_config=generation_config,
                    synced_gpus=False,  # see `generate_batch`: every process decodes its own batches alone
                )
            for i, row in zip(idx, out[:, input_ids.shape[1] :].tolist()):
                new[i] = row
        return new

    def prepare(self, model, calls: Sequence[Sequence[int]] = ()) -> None:
        """Called on every process before the batches are shared out among them, with the row lengths (prompt + new
        tokens) of each call to come where the caller knows them: a backend whose set-up is collective sets up here
        (a vLLM engine under `accelerate launch` joins the job's process group), so that a process left without a
        batch does not leave the others waiting in that set-up (they hung); one that preallocates a cache sizes it
        (vLLM's CPU KV cache). Nothing here."""

    def window(self, model) -> tuple[int | None, str]:
        """(the most tokens, prompt + new, a row can hold here; what that limit is called in a refusal): the model's
        window. `window.check_window` refuses longer rows before the first decode."""
        return model_window(model), "the model's window"

    def cache_key(self) -> dict:
        """The backend's settings that can change a generated token, for the caches' fingerprints (none here)."""
        return {}

    def close(self) -> None:
        """Release what the backend holds on the model (nothing here)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


DEFAULT_BACKEND = GenerateBackend()


def eos_ids(config) -> set[int]:
    """The token ids a generation config stops on."""
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def generate_batch(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    generation_config=None,
    *,
    heads=None,
    masked: Sequence[bool] | None = None,
    seed: int | None = None,
    backend: GenerateBackend | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """New token ids per prompt: one batched decode, `heads` ((layer, head) pairs) masked in the rows flagged by
    `masked` (default: every row when `heads` are given).

    Rows are left-padded for this call only (TRL's `pad`; the tokenizer is not touched, and one without a pad token
    works). Each row is cut after its first EOS, the EOS kept, so its length is the number of generated tokens.
    With `seed`, sampling is reproducible and the global RNG state is left as it was. The model runs in eval mode and
    gets its mode back. `backend` decodes (default: `GenerateBackend`). `row_seeds` (one per prompt) seed the rows
    of a backend that samples each row apart (`backend.row_seeded`); others ignore them. Bad input is refused before
    generating, rows that with `max_new_tokens` would not fit the backend's window included (`check_window`).

    The model must hold its full weights (under ZeRO-3: gathered, as pair generation, detection, NIAH and TRL's
    `unwrap_model_for_generation` do): transformers would otherwise sync every decoding step across processes
    (`synced_gpus`, on by default under ZeRO-3/FSDP, transformers/generation/utils.py:2378-2383, an all-reduce per
    step at :2814-2824), and processes that decode different numbers of batches hang there.
    """
    check_prompt_ids(prompt_ids)
    config = generation_config if generation_config is not None else model.generation_config
    check_window(
        [len(ids) for ids in prompt_ids],
        config.max_new_tokens or 0,
        *(backend or DEFAULT_BACKEND).window(model),
        what="row",
        fix="shorten the prompts or lower `max_new_tokens`",
    )
    if (config.num_return_sequences or 1) != 1 or (config.num_beams or 1) != 1:
        raise ValueError("generate_batch returns one sequence per prompt: set num_return_sequences=1 and num_beams=1.")
    heads = list(heads or ())
    masked = [bool(heads)] * len(prompt_ids) if masked is None else [bool(m) for m in masked]
    if len(masked) != len(prompt_ids):
        raise ValueError(f"Got {len(masked)} `masked` flags for {len(prompt_ids)} prompts: give one flag per prompt.")
    if row_seeds is not None and len(row_seeds) != len(prompt_ids):
        raise ValueError(f"Got {len(row_seeds)} `row_seeds` for {len(prompt_ids)} prompts: give one seed per prompt.")
    if any(masked) and not heads:
        raise ValueError("Rows are flagged `masked` but no heads are given: pass the `heads` to mask.")
    pad_id = next(
        (p for p in (tokenizer.pad_token_id, config.pad_token_id, *sorted(eos_ids(config))) if p is not None), None
    )
    if pad_id is None and len({len(ids) for ids in prompt_ids}) > 1:
        raise ValueError("Prompts of different lengths need a pad token: set `tokenizer.pad_token`.")
    device = model_device(model)
    input_ids = pad([torch.tensor(list(ids)) for ids in prompt_ids], padding_value=pad_id or 0, padding_side="left").to(
        device
    )
    attention_mask = pad(
        [torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], padding_value=0, padding_side="left"
    ).to(device)
    rng = (
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None else nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with rng, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            backend = backend or DEFAULT_BACKEND
            seeds = {"seeds": list(row_seeds)} if backend.row_seeded and row_seeds is not None else {}
            new = backend(model, input_ids, attention_mask, config, heads=heads, masked=masked, **seeds)
    finally:
        model.train(was_training)
    stop = eos_ids(config)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in new]
