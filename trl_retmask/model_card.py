"""The RetMask part of a trained model's card, and the files saved beside the weights, so a pushed model says how
it was made: which heads were masked (with their scores), how they were selected, and what the pairs looked like.
The card itself is TRL's (`generate_model_card`); `retmask_section` is appended to it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .atomic import write_text
from .heads import format_head, parse_head
from .scores import HEAD_SCORES_FILE, RETMASK_FILE

__all__ = ["HEAD_SCORES_FILE", "PAPER", "RETMASK_FILE", "retmask_section", "write_retmask_files"]

PAPER = {
    "title": "From Interpretability to Performance: Optimizing Retrieval Heads for Long-Context Language Models",
    "id": "2601.11020",
    "citation": textwrap.dedent("""\
        @inproceedings{ma2026retmask,
            title         = {{From Interpretability to Performance: Optimizing Retrieval Heads for Long-Context Language Models}},
            author        = {Ma and Okazaki},
            year          = 2026,
            booktitle     = {Findings of the Association for Computational Linguistics: ACL 2026},
            eprint        = {2601.11020},
            archivePrefix = {arXiv},
        }"""),  # noqa: E501 (BibTeX lines are not wrapped)
}
DPO_CITATION = textwrap.dedent("""\
    @inproceedings{rafailov2023direct,
        title        = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
        author       = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
        year         = 2023,
        booktitle    = {Advances in Neural Information Processing Systems 36},
    }""")  # noqa: E501


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def retmask_section(info: dict) -> str:
    """Markdown for the card from the `retmask.json` content (see `RetMaskTrainer.retmask_info`)."""
    lines = ["## RetMask", ""]
    lines.append(
        "This model was trained with RetMask: DPO that prefers the model's own responses (chosen) over those of the "
        "same model with its retrieval heads masked (rejected; the heads' outputs are zeroed before `o_proj`)."
    )
    lines += ["", "### Masked heads", ""]
    sel = info.get("selection", {})
    if "heads" in sel:
        lines.append(f"{len(info['masked_heads'])} heads, given explicitly.")
    else:
        lines.append(
            f"{len(info['masked_heads'])} heads, selected with strategy `{sel.get('strategy')}`, threshold "
            f"`{sel.get('threshold')}`, top-k `{sel.get('top_k')}`, seed `{sel.get('seed')}`"
            f"{' from `' + str(sel['source']) + '`' if sel.get('source') else ''}. Scores are mean retrieval scores; "
            f"the full score file is `{HEAD_SCORES_FILE}`."
        )
    lines += ["", "| layer | head | retrieval score |", "|---:|---:|---:|"]
    scores = info.get("head_scores") or {}
    for key in info["masked_heads"]:
        layer, head = parse_head(key)
        s = scores.get(format_head((layer, head)))
        lines.append(f"| {layer} | {head} | {'' if s is None else f'{s:.4f}'} |")
    if info.get("sparsity"):
        lines += ["", "### Sparsity of the retrieval scores", "", "| statistic | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in info["sparsity"].items()]
    if info.get("generation"):
        lines += ["", "### Pair generation", "", "| setting | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in info["generation"].items()]
    for split, stats in (info.get("pair_stats") or {}).items():
        lines += ["", f"### Pair statistics ({split})", "", "| statistic | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in stats.items()]
    lines += [
        "",
        "### Citation",
        "",
        f"RetMask: [{PAPER['title']}](https://arxiv.org/abs/{PAPER['id']}) (Ma & Okazaki, ACL 2026 Findings; "
        "BibTeX under Citations above). It trains with DPO; cite DPO as:",
        "",
        "```bibtex",
        DPO_CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_retmask_files(save_dir, info: dict, head_scores=None) -> None:
    """Write `retmask.json` and the head-score file (`HeadScores.from_pretrained(save_dir)` reads both back)."""
    save_dir = Path(save_dir)
    write_text(save_dir / RETMASK_FILE, json.dumps(info, indent=2, default=str))
    if head_scores is not None:
        head_scores.save_pretrained(save_dir)
