"""Retrieval-head detection (Wu et al. 2025) without materialising an attention matrix.

During greedy NIAH decoding, a head *copies* when its highest-attention context position lies inside the
needle and holds the token being generated; each copy adds 1/len(needle) to the head's score for that
sample. A head's retrieval score is the mean over correctly answered samples (ROUGE-1 recall > 0.5).

The model keeps its own attention (sdpa, eager, ...) for its outputs. A wrapper registered with
transformers' `AttentionInterface` additionally computes, for the *last query row only* of each forward
(the row that predicts the next token), `argmax_j q.k_j` for every head of the layer at once: GQA by
grouping queries per KV head (no repeated keys), masks honoured (causal, sliding window, padding). Softmax
and tanh soft-capping are monotonic, so this argmax is the argmax of the attention weights.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from trl_retmask.niah import (
    DEFAULT_CONTEXT_LENGTHS,
    DEFAULT_DEPTHS,
    NIAHSample,
    accuracy_grid,
    build_niah_samples,
    generate_answer,
    model_max_length,
    partial_state,
    plot_accuracy_grid,
    rouge1_recall,
    run_samples,
)

_IMPL_PREFIX = "retmask_argmax_"
_RECORDER_ATTR = "_retmask_argmax_recorder"


# --------------------------------------------------------------------------------------- the attention wrapper
def _inner_attention(base: str, module):
    """The function the model would call for `base`; eager is model-specific (e.g. Gemma2's soft-capping)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward; load the model with sdpa.")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        output = _inner_attention(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
        recorder = getattr(module, _RECORDER_ATTR, None)
        if recorder is not None:
            recorder.record(module, query, key, attention_mask)
        return output

    attention.__name__ = f"{_IMPL_PREFIX}{base}"
    return attention


def _register(base: str) -> str:
    """Register (once) the argmax wrapper of `base` with the attention and mask interfaces."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = _IMPL_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base not in ALL_MASK_ATTENTION_FUNCTIONS or base.startswith("flex"):
            raise ValueError(f"Retrieval-head detection supports sdpa, eager and flash attention, not {base!r}; "
                             "load the model with attn_implementation='sdpa'.")
        AttentionInterface.register(name, _make_wrapper(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def last_row_argmax(query: torch.Tensor, key: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """`[batch, heads]` index of the key with the largest logit for the last query row, all heads at once.

    query `[b, Hq, q, d]`, key `[b, Hkv, kv, d]` (GQA: query head h reads KV head h // (Hq // Hkv)); the mask
    is None (everything visible), a 4D boolean / additive float mask, or a 2D padding mask.
    """
    b, hq, _, d = query.shape
    hkv, kv = key.shape[1], key.shape[2]
    q = query[:, :, -1, :].reshape(b, hkv, hq // hkv, d)
    logits = torch.matmul(q, key.transpose(-1, -2)).reshape(b, hq, kv)
    if attention_mask is not None:
        mask = attention_mask
        if mask.dim() == 4:
            mask = mask[:, :, -1, :kv]
        elif mask.dim() == 2:
            mask = mask[:, -kv:].bool()[:, None, :]
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.argmax(dim=-1)


class ArgmaxRecorder:
    """Collects, per layer and forward call, the absolute position each head attends to most (last row)."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self.rows: dict[int, dict[int, torch.Tensor]] = {}

    def reset(self):
        self.seen.clear()
        self.rows.clear()

    def record(self, module, query, key, attention_mask):
        layer = module.layer_idx
        q_len, kv_len = query.shape[2], key.shape[2]
        seen = self.seen.get(layer, 0)
        q_pos = seen + q_len - 1  # absolute position of the last query row
        self.seen[layer] = seen + q_len
        with torch.no_grad():
            idx = last_row_argmax(query, key, attention_mask)
        # A sliding-window cache returns only the last `kv_len` keys; shift back to absolute positions.
        self.rows.setdefault(layer, {})[q_pos] = idx[0] + (q_pos + 1 - kv_len)

    def positions(self, first_pos: int, steps: int) -> torch.Tensor:
        """`[steps, layers, heads]`: for generated token t, the rows of the forward at position first_pos + t."""
        layers = sorted(self.rows)
        return torch.stack([torch.stack([self.rows[layer][first_pos + t] for layer in layers])
                            for t in range(steps)]).cpu()


@contextmanager
def record_attention_argmax(model):
    """Within the block, every forward of `model` records its heads' attention argmax in the yielded recorder."""
    from trl_retmask.masking import attention_modules

    base = model.config._attn_implementation or "sdpa"
    if base.startswith(_IMPL_PREFIX):
        raise ValueError("record_attention_argmax is already active on this model.")
    name = _register(base)
    recorder = ArgmaxRecorder()
    modules = list(attention_modules(model).values())
    model.set_attn_implementation(name)
    for m in modules:
        setattr(m, _RECORDER_ATTR, recorder)
    try:
        yield recorder
    finally:
        for m in modules:
            if hasattr(m, _RECORDER_ATTR):
                delattr(m, _RECORDER_ATTR)
        model.set_attn_implementation(base)


# ------------------------------------------------------------------------------------------------------ scoring
def copy_scores(positions: torch.Tensor, generated: torch.Tensor, sequence: torch.Tensor,
                needle_span: tuple[int, int]) -> torch.Tensor:
    """`[layers, heads]` retrieval score of one sample (vectorised over steps, layers and heads).

    positions `[steps, layers, heads]` (argmax key position per generated token), generated `[steps]`,
    sequence: the prompt + generated ids. A hit: position in the needle span and token there == generated.
    """
    start, end = needle_span
    tokens = sequence[positions.clamp(0, len(sequence) - 1)]
    hits = (positions >= start) & (positions < end) & (tokens == generated[:, None, None])
    return hits.sum(0).float() / (end - start)


def _score_sample(model, tokenizer, recorder: ArgmaxRecorder, sample: NIAHSample, max_new_tokens: int,
                  num_heads_total: int) -> dict:
    recorder.reset()
    new = generate_answer(model, tokenizer, sample, max_new_tokens)
    response = tokenizer.decode(new, skip_special_tokens=True)
    recall = rouge1_recall(sample.answer, response)
    prompt_len = len(sample.input_ids)
    if new:
        positions = recorder.positions(prompt_len - 1, len(new))
        generated = torch.tensor(new)
        scores = copy_scores(positions, generated, torch.tensor(sample.input_ids + new), sample.needle_span)
    else:
        scores = torch.zeros(num_heads_total)
    return {"response": response, "rouge1_recall": recall, "correct": recall > 0.5,
            "num_new_tokens": len(new), "scores": [round(v, 6) for v in scores.flatten().tolist()]}


def detect_retrieval_heads(model, tokenizer, context_lengths: Iterable[int] = DEFAULT_CONTEXT_LENGTHS,
                           depths: Iterable[float] = DEFAULT_DEPTHS, needles=None, max_new_tokens: int = 48,
                           output_dir=None, haystack_dir=None):
    """Retrieval scores of every head from greedy NIAH decoding over context_lengths x depths x needles.

    `needles`: records or a JSONL path (default: bundled). With `output_dir`, each finished sample is appended
    to `detect.rank<i>.jsonl` (an interrupted run resumes), and the outputs land there: `head_scores.json`,
    `head_scores.png`, `sparsity.json`, `niah_grid.png`. Runs sharded under `accelerate launch`.
    Returns a `HeadScores` whose lists hold one score per correctly answered sample.
    """
    from trl_retmask.masking import head_layout
    from trl_retmask.scores import HeadScores

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    num_layers, num_heads, _ = head_layout(model)
    samples = build_niah_samples(tokenizer, context_lengths, depths, needles, haystack_dir,
                                 max_length=model_max_length(model), max_new_tokens=max_new_tokens)
    settings = {"model": getattr(model, "name_or_path", ""), "max_new_tokens": max_new_tokens,
                "layout": [num_layers, num_heads]}
    model.eval()
    with record_attention_argmax(model) as recorder:
        records = run_samples(samples, lambda s: _score_sample(model, tokenizer, recorder, s, max_new_tokens,
                                                                      num_layers * num_heads),
                              output_dir, name="detect", settings=settings, desc="Retrieval-head detection")

    correct = [r for r in records if r["correct"]]
    state = partial_state()
    grid = accuracy_grid(records)
    if output_dir is not None and state.is_main_process:
        plot_accuracy_grid(grid, Path(output_dir) / "niah_grid.png", title="NIAH accuracy during detection")
    if not correct:
        raise ValueError(
            f"The model answered none of the {len(records)} NIAH samples correctly (ROUGE-1 recall > 0.5), so no "
            "retrieval score can be computed. Use shorter contexts (--context-lengths) or more new tokens."
        )
    if len(correct) < len(records) / 4:
        warnings.warn(f"Only {len(correct)}/{len(records)} NIAH samples were answered correctly; the scores rest "
                      "on few samples. Shorter contexts give more.", stacklevel=2)
    per_head = torch.tensor([r["scores"] for r in correct]).reshape(len(correct), num_layers, num_heads)
    scores = HeadScores({(layer, head): per_head[:, layer, head].tolist()
                         for layer in range(num_layers) for head in range(num_heads)},
                        num_layers=num_layers, num_heads=num_heads)
    if output_dir is not None and state.is_main_process:
        out = Path(output_dir)
        scores.save(out / "head_scores.json")
        scores.plot(out / "head_scores.png", title=f"Retrieval scores ({len(correct)}/{len(records)} samples)")
        summary = {**scores.sparsity(), "num_samples": len(records), "num_correct": len(correct)}
        (out / "sparsity.json").write_text(json.dumps(summary, indent=2))
    return scores


__all__ = ["ArgmaxRecorder", "copy_scores", "detect_retrieval_heads", "last_row_argmax", "record_attention_argmax"]
