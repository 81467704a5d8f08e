"""What the stage scripts share: argument groups, model loading, the heads to mask, output checks."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import process_state
from ..heads import HeadSelectionArguments
from ..locks import check_directory
from ..models import DEFAULT_MODEL, load_model_and_tokenizer
from ..prompts import check_dataset_name
from ..scores import resolve_head_scores
from ..selection import select_heads
from ..shared_disk import check_shared_directory
from ..validation import check_int, check_number
from . import STAGES


# ---------------------------------------------------------------------------------------- argument groups
def check_list(
    name: str, values, *, minimum: float | None = None, maximum: float | None = None, integer: bool = False
) -> None:
    """A non-empty list whose items are integers / finite numbers within [minimum, maximum]."""
    if not values:
        raise ValueError(f"`{name}` needs at least one value.")
    for value in values:
        if integer:
            check_int(name, value, minimum=minimum)
        else:
            check_number(name, value, low=minimum, high=maximum)


@dataclass
class OverwriteArguments:
    r"""
    Parameters:
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace what is already there: existing output files, and records of another run in `output_dir`
            (records of the same run are resumed either way).
    """

    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace existing output files and the records of another run in output_dir "
            "(records of the same run are resumed either way)."
        },
    )


@dataclass
class ModelStageArguments:
    """Loading options that `ModelConfig` leaves to the training arguments in TRL."""

    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the model's own modeling code from the Hub (off: safer)."}
    )


@dataclass
class NiahGridArguments(OverwriteArguments):
    r"""
    The needle-in-a-haystack grid of `detect` and `niah`.

    Parameters:
        context_lengths (`list[int]`): Prompt lengths in tokens.
        depths (`list[float]`): Needle depths in percent of the context, in [0, 100].
        needles (`str`, *optional*): JSONL file of needle/question/real_needle (default: bundled).
        num_needles (`int`, *optional*): Use only the first N needles.
        haystack_dir (`str`, *optional*): Directory of .txt haystack files (default: bundled PG-19).
        max_new_tokens (`int`, *optional*, defaults to `32`): Greedy answer length.
        output_dir (`str`, *optional*): Where per-sample JSONL and results go (resumable).
    """

    context_lengths: list[int] = field(default_factory=lambda: [1024], metadata={"help": "Prompt lengths (tokens)."})
    depths: list[float] = field(
        default_factory=lambda: [10.0, 30.0, 50.0, 70.0, 90.0],
        metadata={"help": "Needle depths in percent of the context, in [0, 100]."},
    )
    needles: str | None = field(
        default=None, metadata={"help": "JSONL of needle/question/real_needle (default: bundled)."}
    )
    num_needles: int | None = field(default=None, metadata={"help": "Use only the first N needles."})
    haystack_dir: str | None = field(
        default=None, metadata={"help": "Directory of .txt haystack files (default: bundled PG-19)."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Greedy answer length."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where per-sample JSONL and results go (resumable)."}
    )

    def __post_init__(self):
        check_list("context_lengths", self.context_lengths, minimum=1, integer=True)
        check_list("depths", self.depths, minimum=0, maximum=100)
        check_int("num_needles", self.num_needles, minimum=1, optional=True)
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_output_dir("output_dir", self.output_dir)

    def load_needles(self):
        from ..niah_samples import load_needles

        needles = load_needles(self.needles)
        return needles[: self.num_needles] if self.num_needles else needles


@dataclass
class PromptDataArguments:
    r"""
    Where the prompts come from (TRL's `ScriptArguments` dataset fields plus the prompt column).

    Parameters:
        dataset_name (`str`, *optional*):
            A Hub id, a local directory (`save_to_disk` or data files) or a `.json`/`.jsonl`/`.jsonl.gz`/`.parquet`/
            `.csv` file. `None` uses the prompt set shipped with the package.
        dataset_config (`str`, *optional*): Dataset configuration name (`name` of `datasets.load_dataset`).
        dataset_data_files (`str`, *optional*): `data_files` of `datasets.load_dataset`.
        dataset_train_split (`str`, *optional*, defaults to `"train"`): Split the prompts come from.
        dataset_test_split (`str`, *optional*, defaults to `"test"`): Split used for evaluation.
        dataset_streaming (`bool`, *optional*, defaults to `False`): Stream the dataset.
        prompt_column (`str`, *optional*): Column holding the prompt (string or chat messages; `None`: auto).
        max_prompts (`int`, *optional*): Use only the first N prompts.
        enable_thinking (`bool`, *optional*): Chat-template `enable_thinking` (Qwen3: `False` disables thinking).
        filter_prompts (`bool`, *optional*): Apply the authors' filtering of chat logs (redacted, empty, duplicate
            rows); `None`: on for chat-log columns (see `trl_retmask.prompts.load_prompts`).
    """

    dataset_name: str | None = field(
        default=None, metadata={"help": "Prompt dataset (Hub id, directory or file; default: the shipped prompt set)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_data_files: str | None = field(default=None, metadata={"help": "`data_files` for `load_dataset`."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the training prompts."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split of the evaluation prompts."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the prompt (default: auto)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    enable_thinking: bool | None = field(
        default=None, metadata={"help": "Chat-template `enable_thinking` (False disables Qwen3 thinking)."}
    )
    filter_prompts: bool | None = field(
        default=None,
        metadata={
            "help": "The authors' filtering of chat logs (redacted/empty/duplicate rows); "
            "default: on for chat-log columns."
        },
    )

    def __post_init__(self):
        check_int("max_prompts", self.max_prompts, minimum=1, optional=True)
        check_dataset_name(self.dataset_name)


# --------------------------------------------------------------------------------------------- helpers
def load_model(model_args, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode on this process's device (a quantized model stays where it was loaded)."""
    model, tokenizer = load_model_and_tokenizer(model_args, trust_remote_code=trust_remote_code)
    if getattr(model, "hf_device_map", None) is None:
        model.to(process_state().device)  # under `accelerate launch`: one device per process
    return model.eval(), tokenizer


def scores_before_loading(selection: HeadSelectionArguments, model_args):
    """The retrieval scores `selection` picks from, read before the model is loaded (a wrong path fails in a
    second); None when explicit `heads` are given or nothing is masked. `select_heads` then takes them."""
    if selection.heads or not selection.masks:
        return None
    return resolve_head_scores(selection.head_scores, model_args.model_name_or_path)


def stage_heads(selection: HeadSelectionArguments, model, scores=None):
    """The heads a stage masks (`select_heads` on the loaded model); None when `selection` masks nothing."""
    return select_heads(selection, model, scores)[0] if selection.masks else None


def print_json(obj) -> None:
    """Print a stage's result on the main process only."""
    if process_state().is_main_process:
        print(json.dumps(obj, indent=2, default=str))


def check_name_length(name: str, path, value=None) -> Path:
    """Every part of `path` is a file name its file system takes (`PC_NAME_MAX` bytes, 255 on most), checked before
    any work: a long name otherwise fails only when the result is written. `value` is what the user gave, if
    `path` was derived from it (e.g. `eval --name N` -> `N.generations.rank0.jsonl`)."""
    path = Path(path).expanduser()
    existing = next((p for p in (path, *path.parents) if _exists(p)), Path.cwd())
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = str(path if value is None else value)
            raise ValueError(
                f"`{name}` {shown[:60] + '...' if len(shown) > 60 else shown!r} gives a file name of {size} bytes "
                f"({part[:30]}...), beyond the {limit} its file system takes; use a shorter name."
            )
    return path


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG and the like: not an existing path
        return False


def check_writable_file(name: str, path, overwrite: bool = False, example: str = "out.jsonl") -> Path:
    """A file path we can create: not a directory, not an existing file unless `overwrite` (it may be a checkpoint's
    own file), its parent writable, a name the file system takes; checked before any expensive work."""
    path = check_name_length(name, path)
    if path.is_dir():
        raise ValueError(f"`{name}` {str(path)!r} is a directory; give a file path such as {str(path / example)!r}.")
    if path.exists() and not overwrite:
        raise ValueError(
            f"`{name}` {str(path)!r} already exists; choose another file, or pass --overwrite True to replace it."
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"`{name}` {str(path)!r} cannot be written: {str(parent)!r} is not a writable directory.")
    return path


def check_output_dir(name: str, path, *, read_only_ok: bool = True) -> Path | None:
    """A directory this run can write into, checked before any model loads: not a file (nor under one), and either
    existing or creatable (its nearest existing parent writable). `read_only_ok`: an existing directory this process
    cannot write is let through, since a complete result there is read without writing (a read-only cache); a run
    that must write there is then refused by its result store, with one line. None stays None."""
    if path is None:
        return None
    path = check_directory(check_name_length(name, path), name)
    if path.is_dir():
        if read_only_ok or os.access(path, os.W_OK | os.X_OK):
            return path
        parent = path
    else:
        parent = next(p for p in path.parents if p.exists())
        if os.access(parent, os.W_OK | os.X_OK):
            return path
    raise ValueError(
        f"`{name}` {str(path)!r} cannot be written: {str(parent)!r} is not a writable directory. Choose "
        "a directory you can write, or change its permissions."
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (its command examples), and every field's default."""


def detects_heads(script_args, training_args) -> bool:
    """`train` detects the heads itself: `--detect_heads` and neither `--heads` nor `--head_scores` given."""
    return bool(script_args.detect_heads and not training_args.head_scores and not training_args.heads)


def check_one_disk(script_args, training_args) -> None:
    """`train`: the directories every process writes or reads back (the stores of detection and NIAH in
    `output_dir`, the pair cache) are one disk for all processes, before the model loads."""
    if script_args.niah_eval or detects_heads(script_args, training_args):
        check_shared_directory(training_args.output_dir, "`output_dir`", "pass --niah_eval False --detect_heads False")
    if training_args.cache_pairs or training_args.precompute_ref_log_probs:
        check_shared_directory(
            training_args.pairs_dir,
            "pair cache (`pairs_cache_dir`)",
            "pass --cache_pairs False (and leave --precompute_ref_log_probs off)",
        )


def stage_parser(
    name: str,
    dataclass_types,
    subparsers=None,
    prog: str | None = None,
    description: str | None = None,
    defaults: dict | None = None,
):
    """A stage's `TrlParser` (standalone, or added to a `TrlParser`'s subparsers as `trl/scripts/*.py` do); stages
    that load a model default to the embedded one; `defaults` replace fields' defaults for this stage."""
    from trl import TrlParser

    kwargs = {"description": description, "formatter_class": HelpFormatter}
    if subparsers is not None:
        parser = subparsers.add_parser(name, help=STAGES[name], dataclass_types=dataclass_types, **kwargs)
    else:
        parser = TrlParser(dataclass_types, prog=prog or f"trl-retmask {name}", **kwargs)
    if any(getattr(t, "__name__", "") == "ModelConfig" for t in dataclass_types):
        parser.set_defaults_with_config(model_name_or_path=DEFAULT_MODEL)
    if defaults:
        parser.set_defaults_with_config(**defaults)
    return parser


MASK_NOTHING = {"mask_threshold": None}
"""Defaults of the evaluation stages: nothing is masked unless `heads`, `head_scores`, `mask_threshold` or
`mask_top_k` is given."""
