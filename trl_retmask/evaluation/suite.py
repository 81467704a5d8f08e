"""Run the long-context suite on a model: generate greedily (batched, resumable), score, tabulate, save, plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from ..chat import check_prompts, encode_rendered, render_user_prompt
from ..distributed import process_state
from ..fingerprints import fingerprint, model_fingerprint
from ..generation import check_window, generate_batch, make_backend, make_generation_config
from ..heads import format_heads, validate_heads
from ..store import run_resumable, write_json
from .registry import CATEGORIES, PRIMARY, TASKS, build_suite


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each raw prompt as one user turn (chat template applied here), refused if empty."""
    check_prompts(prompts)
    return [encode_rendered(tokenizer, render_user_prompt(tokenizer, p))["input_ids"] for p in prompts]


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 4, progress: bool = False, heads=None
) -> list[str]:
    """Greedy completions of raw prompts, in batches (this process only; `generate_suite` shares the work)."""
    ids = _encode(tokenizer, prompts)
    config = make_generation_config(model, max_new_tokens)
    out = []
    for i in tqdm(range(0, len(ids), batch_size), desc="generate", disable=not progress):
        new = generate_batch(model, tokenizer, ids[i : i + batch_size], config, heads=heads)
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def generate_suite(
    model,
    tokenizer,
    samples: list[dict],
    batch_size: int = 4,
    heads=None,
    progress: bool = False,
    max_new_tokens: int | None = None,
    output_dir=None,
    name: str = "suite",
    overwrite: bool = False,
    backend="generate",
    vllm=None,
    outputs=(),
) -> list[str]:
    """Completions for suite samples, batched per (task, length) so each batch shares a generation budget.

    `max_new_tokens` caps every task's budget (for quick slices; answers cut short score lower). The batches are
    shared across accelerate processes and gathered; with `output_dir` they are stored as they finish in
    `<name>.rank<i>.jsonl` there, and a rerun (or an interrupted run) reuses them: the same model, samples and
    settings only (another run's directory is refused unless `overwrite=True`, which first removes the old run's
    records and the files named in `outputs`, made from them).

    `backend`: how the greedy answers are decoded, a name of `GENERATION_BACKENDS` or a backend (`"vllm"`: the
    process's colocated engine, the heads masked inside it; `vllm`: its `VLLMSettings` or their fields). The
    default stays `generate`: vLLM's greedy answers were checked equal on short pairs, not on every long context.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    heads = validate_heads(model, heads) if heads else []
    ids = _encode(tokenizer, [s["prompt"] for s in samples])
    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(s["task"], s["length"], s["max_new_tokens"])].append(i)
    batches = [
        (
            f"{task}-{length}-{j // batch_size}",
            idx[j : j + batch_size],
            min(budget, max_new_tokens) if max_new_tokens else budget,
        )
        for (task, length, budget), idx in groups.items()
        for j in range(0, len(idx), batch_size)
    ]

    def run(batch) -> dict:
        _, idx, budget = batch
        new = generate_batch(
            model, tokenizer, [ids[i] for i in idx], make_generation_config(model, budget), heads=heads, backend=decoder
        )
        return {"indices": idx, "outputs": tokenizer.batch_decode(new, skip_special_tokens=True)}

    decoder = make_backend(backend, model, vllm)  # a static backend hooks the model: closed below
    try:
        window = decoder.window(model)  # the model's, or the vLLM engine's where shorter
        for _, idx, budget in batches:  # every batch fits, before the first is generated
            check_window([len(ids[i]) for i in idx], budget, *window, what="sample", fix="pass shorter `lengths`")
        fp = ""
        if output_dir is not None:
            fp = fingerprint(
                kind="suite",
                model=model_fingerprint(model),
                generation=make_generation_config(model, 1),
                heads=heads,
                batches=[[b[1], b[2]] for b in batches],
                prompt_ids=ids,
                **({"backend": decoder.name} if decoder.name != "generate" else {}),  # older stores stay valid
                **decoder.cache_key(),  # the engine's settings (vLLM): they can change a token too
            )
        decoder.prepare(model)  # every process, before the batches are shared out
        records = run_resumable(
            batches,
            run,
            output_dir,
            name=name,
            fingerprint=fp,
            key=lambda b: b[0],
            verify=lambda b, r: (
                r.get("indices") == b[1]
                and isinstance(r.get("outputs"), list)
                and len(r["outputs"]) == len(b[1])
                and all(isinstance(o, str) for o in r["outputs"])
            ),
            info={
                "model": getattr(model.config, "_name_or_path", ""),
                "heads": heads,
                "num_samples": len(samples),
                "max_new_tokens": max_new_tokens,
            },
            overwrite=overwrite,
            outputs=outputs,
            desc="long-context suite",
            show_progress=progress,
        )
    finally:
        if decoder is not backend:
            decoder.close()
    outputs = [""] * len(samples)
    for r in records:
        for i, text in zip(r["indices"], r["outputs"]):
            outputs[i] = text
    return outputs


def sample_score(sample: dict, output: str) -> float:
    """The primary score of one answer (its task's scorer), the unit that `stats` resamples and pairs."""
    return TASKS[sample["task"]].score(sample["reference"], output)


def score_suite(samples: list[dict], outputs: list[str]) -> dict:
    """Scores per task and length with the shipped `evaluate` metrics, and one primary score per category."""
    if len(samples) != len(outputs):
        raise ValueError(f"{len(samples)} samples but {len(outputs)} outputs.")
    groups = defaultdict(list)
    for s, o in zip(samples, outputs):
        groups[(s["task"], s["length"])].append((s, o))
    tasks: dict = defaultdict(dict)
    for (task, length), rows in groups.items():
        result = TASKS[task].compute([s for s, _ in rows], [o for _, o in rows])
        tasks[task][str(length)] = {**result, "n": len(rows)}
    scores: dict = {}
    for cat, cat_tasks in CATEGORIES.items():
        present = [t for t in cat_tasks if t in tasks]
        if not present:
            continue
        lengths = sorted({n for t in present for n in tasks[t]}, key=int)
        scores[cat] = {
            n: sum(tasks[t][n][PRIMARY[cat]] for t in present if n in tasks[t]) / sum(n in tasks[t] for t in present)
            for n in lengths
        }
    return {"scores": scores, "tasks": dict(tasks)}


def evaluate_long_context(
    model,
    tokenizer,
    lengths=(1024, 2048),
    categories=None,
    n_per_task: int = 4,
    heads=None,
    seed: int = 0,
    batch_size: int = 4,
    output_dir=None,
    name: str = "model",
    keep_generations: bool = False,
    progress: bool = True,
    max_new_tokens: int | None = None,
    overwrite: bool = False,
    generation_backend="generate",
    vllm=None,
) -> dict:
    """Evaluate a model (optionally with `heads` masked) on the suite; returns per-category and per-task tables.

    `max_new_tokens` caps the tasks' answer budgets (quick looks only). The result is
    `{"scores": {category: {length: score}}, "tasks": {task: {length: metrics}}, "per_sample": [...], "config": ...}`
    (`per_sample`: each sample's task, length, seed and primary score, for `stats`); with `output_dir` it is also
    saved as `<name>.json` and `<name>.png` there, and the generations as they finish in
    `<name>.generations.rank<i>.jsonl` (an interrupted run resumes; see `generate_suite`, which also says what
    `generation_backend` and `vllm` choose).
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name {name!r} must be a plain file name (it names <output_dir>/<name>.json).")
    samples = build_suite(tokenizer, lengths, categories, n_per_task, seed)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and max(s["length"] for s in samples) > max_len:
        raise ValueError(
            f"Requested length {max(s['length'] for s in samples)} exceeds the model's "
            f"max_position_embeddings={max_len}; pass shorter `lengths`."
        )
    outputs = generate_suite(
        model,
        tokenizer,
        samples,
        batch_size,
        heads,
        progress,
        max_new_tokens,
        output_dir=output_dir,
        name=f"{name}.generations",
        overwrite=overwrite,
        backend=generation_backend,
        vllm=vllm,
        outputs=(f"{name}.json", f"{name}.png"),  # an overwrite never leaves the old results beside new records
    )
    result = score_suite(samples, outputs)
    result["per_sample"] = [
        {"task": s["task"], "length": s["length"], "seed": s["seed"], "score": sample_score(s, o)}
        for s, o in zip(samples, outputs)
    ]
    result["config"] = {
        "lengths": sorted({s["length"] for s in samples}),
        "categories": categories,
        "n_per_task": n_per_task,
        "seed": seed,
        "heads": format_heads(heads),
        "model": getattr(model.config, "_name_or_path", ""),
    }
    if keep_generations:
        result["generations"] = [
            {
                "task": s["task"],
                "length": s["length"],
                "seed": s["seed"],
                "output": o,
                "reference": s["reference"] if s["task"] != "cite" else s["reference"]["answers"],
            }
            for s, o in zip(samples, outputs)
        ]
    if output_dir is not None and process_state().is_main_process:
        png = Path(output_dir) / f"{name}.png"
        if write_json(Path(output_dir) / f"{name}.json", result) or not png.is_file():
            plot_results({name: result}, png)
    return result


def save_results(result: dict, path) -> Path:
    """Write `result` as JSON (nothing is rewritten when the file already holds it)."""
    write_json(path, result)
    return Path(path)


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
    """Grouped bar chart: one panel per category, bars per model, x = context length. A result may carry
    `"intervals": {category: {length: [low, high]}}` (fractions, like its scores), drawn as error bars."""
    from trl_retmask.plotting import new_figure, save_figure

    cats = [c for c in CATEGORIES if any(c in r["scores"] for r in results.values())]
    panels = max(len(cats), 1)
    fig, axes = new_figure(1, panels, figsize=(max(4.2 * panels, 6.4), 4.2), squeeze=False)
    width = 0.8 / max(len(results), 1)
    for ax, cat in zip(axes[0], cats):
        lengths = sorted({n for r in results.values() for n in r["scores"].get(cat, {})}, key=int)
        for j, (name, r) in enumerate(results.items()):
            vals = [100 * r["scores"].get(cat, {}).get(n, float("nan")) for n in lengths]
            spans = [r.get("intervals", {}).get(cat, {}).get(n) for n in lengths]
            err = None
            if any(spans):
                err = [
                    [v - 100 * s[0] if s else 0 for v, s in zip(vals, spans)],
                    [100 * s[1] - v if s else 0 for v, s in zip(vals, spans)],
                ]
            ax.bar([i + j * width for i in range(len(lengths))], vals, width, label=name, yerr=err, capsize=3)
        ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(lengths))], lengths)
        ax.set_title(f"{cat} ({PRIMARY[cat]})")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("score (%)")
    # Below the panels, where it cannot cover a bar.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2) or 1, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = -(-len(labels) // 2)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    return save_figure(fig, path, layout=False)
