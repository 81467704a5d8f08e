"""`trl-retmask niah`: greedy needle-in-a-haystack accuracy over context length x depth, optionally with heads masked.

```bash
trl-retmask niah --model_name_or_path M --context_lengths 1024 2048
trl-retmask niah --head_scores runs/detect --mask_top_k 10 --mask_strategy random_non_retrieval
```

An answer is correct when its ROUGE-1 recall of the needle's answer exceeds 0.5. Nothing is masked unless `heads`
or a selection (`head_scores`, `mask_top_k`, `mask_threshold`) is given; the scores are checked against the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..heads import HeadSelectionArguments
from . import parse_stage_args, run_stage
from .common import (
    MASK_NOTHING,
    ModelStageArguments,
    NiahGridArguments,
    load_model,
    print_json,
    scores_before_loading,
    stage_heads,
    stage_parser,
)


@dataclass
class NiahScriptArguments(NiahGridArguments, ModelStageArguments):
    """Arguments of `trl-retmask niah` besides the heads to mask (`HeadSelectionArguments`, none by default): the
    NIAH grid."""


def main(script_args: NiahScriptArguments, selection: HeadSelectionArguments, model_args) -> dict:
    from ..niah import evaluate_niah, named_grid

    scores = scores_before_loading(selection, model_args)
    model, tokenizer = load_model(model_args, script_args.trust_remote_code)
    heads = stage_heads(selection, model, scores)
    result = evaluate_niah(
        model,
        tokenizer,
        heads=heads,
        context_lengths=script_args.context_lengths,
        depths=script_args.depths,
        needles=script_args.load_needles(),
        haystack_dir=script_args.haystack_dir,
        max_new_tokens=script_args.max_new_tokens,
        output_dir=script_args.output_dir,
        overwrite=script_args.overwrite,
    )
    summary = {
        "accuracy": result["accuracy"],
        "num_samples": result["num_samples"],
        "masked_heads": len(heads or []),
        "grid": named_grid(result["grid"]),
    }
    if script_args.output_dir:
        summary["saved"] = [str(Path(script_args.output_dir) / f) for f in ("niah_summary.json", "niah_grid.png")]
    print_json(summary)
    return summary


def make_parser(subparsers=None, prog: str | None = None):
    from trl import ModelConfig

    return stage_parser(
        "niah",
        (NiahScriptArguments, HeadSelectionArguments, ModelConfig),
        subparsers,
        prog,
        __doc__,
        defaults=MASK_NOTHING,
    )


if __name__ == "__main__":
    sys.exit(run_stage("niah", lambda: main(*parse_stage_args(make_parser()))))
