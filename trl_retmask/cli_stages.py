"""`trl-retmask` subcommands for the pipeline stages after detection: heads, export, pairs, train, eval.

Registered by `trl_retmask.cli` (see its `_REGISTRARS`); heavy imports stay inside the handlers so that `--help`
is instant. Every subcommand works on the embedded default model with no arguments beyond an output path.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse_heads(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.split("-")) for item in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"heads must look like '3-1,14-6' (LAYER-HEAD), got {text!r}") from None


def _add_selection_arguments(p: argparse.ArgumentParser, *, scores_default_help: str) -> None:
    g = p.add_argument_group("head selection")
    g.add_argument("--heads", type=_parse_heads, default=None, help="Explicit heads, e.g. '3-1,14-6' (LAYER-HEAD).")
    g.add_argument("--head-scores", default=None, help=f"Score JSON or model id with bundled scores ({scores_default_help}).")
    g.add_argument("--top-k", type=int, default=None, help="Select the k best heads.")
    g.add_argument("--threshold", type=float, default=None, help="Select heads with mean score >= this.")
    g.add_argument("--strategy", default="retrieval", choices=["retrieval", "random_non_retrieval", "random"],
                   help="The selected retrieval heads, or as many random non-retrieval / random heads (controls).")
    g.add_argument("--seed", type=int, default=0, help="Seed of the random strategies.")


def _selection(args, default_source) -> tuple[list[tuple[int, int]], object]:
    """(heads, HeadScores or None): explicit --heads, or a selection from the scores (default top-10)."""
    from trl_retmask.scores import HeadScores

    if args.heads:
        if args.top_k is not None or args.threshold is not None:
            raise ValueError("Give either --heads or a selection (--top-k/--threshold) from scores, not both.")
        return args.heads, None
    scores = HeadScores.from_pretrained(args.head_scores or default_source)
    if args.top_k is None and args.threshold is None:
        args.top_k = 10
    return scores.select(threshold=args.threshold, top_k=args.top_k, strategy=args.strategy, seed=args.seed), scores


def selected_heads(args) -> list[tuple[int, int]] | None:
    """Heads to mask for evaluation commands: None (no mask) unless a selection argument was given."""
    if args.heads or args.head_scores or args.top_k is not None or args.threshold is not None:
        return _selection(args, default_source=args.model)[0]
    return None


def _fmt_heads(heads) -> str:
    return ",".join(f"{layer}-{head}" for layer, head in heads)


# ---------------------------------------------------------------------------------------------------- heads
def _run_heads(args) -> int:
    from trl_retmask.scores import HeadScores

    scores = HeadScores.from_pretrained(args.source)
    means = scores.mean_scores()
    out = {"source": args.source, "layers": scores.num_layers, "heads_per_layer": scores.num_heads,
           "sparsity": scores.sparsity(),
           "top": {f"{layer}-{head}": round(s, 4) for (layer, head), s in scores.ranked()[: args.show]}}
    selected = None
    if args.top_k is not None or args.threshold is not None:
        selected = scores.select(threshold=args.threshold, top_k=args.top_k, strategy=args.strategy, seed=args.seed)
        out["selection"] = {"strategy": args.strategy, "top_k": args.top_k, "threshold": args.threshold,
                            "seed": args.seed, "n_heads": len(selected), "heads": _fmt_heads(selected),
                            "scores": {f"{layer}-{head}": round(means[(layer, head)], 4) for layer, head in selected}}
        if args.save_heads:
            with open(args.save_heads, "w") as f:
                json.dump([list(h) for h in selected], f)
    if args.plot:
        out["heatmap"] = str(scores.plot(args.plot, heads=selected))
    print(json.dumps(out, indent=2))
    return 0


def _add_heads(subparsers) -> None:
    from trl_retmask.models import DEFAULT_MODEL

    p = subparsers.add_parser(
        "heads", help="Inspect head scores (sparsity, top heads, heatmap) and select heads to mask.",
        description="Summarise a retrieval-score file: sparsity (Gini, entropy, top-1%/5% mass), the top heads, "
        "and optionally a selection (--top-k or --threshold, with the paper's random controls) and a heatmap.",
    )
    p.add_argument("source", nargs="?", default=DEFAULT_MODEL,
                   help=f"Score JSON, or a model id/path with bundled scores (default: {DEFAULT_MODEL}).")
    p.add_argument("--top-k", type=int, default=None, help="Select the k best heads.")
    p.add_argument("--threshold", type=float, default=None, help="Select heads with mean score >= this.")
    p.add_argument("--strategy", default="retrieval", choices=["retrieval", "random_non_retrieval", "random"],
                   help="The selected retrieval heads, or as many random non-retrieval / random heads (controls).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random strategies.")
    p.add_argument("--show", type=int, default=10, help="Print the top N heads (default: 10).")
    p.add_argument("--plot", default=None, help="Save a layers x heads heatmap PNG here (selection boxed).")
    p.add_argument("--save-heads", default=None, help="Write the selected heads as a JSON list of [layer, head].")
    p.set_defaults(func=_run_heads)


# --------------------------------------------------------------------------------------------------- export
def _run_export(args) -> int:
    from trl_retmask.cli import _load
    from trl_retmask.masking import export_masked_model, validate_heads

    heads, _ = _selection(args, default_source=args.model)
    model, tokenizer = _load(args)
    heads = validate_heads(model, heads)
    path = export_masked_model(model, heads, args.output_dir, tokenizer=tokenizer)
    print(json.dumps({"saved": str(path), "masked_heads": _fmt_heads(heads), "n_heads": len(heads)}, indent=2))
    return 0


def _add_export(subparsers) -> None:
    from trl_retmask.cli import _add_model_argument

    p = subparsers.add_parser(
        "export", help="Save a checkpoint with heads masked in the weights (for vLLM and other weight-only tools).",
        description="Zero the selected heads' input columns of the attention output projection and save a "
        "standard checkpoint plus tokenizer. Default selection: the top 10 heads of the model's bundled scores.",
    )
    _add_model_argument(p)
    p.add_argument("--output-dir", required=True, help="Directory of the masked checkpoint.")
    _add_selection_arguments(p, scores_default_help="default: the model's bundled scores")
    p.set_defaults(func=_run_export)


# ---------------------------------------------------------------------------------------------------- pairs
def _run_pairs(args) -> int:
    from accelerate import PartialState

    from trl_retmask.cli import _load
    from trl_retmask.pairs import generate_pairs
    from trl_retmask.recipe import RetMaskScriptArguments, load_prompts

    heads, _ = _selection(args, default_source=args.model)
    prompts = load_prompts(RetMaskScriptArguments(dataset_name=args.dataset, prompt_column=args.prompt_column,
                                                  max_prompts=args.max_prompts))
    model, tokenizer = _load(args)
    if getattr(model, "hf_device_map", None) is None:
        model.to(PartialState().device)  # under `accelerate launch`, each process generates on its own GPU
    pairs = generate_pairs(model, tokenizer, prompts["prompt"], heads, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           batch_size=args.batch_size, cache_dir=args.cache_dir)
    if PartialState().is_main_process:
        dataset = pairs.to_dataset()
        dataset.to_json(args.output, lines=True)
        print(json.dumps({"output": args.output, "masked_heads": _fmt_heads(heads), **pairs.stats.to_dict()},
                         indent=2))
    return 0


def _add_pairs(subparsers) -> None:
    from trl_retmask.cli import _add_model_argument

    p = subparsers.add_parser(
        "pairs", help="Generate the contrastive pairs only (chosen = model, rejected = heads masked) as JSONL.",
        description="Sample one response per prompt from the model and one from the same model with the selected "
        "heads masked; drop identical or empty pairs; write a TRL preference dataset (prompt/chosen/rejected JSONL). "
        "Under `accelerate launch` the prompts are split across processes.",
    )
    _add_model_argument(p)
    p.add_argument("--output", required=True, help="JSONL file of the kept pairs.")
    p.add_argument("--dataset", default=None, help="Prompt dataset (Hub id, directory or file; default: shipped set).")
    p.add_argument("--prompt-column", default=None, help="Column of the prompt (default: auto-detected).")
    p.add_argument("--max-prompts", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--max-new-tokens", type=int, default=128, help="Tokens per response (default: 128).")
    p.add_argument("--temperature", type=float, default=0.6, help="Sampling temperature (default: 0.6; 0 = greedy).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus probability (default: 1.0).")
    p.add_argument("--batch-size", type=int, default=16, help="Prompts generated together (default: 16).")
    p.add_argument("--cache-dir", default=None, help="Cache finished batches here (resumable).")
    _add_selection_arguments(p, scores_default_help="default: the model's bundled scores")
    p.set_defaults(func=_run_pairs)


# ---------------------------------------------------------------------------------------------------- train
def _run_train(args) -> int:
    from trl_retmask.recipe import RECIPE_DEFAULTS, main

    main(RECIPE_DEFAULTS[args.recipe], list(args.extra), prog=f"trl-retmask train --recipe {args.recipe}",
         description=f"RetMask recipe {args.recipe!r}: all TRL / RetMaskConfig / ModelConfig arguments, with the "
         "recipe's defaults (trl_retmask/recipe.py).")
    return 0


def _add_train(subparsers) -> None:
    from trl_retmask.recipe import RECIPE_DEFAULTS

    p = subparsers.add_parser(
        "train", add_help=False,
        help="Run a recipe end to end (default: the embedded model on a CPU); TRL-style arguments override it.",
        description="Same as `python recipes/<recipe>.py`: scores (bundled or detected), pairs, DPO, save. "
        "`trl-retmask train --help` lists every TRL argument with the recipe's defaults.",
    )
    p.add_argument("--recipe", default="smollm2", choices=sorted(RECIPE_DEFAULTS),
                   help="Which recipe's defaults to start from (default: smollm2).")
    p.set_defaults(func=_run_train, accepts_extra=True)


# ----------------------------------------------------------------------------------------------------- eval
def _run_eval(args) -> int:
    from trl_retmask.cli import _load
    from trl_retmask.evaluation import evaluate_long_context, format_table

    heads = selected_heads(args)
    model, tokenizer = _load(args)
    name = args.name or str(args.model).rstrip("/").split("/")[-1]
    result = evaluate_long_context(model, tokenizer, lengths=args.lengths, categories=args.categories,
                                   n_per_task=args.n_per_task, heads=heads, seed=args.seed,
                                   batch_size=args.batch_size, output_dir=args.output_dir, name=name)
    print(format_table({name: result}))
    if heads:
        print(f"(masked heads: {_fmt_heads(heads)})")
    return 0


def _add_eval(subparsers) -> None:
    from trl_retmask.cli import _add_model_argument, _int_list

    p = subparsers.add_parser(
        "eval", help="Long-context suite (recall, re-ranking, citation), optionally with heads masked.",
        description="Offline HELMET-style evaluation generated from the bundled haystack: synthetic recall, "
        "passage re-ranking (NDCG@10) and citation, per context length. Saves JSON and a chart with --output-dir.",
    )
    _add_model_argument(p)
    p.add_argument("--lengths", type=_int_list, default=[1024, 2048], help="Context lengths (default: 1024,2048).")
    p.add_argument("--categories", nargs="*", default=None, help="Categories to run (default: all).")
    p.add_argument("--n-per-task", type=int, default=4, help="Samples per task and length (default: 4).")
    p.add_argument("--batch-size", type=int, default=4, help="Generation batch size (default: 4).")
    p.add_argument("--output-dir", default=None, help="Save <name>.json and <name>.png here.")
    p.add_argument("--name", default=None, help="Name of the result (default: the model's name).")
    _add_selection_arguments(p, scores_default_help="default: the model's bundled scores when a selection is given")
    p.set_defaults(func=_run_eval)


REGISTRARS = [_add_heads, _add_export, _add_pairs, _add_train, _add_eval]


if __name__ == "__main__":  # pragma: no cover
    from trl_retmask.cli import main as _main

    sys.exit(_main())
