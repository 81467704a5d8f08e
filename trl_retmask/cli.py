"""`trl-retmask` command line: one subcommand per stage, each registered by its own small function.

To add a subcommand, write `_add_<name>(subparsers)` that builds its parser and sets `func=<handler>`,
then append it to `_REGISTRARS`. Handlers take the parsed `args` and return an exit code (or None).
Heavy imports stay inside the handlers so that `trl-retmask --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    from trl_retmask.models import DEFAULT_MODEL

    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL,
        help=f"Model id, local path or embedded name (default: {DEFAULT_MODEL}).",
    )
    parser.add_argument("--dtype", default=None, help="Torch dtype to load the model in (e.g. float32, bfloat16).")
    parser.add_argument("--attn-implementation", default=None, help="sdpa (default), eager, flash_attention_2, ...")


def _add_niah_arguments(parser: argparse.ArgumentParser, *, lengths: str, depths: str) -> None:
    parser.add_argument("--context-lengths", type=_int_list, default=_int_list(lengths),
                        help=f"Prompt lengths in tokens, comma separated (default: {lengths}).")
    parser.add_argument("--depths", type=_float_list, default=_float_list(depths),
                        help=f"Needle depths in percent of the context, comma separated (default: {depths}).")
    parser.add_argument("--needles", default=None, help="JSONL file of needle/question/real_needle (default: bundled).")
    parser.add_argument("--num-needles", type=int, default=None, help="Use only the first N needles.")
    parser.add_argument("--haystack-dir", default=None, help="Directory of .txt haystack files (default: bundled PG-19).")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Greedy answer length (default: 32).")
    parser.add_argument("--output-dir", default=None, help="Where per-sample JSONL and results go (resumable).")


def _load(args):
    from trl_retmask.models import load_model_and_tokenizer
    from trl_retmask.niah import partial_state

    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=args.dtype, attn_implementation=args.attn_implementation
    )
    return model.to(partial_state().device).eval(), tokenizer  # under `accelerate launch`: one device per process


def _needles(args):
    from trl_retmask.niah import load_needles

    needles = load_needles(args.needles)
    return needles[: args.num_needles] if args.num_needles else needles


# --------------------------------------------------------------------------------------------------------- detect
def _run_detect(args) -> int:
    import time

    from trl_retmask.detection import detect_retrieval_heads

    model, tokenizer = _load(args)
    start = time.perf_counter()
    scores = detect_retrieval_heads(
        model, tokenizer, context_lengths=args.context_lengths, depths=args.depths, needles=_needles(args),
        haystack_dir=args.haystack_dir, max_new_tokens=args.max_new_tokens, output_dir=args.output_dir,
    )
    if args.save:
        scores.save(args.save)
    top = sorted(scores.mean_scores().items(), key=lambda kv: -kv[1])[: args.show]
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1),
                      "top_heads": {f"{l}-{h}": round(s, 4) for (l, h), s in top},
                      "sparsity": scores.sparsity()}, indent=2))
    return 0


def _add_detect(subparsers) -> None:
    p = subparsers.add_parser(
        "detect", help="Detect retrieval heads with needle-in-a-haystack copying (Wu et al.).",
        description="Run greedy NIAH decoding and score every head by how often its attention argmax copies the "
        "needle token being generated. Writes head_scores.json, a heatmap, the sparsity summary and a NIAH "
        "accuracy grid to --output-dir; an interrupted run resumes from its per-sample JSONL.",
    )
    _add_model_argument(p)
    _add_niah_arguments(p, lengths="512,1024,2048", depths="0,25,50,75,100")
    p.add_argument("--save", default=None, help="Also write the score JSON to this path.")
    p.add_argument("--show", type=int, default=10, help="Print the top N heads (default: 10).")
    p.set_defaults(func=_run_detect)


# ----------------------------------------------------------------------------------------------------------- niah
def _run_niah(args) -> int:
    from trl_retmask.cli_stages import selected_heads
    from trl_retmask.niah import evaluate_niah

    heads = selected_heads(args)
    model, tokenizer = _load(args)
    result = evaluate_niah(
        model, tokenizer, heads=heads, context_lengths=args.context_lengths, depths=args.depths,
        needles=_needles(args), haystack_dir=args.haystack_dir, max_new_tokens=args.max_new_tokens,
        output_dir=args.output_dir,
    )
    print(json.dumps({"accuracy": result["accuracy"], "num_samples": result["num_samples"],
                      "masked_heads": len(heads or []),
                      "grid": {f"{length}@{depth:g}": acc for (length, depth), acc in result["grid"].items()}},
                     indent=2))
    return 0


def _add_niah(subparsers) -> None:
    p = subparsers.add_parser(
        "niah", help="Needle-in-a-haystack accuracy (context length x depth), optionally with heads masked.",
        description="Greedy NIAH evaluation; an answer counts as correct when its ROUGE-1 recall of the needle "
        "answer exceeds 0.5. Mask heads with --heads or with --head-scores plus a selection.",
    )
    _add_model_argument(p)
    _add_niah_arguments(p, lengths="1024", depths="10,30,50,70,90")
    from trl_retmask.cli_stages import _add_selection_arguments

    _add_selection_arguments(p, scores_default_help="default: the model's bundled scores; no mask without a "
                             "selection argument")
    p.set_defaults(func=_run_niah)


# Each entry registers one subcommand; other modules' subcommands are appended here.
_REGISTRARS = [_add_detect, _add_niah]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-retmask", description="RetMask: retrieval-head masking + DPO for TRL.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from trl_retmask.cli_stages import REGISTRARS as _STAGE_REGISTRARS  # heads, export, pairs, train, eval

    for register in [*_REGISTRARS, *_STAGE_REGISTRARS]:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):  # only `train` forwards TRL-style arguments
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 1
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
