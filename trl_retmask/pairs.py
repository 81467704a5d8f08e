"""Contrastive pair generation: chosen = the policy, rejected = the same policy with its retrieval heads masked.

Prompts are encoded as TRL's DPOTrainer encodes them, generated in batches (`generation.generate_batch` through a
backend: a colocated vLLM engine with the heads masked in its weights, `model.generate`, or the static-cache loop that
decodes a batch's chosen and rejected rows together), shared across accelerate processes batch by batch and gathered
(`store.run_resumable`), and cached on disk under a fingerprint of everything the pairs depend on (model weights and
generation config, generation settings, backend, prompts, heads), so reruns skip it and interrupted runs resume. Every
decode is seeded from (seed, batch index, role) alone (under vLLM every row from (seed, prompt index, role)), so the
pairs do not depend on the process count or on where a run was interrupted, and the chosen responses do not depend on
the heads: they are cached apart (fingerprint without heads), so runs that differ only in the masked heads (RetMask and
its random-head control, a sweep over k) share them when they share a cache directory; a batch whose chosen responses
are cached decodes its rejected rows only.

`generate_pairs` is the public function; `PairGeneration` holds its steps (inputs, batches, fingerprints, one batch's
decode, the run), each readable on its own. `GeneratedPairs.completions` is the one conversion of pairs to TRL's
preference columns.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset

from .chat import check_prompt_ids, check_prompts, encode_prompts, is_conversational_prompt, row_template_kwargs
from .distributed import from_main_process, process_state
from .fingerprints import fingerprint, model_fingerprint
from .generation import (
    GenerateBackend,
    check_window,
    generate_batch,
    make_backend,
    make_generation_config,
)
from .heads import format_heads, validate_heads
from .store import ResultStore, run_resumable

CACHE_VERSION = 3
ROLES = ("chosen", "rejected")


@dataclass
class PairStats:
    """What pair generation produced; logged to the trainer's loggers and written into the model card."""

    prompts: int = 0
    kept: int = 0
    dropped_identical: int = 0
    dropped_empty: int = 0
    mean_chosen_tokens: float = 0.0
    mean_rejected_tokens: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    tokens_per_second: float = 0.0
    batches_generated: int = 0
    batches_from_cache: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_logs(self, prefix: str = "pairs/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}

    def check_kept(self, what: str) -> None:
        """Refuse a generation that kept no pair: nothing to train on (trainer) or to write (`trl-retmask pairs`)."""
        if self.kept == 0:
            raise ValueError(
                f"All {self.prompts} generated pairs of {what} were dropped ({self.dropped_identical} identical, "
                f"{self.dropped_empty} empty): masking these heads does not change the model's answers. Mask more "
                "or other heads (`mask_threshold` / `mask_top_k`), sample (`temperature` > 0), or raise "
                "`max_new_tokens`."
            )


@dataclass
class GeneratedPairs:
    """Raw responses for every prompt (in input order), which of them are kept, and the statistics."""

    prompts: list
    chosen: list[str]
    rejected: list[str]
    keep: list[bool]
    stats: PairStats
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def kept_indices(self) -> list[int]:
        return [i for i, k in enumerate(self.keep) if k]

    def completions(self) -> dict[str, list]:
        """The kept pairs' `chosen` and `rejected` columns as TRL expects them (conversational prompts get
        assistant-message completions): the one conversion of pairs to preference data."""
        kept = self.kept_indices
        return {
            role: [as_completion(self.prompts[i], texts[i]) for i in kept]
            for role, texts in (("chosen", self.chosen), ("rejected", self.rejected))
        }

    def to_dataset(self) -> Dataset:
        """The kept pairs as a TRL preference dataset (prompt, chosen, rejected)."""
        return Dataset.from_dict({"prompt": [self.prompts[i] for i in self.kept_indices], **self.completions()})


def as_completion(prompt, text: str):
    return [{"role": "assistant", "content": text}] if is_conversational_prompt(prompt) else text


def is_prompt_only(dataset: Dataset | IterableDataset) -> bool:
    """A dataset RetMask must complete: it has prompts but no chosen/rejected responses yet."""
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    return "prompt" in columns and "chosen" not in columns and "rejected" not in columns


def _decode_completions(tokenizer, prompts: list, prompt_ids: list[list[int]], new: list[list[int]]) -> list[str]:
    """Response texts. For a standard (string) prompt the text is what decoding prompt+response adds to decoding the
    prompt, so that DPO's `prompt + chosen` re-tokenizes to the generated tokens (a bare decode of the response
    drops the joining space with SentencePiece or word-level tokenizers). Chat responses are decoded bare: the
    template renders them as the assistant message."""
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    for j, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            head = tokenizer.decode(prompt_ids[j], skip_special_tokens=True)
            full = tokenizer.decode(prompt_ids[j] + new[j], skip_special_tokens=True)
            if full.startswith(head):
                texts[j] = full[len(head) :]
    return texts


def generate_pairs(
    model,
    tokenizer,
    prompts: list,
    heads,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.6,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    generation_kwargs: dict | None = None,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    desc: str = "RetMask pairs",
    backend: str | GenerateBackend = "auto",
    drop_empty: bool = False,
    keep_reasoning: bool = True,
    template_kwargs: Sequence[dict | None] | None = None,
    vllm: dict | None = None,
) -> GeneratedPairs:
    """Generate a (chosen, rejected) pair per prompt: the model as is, then the model under `mask_heads(heads)`.

    `prompts` are strings or chat-message lists; `temperature=0` decodes greedily; `top_k=None` takes the model's
    generation config value (off when it has none, as vLLM does); `generation_kwargs` are further `GenerationConfig`
    fields. Under `accelerate launch` each process generates its share of the batches and every
    process returns the full, ordered set. With `cache_dir`, finished batches are stored there and reused (see module
    docstring). Bad input (no or empty prompts, heads outside the model) is refused before any generation.

    `backend`: one of `GENERATION_BACKENDS` or a `GenerateBackend` (`generation.make_backend`). `"vllm"` decodes with
    the process's vLLM engine
    (`generation.vllm`; `vllm`: its `VLLMSettings` fields), the rejected rows with the masked layers' `o_proj` weights
    swapped in; `"generate"` decodes chosen and rejected rows in two `model.generate` calls (the rejected under
    `mask_heads`); `"static"` decodes them in one loop with a static KV cache, compiled on CUDA (`generation.static`);
    `"auto"` is `"vllm"` where vLLM is installed and can serve the model, else `"generate"`. Greedy pairs are the same
    under all; sampled pairs differ (other random streams), so the backend is part of the cache fingerprint. Under
    `"static"` a batch's rejected rows share the chosen rows' decode (seeded as the chosen), or decode alone (seeded
    as the rejected) when its chosen responses come from the cache; under `"vllm"` each row has its own seed.

    `template_kwargs`: per-prompt chat-template arguments (`tools`, `chat_template_kwargs`; see `encode_prompts`).

    A pair is kept unless its responses are identical (whitespace stripped; two empty ones are identical), as the
    authors filter; `drop_empty=True` also drops a pair with one empty response (applied after the cache: no
    regeneration). `keep_reasoning=False` trains on the answers alone: the text up to a closing `</think>` is removed
    (`strip_reasoning`) before the filter, also after the cache. The work is done by a `PairGeneration`,
    whose steps can be read one at a time.
    """
    generation = PairGeneration(
        model,
        tokenizer,
        prompts,
        heads,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        generation_kwargs=generation_kwargs,
        batch_size=batch_size,
        backend=backend,
        template_kwargs=template_kwargs,
        vllm=vllm,
    )
    return generation.run(
        cache_dir, drop_empty=drop_empty, keep_reasoning=keep_reasoning, desc=desc, show_progress=show_progress
    )


class PairGeneration:
    """One pair generation, step by step: the inputs checked and encoded (`__init__`), the batches (longest prompts
    first), the cache fingerprints (`fingerprints`), one batch's decode (`decode`) and pair (`pair`), and the whole
    run over the resumable store (`run`). `generate_pairs` is its public face."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: list,
        heads,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int | None,
        seed: int,
        generation_kwargs: dict | None,
        batch_size: int,
        backend: str | GenerateBackend,
        template_kwargs: Sequence[dict | None] | None,
        vllm: dict | None = None,
    ):
        if len(prompts) == 0:
            raise ValueError("No prompts to generate pairs for: the prompt dataset is empty.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.backend = backend
        self.decoder = make_backend(backend, model, vllm)  # checks the name; a static backend hooks the model
        self.heads = sorted({(int(layer), int(head)) for layer, head in heads})
        if not self.heads:
            raise ValueError("No heads to mask: the selection is empty. Lower `mask_threshold` or set `mask_top_k`.")
        validate_heads(model, self.heads)
        self.prompts = list(prompts)
        check_prompts(self.prompts)
        if template_kwargs is not None and len(template_kwargs) != len(self.prompts):
            raise ValueError(f"template_kwargs has {len(template_kwargs)} entries for {len(self.prompts)} prompts.")
        self.model, self.tokenizer, self.seed, self.batch_size = model, tokenizer, seed, batch_size
        self.prompt_ids = encode_prompts(tokenizer, self.prompts, template_kwargs)
        check_prompt_ids(self.prompt_ids)
        self.config = make_generation_config(
            model, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, **(generation_kwargs or {})
        )
        window = self.decoder.window(model)  # the model's, or the vLLM engine's where shorter
        check_window([len(ids) for ids in self.prompt_ids], max_new_tokens, *window)  # before any decode
        # Longest prompts first: little padding per batch, and an out-of-memory shows up at once.
        order = sorted(range(len(self.prompts)), key=lambda i: -len(self.prompt_ids[i]))
        self.batches = [(b, order[i : i + batch_size]) for b, i in enumerate(range(0, len(order), batch_size))]
        self.generated = 0  # batches decoded by this process (the rest came from the cache)
        self.chosen_done: dict[str, dict] = {}
        self.chosen_store: ResultStore | None = None

    def fingerprints(self) -> tuple[str, str]:
        """(pairs, chosen): what the pairs depend on, and the same without the heads (the chosen responses do not
        depend on them, so runs that differ only in the heads share them). The main process's, on every process."""
        inputs = fingerprint(
            v=CACHE_VERSION,
            model=model_fingerprint(self.model),
            generation=self.config,
            seed=self.seed,
            batch_size=self.batch_size,
            prompts=self.prompts,
            prompt_ids=self.prompt_ids,
            backend="/".join(filter(None, (self.decoder.name, self.decoder.sampling_stream))),
            **self.decoder.cache_key(),  # the engine's settings (vLLM): they can change a token too
        )
        return from_main_process((fingerprint(inputs=inputs, heads=self.heads), fingerprint(inputs=inputs)))

    def decode(self, b: int, idx: list[int], roles: tuple[str, ...]) -> dict[str, dict]:
        """The `roles` responses for the prompts `idx` of batch `b`: one decode when the backend decodes masked and
        plain rows together, else one per role; each seeded from (seed, batch, its first role), or each row from
        (seed, prompt, role) where the backend samples rows apart (vLLM)."""
        parts = {}
        for group in [roles] if self.decoder.joint else [(role,) for role in roles]:
            start = time.perf_counter()
            new = generate_batch(
                self.model,
                self.tokenizer,
                [self.prompt_ids[i] for i in idx] * len(group),
                self.config,
                heads=self.heads,
                masked=[role == "rejected" for role in group for _ in idx],
                seed=self.seed * 1_000_003 + b * 2 + (group[0] == "rejected"),
                backend=self.decoder,
                row_seeds=[self.seed * 1_000_003 + i * 2 + (role == "rejected") for role in group for i in idx],
            )
            seconds = (time.perf_counter() - start) / len(group)  # a joint decode's time is shared equally
            for k, role in enumerate(group):
                rows = new[k * len(idx) : (k + 1) * len(idx)]
                texts = _decode_completions(
                    self.tokenizer, [self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx], rows
                )
                parts[role] = {role: texts, f"{role}_tokens": [len(row) for row in rows], "seconds": seconds}
        return parts

    def pair(self, batch) -> dict:
        """One batch's record: its chosen responses (from the shared chosen cache, else decoded and stored there)
        and its rejected responses."""
        b, idx = batch
        chosen = self.chosen_done.get(_batch_key(batch))
        parts = self.decode(b, idx, ROLES if chosen is None else ("rejected",))
        if chosen is None:
            chosen = {"indices": idx, **parts["chosen"]}
            if self.chosen_store is not None:  # same prompts and settings, other heads: shared
                self.chosen_store.append({"key": _batch_key(batch), **chosen})
        rejected = parts["rejected"]
        self.generated += 1
        return {**chosen, **rejected, "seconds": chosen["seconds"] + rejected["seconds"]}

    def run(
        self,
        cache_dir=None,
        *,
        drop_empty: bool = False,
        keep_reasoning: bool = True,
        desc: str = "RetMask pairs",
        show_progress: bool = True,
    ) -> GeneratedPairs:
        """Every batch through `run_resumable` (shared across processes; stored under `cache_dir` when given), then
        the pairs assembled in input order and filtered."""
        fp = None
        if cache_dir is not None:
            fp, chosen_fp = self.fingerprints()
            self.chosen_store = ResultStore(
                Path(cache_dir) / f"chosen-{chosen_fp[:20]}",
                "chosen",
                chosen_fp,
                info={"num_prompts": len(self.prompts)},
                cache=True,
            )
            expected = {_batch_key(batch): batch[1] for batch in self.batches}
            self.chosen_done = self.chosen_store.open(
                lambda k, r: _valid_part(r, "chosen", expected.get(k)),
                complete=lambda records: expected.keys() <= records.keys(),
            )
        try:
            new = self.config.max_new_tokens  # each call: a batch's rows, both roles where the backend joins them
            calls = [[len(self.prompt_ids[i]) + new for i in idx] * (1 + self.decoder.joint) for _, idx in self.batches]
            self.decoder.prepare(self.model, calls)  # every process, before the batches are shared out
            results = run_resumable(
                self.batches,
                self.pair,
                Path(cache_dir) / fp[:20] if fp else None,
                name="pairs",
                fingerprint=fp or "",
                key=_batch_key,
                verify=lambda batch, r: all(_valid_part(r, role, batch[1]) for role in ROLES),
                info={"heads": format_heads(self.heads), "num_prompts": len(self.prompts)},
                cache=True,
                desc=desc,
                show_progress=show_progress,
            )
        finally:
            if self.chosen_store is not None:
                self.chosen_store.close()
            if self.decoder is not self.backend:  # made here: release its hooks
                self.decoder.close()
        generated = self.generated
        if process_state().num_processes > 1:
            generated = sum(gather_object([generated]))
        return _assemble(self.prompts, results, fp or "", generated, drop_empty, keep_reasoning)


def _batch_key(batch) -> str:
    return f"batch_{batch[0]:06d}"


def _valid_part(record: dict, role: str, idx: list[int] | None) -> bool:
    """A stored batch record is for the prompts `idx` and holds one `role` response and length per prompt."""
    texts, lengths = record.get(role), record.get(f"{role}_tokens")
    return (
        idx is not None
        and record.get("indices") == idx
        and isinstance(texts, list)
        and isinstance(lengths, list)
        and len(texts) == len(lengths) == len(idx)
        and all(isinstance(t, str) for t in texts)
        and all(isinstance(n, int) for n in lengths)
        and isinstance(record.get("seconds"), (int, float))
    )


def strip_reasoning(text: str) -> str:
    """The answer of a reasoning model's response: what follows its first `</think>`, as vLLM's Qwen3 reasoning
    parser returns it as `content`; a response without `</think>` (cut inside its reasoning, or never reasoning) is
    kept whole, as that parser leaves it."""
    _, closed, answer = text.partition("</think>")
    return answer if closed else text


def _assemble(
    prompts: list, results: list[dict], fp: str, generated: int, drop_empty: bool, keep_reasoning: bool = True
) -> GeneratedPairs:
    n = len(prompts)
    chosen, rejected, c_tok, r_tok = [""] * n, [""] * n, [0] * n, [0] * n
    stats = PairStats(prompts=n, batches_generated=generated, batches_from_cache=len(results) - generated)
    for r in results:
        for j, i in enumerate(r["indices"]):
            chosen[i], rejected[i] = r["chosen"][j], r["rejected"][j]
            c_tok[i], r_tok[i] = r["chosen_tokens"][j], r["rejected_tokens"][j]
        stats.generation_seconds += r["seconds"]
        stats.generated_tokens += sum(r["chosen_tokens"]) + sum(r["rejected_tokens"])
    if not keep_reasoning:
        chosen, rejected = [strip_reasoning(t) for t in chosen], [strip_reasoning(t) for t in rejected]
    keep = []
    for c, rj in zip(chosen, rejected):
        if drop_empty and (not c.strip() or not rj.strip()):
            stats.dropped_empty += 1
            keep.append(False)
        elif c.strip() == rj.strip():
            stats.dropped_identical += 1
            keep.append(False)
        else:
            keep.append(True)
    kept = [i for i in range(n) if keep[i]]
    stats.kept = len(kept)
    if kept:
        stats.mean_chosen_tokens = sum(c_tok[i] for i in kept) / len(kept)
        stats.mean_rejected_tokens = sum(r_tok[i] for i in kept) / len(kept)
    if stats.generation_seconds > 0:
        stats.tokens_per_second = stats.generated_tokens / stats.generation_seconds
    return GeneratedPairs(
        prompts, chosen, rejected, keep, stats, fp, extra={"chosen_tokens": c_tok, "rejected_tokens": r_tok}
    )


def _warn_untemplated_prompts(tokenizer, prompts: list, name: str) -> None:
    """A chat model given plain-string prompts answers them as raw text continuations (an instruct model often
    with an immediate EOS): almost always a data mistake, so say so. Strings already rendered through the chat
    template (e.g. Qwen3 with `enable_thinking`) are recognised by the template's assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        return
    strings = [p for p in prompts if isinstance(p, str)]
    if not strings:
        return
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "\x00"}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that needs more than one user message: nothing to compare with
        return
    header = rendered.split("\x00", 1)[-1].strip()
    untemplated = sum(header not in p for p in strings)
    if header and untemplated:
        warnings.warn(
            f"{untemplated} of {len(prompts)} prompts of the {name} dataset are plain strings although the tokenizer "
            "has a chat template: pairs are generated (and DPO trains) on raw text continuations, not chat answers. "
            'Pass conversational prompts ({"prompt": [{"role": "user", "content": ...}]}) or render them with '
            "`tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`.",
            UserWarning,
            stacklevel=3,
        )


def complete_prompt_dataset(
    dataset: Dataset, model, tokenizer, heads, *, name: str = "train", **kwargs
) -> tuple[Dataset, PairStats]:
    """Turn a prompt-only dataset into a preference dataset (extra columns kept); other datasets pass through.

    Raises a `ValueError` when every pair is dropped, since DPO would have nothing to learn from.
    """
    if not is_prompt_only(dataset):
        return dataset, None
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"The {name} dataset is a prompt-only IterableDataset; pair generation needs a map-style "
            "`datasets.Dataset` (e.g. load it without `streaming=True`)."
        )
    _warn_untemplated_prompts(tokenizer, dataset["prompt"], name)
    template_kwargs = None  # per-row template arguments, as DPOTrainer will tokenize these rows (columns kept)
    if {"tools", "chat_template_kwargs"} & set(dataset.column_names):
        columns = [c for c in ("tools", "chat_template_kwargs") if c in dataset.column_names]
        template_kwargs = [row_template_kwargs(row) for row in dataset.select_columns(columns)]
    pairs = generate_pairs(
        model,
        tokenizer,
        dataset["prompt"],
        heads,
        desc=f"RetMask pairs ({name})",
        template_kwargs=template_kwargs,
        **kwargs,
    )
    s = pairs.stats
    s.check_kept(f"the {name} dataset")
    out = dataset.select(pairs.kept_indices)
    for role, column in pairs.completions().items():
        out = out.add_column(role, column)
    return out, s
