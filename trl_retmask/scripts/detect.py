"""`trl-retmask detect`: score every head by how often its attention argmax copies the needle token being generated.

```bash
trl-retmask detect --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --output_dir runs/detect
trl-retmask detect --config detect.yaml          # any field below, as YAML
```

Writes `retmask_head_scores.json` (pass the directory as `--head_scores` to the other stages), `head_scores.json`,
a heatmap, the sparsity summary and a NIAH accuracy grid to `--output_dir`; an interrupted run resumes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import process_state
from ..heads import format_head
from ..scores import HEAD_SCORES_FILE
from . import parse_stage_args, run_stage
from .common import (
    ModelStageArguments,
    NiahGridArguments,
    check_writable_file,
    load_model,
    print_json,
    stage_parser,
)


@dataclass
class DetectScriptArguments(NiahGridArguments, ModelStageArguments):
    r"""
    Arguments of `trl-retmask detect` (the grid fields of `NiahGridArguments`, with detection's defaults).

    Parameters:
        save (`str`, *optional*):
            Also write the score JSON to this file.
        show (`int`, *optional*, defaults to `10`):
            Print the top N heads.
    """

    # The authors' grid and budget (detection.DETECTION_PRESETS["authors"]), but for their length 0 (the needle
    # alone), which NiahGridArguments' check refuses.
    context_lengths: list[int] = field(
        default_factory=lambda: [
            263,
            526,
            789,
            1053,
            1316,
            1579,
            1842,
            2105,
            2368,
            2632,
            2895,
            3158,
            3421,
            3684,
            3947,
            4211,
            4474,
            4737,
            5000,
        ],
        metadata={"help": "Context lengths (tokens): haystack + needle + a 200-token buffer, as the authors count."},
    )
    depths: list[float] = field(
        default_factory=lambda: [0.0, 11.0, 22.0, 33.0, 44.0, 56.0, 67.0, 78.0, 89.0, 100.0],
        metadata={"help": "Needle depths in percent of the context, in [0, 100]."},
    )
    max_new_tokens: int = field(default=50, metadata={"help": "Greedy tokens per sample (no EOS stop)."})
    save: str | None = field(default=None, metadata={"help": "Also write the score JSON to this file."})
    show: int = field(default=10, metadata={"help": "Print the top N heads."})

    def __post_init__(self):
        if self.show < 0:
            raise ValueError(f"`show` must be >= 0, got {self.show}.")
        super().__post_init__()
        if self.save is not None:
            check_writable_file("save", self.save, self.overwrite, example="head_scores.json")
        if self.output_dir is not None:
            check_scores_dir(self.output_dir, self.overwrite)


def check_scores_dir(output_dir, overwrite: bool = False) -> None:
    """Refuse an `output_dir` whose `retmask_head_scores.json` this detection did not write (a trained RetMask model
    keeps there the scores it was trained with): detection would replace it."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"`output_dir` {str(out)!r} is a file; give a directory.")
    if (out / HEAD_SCORES_FILE).is_file() and not (out / "detect.meta.json").is_file() and not overwrite:
        raise ValueError(
            f"`output_dir` {str(out)!r} holds a {HEAD_SCORES_FILE} that detection did not write (e.g. the "
            "scores a RetMask model was trained with); detecting there would replace it. Choose another "
            "directory, or pass --overwrite True."
        )


def main(script_args: DetectScriptArguments, model_args) -> dict:
    from ..detection import detect_retrieval_heads

    model, tokenizer = load_model(model_args, script_args.trust_remote_code)
    start = time.perf_counter()
    scores = detect_retrieval_heads(
        model,
        tokenizer,
        context_lengths=script_args.context_lengths,
        depths=script_args.depths,
        needles=script_args.load_needles(),
        haystack_dir=script_args.haystack_dir,
        max_new_tokens=script_args.max_new_tokens,
        output_dir=script_args.output_dir,
        overwrite=script_args.overwrite,
    )
    saved = []
    if process_state().is_main_process:
        if script_args.output_dir:
            saved.append(str(scores.save_pretrained(script_args.output_dir)))
        if script_args.save:
            saved.append(str(scores.save(script_args.save)))
    result = {
        "saved": saved,
        "seconds": round(time.perf_counter() - start, 1),
        "top_heads": {format_head(h): round(s, 4) for h, s in scores.ranked()[: script_args.show]},
        "sparsity": scores.sparsity(),
    }
    print_json(result)
    return result


def make_parser(subparsers=None, prog: str | None = None):
    from trl import ModelConfig

    return stage_parser("detect", (DetectScriptArguments, ModelConfig), subparsers, prog, __doc__)


if __name__ == "__main__":
    sys.exit(run_stage("detect", lambda: main(*parse_stage_args(make_parser()))))
