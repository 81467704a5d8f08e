"""`trl-retmask heads`: summarise retrieval scores (sparsity, top heads), select heads to mask, draw a heatmap.

```bash
trl-retmask heads --head_scores Llama-3.1-8B-Instruct --mask_top_k 10 --plot plots/
trl-retmask heads --head_scores my-org/my-retmask-model --mask_strategy random_non_retrieval --mask_seed 3
```

Sparsity: Gini, entropy, top-1%/5% mass. The selection uses the same fields as training (`mask_threshold`,
`mask_top_k`, `mask_strategy`, `mask_seed`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_text
from ..heads import HeadSelectionArguments, format_head, format_heads
from ..models import DEFAULT_MODEL
from ..scores import resolve_head_scores
from . import parse_stage_args, run_stage
from .common import OverwriteArguments, check_name_length, check_writable_file, stage_parser

HEATMAP_NAME = "heads.png"
"""File name of the heatmap when `--plot` names a directory."""


@dataclass
class HeadsScriptArguments(OverwriteArguments):
    r"""
    Arguments of `trl-retmask heads` besides the scores and selection (`HeadSelectionArguments`; `head_scores`
    defaults to the embedded model's bundled scores): what to show and write.

    Parameters:
        show (`int`, *optional*, defaults to `10`):
            Print the top N heads.
        plot (`str`, *optional*):
            Save a layers x heads heatmap (selection boxed): a `.png` file, or a directory (then `DIR/heads.png`).
        save_heads (`str`, *optional*):
            Write the selected heads as a JSON list of `"LAYER-HEAD"`.
    """

    show: int = field(default=10, metadata={"help": "Print the top N heads."})
    plot: str | None = field(default=None, metadata={"help": "Heatmap PNG file, or a directory (DIR/heads.png)."})
    save_heads: str | None = field(
        default=None, metadata={"help": "Write the selected heads as a JSON list of 'LAYER-HEAD'."}
    )

    def __post_init__(self):
        if self.show < 0:
            raise ValueError(f"`show` must be >= 0, got {self.show}.")
        if self.plot is not None:
            check_name_length("plot", self.plot)
            self.plot = str(heatmap_path(self.plot))  # given as written: a trailing slash names a directory
            check_writable_file("plot", self.plot, self.overwrite, example=HEATMAP_NAME)
            check_image_format(self.plot)
        if self.save_heads is not None:
            check_writable_file("save_heads", self.save_heads, self.overwrite, example="heads.json")


def heatmap_path(plot) -> Path:
    """`--plot` as a file: a directory (existing, or written with a trailing slash or without a suffix) gets
    `heads.png` inside it."""
    path = Path(plot).expanduser()
    if path.is_dir() or str(plot).endswith(("/", "\\")) or not path.suffix:
        return path / HEATMAP_NAME
    return path


def check_image_format(path) -> None:
    """The heatmap's suffix is an image format matplotlib writes (checked before anything is computed)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(
            f"`plot` {str(path)!r}: {suffix!r} is not an image format; use one of "
            f"{', '.join(sorted(formats))} (e.g. heads.png), or a directory."
        )


def main(script_args: HeadsScriptArguments, selection: HeadSelectionArguments) -> dict:
    source = selection.head_scores or DEFAULT_MODEL
    scores = resolve_head_scores(source)
    selected = sorted(selection.heads) if selection.heads else scores.select(**selection.selection)
    means = scores.mean_scores()
    out = {
        "source": source,
        "layers": scores.num_layers,
        "heads_per_layer": scores.num_heads,
        "sparsity": scores.sparsity(),
        "top": {format_head(h): round(s, 4) for h, s in scores.ranked()[: script_args.show]},
        "selection": {
            **selection.selection,
            "n_heads": len(selected),
            "heads": format_heads(selected),
            "scores": {format_head(h): round(means[h], 4) for h in selected},
        },
    }
    if scores.trained_heads is not None:
        out["trained_with"] = format_heads(scores.trained_heads)
    if script_args.save_heads:
        write_text(script_args.save_heads, json.dumps(format_heads(selected)))
        out["saved_heads"] = str(script_args.save_heads)
    if script_args.plot:
        out["heatmap"] = str(scores.plot(script_args.plot, heads=selected))
    print(json.dumps(out, indent=2))
    return out


def make_parser(subparsers=None, prog: str | None = None):
    return stage_parser("heads", (HeadsScriptArguments, HeadSelectionArguments), subparsers, prog, __doc__)


if __name__ == "__main__":
    sys.exit(run_stage("heads", lambda: main(*parse_stage_args(make_parser()))))
