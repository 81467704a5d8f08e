"""`trl-retmask export`: save a checkpoint with the selected heads zeroed in the weights (for vLLM and other tools
that cannot run `mask_heads`' hooks).

```bash
trl-retmask export --model_name_or_path M --head_scores S --mask_top_k 10 --output_dir masked/
```

The heads' input columns of the attention output projection are zeroed and a standard checkpoint plus tokenizer is
saved. An existing non-empty `output_dir` (or the model's own directory) is refused unless `--overwrite True`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..heads import HeadSelectionArguments, format_heads
from ..masking import check_export_dir, export_masked_model
from ..models import resolve_model_path
from . import parse_stage_args, run_stage
from .common import (
    ModelStageArguments,
    OverwriteArguments,
    check_name_length,
    check_output_dir,
    load_model,
    print_json,
    scores_before_loading,
    stage_heads,
    stage_parser,
)


@dataclass
class ExportScriptArguments(OverwriteArguments, ModelStageArguments):
    r"""
    Arguments of `trl-retmask export` besides the heads (`HeadSelectionArguments`; by default the selection of
    `RetMaskConfig` from the model's bundled scores): where the checkpoint goes.

    Parameters:
        output_dir (`str`):
            Directory of the masked checkpoint.
        overwrite (`bool`, *optional*, defaults to `False`):
            Write into a non-empty `output_dir` (checkpoint files there are replaced).
    """

    output_dir: str | None = field(default=None, metadata={"help": "Directory of the masked checkpoint (required)."})

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("`output_dir` is required: the directory of the masked checkpoint (--output_dir DIR).")
        check_name_length("output_dir", self.output_dir)


def main(script_args: ExportScriptArguments, selection: HeadSelectionArguments, model_args) -> dict:
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError(
            "export writes plain weights with heads zeroed; a quantized model cannot be exported: drop "
            "--load_in_4bit/--load_in_8bit."
        )
    # Checked before loading (and again by export_masked_model, from the loaded model's config).
    source = resolve_model_path(model_args.model_name_or_path)
    check_export_dir(script_args.output_dir, script_args.overwrite, source=source)
    check_output_dir("output_dir", script_args.output_dir, read_only_ok=False)
    scores = scores_before_loading(selection, model_args)
    model, tokenizer = load_model(model_args, script_args.trust_remote_code)
    heads = stage_heads(selection, model, scores)
    path = export_masked_model(
        model, heads, script_args.output_dir, tokenizer=tokenizer, overwrite=script_args.overwrite
    )
    result = {"saved": str(path), "masked_heads": format_heads(heads), "n_heads": len(heads)}
    print_json(result)
    return result


def make_parser(subparsers=None, prog: str | None = None):
    from trl import ModelConfig

    return stage_parser(
        "export", (ExportScriptArguments, HeadSelectionArguments, ModelConfig), subparsers, prog, __doc__
    )


if __name__ == "__main__":
    sys.exit(run_stage("export", lambda: main(*parse_stage_args(make_parser()))))
