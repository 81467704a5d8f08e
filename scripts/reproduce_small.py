"""Small-scale RetMask reproduction on the embedded SmolLM2-135M-Instruct, CPU only (issue 6).

    python scripts/reproduce_small.py                       # one seed, all 224 shipped prompts (~1 h on 2 idle cores)
    python scripts/reproduce_small.py --seeds 0 1 2         # three seeds (seed 0 is reused from the run above)
    python scripts/reproduce_small.py --max-prompts 32 --n-per-task 2   # a reduced run

1. evaluate the base model on the long-context suite and the general check,
2. detect the retrieval heads (NIAH copy scores; `--head-scores FILE` skips it) and, with `--eval-masked`, evaluate
   the base model with its top-k retrieval heads masked (and, last, k random non-retrieval heads masked): does the
   suite see the heads?
3. for each seed, train RetMask (top-k retrieval heads masked for the rejected responses) and the paper's control
   (the same training with k random non-retrieval heads masked) from the shipped prompt set (as chat messages, like
   the recipes); both share one pair cache, so the control reuses RetMask's chosen responses (same seed, same
   sampling) and generates only its rejected ones: a paired comparison,
4. evaluate every trained model the same way; write `results.json`, `results.md` and `suite.png` to `--output-dir`.

Every finished piece is saved at once and skipped on a rerun, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/reproduce_small")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--head-scores", default=None, help="score file; default: detect on the model")
    p.add_argument("--detect-lengths", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--mask-top-k", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-prompts", type=int, default=None, help="default: the whole shipped prompt set (224)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="pair response length")
    p.add_argument("--generation-batch-size", type=int, default=16)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for DPO (the paper's precision; faster than fp32 on CPUs with avx512_bf16/AMX)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048], help="suite context lengths")
    p.add_argument("--categories", nargs="+", default=None, help="suite categories or tasks (default: all)")
    p.add_argument("--n-per-task", type=int, default=4)
    p.add_argument("--eval-seed", type=int, default=1000, help="seed of the suite samples (same for all models)")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--eval-masked", action="store_true", help="also evaluate the base model with heads masked")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-only", action="store_true", help="only train and save the models (run beside an eval run)")
    p.add_argument("--strategies", nargs="+", default=["retrieval", "random_non_retrieval"],
                   help="RetMask (retrieval) and/or the control (random_non_retrieval)")
    p.add_argument("--summarize-only", action="store_true", help="tabulate the evaluations finished so far")
    return p.parse_args(argv)


def _cached(path: Path, fn):
    """Load a JSON result if a previous run saved it, else compute and save it."""
    if path.is_file():
        print(f"[cached] {path}")
        return json.loads(path.read_text())
    t = time.time()
    result = fn()
    result["seconds"] = time.time() - t
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"[done {result['seconds']:.0f}s] {path}")
    return result


def evaluate_model(model, tokenizer, args, out: Path, name: str, heads=None) -> dict:
    from trl_retmask.evaluation import evaluate_long_context, general_ability

    def run():
        suite = evaluate_long_context(model, tokenizer, lengths=args.lengths, categories=args.categories,
                                      n_per_task=args.n_per_task, heads=heads, seed=args.eval_seed,
                                      keep_generations=True, progress=True)
        return {"suite": suite, "general": general_ability(model, tokenizer, heads=heads, max_tokens=args.ppl_tokens)}

    return _cached(out / "eval" / f"{name}.json", run)


def train(args, out: Path, scores, strategy: str, seed: int) -> Path:
    """One RetMask training run, saved to `out/models/<strategy>-seed<seed>` with its log (`retmask_run.json`)."""
    import torch

    from trl_retmask import load_model_and_tokenizer
    from trl_retmask.config import RetMaskConfig
    from trl_retmask.recipe import RECIPE_DEFAULTS, RetMaskScriptArguments, load_prompts
    from trl_retmask.trainer import RetMaskTrainer

    save_dir = out / "models" / f"{strategy}-seed{seed}"
    if (save_dir / "retmask_run.json").is_file():
        return save_dir
    marker = save_dir.with_suffix(".training")
    if marker.exists():  # another process (--train-only) is training it: wait for it
        print(f"waiting for {save_dir} (remove {marker} if that process died)")
        while marker.exists() and not (save_dir / "retmask_run.json").is_file():
            time.sleep(20)
        if (save_dir / "retmask_run.json").is_file():
            return save_dir
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        t = time.time()
        torch.manual_seed(seed)
        model, tokenizer = load_model_and_tokenizer(args.model)
        fields = {f.name for f in dataclasses.fields(RetMaskConfig)}
        config = {k: v for k, v in RECIPE_DEFAULTS["smollm2"].items() if k in fields}
        config.update(output_dir=str(out / "runs" / f"{strategy}-seed{seed}"), mask_top_k=args.mask_top_k,
                      mask_strategy=strategy, mask_seed=seed, seed=seed, max_new_tokens=args.max_new_tokens,
                      generation_batch_size=args.generation_batch_size, pairs_cache_dir=str(out / "pairs"),
                      num_train_epochs=args.epochs, learning_rate=args.learning_rate, bf16=args.bf16,
                      gradient_checkpointing=False, train_sampling_strategy="group_by_length",
                      save_strategy="no", report_to="none", use_cpu=True)
        prompts = load_prompts(RetMaskScriptArguments())  # the shipped set as chat messages, like the recipes
        prompts = prompts.shuffle(seed=0).select(range(min(args.max_prompts or len(prompts), len(prompts))))
        trainer = RetMaskTrainer(model=model, args=RetMaskConfig(**config), train_dataset=prompts,
                                 processing_class=tokenizer, head_scores=scores)
        trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        policy.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        info = {"masked_heads": [list(h) for h in trainer.masked_heads], "config": {k: str(v) for k, v in config.items()},
                "log": [h for h in trainer.state.log_history if "loss" in h or "train_runtime" in h],
                "pair_stats": {k: v.to_dict() for k, v in trainer.pair_stats.items()}, "seconds": time.time() - t}
        (save_dir / "retmask_run.json").write_text(json.dumps(info, indent=2))
        print(f"[done {info['seconds']:.0f}s] trained {save_dir}")
    finally:
        marker.unlink(missing_ok=True)
    return save_dir


def summarize(results: dict[str, dict], out: Path, args, scores_info: dict) -> None:
    from trl_retmask.evaluation import format_table, plot_results

    suites = {name: r["suite"] for name, r in results.items()}
    plot_results(suites, out / "suite.png", title="SmolLM2-135M-Instruct: long-context suite (%)")
    lines = [f"## Long-context suite (score x 100; n = {args.n_per_task} per task and length)", "",
             format_table(suites), "", "## General check", "",
             "| model | held-out perplexity | short-answer accuracy (%) | suite answers that differ from base |",
             "|---|---|---|---|"]
    base = {(g["task"], g["length"], g["seed"]): g["output"] for g in results.get("base", {}).get("suite", {})
            .get("generations", [])}
    for name, r in results.items():
        g = r["general"]
        gens = r["suite"].get("generations", [])
        changed = sum(base.get((x["task"], x["length"], x["seed"])) != x["output"] for x in gens)
        lines.append(f"| {name} | {g['heldout_ppl']:.2f} | {100 * g['short_answer']:.1f} | {changed} / {len(gens)} |")
    lines += ["", "## Per task", "", "| model | task | length | metrics |", "|---|---|---|---|"]
    for name, r in results.items():
        for task, by_len in r["suite"]["tasks"].items():
            for n, m in by_len.items():
                cells = ", ".join(f"{k}={v:.3f}" for k, v in m.items() if k != "n")
                lines.append(f"| {name} | {task} | {n} | {cells} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "heads": scores_info, "results": results},
                                                 indent=2))
    print("\n".join(lines[:len(lines)]))


NAMES = {"base": "base", "base_masked_retrieval": "base, top-k retrieval masked",
         "base_masked_random": "base, k random non-retrieval masked"}


def summarize_finished(args, out: Path) -> None:
    """Tables and chart from whatever evaluations are saved (an interrupted or partial run)."""
    from trl_retmask import HeadScores

    results = {}
    for path in sorted((out / "eval").glob("*.json"), key=lambda p: (p.stem != "base", p.stem.startswith("base"), p.stem)):
        name = NAMES.get(path.stem) or path.stem.replace("retrieval-", "RetMask ").replace("random_non_retrieval-", "control ")
        results[name] = json.loads(path.read_text())
        run = out / "models" / path.stem / "retmask_run.json"
        if run.is_file():
            results[name]["train"] = json.loads(run.read_text())
    scores = HeadScores.load(args.head_scores or out / "detection" / "head_scores.json")
    summarize(results, out, args, {"source": str(args.head_scores), "top_k": args.mask_top_k,
                                   "retrieval_heads": scores.select(top_k=args.mask_top_k),
                                   "sparsity": scores.sparsity()})


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from trl_retmask import HeadScores, load_model_and_tokenizer

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        return summarize_finished(args, out)
    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model)
    max_len = max(args.lengths)
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"--lengths up to {max_len} exceed the model's {model.config.max_position_embeddings}.")

    # 1. base model (needs no heads)
    results = {} if args.train_only else {"base": evaluate_model(model, tokenizer, args, out, "base")}
    # 2. heads
    score_path = Path(args.head_scores) if args.head_scores else out / "detection" / "head_scores.json"
    if not score_path.is_file():
        from trl_retmask.detection import detect_retrieval_heads

        t = time.time()
        detect_retrieval_heads(model, tokenizer, context_lengths=args.detect_lengths, output_dir=str(out / "detection"))
        print(f"[done {time.time() - t:.0f}s] detection")
    scores = HeadScores.load(score_path)
    retrieval = scores.select(top_k=args.mask_top_k, strategy="retrieval")
    scores_info = {"source": str(score_path), "top_k": args.mask_top_k, "retrieval_heads": retrieval,
                   "sparsity": scores.sparsity()}

    del model
    gc.collect()

    if args.eval_masked and not args.train_only:  # does the suite see the heads? (while the models train)
        model, tokenizer = load_model_and_tokenizer(args.model)
        results["base, top-k retrieval masked"] = evaluate_model(model, tokenizer, args, out,
                                                                 "base_masked_retrieval", heads=retrieval)
        del model
        gc.collect()

    # 3-4. trained models
    runs = [(seed, strategy, label) for seed in args.seeds
            for strategy, label in (("retrieval", "RetMask"), ("random_non_retrieval", "control"))
            if strategy in args.strategies]
    for seed, strategy, _ in runs if args.train_only else []:
        train(args, out, scores, strategy, seed)
    if args.train_only:
        return
    for seed, strategy, label in runs:
        save_dir = train(args, out, scores, strategy, seed)
        policy, tok = load_model_and_tokenizer(str(save_dir))
        results[f"{label} seed{seed}"] = dict(evaluate_model(policy, tok, args, out, f"{strategy}-seed{seed}"),
                                              train=json.loads((save_dir / "retmask_run.json").read_text()))
        del policy
        gc.collect()
    if args.eval_masked:  # last: the comparison above matters most when time is short
        model, tokenizer = load_model_and_tokenizer(args.model)
        control = scores.select(top_k=args.mask_top_k, strategy="random_non_retrieval", seed=args.seeds[0])
        results["base, k random non-retrieval masked"] = evaluate_model(model, tokenizer, args, out,
                                                                        "base_masked_random", heads=control)
    summarize(results, out, args, scores_info)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
