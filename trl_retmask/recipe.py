"""Shared logic of the `recipes/*.py` scripts: argument parsing, prompt loading, head scores, trainer, NIAH, Hub.

A recipe is a dict of defaults for (`RetMaskScriptArguments`, `RetMaskConfig`, `ModelConfig`) plus a call to
`main(defaults)`: TRL's parser reads them, a `--config file.yaml` overrides them and the command line overrides both,
exactly as in TRL's own `trl/scripts/dpo.py`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Columns a prompt is read from, in this order, when `prompt_column` is not given. Chat-log datasets
# (LMSYS-Chat-1M and its -Synth derivative: `conversation`) contribute their first user turn.
PROMPT_COLUMNS = ("prompt", "messages", "conversation", "conversations", "instruction", "question", "text")


# The paper's DPO settings for Llama-3.1-8B-Instruct (MISSION.md step 4), shared by the 7-8B recipes.
PAPER_DPO_DEFAULTS: dict[str, Any] = dict(
    learning_rate=5e-7,
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs={"min_lr": 5e-8},
    weight_decay=0.1,
    num_train_epochs=2,
    warmup_steps=0.1,  # a float < 1 is a ratio of the total steps
    adam_beta2=0.95,
    bf16=True,
    gradient_checkpointing=True,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=64,  # x 2 x 4 GPUs = 512 pairs per optimizer step
    # Pair sampling: temperature 0.6, top_p 1.0, one sample each (RetMaskConfig's defaults, stated for the record)
    temperature=0.6,
    top_p=1.0,
    generation_batch_size=16,
    dataset_name="tokyotech-llm/lmsys-chat-1m-synth",
    logging_steps=1,
    save_strategy="epoch",
    report_to="none",
)


# The embedded model, whole pipeline on a CPU in under 20 minutes (recipes/smollm2.py, `trl-retmask train`).
SMOLLM2_DEFAULTS: dict[str, Any] = dict(
    model_name_or_path="smollm2-135m-instruct",
    output_dir="smollm2-135m-instruct-RetMask",
    # detection: 2 lengths x 3 depths x 3 needles = 18 NIAH samples
    detect_heads=True,
    detect_context_lengths=[512, 1024],
    detect_depths=[0.0, 50.0, 100.0],
    # NIAH before/after on depths not used for detection: 3 depths x 3 needles = 9 samples, three times
    niah_eval=True,
    niah_context_lengths=[1024],
    niah_depths=[25.0, 75.0, 90.0],
    # pairs: the shipped prompt set, the paper's sampling, short answers for a CPU
    dataset_name=None,
    max_prompts=32,
    mask_top_k=10,
    max_new_tokens=64,
    temperature=0.6,
    top_p=1.0,
    generation_batch_size=16,
    # DPO sized for a 135M model on 2 cores (fp32, no checkpointing: RetMaskConfig's CPU defaults)
    learning_rate=1e-5,
    lr_scheduler_type="cosine",
    warmup_steps=0.1,
    weight_decay=0.1,
    adam_beta2=0.95,
    num_train_epochs=1,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_length=512,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    seed=0,
)

RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "smollm2": SMOLLM2_DEFAULTS,
    "llama31": dict(PAPER_DPO_DEFAULTS, model_name_or_path="meta-llama/Llama-3.1-8B-Instruct",
                    output_dir="Llama-3.1-8B-Instruct-RetMask"),
    "qwen3": dict(PAPER_DPO_DEFAULTS, model_name_or_path="Qwen/Qwen3-8B", output_dir="Qwen3-8B-RetMask",
                  enable_thinking=False),
    "olmo3": dict(PAPER_DPO_DEFAULTS, model_name_or_path="allenai/Olmo-3-7B-Instruct",
                  output_dir="Olmo-3-7B-Instruct-RetMask", detect_heads=True,
                  detect_context_lengths=[1024, 4096, 16384], detect_depths=[0.0, 25.0, 50.0, 75.0, 100.0]),
}
"""Defaults of each recipe (recipes/<name>.py and `trl-retmask train --recipe <name>`)."""


@dataclass
class RetMaskScriptArguments:
    r"""
    Script arguments of the RetMask recipes (TRL's `ScriptArguments` fields plus the RetMask pipeline stages).

    Parameters:
        dataset_name (`str`, *optional*):
            Prompt dataset: a Hub id, a local directory (`save_to_disk` or data files) or a `.json`/`.jsonl`/
            `.jsonl.gz`/`.parquet`/`.csv` file. `None` uses the prompt set shipped with the package.
        dataset_config (`str`, *optional*):
            Dataset configuration name (`name` of `datasets.load_dataset`).
        dataset_data_files (`str`, *optional*):
            `data_files` of `datasets.load_dataset`, for Hub repositories that hold several files.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split the prompts come from.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Split used for evaluation when `eval_strategy` is not `"no"`.
        dataset_streaming (`bool`, *optional*, defaults to `False`):
            Stream the dataset (then `max_prompts` rows are read and materialised).
        prompt_column (`str`, *optional*):
            Column holding the prompt (a string or a list of chat messages, of which the first user turn is kept).
            `None` tries `prompt`, `messages`, `conversation`, `conversations`, `instruction`, `question`, `text`.
        max_prompts (`int`, *optional*):
            Use only the first this-many prompts (after dropping empty ones).
        enable_thinking (`bool`, *optional*):
            Passed to the chat template as `enable_thinking` (Qwen3: `False` disables the thinking block).
        detect_heads (`bool`, *optional*, defaults to `False`):
            Detect the retrieval heads with NIAH before training instead of reading `head_scores`/bundled scores.
        detect_context_lengths (`list[int]`, *optional*, defaults to `[512, 1024]`):
            Context lengths (tokens) of the detection samples.
        detect_depths (`list[float]`, *optional*, defaults to `[0, 25, 50, 75, 100]`):
            Needle depths (percent) of the detection samples.
        niah_eval (`bool`, *optional*, defaults to `False`):
            Evaluate NIAH accuracy before and after training (on depths not used for detection).
        niah_context_lengths (`list[int]`, *optional*, defaults to `[1024]`):
            Context lengths of the NIAH evaluation.
        niah_depths (`list[float]`, *optional*, defaults to `[10, 30, 50, 70, 90]`):
            Needle depths of the NIAH evaluation.
        niah_max_new_tokens (`int`, *optional*, defaults to `32`):
            Greedy answer length in detection and NIAH evaluation.
        ignore_bias_buffers (`bool`, *optional*, defaults to `False`):
            DDP work-around for boolean buffers (as in TRL's scripts).
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Prompt dataset (Hub id, directory or file)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_data_files: str | None = field(default=None, metadata={"help": "`data_files` for `load_dataset`."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the training prompts."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split of the evaluation prompts."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the prompt."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    enable_thinking: bool | None = field(
        default=None, metadata={"help": "Chat-template `enable_thinking` (False disables Qwen3 thinking)."}
    )
    detect_heads: bool = field(default=False, metadata={"help": "Detect retrieval heads (NIAH) before training."})
    detect_context_lengths: list[int] = field(
        default_factory=lambda: [512, 1024], metadata={"help": "Context lengths of the detection samples."}
    )
    detect_depths: list[float] = field(
        default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0], metadata={"help": "Needle depths for detection."}
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

    def __post_init__(self):
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"`max_prompts` must be >= 1, got {self.max_prompts}.")
        if not self.detect_context_lengths or not self.niah_context_lengths:
            raise ValueError("`detect_context_lengths` and `niah_context_lengths` need at least one length.")


# --------------------------------------------------------------------------------------------------- parsing
def make_parser(defaults: dict[str, Any] | None = None, prog: str | None = None, description: str | None = None):
    """TRL's parser over (script, RetMask, model) arguments, with the recipe's `defaults` installed."""
    from trl import ModelConfig, TrlParser

    from .config import RetMaskConfig

    parser = TrlParser((RetMaskScriptArguments, RetMaskConfig, ModelConfig), prog=prog, description=description)
    if defaults:
        unknown = parser.set_defaults_with_config(**defaults)
        if unknown:
            raise ValueError(f"Recipe defaults name unknown arguments: {unknown[::2]}. Fix the recipe's DEFAULTS.")
    return parser


def parse_args(defaults: dict[str, Any] | None = None, argv: list[str] | None = None, prog: str | None = None,
               description: str | None = None):
    """(script_args, training_args, model_args) from the command line over the recipe defaults."""
    parser = make_parser(defaults, prog=prog, description=description)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    check_parallelism(training_args)
    return script_args, training_args, model_args


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
        value = value if value is not None else (int(env) if env and env.isdigit() else 1)
        sizes[name] = value
    if sizes["cp_size"] > 1 or sizes["sp_size"] > 1:
        raise ValueError(
            f"Context/sequence parallelism is configured ({sizes}) but TRL's DPO loss, which RetMaskTrainer uses, "
            "does not support it: each rank would sum only its shard of a sequence's log-probs. Remove "
            "`parallelism_config` (cp_size/sp_size) from the accelerate config and fit long sequences with "
            "gradient checkpointing and ZeRO-3/FSDP2 (see docs/distributed.md)."
        )


# --------------------------------------------------------------------------------------------------- prompts
def _message_text(message) -> tuple[str | None, str | None]:
    if isinstance(message, dict):
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        return (str(role).lower() if role is not None else None), content
    return None, None


def first_user_turn(value) -> str | None:
    """The prompt text of one dataset cell: a string as is, or the first user message of a conversation."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):
        role, content = _message_text(value)
        return first_user_turn(content) if role in (None, "user", "human") else None
    if isinstance(value, (list, tuple)):
        for message in value:
            role, content = _message_text(message)
            if role in ("user", "human") and isinstance(content, str) and content.strip():
                return content.strip()
    return None


def _load_raw_dataset(script_args, split: str):
    from datasets import load_dataset, load_from_disk

    name = script_args.dataset_name
    path = Path(name).expanduser() if name else None
    if path is not None and path.is_dir() and any((path / f).is_file() for f in (
            "dataset_info.json", "dataset_dict.json", "state.json")):  # written by `save_to_disk`
        return load_from_disk(str(path))
    if path is not None and path.is_file():
        suffixes = "".join(path.suffixes).lower()
        builder = ("json" if ".json" in suffixes else "parquet" if ".parquet" in suffixes
                   else "csv" if ".csv" in suffixes else None)
        if builder is None:
            raise ValueError(f"Cannot read prompt file {path}: use .json, .jsonl(.gz), .parquet or .csv.")
        return load_dataset(builder, data_files=str(path), split="train", streaming=script_args.dataset_streaming)
    return load_dataset(name, name=script_args.dataset_config, data_files=script_args.dataset_data_files,
                        split=split, streaming=script_args.dataset_streaming)


def shipped_prompts():
    """The prompt set shipped in the package (`data/prompts/*.jsonl`: general and document instructions)."""
    from datasets import Dataset

    folder = Path(__file__).parent / "data" / "prompts"
    rows = []
    for f in sorted(folder.glob("*.jsonl")):
        rows.extend(json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    if not rows:
        raise ValueError(f"No shipped prompt set found in {folder}; pass --dataset_name with your prompts.")
    return Dataset.from_list([r if isinstance(r, dict) else {"prompt": r} for r in rows])


def load_prompts(script_args, split: str | None = None, tokenizer=None):
    """Prompt-only conversational dataset `{"prompt": [{"role": "user", "content": ...}]}` for the trainer.

    A preference dataset (prompt/chosen/rejected, e.g. written by `trl-retmask pairs`) is returned as is: the
    trainer then skips generation.
    Chat logs contribute their first user turn (the paper's use of LMSYS-Chat-1M-Synth); empty prompts are dropped.
    With `enable_thinking` set (Qwen3), the prompts are rendered here through the chat template with that option,
    so that pair generation and DPO tokenization both see exactly the same prompt text.
    """
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    split = split or script_args.dataset_train_split
    raw = shipped_prompts() if script_args.dataset_name is None else _load_raw_dataset(script_args, split)
    if isinstance(raw, (DatasetDict, IterableDatasetDict)):
        if split not in raw:
            raise ValueError(f"Dataset {script_args.dataset_name!r} has no split {split!r} (has {list(raw)}).")
        raw = raw[split]
    columns = list(raw.column_names or []) if getattr(raw, "column_names", None) else None
    if columns and {"prompt", "chosen", "rejected"} <= set(columns):  # ready pairs (e.g. `trl-retmask pairs`)
        if script_args.max_prompts is not None:
            raw = raw.take(script_args.max_prompts)
        return raw
    column = script_args.prompt_column
    if column is None:
        candidates = [c for c in PROMPT_COLUMNS if columns is None or c in columns]
        if not candidates:
            raise ValueError(f"No prompt column in {script_args.dataset_name!r} (columns: {columns}). Name it with "
                             f"--prompt_column (tried {', '.join(PROMPT_COLUMNS)}).")
        column = candidates[0]
    elif columns is not None and column not in columns:
        raise ValueError(f"--prompt_column {column!r} is not a column of the dataset (columns: {columns}).")

    prompts = []
    for row in raw:
        text = first_user_turn(row.get(column))
        if text:
            prompts.append(text)
        if script_args.max_prompts is not None and len(prompts) >= script_args.max_prompts:
            break
    if not prompts:
        raise ValueError(f"No non-empty prompt in column {column!r} of {script_args.dataset_name or 'the shipped set'}.")
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
    if script_args.enable_thinking is not None:
        if tokenizer is None:
            raise ValueError("`enable_thinking` renders prompts with the chat template: pass the tokenizer.")
        rows = [{"prompt": tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False,
                                                         enable_thinking=script_args.enable_thinking)}
                for r in rows]
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------- head scores
def resolve_head_scores(script_args, training_args, model_args, model=None, tokenizer=None):
    """The `HeadScores` to mask: `--head_scores` (file or model id), detection, or the bundled file of the model."""
    from .scores import HeadScores

    if training_args.head_scores:
        return HeadScores.from_pretrained(training_args.head_scores)
    if script_args.detect_heads:
        if model is None:
            raise ValueError("Detection needs the model; call resolve_head_scores after loading it.")
        return detect_heads(script_args, training_args, model, tokenizer)
    try:
        return HeadScores.from_pretrained(model_args.model_name_or_path)
    except ValueError as e:
        raise ValueError(f"{e} Or run this recipe with --detect_heads, or pass --head_scores FILE.") from None


def detect_heads(script_args, training_args, model, tokenizer):
    """Run NIAH detection on the model (split across processes under accelerate) and save the scores."""
    from .detection import detect_retrieval_heads

    out = Path(training_args.output_dir) / "detection"
    scores = detect_retrieval_heads(
        model, tokenizer, context_lengths=script_args.detect_context_lengths, depths=script_args.detect_depths,
        max_new_tokens=script_args.niah_max_new_tokens, output_dir=str(out),
    )
    scores.save(out / "head_scores.json")
    return scores


def select_heads(training_args, scores) -> list[tuple[int, int]]:
    """The heads the trainer will mask (`RetMaskConfig.selection`), for NIAH before/after and the summary."""
    return scores.select(**training_args.selection)


# ------------------------------------------------------------------------------------------------ the pipeline
def load_model(model_args, training_args):
    """Policy and tokenizer; embedded names (`smollm2-135m-instruct`) resolve to the converted checkpoint."""
    from .models import load_model_and_tokenizer

    kwargs = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    if training_args.model_init_kwargs and isinstance(training_args.model_init_kwargs, dict):
        kwargs.update(training_args.model_init_kwargs)
    if model_args.model_revision == "main":
        kwargs.pop("revision")
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        **kwargs,
    )
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(model, "hf_device_map", None) is None and not is_deepspeed_zero3_enabled():
        model.to(training_args.device)  # detection, NIAH and pair generation run before the Trainer would move it
    return model, tokenizer


def build_trainer(script_args, training_args, model_args, model=None, tokenizer=None, head_scores=None,
                  train_dataset=None, eval_dataset=None):
    """A `RetMaskTrainer` ready to `train()`: loads what is not given (model, prompts, scores)."""
    from trl import get_peft_config

    from .trainer import RetMaskTrainer

    if model is None:
        model, tokenizer = load_model(model_args, training_args)
    if head_scores is None:
        head_scores = resolve_head_scores(script_args, training_args, model_args, model, tokenizer)
    head_scores.validate(model)
    if train_dataset is None:
        train_dataset = load_prompts(script_args, tokenizer=tokenizer)
    if eval_dataset is None and training_args.eval_strategy != "no":
        eval_dataset = load_prompts(script_args, split=script_args.dataset_test_split, tokenizer=tokenizer)
    trainer = RetMaskTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, peft_config=get_peft_config(model_args),
        head_scores=None if training_args.head_scores else head_scores,  # the trainer refuses them twice
    )
    if script_args.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer


def niah_accuracy(script_args, model, tokenizer, heads=None, output_dir=None) -> dict:
    """NIAH accuracy of `model` (optionally with `heads` masked) on the evaluation grid (grid PNG in `output_dir`)."""
    from .niah import evaluate_niah

    if output_dir is not None:  # fresh: the per-sample files would otherwise resume a previous run's answers
        import shutil

        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            shutil.rmtree(output_dir, ignore_errors=True)
        state.wait_for_everyone()
    was_training = model.training
    model.eval()
    result = evaluate_niah(model, tokenizer, heads=heads, context_lengths=script_args.niah_context_lengths,
                           depths=script_args.niah_depths, max_new_tokens=script_args.niah_max_new_tokens,
                           output_dir=output_dir)
    model.train(was_training)
    return {"accuracy": result["accuracy"], "num_samples": result["num_samples"],
            "grid": {f"{length}@{depth:g}": acc for (length, depth), acc in result["grid"].items()}}


def run(script_args, training_args, model_args) -> dict:
    """The whole recipe: scores (bundled or detected), NIAH before, RetMask training, save, NIAH after, push."""
    from .trainer import RetMaskTrainer  # noqa: F401  (import errors surface now, not after detection)

    t0 = time.time()
    model, tokenizer = load_model(model_args, training_args)
    head_scores = resolve_head_scores(script_args, training_args, model_args, model, tokenizer)
    head_scores.validate(model)
    heads = select_heads(training_args, head_scores)
    summary: dict[str, Any] = {"model": model_args.model_name_or_path, "masked_heads": [f"{layer}-{head}" for layer, head in heads],
                               "sparsity": head_scores.sparsity(), "timings_s": {"load_and_scores": time.time() - t0}}
    is_main = int(os.environ.get("RANK", "0")) == 0
    if script_args.niah_eval:
        t = time.time()
        out = Path(training_args.output_dir)
        summary["niah_before"] = niah_accuracy(script_args, model, tokenizer, output_dir=out / "niah_before")
        summary["niah_before_masked"] = niah_accuracy(script_args, model, tokenizer, heads=heads,
                                                      output_dir=out / "niah_before_masked")
        summary["timings_s"]["niah_before"] = time.time() - t

    t = time.time()
    trainer = build_trainer(script_args, training_args, model_args, model=model, tokenizer=tokenizer,
                            head_scores=head_scores)
    summary["timings_s"]["pairs_and_setup"] = time.time() - t
    t = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    summary["timings_s"]["train"] = time.time() - t
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")

    if script_args.niah_eval:
        t = time.time()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        summary["niah_after"] = niah_accuracy(script_args, policy, tokenizer,
                                              output_dir=Path(training_args.output_dir) / "niah_after")
        summary["timings_s"]["niah_after"] = time.time() - t
    summary["pair_stats"] = {split: stats.to_dict() for split, stats in trainer.pair_stats.items()}
    summary["timings_s"]["total"] = time.time() - t0
    if is_main:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(training_args.output_dir) / "retmask_recipe_summary.json", "w") as f:
            json.dump(summary, f, indent=2, default=str)
        trainer.accelerator.print(json.dumps({k: v for k, v in summary.items() if k != "sparsity"}, indent=2,
                                             default=str))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):
        trainer.end()
    return summary


def main(defaults: dict[str, Any] | None = None, argv: list[str] | None = None, prog: str | None = None,
         description: str | None = None) -> dict:
    """Entry point of a recipe script: parse (defaults < --config < command line) and run."""
    script_args, training_args, model_args = parse_args(defaults, argv, prog=prog, description=description)
    return run(script_args, training_args, model_args)
