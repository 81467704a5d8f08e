"""Run the long-context suite on a model: generate greedily (batched, left padding), score, tabulate, save, plot."""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..niah import greedy_generation_config, render_user_prompt
from .metrics import load_metric
from .tasks import CATEGORIES, build_suite

PRIMARY = {"recall": "recall", "rerank": "ndcg", "cite": "cite_avg"}
"""The one number per category: substring recall, NDCG@10, mean of correctness and citation recall/precision."""


@contextlib.contextmanager
def _generation_mode(model, tokenizer):
    """Eval mode, left padding and a pad token for batched generation; everything restored afterwards."""
    was_training, side, pad = model.training, tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 4,
             progress: bool = False) -> list[str]:
    """Greedy completions of raw prompts (chat template applied here), batched with left padding."""
    out = []
    device = next(model.parameters()).device
    config = greedy_generation_config(model, max_new_tokens)
    config.update(use_cache=True, pad_token_id=tokenizer.pad_token_id)  # in the config: extra kwargs are deprecated
    with _generation_mode(model, tokenizer):
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            texts = [render_user_prompt(tokenizer, p) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids = model.generate(**enc, generation_config=config)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def generate_suite(model, tokenizer, samples: list[dict], batch_size: int = 4, heads=None,
                   progress: bool = False, max_new_tokens: int | None = None) -> list[str]:
    """Completions for suite samples, batched per (task, length) so each batch shares a generation budget.

    `max_new_tokens` caps every task's budget (for quick slices; answers cut short score lower)."""
    from ..masking import mask_heads

    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(s["task"], s["length"], s["max_new_tokens"])].append(i)
    outputs = [""] * len(samples)
    with mask_heads(model, heads) if heads else contextlib.nullcontext():
        for (_, _, budget), idx in tqdm(groups.items(), desc="long-context suite", disable=not progress):
            budget = min(budget, max_new_tokens) if max_new_tokens else budget
            for i, text in zip(idx, generate(model, tokenizer, [samples[i]["prompt"] for i in idx], budget,
                                             batch_size)):
                outputs[i] = text
    return outputs


def parse_ranking(text: str, ids: list[str]) -> list[str]:
    """IDs in the order the model wrote them (known IDs only, first occurrence)."""
    known, out = set(ids), []
    for token in re.findall(r"\d+", text):
        if token in known and token not in out:
            out.append(token)
    return out


def score_suite(samples: list[dict], outputs: list[str]) -> dict:
    """Scores per task and length with the shipped `evaluate` metrics, and one primary score per category."""
    if len(samples) != len(outputs):
        raise ValueError(f"{len(samples)} samples but {len(outputs)} outputs.")
    groups = defaultdict(list)
    for s, o in zip(samples, outputs):
        groups[(s["task"], s["length"])].append((s, o))
    tasks: dict = defaultdict(dict)
    for (task, length), rows in groups.items():
        preds, refs = [o for _, o in rows], [s["reference"] for s, _ in rows]
        if task == "rerank":
            ranked = [parse_ranking(o, r["ids"]) for o, r in zip(preds, refs)]
            res = load_metric("ndcg").compute(predictions=ranked, references=refs, k=10)
        elif task == "cite":
            res = load_metric("citation").compute(predictions=preds, references=refs)
            res["cite_avg"] = (res["correctness"] + res["citation_recall"] + res["citation_precision"]) / 3
        else:
            res = load_metric("substring_match").compute(predictions=preds, references=refs)
        tasks[task][str(length)] = {**{k: float(v) for k, v in res.items()}, "n": len(rows)}
    scores: dict = {}
    for cat, cat_tasks in CATEGORIES.items():
        present = [t for t in cat_tasks if t in tasks]
        if not present:
            continue
        lengths = sorted({n for t in present for n in tasks[t]}, key=int)
        scores[cat] = {n: sum(tasks[t][n][PRIMARY[cat]] for t in present if n in tasks[t])
                       / sum(n in tasks[t] for t in present) for n in lengths}
    return {"scores": scores, "tasks": dict(tasks)}


def evaluate_long_context(model, tokenizer, lengths=(1024, 2048), categories=None, n_per_task: int = 4,
                          heads=None, seed: int = 0, batch_size: int = 4, output_dir=None, name: str = "model",
                          keep_generations: bool = False, progress: bool = True,
                          max_new_tokens: int | None = None) -> dict:
    """Evaluate a model (optionally with `heads` masked) on the suite; returns per-category and per-task tables.

    `max_new_tokens` caps the tasks' answer budgets (quick looks only). The result is `{"scores": {category: {length: score}}, "tasks": {task: {length: metrics}}, "config": ...}`;
    with `output_dir` it is also saved as `<name>.json` and `<name>.png` there.
    """
    samples = build_suite(tokenizer, lengths, categories, n_per_task, seed)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and max(s["length"] for s in samples) > max_len:
        raise ValueError(f"Requested length {max(s['length'] for s in samples)} exceeds the model's "
                         f"max_position_embeddings={max_len}; pass shorter `lengths`.")
    outputs = generate_suite(model, tokenizer, samples, batch_size, heads, progress, max_new_tokens)
    result = score_suite(samples, outputs)
    result["config"] = {"lengths": sorted({s["length"] for s in samples}), "categories": categories,
                        "n_per_task": n_per_task, "seed": seed, "heads": [list(h) for h in heads or []],
                        "model": getattr(model.config, "_name_or_path", "")}
    if keep_generations:
        result["generations"] = [{"task": s["task"], "length": s["length"], "seed": s["seed"], "output": o,
                                  "reference": s["reference"] if s["task"] != "cite" else s["reference"]["answers"]}
                                 for s, o in zip(samples, outputs)]
    if output_dir is not None:
        save_results(result, Path(output_dir) / f"{name}.json")
        plot_results({name: result}, Path(output_dir) / f"{name}.png")
    return result


def save_results(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def format_table(results: dict[str, dict]) -> str:
    """Markdown table: one row per (model, category), one column per length."""
    lengths = sorted({n for r in results.values() for c in r["scores"].values() for n in c}, key=int)
    lines = ["| model | category | " + " | ".join(lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for name, r in results.items():
        for cat, by_len in r["scores"].items():
            cells = [f"{100 * by_len[n]:.1f}" if n in by_len else "" for n in lengths]
            lines.append(f"| {name} | {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: dict[str, dict], path, title: str = "Long-context suite") -> Path:
    """Grouped bar chart: one panel per category, bars per model, x = context length."""
    from trl_retmask.plotting import new_figure, save_figure

    cats = [c for c in CATEGORIES if any(c in r["scores"] for r in results.values())]
    fig, axes = new_figure(1, max(len(cats), 1), figsize=(4.2 * max(len(cats), 1), 3.4), squeeze=False)
    width = 0.8 / max(len(results), 1)
    for ax, cat in zip(axes[0], cats):
        lengths = sorted({n for r in results.values() for n in r["scores"].get(cat, {})}, key=int)
        for j, (name, r) in enumerate(results.items()):
            vals = [100 * r["scores"].get(cat, {}).get(n, float("nan")) for n in lengths]
            ax.bar([i + j * width for i in range(len(lengths))], vals, width, label=name)
        ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(lengths))], lengths)
        ax.set_title(f"{cat} ({PRIMARY[cat]})")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("score (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
