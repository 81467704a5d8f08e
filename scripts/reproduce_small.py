"""Small-scale RetMask reproduction with the power to see an effect, on the embedded SmolLM2-135M-Instruct, CPU.

    python scripts/reproduce_small.py            # default size (~2.5 h on 2 idle cores: docs/evaluation.md)
    python scripts/reproduce_small.py --quick    # smoke run of every stage (minutes)

1. the base model, and the base model with the top-k retrieval heads masked and with k random non-retrieval heads
   masked, on the long-context suite and the general check (does the suite see the heads?);
2. for each seed, RetMask (top-k retrieval heads masked for the rejected responses) and the paper's control (the
   same training with k random non-retrieval heads masked) from the same shipped prompts: they share one pair cache,
   so the control reuses RetMask's chosen responses and differs only in the rejected ones;
3. every trained model on the same suite samples; seeds are averaged per sample, then RetMask vs base, RetMask vs
   control and control vs base are compared pairwise (`trl_retmask.evaluation.stats`): mean difference, 95%
   paired-bootstrap interval and sign-flip p-value, at every task, category and length; 95% bootstrap intervals on
   every number. Written to `results.json`, `results.md` and `suite.png` in `--output-dir`.

Every finished piece (each evaluation, each batch of suite generations, each batch of pairs, each trained model)
is stored under a fingerprint of its inputs and reused by a rerun, so an interrupted run resumes; a piece made
with other settings is refused (`--overwrite` recomputes it). `--report-only` tabulates the pieces finished so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULTS = dict(
    output_dir="outputs/reproduce_small",
    seeds=[0, 1, 2],
    max_prompts=None,
    max_new_tokens=64,
    lengths=[1024],
    categories=["recall"],
    n_per_task=24,
    ppl_tokens=4096,
    short_answer=50,
)
"""The default size: 24 samples per recall task (96 per model), 3 seeds, all 224 shipped prompts; sized to fit
3 hours on 2 idle cores (a second length, 2048, would add ~1.9 h: docs/evaluation.md)."""
QUICK = dict(
    output_dir="outputs/reproduce_small_quick",
    seeds=[0],
    max_prompts=16,
    max_new_tokens=32,
    lengths=[1024, 2048],
    categories=["recall"],
    n_per_task=1,
    ppl_tokens=1024,
    short_answer=10,
)
"""`--quick` runs every stage at the smallest size that still times each kind of piece."""

MODELS = {
    "base": "base",
    "base_masked_retrieval": "base, top-k retrieval heads masked",
    "base_masked_random": "base, k random non-retrieval heads masked",
    "retrieval": "RetMask",
    "random_non_retrieval": "control",
}
TRAINED_LABELS = (MODELS["retrieval"], MODELS["random_non_retrieval"])
COMPARISONS = [
    ("RetMask", "base"),
    ("RetMask", "control"),
    ("control", "base"),
    ("base, top-k retrieval heads masked", "base"),
    ("base, k random non-retrieval heads masked", "base"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-run size (minutes); its own default --output-dir")
    p.add_argument("--output-dir")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--head-scores",
        default="smollm2-135m-instruct",
        help="bundled name, file or directory of head scores (default: the bundled SmolLM2 scores)",
    )
    p.add_argument("--mask-top-k", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--dataset-name", default=None, help="prompt dataset (default: the shipped prompt set)")
    p.add_argument("--max-prompts", type=int, help="default: every shipped prompt (224)")
    p.add_argument("--max-new-tokens", type=int, help="pair response length")
    p.add_argument("--generation-batch-size", type=int, default=16)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast for DPO")
    p.add_argument("--lengths", type=int, nargs="+", help="suite context lengths")
    p.add_argument("--categories", nargs="+", help="suite categories or tasks")
    p.add_argument("--n-per-task", type=int, help="suite samples per task and length")
    p.add_argument("--eval-seed", type=int, default=1000, help="seed of the suite samples (same for all models)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--ppl-tokens", type=int, help="held-out tokens for perplexity")
    p.add_argument("--short-answer", type=int, help="short-answer questions (of 50)")
    p.add_argument("--n-resamples", type=int, default=10_000, help="bootstrap / permutation resamples")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report-only", action="store_true", help="tabulate the pieces finished so far")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute pieces made with other inputs (e.g. after the head scores changed)",
    )
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in (
        "mask_top_k",
        "n_per_task",
        "max_new_tokens",
        "ppl_tokens",
        "short_answer",
        "n_resamples",
        "eval_batch_size",
        "generation_batch_size",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    return args


# ------------------------------------------------------------------------------------------------ pieces
def evaluate(model, tokenizer, args, out: Path, name: str, heads=None) -> dict:
    """Suite + general check of one model, cached in `out/eval/<name>.json` (its generations in `out/suite`)."""
    from trl_retmask.evaluation import evaluate_long_context, general_ability
    from trl_retmask.evaluation.general import load_short_answer
    from trl_retmask.fingerprints import fingerprint, model_fingerprint
    from trl_retmask.store import cached_json

    def run():
        t, cpu = time.time(), time.process_time()
        suite = evaluate_long_context(
            model,
            tokenizer,
            lengths=args.lengths,
            categories=args.categories,
            n_per_task=args.n_per_task,
            heads=heads,
            seed=args.eval_seed,
            batch_size=args.eval_batch_size,
            output_dir=out / "suite",
            name=name,
            keep_generations=True,
            overwrite=args.overwrite,
        )
        t_suite, cpu_suite = time.time() - t, time.process_time() - cpu
        general = general_ability(
            model,
            tokenizer,
            heads=heads,
            max_tokens=args.ppl_tokens,
            questions=load_short_answer()[: args.short_answer],
        )
        return {
            "suite": suite,
            "general": general,
            "seconds": {"suite": t_suite, "general": time.time() - t - t_suite},
            "cpu_seconds": {"suite": cpu_suite, "general": time.process_time() - cpu - cpu_suite},
        }

    fp = fingerprint(
        model=model_fingerprint(model),
        heads=[list(h) for h in heads or []],
        lengths=args.lengths,
        categories=args.categories,
        n_per_task=args.n_per_task,
        eval_seed=args.eval_seed,
        ppl_tokens=args.ppl_tokens,
        short_answer=args.short_answer,
    )
    result = cached_json(out / "eval" / f"{name}.json", fp, run, overwrite=args.overwrite)
    print(f"[{sum(result['seconds'].values()):.0f}s] evaluated {name}", flush=True)
    return result


def train(args, out: Path, scores, strategy: str, seed: int) -> Path:
    """One RetMask run (strategy `retrieval`) or control run, saved to `out/models/<strategy>-seed<seed>`."""
    import torch

    from trl_retmask import load_model_and_tokenizer
    from trl_retmask.config import RetMaskConfig
    from trl_retmask.fingerprints import fingerprint
    from trl_retmask.heads import format_heads
    from trl_retmask.prompts import load_prompts
    from trl_retmask.scripts.train import TrainScriptArguments, recipe_defaults
    from trl_retmask.store import cached_json
    from trl_retmask.trainer import RetMaskTrainer

    save_dir = out / "models" / f"{strategy}-seed{seed}"
    fields = {f.name for f in dataclasses.fields(RetMaskConfig)}
    config = {k: v for k, v in recipe_defaults("smollm2").items() if k in fields}
    config.update(
        output_dir=str(out / "runs" / f"{strategy}-seed{seed}"),
        mask_threshold=None,
        mask_top_k=args.mask_top_k,
        mask_strategy=strategy,
        mask_seed=seed,
        seed=seed,
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size,
        pairs_cache_dir=str(out / "pairs"),
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        bf16=args.bf16,
        gradient_checkpointing=False,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )

    def run():
        t, cpu = time.time(), time.process_time()
        torch.manual_seed(seed)
        model, tokenizer = load_model_and_tokenizer(args.model)
        prompts = load_prompts(TrainScriptArguments(dataset_name=args.dataset_name))
        prompts = prompts.shuffle(seed=0).select(range(min(args.max_prompts or len(prompts), len(prompts))))
        trainer = RetMaskTrainer(
            model=model,
            args=RetMaskConfig(**config),
            train_dataset=prompts,
            processing_class=tokenizer,
            head_scores=scores,
        )
        trainer.train()
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        log = trainer.state.log_history
        return {
            "masked_heads": format_heads(trainer.masked_heads),
            "num_prompts": len(prompts),
            "steps": trainer.state.global_step,
            "log": [h for h in log if "loss" in h or "train_runtime" in h],
            "pair_stats": {k: v.to_dict() for k, v in trainer.pair_stats.items()},
            "seconds": {
                "train": time.time() - t,
                "dpo": next((h["train_runtime"] for h in log if "train_runtime" in h), None),
            },
            "cpu_seconds": {"train": time.process_time() - cpu},
        }

    def where(name):  # a local model or dataset path counts as its directory, however it is spelled
        return str(Path(name).resolve()) if name and os.path.exists(name) else name

    fp = fingerprint(
        model=where(args.model),
        dataset=where(args.dataset_name),
        max_prompts=args.max_prompts,
        heads=scores.select(top_k=args.mask_top_k, strategy=strategy, seed=seed),
        config={k: str(v) for k, v in sorted(config.items())},
    )
    info = cached_json(save_dir / "retmask_run.json", fp, run, overwrite=args.overwrite)
    print(f"[{info['seconds']['train']:.0f}s] trained {save_dir}", flush=True)
    return save_dir


# ------------------------------------------------------------------------------------------------ report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(s: dict) -> str:
    return f"{_pct(s['mean'])} [{_pct(s['ci'][0])}, {_pct(s['ci'][1])}]"


def _p(p: float) -> str:
    """Three decimals; below 0.001 (a Monte Carlo p is at least 1 / (1 + resamples), never 0) as a bound."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _diff(c: dict) -> str:
    return f"{100 * c['difference']:+.1f} [{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}] {_p(c['p_value'])}"


def report(evals: dict[str, list[dict]], args, out: Path, heads: dict, timings: dict) -> dict:
    """Intervals for every number, paired comparisons (seeds averaged per sample); results.json / .md, suite.png."""
    import numpy as np

    from trl_retmask.evaluation import paired_comparison, perplexity_ci, plot_results, suite_comparison, suite_summary
    from trl_retmask.evaluation.stats import summarize

    def general_of(runs):  # each question's correctness, mean over the runs' seeds
        return np.mean([r["general"]["short_answer_correct"] for r in runs], axis=0)

    kw = dict(n_resamples=args.n_resamples)
    models = {}
    for label, runs in evals.items():
        chunks = np.mean([r["general"]["heldout_chunks"] for r in runs], axis=0)  # per chunk, mean over seeds
        correct = general_of(runs)
        models[label] = {
            "runs": len(runs),
            "suite": suite_summary([r["suite"]["per_sample"] for r in runs], **kw),
            "heldout_ppl": {
                "mean": float(np.exp(chunks[:, 0].sum() / chunks[:, 1].sum())),
                "ci": perplexity_ci(chunks, **kw),
            },
            "short_answer": summarize(correct, **kw),
        }
    trained = set(TRAINED_LABELS)

    def runs_of(a, b):
        """Both sides' runs; two trained models are paired over the seeds both finished (runs are in seed order,
        so an interrupted run compares like with like)."""
        k = min(len(evals[a]), len(evals[b])) if {a, b} <= trained else None
        return evals[a][:k], evals[b][:k]

    comparisons = {}
    for a, b in COMPARISONS:
        if a in evals and b in evals:
            ra, rb = runs_of(a, b)
            comparisons[f"{a} vs {b}"] = {
                "suite": suite_comparison(
                    [r["suite"]["per_sample"] for r in ra], [r["suite"]["per_sample"] for r in rb], **kw
                ),
                "short_answer": paired_comparison(general_of(ra), general_of(rb), **kw),
                "runs": len(ra),
            }
    result = {"args": vars(args), "heads": heads, "models": models, "comparisons": comparisons, "seconds": timings}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot_results(
        {
            label: {
                "scores": {
                    c: {n: v["mean"] for n, v in by_len.items()} for c, by_len in m["suite"]["category"].items()
                },
                "intervals": {
                    c: {n: v["ci"] for n, v in by_len.items()} for c, by_len in m["suite"]["category"].items()
                },
            }
            for label, m in models.items()
        },
        out / "suite.png",
        title=f"{Path(args.model).name}: long-context suite (%), seed means, 95% intervals",
    )
    (out / "results.md").write_text(format_report(result))
    return result


def format_report(result: dict) -> str:
    args, models = result["args"], result["models"]
    cols = [(c, n) for m in models.values() for c, by_len in m["suite"]["category"].items() for n in by_len]
    cols = sorted(set(cols), key=lambda x: (x[0], int(x[1])))
    lines = [
        f"## Scores (x 100, mean [95% bootstrap interval]; n = {args['n_per_task']} per task and length; "
        f"trained models: mean over their finished seeds of {args['seeds']} per sample, count in brackets)",
        "",
        "| model | " + " | ".join(f"{c} @{n}" for c, n in cols) + " | overall | held-out ppl | short answer |",
        "|---|" + "---|" * (len(cols) + 3),
    ]
    for label, m in models.items():
        cells = [_cell(m["suite"]["category"][c][n]) if n in m["suite"]["category"].get(c, {}) else "" for c, n in cols]
        ppl = m["heldout_ppl"]
        name = f"{label} ({m['runs']} seed{'s' if m['runs'] > 1 else ''})" if label in TRAINED_LABELS else label
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_cell(m['suite']['overall'])} | {ppl['mean']:.2f} "
            f"[{ppl['ci'][0]:.2f}, {ppl['ci'][1]:.2f}] | {_cell(m['short_answer'])} |"
        )
    lines += [
        "",
        "## Paired comparisons (difference x 100 [95% paired-bootstrap interval], two-sided sign-flip p)",
        "",
        "| comparison | " + " | ".join(f"{c} @{n}" for c, n in cols) + " | overall | short answer |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    for name, comp in result["comparisons"].items():
        cells = [_diff(comp["suite"]["category"][c][n]) for c, n in cols]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_diff(comp['suite']['overall'])} | "
            f"{_diff(comp['short_answer'])} |"
        )
    tasks = sorted(
        {(t, n) for m in models.values() for t, by_len in m["suite"]["task"].items() for n in by_len},
        key=lambda x: (x[0], int(x[1])),
    )
    lines += [
        "",
        "## Per task",
        "",
        "| task @ length | " + " | ".join(models) + " | " + " | ".join(result["comparisons"]) + " |",
        "|---|" + "---|" * (len(models) + len(result["comparisons"])),
    ]
    for t, n in tasks:
        cells = [_cell(m["suite"]["task"][t][n]) for m in models.values()]
        cells += [_diff(c["suite"]["task"][t][n]) for c in result["comparisons"].values()]
        lines.append(f"| {t} @{n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Masked heads: {result['heads']}",
        "",
        "## Seconds per piece",
        "",
        "| piece | wall clock | process CPU time |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k} | {wall:.0f} | {'' if cpu is None else f'{cpu:.0f}'} |" for k, (wall, cpu) in result["seconds"].items()
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def _timings(name: str, result: dict) -> dict:
    """`{"<name>: <stage>": [wall seconds, process CPU seconds]}`. CPU time depends less on other jobs than the wall
    clock does, but with several threads on a busy machine it also counts the threads' spin-waiting."""
    cpu = result.get("cpu_seconds", {})
    return {f"{name}: {k}": [v, cpu.get(k)] for k, v in result["seconds"].items() if v is not None}


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from trl_retmask import load_model_and_tokenizer
    from trl_retmask.heads import format_heads
    from trl_retmask.scores import resolve_head_scores

    out = Path(args.output_dir).resolve()  # fingerprints hold paths under it: one per directory, however spelled
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model)
    if max(args.lengths) > model.config.max_position_embeddings:
        raise SystemExit(
            f"--lengths up to {max(args.lengths)} exceed the model's "
            f"{model.config.max_position_embeddings} positions; pass shorter --lengths."
        )
    scores = resolve_head_scores(args.head_scores, model)
    heads = {
        "retrieval": scores.select(top_k=args.mask_top_k),
        "random_non_retrieval": scores.select(
            top_k=args.mask_top_k, strategy="random_non_retrieval", seed=args.seeds[0]
        ),
    }
    evals: dict[str, list[dict]] = {}
    timings: dict[str, list] = {}

    def piece(label: str, name: str, compute):
        path = out / "eval" / f"{name}.json"
        if args.report_only and not path.is_file():
            return
        result = compute()
        evals.setdefault(label, []).append(result)
        timings.update(_timings(name, result))

    for name, masked in (
        ("base", None),
        ("base_masked_retrieval", heads["retrieval"]),
        ("base_masked_random", heads["random_non_retrieval"]),
    ):
        piece(MODELS[name], name, functools.partial(evaluate, model, tokenizer, args, out, name, heads=masked))
    del model
    gc.collect()
    for seed in args.seeds:
        for strategy in ("retrieval", "random_non_retrieval"):
            name = f"{strategy}-seed{seed}"

            def trained(strategy=strategy, seed=seed, name=name):
                save_dir = train(args, out, scores, strategy, seed)
                timings.update(_timings(name, json.loads((save_dir / "retmask_run.json").read_text())))
                policy, tok = load_model_and_tokenizer(str(save_dir))
                try:
                    return evaluate(policy, tok, args, out, name)
                finally:
                    del policy
                    gc.collect()

            piece(MODELS[strategy], name, trained)
    if not evals:
        raise SystemExit(f"No finished evaluation in {out}; run without --report-only first.")
    result = report(evals, args, out, {k: format_heads(v) for k, v in heads.items()}, timings)
    print((out / "results.md").read_text())
    print(f"total {time.time() - t0:.0f}s")
    return result


if __name__ == "__main__":
    main()
