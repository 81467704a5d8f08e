"""Prompt datasets for pair generation: the shipped prompt set, Hub/local datasets, and the authors' filtering.

The RetMask authors sample pairs for the first user turn of LMSYS-Chat-1M-Synth and skip a record when
(`2_Contrastive_Response_Generation/synthesize_assistant_response.py`)::

    record.get("empty_user_instruction_ja", False) or record.get("duplicate_user_instruction_ja") is not None
        or record.get("redacted", False)

`load_prompts` applies that rule (by default, for chat-log datasets), so that the same prompts survive.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .validation import check_pair_columns

logger = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt", "messages", "conversation", "conversations", "instruction", "question", "text")
"""Columns a prompt is read from, in this order, when `prompt_column` is not given."""

CHAT_LOG_COLUMNS = ("messages", "conversation", "conversations")
"""Columns holding whole conversations (of which the first user turn is kept): the filter is on for these."""

# The authors' per-record flags (LMSYS-Chat-1M-Synth; LMSYS-Chat-1M has `redacted` too).
REDACTED, EMPTY_FLAG, DUPLICATE_FLAG = "redacted", "empty_user_instruction_ja", "duplicate_user_instruction_ja"

SHIPPED_PROMPTS_DIR = Path(__file__).parent / "data" / "prompts"

MISSING_USER_TURNS = (
    "LMSYS-Chat-1M-Synth is distributed without the user turns (they are LMSYS-Chat-1M's, under its own licence). "
    "Accept the licence of lmsys/lmsys-chat-1m on the Hub, run the dataset's merge script "
    "(`scripts/exec_merge_lmsys-chat-1m_json_files.sh` in tokyotech-llm/lmsys-chat-1m-synth; see its README) to add "
    "the `conversation` column, and pass the merged .jsonl.gz file as --dataset_name."
)


def _message_text(message) -> tuple[str | None, str | None]:
    if isinstance(message, dict):
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        return (str(role).lower() if role is not None else None), content
    return None, None


def first_user_turn(value) -> str | None:
    """The prompt text of one dataset cell: a string as is, or the first user message of a conversation."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):
        role, content = _message_text(value)
        return first_user_turn(content) if role in (None, "user", "human") else None
    if isinstance(value, (list, tuple)):
        for message in value:
            role, content = _message_text(message)
            if role in ("user", "human") and isinstance(content, str) and content.strip():
                return content.strip()
    return None


def authors_skip_reason(row: dict) -> str | None:
    """Why the authors' generation script skips this record (`redacted`, `empty`, `duplicate`), or None."""
    if row.get(EMPTY_FLAG, False):
        return "empty"
    if row.get(DUPLICATE_FLAG) is not None:
        return "duplicate"
    if row.get(REDACTED, False):
        return "redacted"
    return None


DATA_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".csv", ".arrow", ".txt")


def check_dataset_name(name: str | None) -> None:
    """Refuse a `dataset_name` that can only be a local path (it starts with `.`, `/` or `~`, has a data-file suffix
    or more than one `/`, which no Hub id has) when nothing is there, before the Hub is asked (offline: a
    ConnectionError traceback) and before any model loads."""
    if not name:
        return
    text = str(name)
    path = Path(text).expanduser()
    local = text.startswith((".", "/", "~", "\\")) or path.suffix.lower() in DATA_SUFFIXES or text.count("/") > 1
    if local and not path.exists():
        raise FileNotFoundError(
            f"`dataset_name` {text!r}: no such file or directory. Give an existing prompt file "
            "(.json, .jsonl(.gz), .parquet, .csv), a directory, or a Hub dataset id."
        )


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON prompt file breaks: the first line of a JSON Lines file that is not UTF-8 or not JSON, or the
    error's line in one JSON document over several lines (no line is JSON alone); None when it all reads."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    first_bad, lines_are_json = None, False
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            if not line.strip():
                continue
            try:
                json.loads(line)
                lines_are_json = True
            except json.JSONDecodeError as e:
                first_bad = first_bad or f"line {n} is not valid JSON ({e.msg}, column {e.colno})"
            if first_bad and lines_are_json:
                return first_bad
        if first_bad is None:
            return None
        f.seek(0)
        try:
            json.loads(f.read().decode("utf-8"))
        except json.JSONDecodeError as e:
            return f"line {e.lineno} is not valid JSON ({e.msg}, column {e.colno})"
    return None


@contextmanager
def _reading(path: Path | None, name) -> Iterator[None]:
    """Errors of the `datasets` builders on a file they cannot parse (a malformed JSON line, a cut CSV, bytes that
    are not UTF-8), raised while loading or, streamed, while iterating, as one ValueError naming the file and, for
    JSON, the line."""
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except (DatasetGenerationError, ValueError) as error:
        if isinstance(error, ValueError) and not isinstance(error, UnicodeDecodeError) and path is None:
            raise
        cause = error
        for _ in range(10):  # the parser's own error, under the builder's
            cause = cause.__cause__ or cause.__context__ or cause
        json_file = path is not None and path.is_file() and ".json" in "".join(path.suffixes).lower()
        detail = (_first_bad_json_line(path) if json_file else None) or " ".join(str(cause).split())[:300]
        what = f"prompt file {path}" if path is not None and path.is_file() else f"dataset {str(name)!r}"
        fix = "one JSON object per line (.jsonl), or one JSON document (.json)" if json_file else "a well-formed file"
        raise ValueError(f"Cannot read {what}: {detail or type(cause).__name__}. Give {fix}.") from None


def _load_raw_dataset(script_args, split: str):
    from datasets import load_dataset, load_from_disk

    name = script_args.dataset_name
    check_dataset_name(name)
    path = Path(name).expanduser() if name else None
    if (
        path is not None
        and path.is_dir()
        and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    ):  # written by `save_to_disk`
        return load_from_disk(str(path))
    if path is not None and path.is_file():
        suffixes = "".join(path.suffixes).lower()
        builder = (
            "json"
            if ".json" in suffixes
            else "parquet"
            if ".parquet" in suffixes
            else "csv"
            if ".csv" in suffixes
            else None
        )
        if builder is None:
            raise ValueError(f"Cannot read prompt file {path}: use .json, .jsonl(.gz), .parquet or .csv.")
        if path.stat().st_size == 0:  # datasets' builders end in a bare StopIteration on an empty file
            raise ValueError(f"Prompt file {path} is empty; pass a file with one prompt per row.")
        with _reading(path, name):
            return load_dataset(builder, data_files=str(path), split="train", streaming=script_args.dataset_streaming)
    try:
        with _reading(None, name):
            return load_dataset(
                name,
                name=script_args.dataset_config,
                data_files=script_args.dataset_data_files,
                split=split,
                streaming=script_args.dataset_streaming,
            )
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE=1) or unreachable: say what was looked for
        raise ValueError(
            f"`dataset_name` {name!r} is neither a local file or directory nor reachable on the Hub "
            f"({' '.join(str(e).split())[:200]}). Check the path, or go online for a Hub "
            "dataset."
        ) from None


def shipped_prompts():
    """The prompt set shipped in the package (`data/prompts/*.jsonl`: general and document instructions)."""
    from datasets import Dataset

    rows = []
    for f in sorted(SHIPPED_PROMPTS_DIR.glob("*.jsonl")):
        rows.extend(json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    if not rows:
        raise ValueError(
            f"No shipped prompt set found in {SHIPPED_PROMPTS_DIR}; pass --dataset_name with your prompts."
        )
    return Dataset.from_list([r if isinstance(r, dict) else {"prompt": r} for r in rows])


def _is_synth_without_turns(name: str | None, columns) -> bool:
    return bool(columns) and (
        DUPLICATE_FLAG in columns or EMPTY_FLAG in columns or "lmsys-chat-1m-synth" in str(name or "").lower()
    )


def _prompt_column(script_args, columns) -> str:
    column = script_args.prompt_column
    if column is not None:
        if columns is not None and column not in columns:
            raise ValueError(f"--prompt_column {column!r} is not a column of the dataset (columns: {columns}).")
        return column
    candidates = [c for c in PROMPT_COLUMNS if columns is None or c in columns]
    if not candidates:
        if _is_synth_without_turns(script_args.dataset_name, columns):
            raise ValueError(
                f"No user turns in {script_args.dataset_name!r} (columns: {columns}). {MISSING_USER_TURNS}"
            )
        raise ValueError(
            f"No prompt column in {script_args.dataset_name!r} (columns: {columns}). Name it with "
            f"--prompt_column (tried {', '.join(PROMPT_COLUMNS)})."
        )
    return candidates[0]


def _first_turns(raw, column: str, *, filtered: bool, dedupe_text: bool, limit: int | None, counts: Counter):
    """First user turns of `raw[column]`, skipping the authors' flagged rows and empty turns (counted in `counts`)."""
    seen: set[str] = set()
    for row in raw:
        reason = authors_skip_reason(row) if filtered else None
        text = first_user_turn(row.get(column)) if reason is None else None
        if reason is None and text is None:
            reason = "empty"
            counts["no prompt"] += 1
        if reason is None and dedupe_text:
            reason = "duplicate" if text in seen else None
            seen.add(text)
        if reason is not None:
            counts[reason] += 1
            continue
        counts["kept"] += 1
        yield text
        if limit is not None and counts["kept"] >= limit:
            return


def load_prompts(script_args, split: str | None = None, tokenizer=None):
    """Prompt-only conversational dataset `{"prompt": [{"role": "user", "content": ...}]}` for the trainer.

    A preference dataset (prompt/chosen/rejected, e.g. written by `trl-retmask pairs`) is returned as is: the
    trainer then skips generation. Chat logs contribute their first user turn (the paper's use of LMSYS-Chat-1M-Synth).

    Filtering (`script_args.filter_prompts`, default on for chat-log columns): the authors' rule above on the
    record flags; a dataset without the duplicate flag is instead deduplicated on the first-turn text. Empty prompts
    are always dropped. `max_prompts` counts kept prompts. A log line reports what was dropped and why.
    With `enable_thinking` set (Qwen3), the prompts are rendered here through the chat template with that option,
    so that pair generation and DPO tokenization both see exactly the same prompt text.
    """
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    split = split or script_args.dataset_train_split
    raw = shipped_prompts() if script_args.dataset_name is None else _load_raw_dataset(script_args, split)
    if isinstance(raw, (DatasetDict, IterableDatasetDict)):
        if split not in raw:
            raise ValueError(f"Dataset {script_args.dataset_name!r} has no split {split!r} (has {list(raw)}).")
        raw = raw[split]
    columns = list(raw.column_names or []) if getattr(raw, "column_names", None) else None
    check_pair_columns(f"Dataset {script_args.dataset_name or 'the shipped set'!r}", columns or ())
    if columns and {"prompt", "chosen", "rejected"} <= set(columns):  # ready pairs (e.g. `trl-retmask pairs`)
        if script_args.max_prompts is not None:
            raw = raw.take(script_args.max_prompts)
        return raw
    column = _prompt_column(script_args, columns)

    filter_prompts = getattr(script_args, "filter_prompts", None)
    flagged = bool(columns) and any(c in columns for c in (REDACTED, EMPTY_FLAG, DUPLICATE_FLAG))
    filtered = (column in CHAT_LOG_COLUMNS or flagged) if filter_prompts is None else bool(filter_prompts)
    dedupe_text = filtered and not (columns and DUPLICATE_FLAG in columns)
    counts: Counter = Counter()
    local = Path(script_args.dataset_name).expanduser() if script_args.dataset_name else None
    with _reading(local if local is not None and local.is_file() else None, script_args.dataset_name):
        prompts = list(
            _first_turns(
                raw, column, filtered=filtered, dedupe_text=dedupe_text, limit=script_args.max_prompts, counts=counts
            )
        )
    source = script_args.dataset_name or "the shipped set"
    dropped = ", ".join(f"{counts[k]} {k}" for k in ("empty", "redacted", "duplicate") if counts[k]) or "none"
    if counts["no prompt"]:  # a data problem, not the authors' filtering: said where it is seen
        logger.warning(
            "%s: %d row(s) without a prompt in column %r (null, missing or blank) were dropped.",
            source,
            counts["no prompt"],
            column,
        )
    logger.info(
        "Prompts from %s (column %r, filter %s): kept %d, dropped %s.",
        source,
        column,
        "on" if filtered else "off",
        counts["kept"],
        dropped,
    )
    if not prompts:
        if (
            column in CHAT_LOG_COLUMNS
            and counts["empty"]
            and _is_synth_without_turns(script_args.dataset_name, columns)
        ):
            raise ValueError(f"No user turns in column {column!r} of {source}. {MISSING_USER_TURNS}")
        raise ValueError(
            f"No non-empty prompt in column {column!r} of {source} (dropped: {dropped}). A chat-log "
            "column needs messages with role 'user' (or 'human'); pass --prompt_column to use another."
        )
    if script_args.enable_thinking is None:
        return Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    if tokenizer is None:
        raise ValueError("`enable_thinking` renders prompts with the chat template: pass the tokenizer.")
    from .chat import render_user_prompt

    return Dataset.from_list(
        [{"prompt": render_user_prompt(tokenizer, p, enable_thinking=script_args.enable_thinking)} for p in prompts]
    )


__all__ = [
    "CHAT_LOG_COLUMNS",
    "MISSING_USER_TURNS",
    "PROMPT_COLUMNS",
    "authors_skip_reason",
    "first_user_turn",
    "load_prompts",
    "shipped_prompts",
]
