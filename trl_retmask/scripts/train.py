"""`trl-retmask train`: the RetMask recipe end to end, like TRL's `trl dpo` script.

```bash
trl-retmask train --recipe smollm2 --output_dir outputs/smollm2-retmask        # embedded model, CPU
trl-retmask train --recipe llama31 --accelerate_config zero1 --dataset_name ./lmsys-chat-1m-synth.jsonl.gz
python recipes/smollm2.py --max_prompts 16                                      # the same, from the checkout
```

1. loads the policy (`ModelConfig`: dtype, attention, revision, quantization), 2. reads the head scores
(`--head_scores`, the model's bundled ones) or detects them (`--detect_heads`), 3. measures NIAH accuracy with and
without the heads masked (`--niah_eval`), 4. generates the pairs and trains (`RetMaskTrainer`), 5. saves, measures
NIAH again, writes `retmask_recipe_summary.json` and pushes (`--push_to_hub`).

Defaults: `RetMaskConfig`/`ModelConfig` < the recipe's YAML (`recipes/<name>.yaml`) < `--config file.yaml` < the
command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..detection import AUTHORS_CONTEXT_LENGTHS, AUTHORS_DEPTHS
from ..distributed import (
    gathered_for_generation,
    limit_cpu_training_memory,
    process_state,
    unwrapped_for_generation,
)
from ..heads import format_heads
from ..models import load_model_and_tokenizer, model_init_kwargs
from ..selection import select_heads
from ..validation import check_int
from . import config_argv, run_stage
from .common import (
    OverwriteArguments,
    PromptDataArguments,
    check_list,
    check_one_disk,
    check_output_dir,
    detects_heads,
    stage_parser,
)
from .recipe_files import (  # noqa: F401 - recipes/*.py and scripts import them from here
    RECIPE_DIRS,
    accelerate_config_path,
    recipe_defaults,
    recipe_names,
    recipe_path,
)


@dataclass
class TrainScriptArguments(PromptDataArguments, OverwriteArguments):
    r"""
    Script arguments of `trl-retmask train` and the recipes (besides `RetMaskConfig` and `ModelConfig`).

    Parameters:
        recipe (`str`, *optional*):
            Recipe whose YAML defaults apply: the name of a `recipes/<name>.yaml` (e.g. `smollm2`), or a YAML file.
        detect_heads (`bool`, *optional*, defaults to `False`):
            Detect the retrieval heads with NIAH before training instead of reading `head_scores`/bundled scores.
        detect_context_lengths (`list[int]`, *optional*, defaults to the authors' 20 lengths from 0 to 5000):
            Context lengths (tokens, a 200-token buffer included, as in the authors' detector) of the detection
            samples (`trl_retmask.detection.AUTHORS_CONTEXT_LENGTHS`).
        detect_depths (`list[float]`, *optional*, defaults to the authors' 10 depths from 0 to 100):
            Needle depths (percent) of the detection samples (`trl_retmask.detection.AUTHORS_DEPTHS`).
        detect_max_new_tokens (`int`, *optional*, defaults to `50`):
            Greedy tokens decoded per detection sample, without stopping at EOS (the authors' budget).
        niah_eval (`bool`, *optional*, defaults to `False`):
            Evaluate NIAH accuracy before and after training (on depths not used for detection).
        niah_context_lengths (`list[int]`, *optional*, defaults to `[1024]`):
            Context lengths of the NIAH evaluation.
        niah_depths (`list[float]`, *optional*, defaults to `[10, 30, 50, 70, 90]`):
            Needle depths of the NIAH evaluation.
        niah_max_new_tokens (`int`, *optional*, defaults to `32`):
            Greedy answer length in the NIAH evaluation.
        ignore_bias_buffers (`bool`, *optional*, defaults to `False`):
            DDP work-around for boolean buffers (as in TRL's scripts).
        overwrite (`bool`, *optional*, defaults to `False`):
            Discard the records of another detection run in `<output_dir>/detection` (`--detect_heads`).
        compare_heads_with (`str`, *optional*):
            A model with published head scores (bundled name, file or Hub repo); the run summary reports how many
            heads the same selection takes from them beside the heads masked here (the olmo3 recipe compares its
            detected Olmo-3-7B-Instruct heads with the authors' Olmo-3-7B-Think scores).
    """

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Recipe whose YAML defaults apply: the name of a "
            "recipes/<name>.yaml (e.g. smollm2), or a YAML file."
        },
    )
    detect_heads: bool = field(default=False, metadata={"help": "Detect retrieval heads (NIAH) before training."})
    detect_context_lengths: list[int] = field(
        default_factory=lambda: list(AUTHORS_CONTEXT_LENGTHS),
        metadata={"help": "Context lengths of the detection samples (default: the authors' 0..5000 grid)."},
    )
    detect_depths: list[float] = field(
        default_factory=lambda: [float(d) for d in AUTHORS_DEPTHS],
        metadata={"help": "Needle depths for detection (default: the authors' 10 depths)."},
    )
    detect_max_new_tokens: int = field(
        default=50, metadata={"help": "Greedy tokens per detection sample, no EOS stop (the authors' 50)."}
    )
    niah_eval: bool = field(default=False, metadata={"help": "NIAH accuracy before and after training."})
    niah_context_lengths: list[int] = field(
        default_factory=lambda: [1024], metadata={"help": "Context lengths of the NIAH evaluation."}
    )
    niah_depths: list[float] = field(
        default_factory=lambda: [10.0, 30.0, 50.0, 70.0, 90.0], metadata={"help": "Needle depths of NIAH evaluation."}
    )
    niah_max_new_tokens: int = field(default=32, metadata={"help": "Greedy answer length in NIAH."})
    ignore_bias_buffers: bool = field(default=False, metadata={"help": "DDP work-around for boolean buffers."})
    compare_heads_with: str | None = field(
        default=None,
        metadata={
            "help": "Published head scores (model or file) whose selection size the run summary "
            "reports beside the heads masked here."
        },
    )

    def __post_init__(self):
        check_list("detect_context_lengths", self.detect_context_lengths, minimum=0, integer=True)
        check_list("niah_context_lengths", self.niah_context_lengths, minimum=1, integer=True)
        check_list("detect_depths", self.detect_depths, minimum=0, maximum=100)
        check_list("niah_depths", self.niah_depths, minimum=0, maximum=100)
        check_int("niah_max_new_tokens", self.niah_max_new_tokens, minimum=1)
        check_int("detect_max_new_tokens", self.detect_max_new_tokens, minimum=1)
        super().__post_init__()


# ------------------------------------------------------------------------------------------------- parsing
def make_parser(
    subparsers=None, prog: str | None = None, recipe: str | None = None, defaults: dict[str, Any] | None = None
):
    """TRL's parser over (script, RetMask, model) arguments, with a recipe's YAML defaults (or `defaults`) set."""
    from trl import ModelConfig

    from ..config import RetMaskConfig

    parser = stage_parser("train", (TrainScriptArguments, RetMaskConfig, ModelConfig), subparsers, prog, __doc__)
    defaults = {**(recipe_defaults(recipe) if recipe else {}), **(defaults or {})}
    if recipe:
        defaults.setdefault("recipe", str(recipe))
    if defaults:
        unknown = parser.set_defaults_with_config(**defaults)
        if unknown:
            raise ValueError(f"Recipe defaults name unknown arguments: {unknown[::2]}. Fix the recipe's YAML.")
    return parser


def recipe_in(argv: list[str]) -> str | None:
    """The `--recipe` value of a command line (read before parsing, since it sets the parser's defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    return pre.parse_known_args(argv)[0].recipe


def parse_args(
    argv: list[str] | None = None,
    prog: str | None = None,
    recipe: str | None = None,
    defaults: dict[str, Any] | None = None,
):
    """(script_args, training_args, model_args): defaults < recipe YAML < `--config` < command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(prog=prog, recipe=recipe_in(argv) or recipe, defaults=defaults)
    with config_argv(argv) as args:
        parsed = parser.parse_args_and_config(args=args)
    check_args(*parsed)
    return parsed


def check_args(script_args, training_args, model_args) -> None:
    """What the dataclasses cannot check alone, before any model work."""
    check_parallelism(training_args)
    check_niah_under_fsdp(script_args, training_args)
    check_quantized_training(training_args, model_args)
    check_output_dirs(training_args)


def check_output_dirs(training_args) -> None:
    """`output_dir` and the pair cache can be written: refused before the model loads, not after minutes."""
    check_output_dir("output_dir", training_args.output_dir, read_only_ok=False)
    if training_args.cache_pairs:
        check_output_dir("pairs_cache_dir", training_args.pairs_dir)


def check_parallelism(training_args) -> None:
    """Refuse context/sequence parallelism before any model work: TRL's DPO loss does not support it.

    `DPOTrainer` (TRL 1.16) sums each sequence's log-probs on one rank; with the sequence sharded across ranks
    (accelerate's `cp_size`/`sp_size`) the per-sequence sums would be partial and `completion_mask` is not sharded,
    so the loss would be wrong or crash. Long sequences use gradient checkpointing + ZeRO-3/FSDP2 instead.
    """
    sizes = {}
    pc = getattr(training_args, "parallelism_config", None)
    for name in ("cp_size", "sp_size"):
        env = os.environ.get(f"PARALLELISM_CONFIG_{name.upper()}")
        value = getattr(pc, name, None) if pc is not None else None
        sizes[name] = value if value is not None else (int(env) if env and env.isdigit() else 1)
    if sizes["cp_size"] > 1 or sizes["sp_size"] > 1:
        raise ValueError(
            f"Context/sequence parallelism is configured ({sizes}) but TRL's DPO loss, which RetMaskTrainer uses, "
            "does not support it: each rank would sum only its shard of a sequence's log-probs. Remove "
            "`parallelism_config` (cp_size/sp_size) from the accelerate config and fit long sequences with "
            "gradient checkpointing and ZeRO-3/FSDP2 (see docs/distributed.md)."
        )


def check_niah_under_fsdp(script_args, training_args) -> None:
    """NIAH after training would decode through FSDP's sharded policy: every forward all-gathers across processes,
    which decode different samples and stop at different steps, so they would hang. Refused before any model work.
    (Detection and NIAH before training run on the full model, which FSDP shards only inside the Trainer.)"""
    fsdp = training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if script_args.niah_eval and fsdp:
        raise ValueError(
            "--niah_eval cannot run under FSDP: after training, NIAH would decode through the sharded policy, whose "
            "all-gathers hang when processes decode different samples. Set --niah_eval False and evaluate the saved "
            "model with `trl-retmask niah --model_name_or_path <output_dir>`."
        )


def check_quantized_training(training_args, model_args) -> None:
    """A 4/8-bit model trains only through an adapter (TRL: "Works only with LoRA"); unusable quantization is
    refused by `model_init_kwargs` before anything loads."""
    model_init_kwargs(model_args)
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise ValueError(
            "A quantized model (--load_in_4bit/--load_in_8bit) trains only with an adapter: add --use_peft True (LoRA)."
        )


# ------------------------------------------------------------------------------------------------ pipeline
def load_model(model_args, training_args):
    """Policy and tokenizer with every `ModelConfig` loading option (plus `model_init_kwargs`), on the training
    device: detection, NIAH and pair generation run before the Trainer would move it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    extra = training_args.model_init_kwargs if isinstance(training_args.model_init_kwargs, dict) else {}
    model, tokenizer = load_model_and_tokenizer(model_args, trust_remote_code=training_args.trust_remote_code, **extra)
    if getattr(model, "hf_device_map", None) is None and not is_deepspeed_zero3_enabled():
        model.to(training_args.device)
    return model, tokenizer


def detect_heads(script_args, training_args, model, tokenizer):
    """NIAH detection on the loaded policy (split across processes under accelerate); scores saved in
    `<output_dir>/detection`."""
    from ..detection import detect_retrieval_heads

    out = Path(training_args.output_dir) / "detection"
    scores = detect_retrieval_heads(
        model,
        tokenizer,
        context_lengths=script_args.detect_context_lengths,
        depths=script_args.detect_depths,
        max_new_tokens=script_args.detect_max_new_tokens,
        output_dir=str(out),
        overwrite=script_args.overwrite,
    )
    if process_state().is_main_process:
        scores.save_pretrained(out)
    return scores


def resolve_heads(script_args, training_args, model, tokenizer):
    """(heads, scores), once per run: `--heads`, else the selection from `--head_scores`, else from detection when
    `--detect_heads`, else from the model's bundled scores (`select_heads`). The trainer takes both as they are."""
    detected = None
    if detects_heads(script_args, training_args):
        with gathered_for_generation(model):  # ZeRO-3 partitioned it at load: full weights for decoding
            detected = detect_heads(script_args, training_args, model, tokenizer)
    return select_heads(training_args, model, detected)


def niah_accuracy(script_args, model, tokenizer, heads=None, output_dir=None) -> dict:
    """NIAH accuracy of `model` (optionally with `heads` masked) on the evaluation grid, in a fresh `output_dir`."""
    from ..niah import evaluate_niah, named_grid

    state = process_state()
    if output_dir is not None:  # fresh: the per-sample files would otherwise resume a previous run's answers
        if state.is_main_process:
            shutil.rmtree(output_dir, ignore_errors=True)
        state.wait_for_everyone()
    was_training = model.training
    model.eval()
    result = evaluate_niah(
        model,
        tokenizer,
        heads=heads,
        context_lengths=script_args.niah_context_lengths,
        depths=script_args.niah_depths,
        max_new_tokens=script_args.niah_max_new_tokens,
        output_dir=output_dir,
    )
    model.train(was_training)
    return {"accuracy": result["accuracy"], "num_samples": result["num_samples"], "grid": named_grid(result["grid"])}


def compare_heads(heads, reference: str, training_args) -> dict:
    """The number of heads masked here beside the number the same selection takes from `reference`'s scores."""
    from ..scores import resolve_head_scores

    selection = {k: v for k, v in training_args.selection.items() if k in ("threshold", "top_k")}
    return {
        "selection": selection,
        "masked_here": len(heads),
        "reference": reference,
        "reference_heads": len(resolve_head_scores(reference).select(**selection)),
    }


def build_trainer(
    script_args,
    training_args,
    model_args,
    model=None,
    tokenizer=None,
    heads=None,
    head_scores=None,
    train_dataset=None,
    eval_dataset=None,
):
    """A `RetMaskTrainer` ready to `train()`: loads what is not given (model, prompts, heads and their scores)."""
    from trl import get_peft_config

    from ..prompts import load_prompts
    from ..trainer import RetMaskTrainer

    if model is None:
        model, tokenizer = load_model(model_args, training_args)
    if heads is None:
        heads, head_scores = resolve_heads(script_args, training_args, model, tokenizer)
    if train_dataset is None:
        train_dataset = load_prompts(script_args, tokenizer=tokenizer)
    if eval_dataset is None and training_args.eval_strategy != "no":
        eval_dataset = load_prompts(script_args, split=script_args.dataset_test_split, tokenizer=tokenizer)
    trainer = RetMaskTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **({} if training_args.heads else {"masked_heads": heads, "head_scores": head_scores}),
    )
    if script_args.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


def main(script_args: TrainScriptArguments, training_args, model_args) -> dict:
    """The whole recipe: scores (bundled or detected), NIAH before, RetMask training, save, NIAH after, push."""
    from ..prompts import load_prompts

    t0 = time.time()
    check_one_disk(script_args, training_args)  # a multi-node job without a shared disk stops here, in seconds
    limit_cpu_training_memory(training_args.device)  # freed activations go back to the OS
    model, tokenizer = load_model(model_args, training_args)
    # Prompts before detection and NIAH: a dataset without usable user turns must fail in seconds, not hours.
    train_dataset = load_prompts(script_args, tokenizer=tokenizer)
    heads, head_scores = resolve_heads(script_args, training_args, model, tokenizer)
    summary: dict[str, Any] = {
        "model": model_args.model_name_or_path,
        "masked_heads": format_heads(heads),
        "sparsity": head_scores.sparsity() if head_scores is not None else None,
        "timings_s": {"load_and_scores": time.time() - t0},
    }
    if script_args.compare_heads_with:
        summary["heads_compared"] = compare_heads(heads, script_args.compare_heads_with, training_args)
    out = Path(training_args.output_dir)
    if script_args.niah_eval:
        t = time.time()
        with gathered_for_generation(model):  # ZeRO-3 partitioned it at load: full weights for decoding
            summary["niah_before"] = niah_accuracy(script_args, model, tokenizer, output_dir=out / "niah_before")
            summary["niah_before_masked"] = niah_accuracy(
                script_args, model, tokenizer, heads=heads, output_dir=out / "niah_before_masked"
            )
        summary["timings_s"]["niah_before"] = time.time() - t

    t = time.time()
    trainer = build_trainer(
        script_args,
        training_args,
        model_args,
        model=model,
        tokenizer=tokenizer,
        heads=heads,
        head_scores=head_scores,
        train_dataset=train_dataset,
    )
    summary["timings_s"]["pairs_and_setup"] = time.time() - t
    t = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary["timings_s"]["train"] = time.time() - t
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")

    if script_args.niah_eval:
        t = time.time()
        with unwrapped_for_generation(trainer) as policy:  # ZeRO-3: gathered, without the engine's hooks
            summary["niah_after"] = niah_accuracy(script_args, policy, tokenizer, output_dir=out / "niah_after")
        summary["timings_s"]["niah_after"] = time.time() - t
    summary["pair_stats"] = {split: stats.to_dict() for split, stats in trainer.pair_stats.items()}
    summary["timings_s"]["total"] = time.time() - t0
    if trainer.accelerator.is_main_process:
        write_text(out / "retmask_recipe_summary.json", json.dumps(summary, indent=2, default=str))
        trainer.accelerator.print(
            json.dumps({k: v for k, v in summary.items() if k != "sparsity"}, indent=2, default=str)
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):
        trainer.end()
    return summary


def cli_main(argv: list[str] | None = None, prog: str = "trl-retmask train", recipe: str | None = None) -> int:
    """Parse (recipe YAML < `--config` < command line) and run, with the CLI's one error path."""
    return run_stage("train", lambda: main(*parse_args(argv, prog=prog, recipe=recipe)))


if __name__ == "__main__":
    sys.exit(cli_main())
