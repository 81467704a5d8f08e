"""Needle-in-a-haystack (NIAH) samples: the haystacks, the needles, the prompt and the needle's token span.

One builder for retrieval-head detection (`trl_retmask.detection`) and NIAH evaluation (`trl_retmask.niah`), so that
the haystack logic exists once. Depths are in percent of the context (0 = start). The prompt is the one of the
RetMask authors' detector (YoumiMa/RetMask, `1_Retrieval_Head_Deactivation/retrieval_head_detection.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .chat import encode_rendered, render_user_prompt
from .fingerprints import fingerprint
from .generation import check_window

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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"Needle file {path} is not UTF-8 text ({e}); save it as UTF-8 JSONL.") from None
    needles = []
    for lineno, line in enumerate(text.splitlines(), 1):
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


# --------------------------------------------------------------------------------------------- what they are
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


__all__ = [
    "DEFAULT_CONTEXT_LENGTHS",
    "DEFAULT_DEPTHS",
    "DEFAULT_HAYSTACK_DIR",
    "DEFAULT_NEEDLES",
    "NIAHSample",
    "PROMPT_TEMPLATE",
    "build_niah_sample",
    "build_niah_samples",
    "format_prompt",
    "haystack_token_ids",
    "load_haystack",
    "load_haystacks",
    "load_needles",
    "samples_fingerprint",
    "samples_info",
]
