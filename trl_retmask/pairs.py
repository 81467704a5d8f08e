"""Contrastive pair generation: chosen = the policy, rejected = the same policy with its retrieval heads masked.

Generation is batched (left padding, KV cache), sharded over accelerate processes by batch and gathered, and cached
on disk batch by batch under a fingerprint of (weights, heads, settings, prompts), so reruns skip it and interrupted
runs resume. Every batch is seeded from (seed, batch index, role) alone, so the pairs do not depend on the process
count or on where a run was interrupted, and the chosen responses do not depend on the heads: they are cached apart
(fingerprint without heads), so runs that differ only in the masked heads (RetMask and its random-head control, a
sweep over k) share them when they share a cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset, IterableDataset
from tqdm.auto import tqdm

from .masking import mask_heads, validate_heads

logger = logging.getLogger(__name__)

CACHE_VERSION = 2


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

    def to_dataset(self) -> Dataset:
        """The kept pairs as a TRL preference dataset (conversational prompts get assistant-message completions)."""
        rows = {"prompt": [], "chosen": [], "rejected": []}
        for i in self.kept_indices:
            rows["prompt"].append(self.prompts[i])
            rows["chosen"].append(as_completion(self.prompts[i], self.chosen[i]))
            rows["rejected"].append(as_completion(self.prompts[i], self.rejected[i]))
        return Dataset.from_dict(rows)


def is_conversational_prompt(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def as_completion(prompt, text: str):
    return [{"role": "assistant", "content": text}] if is_conversational_prompt(prompt) else text


def is_prompt_only(dataset: Dataset | IterableDataset) -> bool:
    """A dataset RetMask must complete: it has prompts but no chosen/rejected responses yet."""
    columns = dataset.column_names or list(next(iter(dataset)).keys())
    return "prompt" in columns and "chosen" not in columns and "rejected" not in columns


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids exactly as TRL's DPO preprocessing tokenizes the prompt (chat template with generation prompt)."""
    out = []
    for p in prompts:
        if is_conversational_prompt(p):
            out.append(list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]))
        elif isinstance(p, str):
            out.append(list(tokenizer(text=p)["input_ids"]))
        else:
            raise ValueError(f"A prompt must be a string or a list of chat messages, got {type(p).__name__}: {p!r:.80}")
    return out


def hash_weights(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    seen = {}  # tied weights (embeddings / LM head) are hashed once
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() == 0 or key in seen:
            h.update(f"={seen.get(key, '')}".encode())
            continue
        seen[key] = name
        t = t.detach().contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pairs_fingerprint(weights_hash: str, heads, settings: dict, prompt_ids: list[list[int]], prompts: list) -> str:
    payload = json.dumps(
        {"v": CACHE_VERSION, "weights": weights_hash, "heads": sorted([list(h) for h in heads]),
         "settings": settings, "prompt_ids": prompt_ids, "prompts": prompts},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _response_lengths(new_tokens: torch.Tensor, eos_ids: set[int]) -> list[int]:
    """Generated tokens per row, up to and including the first EOS (the rest is padding)."""
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= new_tokens == e
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(new_tokens[:, 0], new_tokens.size(1)))
    return first.tolist()


def _decode_completions(tokenizer, prompts: list, prompt_ids: list[list[int]], new: torch.Tensor) -> list[str]:
    """Response texts. For a standard (string) prompt the text is what decoding prompt+response adds to decoding the
    prompt, so that DPO's `prompt + chosen` re-tokenizes to the generated tokens (a bare decode of the response
    drops the joining space with SentencePiece or word-level tokenizers). Chat responses are decoded bare: the
    template renders them as the assistant message."""
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    for j, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            head = tokenizer.decode(prompt_ids[j], skip_special_tokens=True)
            full = tokenizer.decode(prompt_ids[j] + new[j].tolist(), skip_special_tokens=True)
            if full.startswith(head):
                texts[j] = full[len(head):]
    return texts


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def generate_pairs(
    model,
    tokenizer,
    prompts: list,
    heads,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.6,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    generation_kwargs: dict | None = None,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    desc: str = "RetMask pairs",
) -> GeneratedPairs:
    """Generate a (chosen, rejected) pair per prompt: the model as is, then the model under `mask_heads(heads)`.

    `prompts` are strings or chat-message lists; `temperature=0` decodes greedily. Under `accelerate launch` each
    process generates its share of the batches and every process returns the full, ordered set. With `cache_dir`,
    finished batches are stored there and reused (see module docstring).
    """
    if len(prompts) == 0:
        raise ValueError("No prompts to generate pairs for: the prompt dataset is empty.")
    heads = sorted({(int(layer), int(head)) for layer, head in heads})
    if not heads:
        raise ValueError("No heads to mask: the selection is empty. Lower `mask_threshold` or set `mask_top_k`.")
    validate_heads(model, heads)
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token`.")
    state = PartialState()
    prompts = list(prompts)
    prompt_ids = encode_prompts(tokenizer, prompts)

    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "seed": seed, "batch_size": batch_size, "generation_kwargs": generation_kwargs or {}}
    fingerprint = ""
    batch_dir = chosen_dir = None
    if cache_dir is not None:
        fp = [None, None]
        if state.is_main_process:
            weights = hash_weights(model)
            fp = [pairs_fingerprint(weights, heads, settings, prompt_ids, prompts),
                  pairs_fingerprint(weights, [], settings, prompt_ids, prompts)]
        if state.num_processes > 1:
            broadcast_object_list(fp, from_process=0)
        fingerprint = fp[0]
        batch_dir = Path(cache_dir) / fingerprint[:20]
        chosen_dir = Path(cache_dir) / f"chosen-{fp[1][:20]}"
        batch_dir.mkdir(parents=True, exist_ok=True)
        chosen_dir.mkdir(parents=True, exist_ok=True)
        if state.is_main_process:
            _write_json_atomic(batch_dir / "meta.json", {"fingerprint": fingerprint, "heads": heads,
                                                         "settings": settings, "num_prompts": len(prompts)})

    # Longest prompts first: little padding per batch, and an out-of-memory shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    my_batches = list(range(len(batches)))[state.process_index::state.num_processes]

    gen_kwargs = dict(max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    gen_kwargs.update(generation_kwargs or {})
    eos_ids = _eos_ids(model, tokenizer)
    device = _model_device(model)
    was_training = model.training
    model.eval()

    results = []
    n_generated = 0
    try:
        for b in tqdm(my_batches, desc=desc, disable=not (show_progress and state.is_local_main_process)):
            path = batch_dir / f"batch_{b:06d}.json" if batch_dir is not None else None
            if path is not None and path.is_file():
                results.append({**json.loads(path.read_text()), "cached": True})
                continue
            idx = batches[b]
            enc = tokenizer.pad({"input_ids": [prompt_ids[i] for i in idx]}, padding=True, padding_side="left",
                                return_tensors="pt").to(device)
            out = {"batch": b, "indices": idx, "seconds": 0.0}
            chosen_path = chosen_dir / f"chosen_{b:06d}.json" if chosen_dir is not None else None
            if chosen_path is not None and chosen_path.is_file():  # same prompts and settings, other heads
                out.update(json.loads(chosen_path.read_text()))
            for role, ctx_heads in (("chosen", None), ("rejected", heads)):
                if role in out:
                    continue
                start = time.perf_counter()
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                    torch.manual_seed(seed * 1_000_003 + b * 2 + (role == "rejected"))
                    with mask_heads(model, ctx_heads or []):
                        seq = model.generate(**enc, **gen_kwargs)
                new = seq[:, enc["input_ids"].shape[1]:].cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                part = {role: _decode_completions(tokenizer, [prompts[i] for i in idx], [prompt_ids[i] for i in idx],
                                                  new),
                        f"{role}_tokens": _response_lengths(new, eos_ids) if new.numel() else [0] * len(idx),
                        "seconds": time.perf_counter() - start}
                if role == "chosen" and chosen_path is not None:
                    _write_json_atomic(chosen_path, {"batch": b, "indices": idx, **part})
                out.update(part, seconds=out["seconds"] + part["seconds"])
            if path is not None:
                _write_json_atomic(path, out)
            results.append({**out, "cached": False})
            n_generated += 1
    finally:
        model.train(was_training)

    if state.num_processes > 1:
        results = gather_object(results)
    return _assemble(prompts, results, fingerprint)


def _assemble(prompts: list, results: list[dict], fingerprint: str) -> GeneratedPairs:
    n = len(prompts)
    chosen, rejected, c_tok, r_tok = [""] * n, [""] * n, [0] * n, [0] * n
    stats = PairStats(prompts=n)
    for r in results:
        for j, i in enumerate(r["indices"]):
            chosen[i], rejected[i] = r["chosen"][j], r["rejected"][j]
            c_tok[i], r_tok[i] = r["chosen_tokens"][j], r["rejected_tokens"][j]
        stats.generation_seconds += r["seconds"]
        stats.generated_tokens += sum(r["chosen_tokens"]) + sum(r["rejected_tokens"])
        stats.batches_from_cache += int(r["cached"])
        stats.batches_generated += int(not r["cached"])
    keep = []
    for c, rj in zip(chosen, rejected):
        if not c.strip() or not rj.strip():
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
    return GeneratedPairs(prompts, chosen, rejected, keep, stats, fingerprint,
                          extra={"chosen_tokens": c_tok, "rejected_tokens": r_tok})


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
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True,
                                                 tokenize=False)
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
            UserWarning, stacklevel=3)


def complete_prompt_dataset(
    dataset: Dataset, model, tokenizer, heads, *, name: str = "train", **kwargs
) -> tuple[Dataset, PairStats]:
    """Turn a prompt-only dataset into a preference dataset (extra columns kept); other datasets pass through.

    Raises a `ValueError` when every pair is dropped, since DPO would have nothing to learn from.
    """
    if not is_prompt_only(dataset):
        return dataset, None
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"The {name} dataset is a prompt-only IterableDataset; pair generation needs a map-style "
                         "`datasets.Dataset` (e.g. load it without `streaming=True`).")
    _warn_untemplated_prompts(tokenizer, dataset["prompt"], name)
    pairs = generate_pairs(model, tokenizer, dataset["prompt"], heads, desc=f"RetMask pairs ({name})", **kwargs)
    s = pairs.stats
    if s.kept == 0:
        raise ValueError(
            f"All {s.prompts} generated pairs of the {name} dataset were dropped ({s.dropped_identical} identical, "
            f"{s.dropped_empty} empty): masking these heads does not change the model's answers. Mask more or other "
            "heads (`mask_threshold` / `mask_top_k`), sample (`temperature` > 0), or raise `max_new_tokens`."
        )
    kept = pairs.kept_indices
    out = dataset.select(kept)
    out = out.add_column("chosen", [as_completion(pairs.prompts[i], pairs.chosen[i]) for i in kept])
    out = out.add_column("rejected", [as_completion(pairs.prompts[i], pairs.rejected[i]) for i in kept])
    logger.info("RetMask %s pairs: %s", name, s.to_dict())
    return out, s
