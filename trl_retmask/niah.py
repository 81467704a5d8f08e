"""Needle-in-a-haystack (NIAH): sample building, greedy answering, scoring and the accuracy grid.

The sample builder is shared by retrieval-head detection (`trl_retmask.detection`) and NIAH evaluation, so that
the haystack logic exists once. Depths are in percent of the context (0 = start). The prompt is the one of the
RetMask authors' detector (YoumiMa/RetMask, `1_Retrieval_Head_Deactivation/retrieval_head_detection.py`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .chat import encode_rendered, render_user_prompt
from .distributed import process_state
from .fingerprints import fingerprint, model_fingerprint
from .generation import check_window, generate_batch, make_generation_config, model_window
from .heads import format_heads, validate_heads
from .store import run_resumable, write_json

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_HAYSTACK_DIR = DATA_DIR / "haystack"
DEFAULT_NEEDLES = DATA_DIR / "needles.jsonl"
DEFAULT_CONTEXT_LENGTHS = (512, 1024, 2048)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
PROMPT_TEMPLATE = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
"""The RetMask authors' NIAH prompt (the user turn of chat models; plain-text models get the same text)."""


# ----------------------------------------------------------------------------------------------------- data files
def _read_text(path: Path, tokenizer=None, max_tokens: int | None = None) -> str:
    """The file, or with `max_tokens` a beginning of it that still holds more than `max_tokens` tokens."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if tokenizer is None or max_tokens is None:
            return f.read().strip()
        text = f.read(16 * max_tokens + 1000)  # English text runs ~4 characters per token
        if f.read(1) and len(haystack_token_ids(tokenizer, text.strip())) < max_tokens + 2:
            f.seek(0)  # denser text than assumed: the whole file, as without a limit
            text = f.read()
    return text.strip()


def load_haystacks(haystack_dir=None, *, tokenizer=None, max_tokens: int | None = None) -> list[str]:
    """The non-empty `*.txt` files of `haystack_dir` (default: the bundled PG-19 excerpts), sorted by name. With
    `tokenizer` and `max_tokens`, only a beginning of each that holds more than `max_tokens` tokens (samples use a
    haystack's first tokens, so a large directory is neither read nor tokenised whole)."""
    directory = Path(haystack_dir) if haystack_dir is not None else DEFAULT_HAYSTACK_DIR
    if not directory.is_dir():
        raise ValueError(f"Haystack directory {directory} does not exist; pass a directory of .txt files.")
    texts = [_read_text(p, tokenizer, max_tokens) for p in sorted(directory.glob("*.txt"))]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(
            f"Haystack directory {directory} holds no text (no non-empty *.txt files); "
            "add plain-text files or omit it to use the bundled PG-19 haystack."
        )
    return texts


def load_haystack(haystack_dir=None) -> str:
    """All haystack files of `haystack_dir` joined into one text (see `load_haystacks`)."""
    return "\n\n".join(load_haystacks(haystack_dir))


def load_needles(path=None) -> list[dict]:
    """Needle records (`needle`, `question`, `real_needle` = the expected answer) from a JSONL file."""
    path = Path(path) if path is not None else DEFAULT_NEEDLES
    if not path.is_file():
        raise ValueError(f"Needle file {path} does not exist; pass a JSONL file of needle/question/real_needle.")
    needles = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e}); each line must be one needle record.") from e
        missing = {"needle", "question"} - record.keys()
        if missing:
            raise ValueError(
                f"{path}:{lineno} lacks {sorted(missing)}; each line needs needle, question and "
                "real_needle (the answer; defaults to the needle)."
            )
        record.setdefault("real_needle", record["needle"])
        needles.append(record)
    if not needles:
        raise ValueError(f"Needle file {path} is empty.")
    return needles


def _as_needles(needles) -> list[dict]:
    if needles is None or isinstance(needles, (str, Path)):
        return load_needles(needles)
    needles = [dict(n) for n in needles]
    for n in needles:
        if "needle" not in n or "question" not in n:
            raise ValueError(f"Needle {n} needs 'needle' and 'question' keys (and 'real_needle', the answer).")
        n.setdefault("real_needle", n["needle"])
    return needles


# --------------------------------------------------------------------------------------------------- the samples
@dataclass
class NIAHSample:
    """One prompt: `input_ids[needle_start:needle_end]` are the inserted needle's tokens and
    `input_ids[answer_start:answer_end]` those of its answer part (`real_needle`), the span detection scores.
    `answer` is the ROUGE reference (`real_needle`); the answer span is None when it does not occur in the needle."""

    input_ids: list[int]
    needle_start: int
    needle_end: int
    answer: str
    question: str
    needle: str
    context_length: int
    depth: float
    needle_index: int = 0
    answer_start: int | None = None
    answer_end: int | None = None

    @property
    def key(self) -> str:
        """Identifies the sample in result files (used to resume)."""
        return f"{self.context_length}-{self.depth:g}-{self.needle_index}"

    @property
    def needle_span(self) -> tuple[int, int]:
        return self.needle_start, self.needle_end

    @property
    def answer_span(self) -> tuple[int, int] | None:
        """The tokens of `real_needle` in the prompt: the copy span of retrieval-head detection."""
        return None if self.answer_start is None else (self.answer_start, self.answer_end)


def format_prompt(tokenizer, context: str, question: str) -> str:
    """The authors' NIAH prompt: the user turn through the chat template (a template that knows `enable_thinking`,
    e.g. Qwen3's, gets `enable_thinking=False`, as they ran it); plain-text models get the same text."""
    content = PROMPT_TEMPLATE.format(context=context, question=question)
    kwargs = {"enable_thinking": False} if "enable_thinking" in str(getattr(tokenizer, "chat_template", "")) else {}
    return render_user_prompt(tokenizer, content, **kwargs)


def _encode(tokenizer, text: str, offsets: bool = False):
    return encode_rendered(tokenizer, text, return_offsets_mapping=offsets)


@lru_cache(maxsize=8)
def haystack_token_ids(tokenizer, haystack: str) -> tuple[int, ...]:
    """The haystack tokenised once per (tokenizer, text); building many samples reuses it."""
    return tuple(tokenizer(haystack, add_special_tokens=False)["input_ids"])


def _answer_chars(needle: str, answer: str) -> tuple[int, int] | None:
    """Character range of `answer` inside `needle` (exact, else case-insensitive: the bundled third needle's
    answer starts with "Because" where the needle says "because"); None when it does not occur."""
    start = needle.find(answer)
    if start < 0:
        start = needle.lower().find(answer.lower())
    return None if start < 0 or not answer else (start, start + len(answer))


def _token_span(offsets, prompt: str, char_start: int, char_end: int) -> tuple[int, int] | None:
    """The tokens covering the non-blank characters of `prompt[char_start:char_end]`. A token merged across the
    boundary (e.g. the final "." with a following "</") belongs to the span, as in the authors' window search."""
    inside = [
        i
        for i, (s, e) in enumerate(offsets)
        if e > s and s < char_end and e > char_start and prompt[max(s, char_start) : min(e, char_end)].strip()
    ]
    return (inside[0], inside[-1] + 1) if inside else None


def _search_ids(tokenizer, ids: list[int], text: str) -> tuple[int, int] | None:
    """Fallback without character offsets (slow tokenizers): the first exact occurrence of `text`'s ids."""
    for variant in (" " + text, text):
        target = tokenizer(variant, add_special_tokens=False)["input_ids"]
        for i in range(len(ids) - len(target) + 1):
            if ids[i : i + len(target)] == target:
                return i, i + len(target)
    return None


def _locate_needle(tokenizer, prompt: str, needle: str, answer: str | None = None):
    """Prompt ids, the token span of `needle` and that of `answer` inside it (None when `answer` is not in the
    needle or not given); by character offsets, else by searching token ids."""
    char_start = prompt.find(needle)
    if char_start < 0:
        raise ValueError("The needle does not occur verbatim in the rendered prompt (the chat template changed it).")
    answer_chars = _answer_chars(needle, answer) if answer else None
    try:
        enc = _encode(tokenizer, prompt, offsets=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # slow tokenizers have no offsets
        ids, offsets = _encode(tokenizer, prompt)["input_ids"], None
    if offsets is not None:
        span = _token_span(offsets, prompt, char_start, char_start + len(needle))
        answer_span = (
            None
            if answer_chars is None
            else _token_span(offsets, prompt, char_start + answer_chars[0], char_start + answer_chars[1])
        )
    else:
        span = _search_ids(tokenizer, ids, needle)
        answer_span = (
            None if answer_chars is None else _search_ids(tokenizer, ids, needle[answer_chars[0] : answer_chars[1]])
        )
    if span is None or (answer_chars is not None and answer_span is None):
        raise ValueError(
            "The needle was not found as tokens of the tokenised prompt: the tokenizer merged it with "
            "the neighbouring text. Start and end the needle with a complete word and punctuation, or "
            "use another haystack."
        )
    return ids, span, answer_span


def build_niah_sample(
    tokenizer,
    haystack: str,
    needle: dict,
    context_length: int,
    depth: float,
    *,
    max_length: int | None = None,
    needle_index: int = 0,
    length_buffer: int | None = None,
) -> NIAHSample:
    """A NIAH prompt with `needle` at `depth` percent of the context, moved back to the previous sentence end.

    Lengths (one definition per value of `length_buffer`):
    - `length_buffer=None` (NIAH evaluation): `context_length` is the whole prompt, chat template and question
      included, give or take a few merged tokens.
    - `length_buffer=B` (detection, the authors' semantics with B=200): `context_length` counts the context
      (haystack + needle) plus B tokens of buffer, so the context is `context_length - B` tokens; at or below
      `B + len(needle)` the context is the needle alone.
    The haystack is its beginning, repeated when too short. `max_length` (the model's window) refuses longer prompts.
    """
    if not 0 <= depth <= 100:
        raise ValueError(f"depth is a percentage of the context, in [0, 100]; got {depth}.")
    text, question = needle["needle"].strip(), needle["question"].strip()
    if length_buffer is None:
        if context_length < 1:
            raise ValueError(f"context_length must be positive, got {context_length}.")
        if max_length is not None and context_length > max_length:
            raise ValueError(
                f"context_length {context_length} exceeds the model's window of {max_length} tokens; "
                "use shorter contexts."
            )
        overhead = len(_encode(tokenizer, format_prompt(tokenizer, "", question))["input_ids"])
        overhead += len(tokenizer(" " + text + " ", add_special_tokens=False)["input_ids"])
        n_hay = context_length - overhead
        if n_hay < 0:
            raise ValueError(
                f"The needle, question and prompt template take {overhead} tokens, more than "
                f"context_length={context_length}; use a longer context or a shorter needle."
            )
    else:
        if context_length < 0 or length_buffer < 0:
            raise ValueError(f"context_length and length_buffer must be >= 0, got {context_length}, {length_buffer}.")
        n_hay = max(0, context_length - length_buffer - len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    hay_ids = haystack_token_ids(tokenizer, haystack)
    if not hay_ids:
        raise ValueError("The haystack tokenises to no tokens; pass a haystack with text.")
    if n_hay > len(hay_ids):  # longer contexts than the haystack repeat it
        hay_ids = hay_ids * math.ceil(n_hay / len(hay_ids))
    hay_ids = hay_ids[:n_hay]
    cut = round(n_hay * depth / 100)
    if cut < n_hay:  # back to the previous sentence end ('.' token), as the original NIAH code intends
        while cut > 0 and not tokenizer.decode([hay_ids[cut - 1]]).rstrip().endswith("."):
            cut -= 1
    before = tokenizer.decode(hay_ids[:cut], skip_special_tokens=True)
    after = tokenizer.decode(hay_ids[cut:], skip_special_tokens=True)
    context = " ".join(part for part in (before.strip(), text, after.strip()) if part)
    ids, (start, end), answer_span = _locate_needle(
        tokenizer, format_prompt(tokenizer, context, question), text, needle["real_needle"]
    )
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"The prompt of context_length {context_length} has {len(ids)} tokens, more than the "
            f"model's window of {max_length}; use shorter contexts."
        )
    answer_start, answer_end = answer_span if answer_span is not None else (None, None)
    return NIAHSample(
        input_ids=list(ids),
        needle_start=start,
        needle_end=end,
        answer=needle["real_needle"],
        question=question,
        needle=text,
        context_length=context_length,
        depth=float(depth),
        needle_index=needle_index,
        answer_start=answer_start,
        answer_end=answer_end,
    )


def build_niah_samples(
    tokenizer,
    context_lengths: Iterable[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Iterable[float] = DEFAULT_DEPTHS,
    needles=None,
    haystack_dir=None,
    *,
    max_length: int | None = None,
    max_new_tokens: int = 0,
    length_buffer: int | None = None,
    haystack_per_needle: bool | None = False,
) -> list[NIAHSample]:
    """The grid context length x depth x needle; errors on bad input come before any model work.

    `haystack_per_needle`: needle i reads haystack file i (cycling), as the authors' needle i reads their part{i};
    False joins the files into one haystack; None picks per-needle when the directory holds several files.
    `length_buffer`: see `build_niah_sample`.
    """
    needles = _as_needles(needles)
    context_lengths, depths = list(context_lengths), list(depths)
    if not context_lengths or not depths:
        raise ValueError("Give at least one context length and one depth.")
    haystacks = load_haystacks(haystack_dir, tokenizer=tokenizer, max_tokens=max(context_lengths))
    if max_length is not None and length_buffer is None and max(context_lengths) + max_new_tokens > max_length:
        raise ValueError(
            f"Context length {max(context_lengths)} + {max_new_tokens} new tokens exceeds the model's "
            f"window of {max_length} tokens; use shorter contexts."
        )
    if haystack_per_needle is None:
        haystack_per_needle = len(haystacks) > 1
    joined = "\n\n".join(haystacks)

    def haystack(i: int) -> str:
        return haystacks[i % len(haystacks)] if haystack_per_needle else joined

    samples = [
        build_niah_sample(
            tokenizer, haystack(i), n, length, depth, max_length=max_length, needle_index=i, length_buffer=length_buffer
        )
        for length in context_lengths
        for depth in depths
        for i, n in enumerate(needles)
    ]
    check_window(
        [len(s.input_ids) for s in samples], max_new_tokens, max_length, what="sample", fix="use shorter contexts"
    )
    return samples


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
def samples_fingerprint(samples: Sequence[NIAHSample]) -> str:
    """What the samples are: every prompt's tokens (haystack, needle, question, template), span and answer."""
    return fingerprint(
        samples=[[s.key, s.input_ids, s.needle_start, s.needle_end, s.answer, s.answer_span] for s in samples]
    )


def samples_info(model, samples: Sequence[NIAHSample]) -> dict:
    """A few readable facts stored beside a fingerprint, to name what changed when a directory is refused."""
    return {
        "model": getattr(model, "name_or_path", ""),
        "needles": sorted({s.needle for s in samples}),
        "samples": samples_fingerprint(samples)[:16],
        "num_samples": len(samples),
    }


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
