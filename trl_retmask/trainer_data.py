"""What datasets `RetMaskTrainer` takes (prompts, or chosen/rejected pairs; eval splits) and how it reads back the
pairs it saved for every process (whole, or not at all)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from .validation import check_pair_columns


def saved_dataset(path: Path, num_rows: int) -> Dataset | None:
    """The dataset saved at `path` when every file it needs reads back (metadata and every row of every `.arrow`
    file, `num_rows` of them), else None."""
    from datasets import load_from_disk

    if not (path / "state.json").is_file():
        return None
    try:
        dataset = load_from_disk(str(path))
        if not isinstance(dataset, Dataset) or len(dataset) != num_rows:
            return None
        dataset.data.table.validate(full=True)  # reads the memory-mapped columns to their last byte
        return dataset
    except Exception:  # noqa: BLE001 - JSONDecodeError, ArrowInvalid, FileNotFoundError, ...: a damaged copy
        return None


def eval_splits(eval_dataset) -> dict:
    if eval_dataset is None:
        return {}
    return eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}


def check_columns(name: str, dataset) -> None:
    """A prompt column (prompt-only data) or chosen/rejected (preference data; TRL extracts a shared prompt)."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        columns = list(next(iter(dataset)).keys())
    check_pair_columns(f"`{name}`", columns)
    if "prompt" not in columns and not {"chosen", "rejected"} <= set(columns):
        raise ValueError(
            f"`{name}` has columns {list(columns)}, but RetMask needs a `prompt` column (prompts to complete with "
            "pairs) or `chosen`/`rejected` columns (preference pairs). Rename the prompt column, e.g. "
            "`dataset.rename_column('question', 'prompt')`."
        )
