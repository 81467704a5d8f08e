"""`trl-retmask pairs`: generate the contrastive pairs only (chosen = the model, rejected = the same model with the
selected heads masked) and write a TRL preference dataset (prompt/chosen/rejected JSONL).

```bash
trl-retmask pairs --model_name_or_path M --dataset_name prompts.jsonl --output pairs.jsonl --mask_top_k 10
```

Head selection and generation use `RetMaskConfig`'s fields and defaults (`--max_new_tokens`, `--temperature`,
`--top_p`, `--top_k`, `--generation_batch_size`, `--generation_seed`, ...), so pairs made here are the pairs the
trainer would make. They are cached where the trainer caches them (`--pairs_cache_dir`, default
`<output_dir>/_retmask_pairs`; `--cache_pairs False` for none): a rerun reads them back and an interrupted run
resumes. Under `accelerate launch` the prompts are split across processes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..distributed import process_state
from ..heads import format_heads
from . import parse_stage_args, run_stage
from .common import (
    OverwriteArguments,
    PromptDataArguments,
    check_output_dir,
    check_writable_file,
    load_model,
    print_json,
    scores_before_loading,
    stage_heads,
    stage_parser,
)


@dataclass
class PairsScriptArguments(PromptDataArguments, OverwriteArguments):
    r"""
    Arguments of `trl-retmask pairs` besides `RetMaskConfig` (heads, generation) and `ModelConfig`.

    Parameters:
        output (`str`):
            JSONL file of the kept pairs (checked before any generation).
    """

    output: str | None = field(default=None, metadata={"help": "JSONL file of the kept pairs (required)."})

    def __post_init__(self):
        if not self.output:
            raise ValueError("`output` is required: the JSONL file of the pairs (--output pairs.jsonl).")
        check_writable_file("output", self.output, self.overwrite, example="pairs.jsonl")
        super().__post_init__()


def main(script_args: PairsScriptArguments, training_args, model_args) -> dict:
    from ..pairs import generate_pairs
    from ..prompts import load_prompts

    if training_args.cache_pairs:
        check_output_dir("pairs_cache_dir", training_args.pairs_dir)
    scores = scores_before_loading(training_args, model_args)
    model, tokenizer = load_model(model_args, training_args.trust_remote_code)
    heads = stage_heads(training_args, model, scores)
    prompts = load_prompts(script_args, tokenizer=tokenizer)
    pairs = generate_pairs(  # the trainer's own settings and cache (RetMaskConfig.pair_generation_kwargs)
        model, tokenizer, prompts["prompt"], heads, **training_args.pair_generation_kwargs
    )
    pairs.stats.check_kept("the prompts")  # as the trainer: no empty output file
    result = {"output": script_args.output, "masked_heads": format_heads(heads), **pairs.stats.to_dict()}
    if process_state().is_main_process:
        write_pairs(pairs.to_dataset(), script_args.output, script_args.overwrite)
    print_json(result)
    return result


def write_pairs(dataset, output, overwrite: bool = False) -> None:
    """The pairs as JSONL at `output`, whole or not at all; a file created there while they were generated is kept
    unless `overwrite` (the check at parse time is repeated at the final rename)."""
    from ..atomic import atomic_path

    try:
        with atomic_path(output, overwrite=overwrite) as tmp:
            dataset.to_json(str(tmp), lines=True)
    except FileExistsError:
        raise ValueError(
            f"`output` {str(output)!r} was created by someone else while the pairs were generated; it "
            "is kept and the pairs are not written. Rerun with another --output (the pair cache makes "
            "it quick), or pass --overwrite True to replace that file."
        ) from None


def make_parser(subparsers=None, prog: str | None = None):
    from trl import ModelConfig

    from ..config import RetMaskConfig

    return stage_parser("pairs", (PairsScriptArguments, RetMaskConfig, ModelConfig), subparsers, prog, __doc__)


if __name__ == "__main__":
    sys.exit(run_stage("pairs", lambda: main(*parse_stage_args(make_parser()))))
