"""Retrieval-head detection (Wu et al. 2025) as the RetMask authors run it, without materialising attention.

During greedy NIAH decoding (50 tokens, no EOS stop), a head *copies* when its highest-attention position lies
inside the needle's answer part (`real_needle`) and holds the token being generated; each copy adds
1/len(real_needle tokens) to the head's score for that sample. A head's retrieval score is the mean over
correctly answered samples (ROUGE-1 recall of `real_needle` > 0.5). Reference: YoumiMa/RetMask,
`1_Retrieval_Head_Deactivation/retrieval_head_detection.py`; the deliberate differences are in docs/detection.md.

The model keeps its own attention (sdpa, eager, ...) for its outputs. A wrapper registered with
transformers' `AttentionInterface` additionally computes, for the *last query row only* of each forward
(the row that predicts the next token), `argmax_j q.k_j` for every head of the layer at once: GQA by
grouping queries per KV head (no repeated keys), masks honoured (causal, sliding window, padding). Softmax
and tanh soft-capping are monotonic, so this argmax is the argmax of the attention weights.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from trl_retmask.distributed import process_state
from trl_retmask.fingerprints import fingerprint, model_fingerprint
from trl_retmask.generation import model_window
from trl_retmask.layout import attention_modules, head_layout
from trl_retmask.niah import (
    accuracy_grid,
    generate_answer,
    niah_generation_config,
    plot_accuracy_grid,
    run_niah_samples,
    score_answer,
)
from trl_retmask.niah_samples import NIAHSample, build_niah_samples, samples_fingerprint, samples_info
from trl_retmask.scores import HEAD_SCORES_FILE, HeadScores
from trl_retmask.store import write_json

AUTHORS_CONTEXT_LENGTHS = tuple(int(x) for x in np.round(np.linspace(0, 5000, 20)))
"""`np.round(np.linspace(0, 5000, 20))`: the RetMask authors' lengths (`--s 0 --e 5000`), 0 to 5000 tokens."""
AUTHORS_DEPTHS = tuple(int(x) for x in np.round(np.linspace(0, 100, 10)))
"""`np.round(np.linspace(0, 100, 10))`: their needle depths in percent, 0 to 100."""
DETECTION_OUTPUTS = ("head_scores.json", "head_scores.png", "sparsity.json", "niah_grid.png", HEAD_SCORES_FILE)
"""The files made from detection's records in its `output_dir` (the stages add `retmask_head_scores.json`): an
overwrite removes them with the old records, so an interrupted one never leaves another model's scores there."""

DETECTION_PRESETS = {
    "authors": {
        "context_lengths": AUTHORS_CONTEXT_LENGTHS,
        "depths": AUTHORS_DEPTHS,
        "max_new_tokens": 50,
        "length_buffer": 200,
    },
    "cpu": {"context_lengths": (526, 1053), "depths": (0, 56, 100), "max_new_tokens": 50, "length_buffer": 200},
}
"""Keyword arguments of `detect_retrieval_heads`. "authors": their grid and budget (the defaults; 600 samples).
"cpu": a subset of their grid, sized for the embedded SmolLM2-135M in the CPU recipe (18 samples, about 2 minutes
on 2 cores); same prompt, buffer, decoding and scoring."""

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


def _attend_and_record(base: str, module, query, key, value, attention_mask, *args, **kwargs):
    """The model's own attention (`base`), plus the last row's argmax when a recorder is attached to `module`."""
    output = _inner_attention(base, module)(module, query, key, value, attention_mask, *args, **kwargs)
    recorder = getattr(module, _RECORDER_ATTR, None)
    if recorder is not None:
        recorder.record(module, query, key, attention_mask)
    return output


def _make_wrapper(base: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        return _attend_and_record(base, module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{_IMPL_PREFIX}{base}"
    return attention


def _register(base: str) -> str:
    """Register (once) the argmax wrapper of `base` with the attention and mask interfaces."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = _IMPL_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base not in ALL_MASK_ATTENTION_FUNCTIONS or base.startswith("flex"):
            raise ValueError(
                f"Retrieval-head detection supports sdpa, eager and flash attention, not {base!r}; "
                "load the model with attn_implementation='sdpa'."
            )
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
        return torch.stack(
            [torch.stack([self.rows[layer][first_pos + t] for layer in layers]) for t in range(steps)]
        ).cpu()


@contextmanager
def record_attention_argmax(model):
    """Within the block, every forward of `model` records its heads' attention argmax in the yielded recorder."""
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
def copy_scores(
    positions: torch.Tensor, generated: torch.Tensor, sequence: torch.Tensor, span: tuple[int, int]
) -> torch.Tensor:
    """`[layers, heads]` retrieval score of one sample (vectorised over steps, layers and heads).

    positions `[steps, layers, heads]` (argmax key position per generated token), generated `[steps]`,
    sequence: the prompt + generated ids, span: `[start, end)` of the real_needle's tokens. A hit:
    `start <= position < end` and the token there == the generated one; each is worth `1 / (end - start)`.
    """
    start, end = span
    tokens = sequence[positions]  # argmax positions index the attended keys: always inside the sequence
    hits = (positions >= start) & (positions < end) & (tokens == generated[:, None, None])
    return hits.sum(0).float() / (end - start)


def _score_sample(model, tokenizer, recorder: ArgmaxRecorder, sample: NIAHSample, max_new_tokens: int) -> dict:
    """One sample's record. Without an EOS stop, and with the window checked by `build_niah_samples`, the decode
    always yields `max_new_tokens` tokens (at least 1)."""
    recorder.reset()
    new = generate_answer(model, tokenizer, sample, max_new_tokens, stop_at_eos=False)
    response = tokenizer.decode(new, skip_special_tokens=True)
    positions = recorder.positions(len(sample.input_ids) - 1, len(new))
    scores = copy_scores(positions, torch.tensor(new), torch.tensor(sample.input_ids + new), sample.answer_span)
    return {
        "response": response,
        **score_answer(sample.answer, response),
        "num_new_tokens": len(new),
        "scores": [round(v, 6) for v in scores.flatten().tolist()],
    }


def detect_retrieval_heads(
    model,
    tokenizer,
    context_lengths: Iterable[int] = AUTHORS_CONTEXT_LENGTHS,
    depths: Iterable[float] = AUTHORS_DEPTHS,
    needles=None,
    max_new_tokens: int = 50,
    output_dir=None,
    haystack_dir=None,
    overwrite: bool = False,
    *,
    length_buffer: int = 200,
    haystack_per_needle: bool | None = None,
):
    """Retrieval scores of every head from greedy NIAH decoding over context_lengths x depths x needles.

    The defaults are the RetMask authors' (`DETECTION_PRESETS["authors"]`): lengths 0..5000 x 10 depths, 50 greedy
    tokens that do not stop at EOS, `context_length` = context (haystack + needle) + `length_buffer` tokens, needle
    i in haystack file i when the directory holds several (`haystack_per_needle=None`). A head scores a hit when its
    attention argmax lies in the needle's answer part (`real_needle`) on the token being generated, worth
    1/len(answer tokens); a sample counts when ROUGE-1 recall of `real_needle` in the response exceeds 0.5.

    `needles`: records or a JSONL path (default: bundled). With `output_dir`, each finished sample is appended
    to `detect.rank<i>.jsonl` (an interrupted run resumes; a directory made from another model, other samples or
    settings is refused unless `overwrite=True`), and the outputs land there: `head_scores.json`,
    `head_scores.png`, `sparsity.json`, `niah_grid.png`. Runs sharded under `accelerate launch`.
    Returns a `HeadScores` whose lists hold one score per correctly answered sample.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    num_layers, num_heads, _ = head_layout(model)
    samples = build_niah_samples(
        tokenizer,
        context_lengths,
        depths,
        needles,
        haystack_dir,
        max_length=model_window(model),
        max_new_tokens=max_new_tokens,
        length_buffer=length_buffer,
        haystack_per_needle=haystack_per_needle,
    )
    missing = sorted({s.needle_index for s in samples if s.answer_span is None})
    if missing:
        raise ValueError(
            f"The real_needle of needle(s) {missing} does not occur in its needle (case-insensitive): "
            "detection scores copies of the real_needle's tokens, so it must be part of the needle."
        )
    generation = niah_generation_config(model, max_new_tokens, stop_at_eos=False)
    fp = ""
    if output_dir is not None:  # before the recorder swaps the attention implementation
        fp = fingerprint(
            kind="detect", model=model_fingerprint(model), samples=samples_fingerprint(samples), generation=generation
        )
    info = {
        **samples_info(model, samples),
        "max_new_tokens": max_new_tokens,
        "length_buffer": length_buffer,
        "layout": [num_layers, num_heads],
    }
    with record_attention_argmax(model) as recorder:
        records = run_niah_samples(
            samples,
            lambda s: _score_sample(model, tokenizer, recorder, s, max_new_tokens),
            output_dir,
            name="detect",
            fingerprint=fp,
            info=info,
            overwrite=overwrite,
            fields=("response", "rouge1_recall", "correct", "scores"),
            verify=lambda s, r: isinstance(r["scores"], list) and len(r["scores"]) == num_layers * num_heads,
            outputs=DETECTION_OUTPUTS,
            desc="Retrieval-head detection",
        )

    correct = [r for r in records if r["correct"]]
    is_main = process_state().is_main_process
    grid = accuracy_grid(records)
    if not correct:
        if output_dir is not None and is_main:
            plot_accuracy_grid(grid, Path(output_dir) / "niah_grid.png", title="NIAH accuracy during detection")
        raise ValueError(
            f"The model answered none of the {len(records)} NIAH samples correctly (ROUGE-1 recall > 0.5), so no "
            "retrieval score can be computed. Use shorter contexts (context_lengths) or more new tokens."
        )
    if len(correct) < len(records) / 4:
        warnings.warn(
            f"Only {len(correct)}/{len(records)} NIAH samples were answered correctly; the scores rest "
            "on few samples. Shorter contexts give more.",
            stacklevel=2,
        )
    per_head = torch.tensor([r["scores"] for r in correct]).reshape(len(correct), num_layers, num_heads)
    scores = HeadScores(
        {(layer, head): per_head[:, layer, head].tolist() for layer in range(num_layers) for head in range(num_heads)},
        num_layers=num_layers,
        num_heads=num_heads,
    )
    if output_dir is not None and is_main:
        _save_outputs(Path(output_dir), scores, grid, num_samples=len(records), num_correct=len(correct))
    return scores


def _save_outputs(out: Path, scores, grid, *, num_samples: int, num_correct: int) -> None:
    """Scores, summary and plots; nothing is rewritten when they are unchanged (a finished read-only directory)."""
    summary = {**scores.sparsity(), "num_samples": num_samples, "num_correct": num_correct}
    path = out / "head_scores.json"
    try:
        unchanged = HeadScores.load(path).scores == scores.scores
    except (OSError, ValueError):
        unchanged = False
    if (
        not write_json(out / "sparsity.json", summary)
        and unchanged
        and (out / "head_scores.png").is_file()
        and (out / "niah_grid.png").is_file()
    ):
        return
    scores.save(path)
    scores.plot(out / "head_scores.png", title=f"Retrieval scores ({num_correct}/{num_samples} samples)")
    plot_accuracy_grid(grid, out / "niah_grid.png", title="NIAH accuracy during detection")


__all__ = [
    "AUTHORS_CONTEXT_LENGTHS",
    "AUTHORS_DEPTHS",
    "DETECTION_PRESETS",
    "ArgmaxRecorder",
    "copy_scores",
    "detect_retrieval_heads",
    "last_row_argmax",
    "record_attention_argmax",
]
