"""`trl-retmask eval`: the offline long-context suite (synthetic recall, passage re-ranking, citation) per context
length, optionally with heads masked.

```bash
trl-retmask eval --model_name_or_path M --lengths 1024 2048 --output_dir runs/eval
trl-retmask eval --mask_top_k 10 --mask_strategy random_non_retrieval --name control
```

Saves `<name>.json` and `<name>.png` in `--output_dir`. Nothing is masked unless `heads` or a selection is given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import process_state
from ..generation import GENERATION_BACKENDS
from ..generation.vllm import require_vllm
from ..heads import HeadSelectionArguments, format_heads
from ..validation import check_choice, check_int, check_seed
from . import parse_stage_args, run_stage
from .common import (
    MASK_NOTHING,
    ModelStageArguments,
    OverwriteArguments,
    check_list,
    check_name_length,
    check_output_dir,
    load_model,
    scores_before_loading,
    stage_heads,
    stage_parser,
)


@dataclass
class EvalScriptArguments(OverwriteArguments, ModelStageArguments):
    r"""
    Arguments of `trl-retmask eval` besides the heads to mask (`HeadSelectionArguments`, none by default).

    Parameters:
        lengths (`list[int]`, *optional*, defaults to `[1024, 2048]`): Context lengths (tokens).
        categories (`list[str]`, *optional*): Categories to run (default: all).
        n_per_task (`int`, *optional*, defaults to `4`): Samples per task and length.
        eval_seed (`int`, *optional*, defaults to `0`): Seed of the suite's samples (not of the head draw).
        batch_size (`int`, *optional*, defaults to `4`): Generation batch size.
        output_dir (`str`, *optional*): Save `<name>.json` and `<name>.png` here.
        name (`str`, *optional*): Name of the result, a plain file name (default: the model's name).
        generation_backend (`str`, *optional*, defaults to `"generate"`): How the answers are decoded: `"generate"`,
            `"vllm"` (one colocated vLLM engine, the heads masked inside it; `RetMaskConfig`'s default engine
            settings), `"static"` or `"auto"` (see `RetMaskConfig.generation_backend`).
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048], metadata={"help": "Context lengths (tokens)."})
    categories: list[str] | None = field(default=None, metadata={"help": "Categories to run (default: all)."})
    n_per_task: int = field(default=4, metadata={"help": "Samples per task and length."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the suite's samples (not of the head draw)."})
    batch_size: int = field(default=4, metadata={"help": "Generation batch size."})
    output_dir: str | None = field(default=None, metadata={"help": "Save <name>.json and <name>.png here."})
    name: str | None = field(
        default=None, metadata={"help": "Name of the result (a plain file name; default: the model's name)."}
    )

    generation_backend: str = field(
        default="generate",
        metadata={"help": "How the answers are decoded.", "choices": list(GENERATION_BACKENDS)},
    )

    def __post_init__(self):
        check_choice("generation_backend", self.generation_backend, GENERATION_BACKENDS)
        if self.generation_backend == "vllm":
            require_vllm("`generation_backend='vllm'`", "leave `generation_backend` at 'generate'")
        check_list("lengths", self.lengths, minimum=1, integer=True)
        if self.categories is not None and not self.categories:
            raise ValueError("`categories` needs at least one category (or leave it unset for all).")
        check_int("n_per_task", self.n_per_task, minimum=1)
        check_seed("eval_seed", self.eval_seed)
        check_int("batch_size", self.batch_size, minimum=1)
        check_output_dir("output_dir", self.output_dir)
        if self.name is not None:
            check_file_name("name", self.name, self.output_dir)
            check_result_files(self.output_dir, self.name, self.overwrite)


LONGEST_RESULT_SUFFIX = ".generations.rank99999.jsonl"
"""The longest name the suite derives from `name` (its per-process records), for the file-name length check."""


def check_file_name(field_name: str, name: str, output_dir=None) -> None:
    """A plain file name: no directory part, not `.`/`..`, so results stay inside `output_dir`; short enough that
    every file named after it (`LONGEST_RESULT_SUFFIX`) can be written."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name:
        raise ValueError(f"`{field_name}` must be a plain file name (no directory part), got {name!r}.")
    check_name_length(field_name, Path(output_dir or ".") / f"{name}{LONGEST_RESULT_SUFFIX}", value=name)


def check_result_files(output_dir, name: str, overwrite: bool = False) -> None:
    """Refuse to replace `<name>.json`/`<name>.png` that no suite run with that name wrote (e.g. `--name config`
    in a model directory would replace its config.json)."""
    if output_dir is None or overwrite:
        return
    out = Path(output_dir).expanduser()
    if (out / f"{name}.generations.meta.json").is_file():
        return  # this suite's own results: resumed or redone under the runner's fingerprint policy
    existing = [str(out / f"{name}{suffix}") for suffix in (".json", ".png") if (out / f"{name}{suffix}").exists()]
    if existing:
        raise ValueError(
            f"{', '.join(existing)} already exist(s) and no suite run named {name!r} wrote them; choose "
            "another `name` or `output_dir`, or pass --overwrite True."
        )


def main(script_args: EvalScriptArguments, selection: HeadSelectionArguments, model_args) -> dict:
    from ..evaluation import evaluate_long_context, format_table

    scores = scores_before_loading(selection, model_args)
    model, tokenizer = load_model(model_args, script_args.trust_remote_code)
    heads = stage_heads(selection, model, scores)
    name = script_args.name or Path(str(model_args.model_name_or_path).rstrip("/")).name
    check_file_name("name", name, script_args.output_dir)
    check_result_files(script_args.output_dir, name, script_args.overwrite)
    result = evaluate_long_context(
        model,
        tokenizer,
        lengths=script_args.lengths,
        categories=script_args.categories,
        n_per_task=script_args.n_per_task,
        heads=heads,
        seed=script_args.eval_seed,
        batch_size=script_args.batch_size,
        output_dir=script_args.output_dir,
        name=name,
        overwrite=script_args.overwrite,
        generation_backend=script_args.generation_backend,
    )
    if process_state().is_main_process:
        print(format_table({name: result}))
        if heads:
            print(f"(masked heads: {','.join(format_heads(heads))})")
        if script_args.output_dir:
            saved = [p for p in (Path(script_args.output_dir) / f"{name}{s}" for s in (".json", ".png")) if p.is_file()]
            print(f"(saved: {', '.join(map(str, saved))})")
    return result


def make_parser(subparsers=None, prog: str | None = None):
    from trl import ModelConfig

    return stage_parser(
        "eval",
        (EvalScriptArguments, HeadSelectionArguments, ModelConfig),
        subparsers,
        prog,
        __doc__,
        defaults=MASK_NOTHING,
    )


if __name__ == "__main__":
    sys.exit(run_stage("eval", lambda: main(*parse_stage_args(make_parser()))))
