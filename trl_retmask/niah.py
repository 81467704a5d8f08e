"""Needle-in-a-haystack (NIAH) evaluation: greedy answering, scoring, the resumable run and the accuracy grid.

The samples are built in `trl_retmask.niah_samples` (shared with retrieval-head detection); their names are
re-exported here, as they were before the split.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .distributed import process_state
from .fingerprints import fingerprint, model_fingerprint
from .generation import generate_batch, make_generation_config, model_window
from .heads import format_heads, validate_heads
from .niah_samples import (
    PROMPT_TEMPLATE,
    NIAHSample,
    build_niah_sample,
    build_niah_samples,
    format_prompt,
    haystack_token_ids,
    load_haystack,
    load_haystacks,
    load_needles,
    samples_fingerprint,
    samples_info,
)
from .store import run_resumable, write_json

# ----------------------------------------------------------------------------------------------------- answering
_SCORER = None


def rouge1_recall(reference: str, prediction: str) -> float:
    """ROUGE-1 recall of the reference words in the prediction (the `rouge-score` package; no downloads)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return _SCORER.score(reference, prediction)["rouge1"].recall


CORRECT_THRESHOLD = 0.5
"""A sample is answered correctly when the ROUGE-1 recall of its answer is above this (the retrieval-head paper)."""


def score_answer(reference: str, prediction: str) -> dict:
    """`{"rouge1_recall", "correct"}` of a response: the one place the correctness threshold is applied."""
    recall = rouge1_recall(reference, prediction)
    return {"rouge1_recall": recall, "correct": recall > CORRECT_THRESHOLD}


def is_correct(reference: str, prediction: str) -> bool:
    """The retrieval-head paper's success criterion: ROUGE-1 recall of the answer above `CORRECT_THRESHOLD`."""
    return score_answer(reference, prediction)["correct"]


def niah_generation_config(model, max_new_tokens: int, *, stop_at_eos: bool = True):
    """Greedy decoding of up to `max_new_tokens`; `stop_at_eos=False` runs all of them, as the authors' detector
    does (an empty EOS list: `generate` refills None from the model's defaults)."""
    config = make_generation_config(model, max_new_tokens)
    if not stop_at_eos:
        config.eos_token_id = []
    return config


def generate_answer(
    model, tokenizer, sample: NIAHSample, max_new_tokens: int = 48, heads=None, *, stop_at_eos: bool = True
) -> list[int]:
    """Greedy continuation of the prompt (a batch of one, `heads` masked when given); the new token ids."""
    config = niah_generation_config(model, max_new_tokens, stop_at_eos=stop_at_eos)
    return generate_batch(model, tokenizer, [sample.input_ids], config, heads=heads)[0]


# --------------------------------------------------------------------------------- resumable runs over samples
def run_niah_samples(
    samples: Sequence[NIAHSample],
    fn: Callable[[NIAHSample], dict],
    output_dir=None,
    *,
    name: str,
    fingerprint: str = "",
    info: dict | None = None,
    overwrite: bool = False,
    fields: Sequence[str] = ("response", "rouge1_recall", "correct"),
    verify: Callable[[NIAHSample, dict], bool] | None = None,
    desc: str = "NIAH",
    outputs: Sequence[str] = (),
) -> list[dict]:
    """`run_resumable` over NIAH samples: each record holds the sample's grid cell, `fn(sample)`, and is reused on
    resume only if it names this sample's cell and prompt length and has `fields` (and passes `verify`); `outputs`:
    the files made from the records (see `run_resumable`)."""

    def cell(s: NIAHSample) -> dict:
        return {
            "context_length": s.context_length,
            "depth": s.depth,
            "needle_index": s.needle_index,
            "prompt_tokens": len(s.input_ids),
        }

    def valid(s: NIAHSample, record: dict) -> bool:
        return (
            all(record.get(k) == v for k, v in cell(s).items())
            and all(f in record for f in fields)
            and (verify is None or verify(s, record))
        )

    return run_resumable(
        samples,
        lambda s: {**cell(s), **fn(s)},
        output_dir,
        name=name,
        fingerprint=fingerprint,
        verify=valid,
        info=info,
        overwrite=overwrite,
        outputs=outputs,
        desc=desc,
    )


# -------------------------------------------------------------------------------------------------- evaluation
def accuracy_grid(records: Iterable[dict]) -> dict[tuple[int, float], float]:
    """Mean correctness per (context length, depth)."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for r in records:
        cells.setdefault((r["context_length"], r["depth"]), []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def plot_accuracy_grid(grid: dict[tuple[int, float], float], path, title: str | None = None) -> None:
    """Heatmap of NIAH accuracy: depth (rows) x context length (columns)."""
    import numpy as np

    from trl_retmask.plotting import new_figure, save_figure

    lengths = sorted({k[0] for k in grid})
    depths = sorted({k[1] for k in grid})
    values = np.full((len(depths), len(lengths)), np.nan)
    for (length, depth), acc in grid.items():
        values[depths.index(depth), lengths.index(length)] = acc
    fig, ax = new_figure(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title or "Needle-in-a-haystack accuracy")
    save_figure(fig, path)


def evaluate_niah(
    model,
    tokenizer,
    heads=None,
    context_lengths: Iterable[int] = (1024,),
    depths: Iterable[float] = (10, 30, 50, 70, 90),
    needles=None,
    haystack_dir=None,
    max_new_tokens: int = 48,
    output_dir=None,
    samples: Sequence[NIAHSample] | None = None,
    overwrite: bool = False,
) -> dict:
    """NIAH accuracy with `heads` (list of (layer, head)) masked: per (length, depth) and overall.

    `context_lengths` are whole-prompt lengths over the joined haystack files (`build_niah_sample` with
    `length_buffer=None`); answers are greedy and stop at EOS.

    Returns `{"accuracy", "grid", "num_samples", "records"}`. With `output_dir`, per-sample JSONL (resumable; a
    directory made from another model, other samples or settings is refused unless `overwrite=True`),
    `niah_summary.json` and `niah_grid.png` are written there.
    """
    heads = validate_heads(model, heads) if heads else []
    if samples is None:
        samples = build_niah_samples(
            tokenizer,
            context_lengths,
            depths,
            needles,
            haystack_dir,
            max_length=model_window(model),
            max_new_tokens=max_new_tokens,
        )

    def answer(sample: NIAHSample) -> dict:
        new = generate_answer(model, tokenizer, sample, max_new_tokens, heads=heads)
        response = tokenizer.decode(new, skip_special_tokens=True)
        return {"response": response, **score_answer(sample.answer, response)}

    fp = ""
    if output_dir is not None:
        fp = fingerprint(
            kind="niah",
            model=model_fingerprint(model),
            samples=samples_fingerprint(samples),
            generation=niah_generation_config(model, max_new_tokens),
            heads=heads,
        )
    info = {**samples_info(model, samples), "heads": format_heads(heads), "max_new_tokens": max_new_tokens}
    records = run_niah_samples(
        samples,
        answer,
        output_dir,
        name="niah",
        fingerprint=fp,
        info=info,
        overwrite=overwrite,
        outputs=("niah_summary.json", "niah_grid.png"),
        desc="NIAH eval",
    )
    grid = accuracy_grid(records)
    accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
    if output_dir is not None and process_state().is_main_process:
        summary = {
            "accuracy": accuracy,
            "num_samples": len(records),
            "heads": format_heads(heads),
            "grid": named_grid(grid),
        }
        png = Path(output_dir) / "niah_grid.png"
        if write_json(Path(output_dir) / "niah_summary.json", summary) or not png.is_file():
            plot_accuracy_grid(grid, png, title=f"NIAH accuracy ({len(heads)} heads masked)")
    if not records:
        warnings.warn("No NIAH samples were evaluated.", stacklevel=2)
    return {"accuracy": accuracy, "grid": grid, "num_samples": len(records), "records": records}


def named_grid(grid: dict) -> dict[str, float]:
    """An accuracy grid keyed `"LENGTH@DEPTH"` (e.g. `"1024@50"`), as the summaries save and print it."""
    return {f"{length}@{depth:g}": value for (length, depth), value in grid.items()}


__all__ = [
    "CORRECT_THRESHOLD",
    "NIAHSample",
    "PROMPT_TEMPLATE",
    "accuracy_grid",
    "build_niah_sample",
    "build_niah_samples",
    "evaluate_niah",
    "format_prompt",
    "generate_answer",
    "haystack_token_ids",
    "is_correct",
    "load_haystack",
    "load_haystacks",
    "load_needles",
    "named_grid",
    "niah_generation_config",
    "plot_accuracy_grid",
    "rouge1_recall",
    "run_niah_samples",
    "samples_fingerprint",
    "samples_info",
    "score_answer",
]
